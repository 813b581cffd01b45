"""Cases the ``torch`` backend is known to fail: (case-id regex, reason with evidence).

A matching failure is reported XFAIL; a matching pass is OK (may_pass: the
error depends on the inputs).  The entry here is a precision
limit of the Hugging Face code the backend reproduces, not an adapter bug: whether a case
exceeds the bound depends on its random inputs, so some cases of the family pass.
"""

KNOWN_FAILURES: list[tuple[str, str, bool]] = [
    (
        r"^ROPE\(type=(f16|bf16),",
        "HF's LLM RoPE (apply_rotary_pos_emb) casts cos/sin to the input dtype and computes "
        "q*cos + rotate_half(q)*sin in f16/bf16: up to 3 roundings per element instead of 1. "
        "Full table (torch 2.13 CPU): 429/1280 f16 and 338/1280 bf16 cases exceed the "
        "precision rule, by up to 1.91x (f16) and 1.55x (bf16); the same code with float32 "
        "math and one final rounding (TorchBackend(rope_upcast=True), HF's vision-tower style) "
        "passes all 2560",
        True,  # may_pass: whether a case crosses the bound depends on its inputs
    ),
    (
        r"^ROPE\(type=f32,.*,pos=(long|huge|\d+)\)",
        "HF's RoPE (ROPE_INIT_FUNCTIONS inv_freq, then position_ids @ inv_freq) computes the "
        "angles in float32: measured nmse 1.3e-6..1.5e-6 at positions in [3000, 2^18), "
        "2.5e-6..3.8e-6 straddling 2^18 and 5.6e-3..6.5e-3 in [2^18, 2^24] (threshold 1e-6); "
        "the precision rule, judged against the oracle with float32 angles, passes (0 bad)",
        True,  # may_pass: NMSE just over the threshold below ~2^18 depends on the inputs
    ),
]
