"""Multi-device, stateful scenarios: a decode loop through a small transformer, judged at every
step, layer and output against the same model in float64 (docs/scenarios.md)."""
