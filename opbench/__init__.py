"""opbench: float64 oracles judge LLM-inference ops on real backends."""

__version__ = "0.1.0"
