"""Cases the ``ggml`` backend is known to fail: (case-id regex, reason with evidence).

A matching failure is reported XFAIL; a matching pass is OK (may_pass: the
error depends on the inputs).  Both entries here are precision
limits of ggml's CPU kernels (ggml-python 0.0.45, vendored ggml 0.15.3), not adapter bugs: the
error depends on the random inputs, so some cases in each family pass by luck of the
draw.  The oracle is right in both; the scripts that reproduce the numbers are described in
docs/backends-torch-ggml.md.
"""

KNOWN_FAILURES: list[tuple[str, str, bool]] = [
    (
        r"^ROPE\(type=f32,",
        "ggml-cpu builds each token's angles as theta *= theta_scale, n_dims/2 float32 "
        "multiplications in a row (ops.cpp ggml_rope_cache_init), so pair i carries ~i ulp of "
        "relative angle error: measured 1.9e-4 rad at positions < 3000 (head_dim 128, base 1e4)"
        " vs 6.9e-6 for float32 angles computed directly; ~4% of f32 cases exceed the precision"
        " rule, by up to 2.9x",
        True,  # may_pass: whether a case crosses the bound depends on its inputs
    ),
    (
        r"^ATTN\(type=f16,",
        "with f16 V, ggml_flash_attn_ext (CPU) accumulates softmax(QK)*V in an f16 buffer "
        "(ops.cpp: VKQ16 += v*expf(s-M) via ggml_vec_mad_f16): nmse up to 2.1e-5 (threshold "
        "5e-6) at n_kv=1024; the same inputs with V upcast exactly to f32 give nmse 5.9e-13",
        True,  # may_pass: whether a case crosses the bound depends on its inputs
    ),
    (
        r"^ATTN\(type=f32,.*,mask=1,",
        "ggml_flash_attn_ext requires an F16 mask (ggml.c asserts mask->type == GGML_TYPE_F16),"
        " so an f32 additive mask is rounded to f16 first: max_err 2.9e-5 (bound 2.6e-6) vs "
        "the oracle, 7.1e-8 vs the oracle fed the f16-rounded mask",
        True,  # may_pass: whether a case crosses the bound depends on its inputs
    ),
    (
        r"^(SET_ROWS|GET_ROWS)\(type=(f16|bf16),type_src=\2,.*vals=special",
        "ggml's row ops go through f32 (ggml_get_rows always returns F32 rows for f16/bf16 "
        "sources; ggml_set_rows asserts F32 rows), so an f16/bf16 move is a widening plus a "
        "narrowing and NaN bits change: measured signalling 0x7c05 -> 0x7e05 and 0xff85 -> "
        "0xffc5 (quieted), and f16 GET_ROWS gives 0x7e00/0xfe00 for every NaN (payload "
        "dropped); numbers, infinities and -0.0 move bit-exactly (README \"The NaN rule\")",
        False,  # always: every special case holds signalling NaNs
    ),
    (
        r"^ROPE\(type=f16,.*,pos=(long|huge|\d+)\)",
        "the f32 entry's angle error (theta *= theta_scale, float32) grows with the position: "
        "f16 measured nmse 3.7e-5 at positions in [3000, 2^18), 1.05e-4 straddling 2^18, 0.106 "
        "in [2^18, 2^24] (threshold 1e-6), and past the precision rule from positions near "
        "8192 (4/16896 elements, max_err 1.35e-3 > 1.24e-3)",
        True,  # may_pass: NMSE just over the threshold below ~2^18 depends on the inputs
    ),
]
