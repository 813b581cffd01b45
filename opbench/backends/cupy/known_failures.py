"""Cases the cupy backend is known to fail: (case-id regex, reason with evidence).

Empty: nothing has run on a GPU yet (see docs/backends-cupy.md), so no failure is known."""

KNOWN_FAILURES: list[tuple[str, str]] = []
