"""Cases the ``triton`` backend is known to fail: (case-id regex, reason with evidence).

A matching failure is reported XFAIL; a matching pass is OK (may_pass: the error depends on the
inputs).  The kernels are opbench's own; the entry is a limit of their float32 angles, fixable
by splitting the position into two float32 parts before multiplying by the frequency.
"""

KNOWN_FAILURES: list[tuple[str, str, bool]] = [
    (
        r"^ROPE\(.*,pos=(long|huge|\d+)\)",
        "kernels_rope computes theta = pos * omega in float32 in-kernel: off by up to "
        "|pos| * 2^-24 rad where the oracle uses float64 angles; measured (interpreter) nmse "
        "1.2e-6..1.5e-6 at positions in [3000, 2^18), 2.5e-6..3.8e-6 straddling 2^18, "
        "3.8e-3..6.5e-3 in [2^18, 2^24] (threshold 1e-6); the precision rule, judged against "
        "the oracle with float32 angles, passes (0 bad)",
        True,  # may_pass: NMSE just over the threshold below ~2^18 depends on the inputs
    ),
]
