"""Host-side helpers several backends share: argument checks (``arg_checks``), plain array
views (``arrays``), the YaRN correction range (``yarn``) and the NumPy scenario primitives
(``numpy_model``).  Backends import these, never each other's internals."""
