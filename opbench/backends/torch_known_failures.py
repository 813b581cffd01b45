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
]
