"""Float64 NumPy oracles, one module per op family: the normative definition of every op.

``rope`` (RoPE, ggml and Hugging Face conventions), ``attention`` (contiguous and paged
attention, merge of partial results), ``kv_cache`` (OpenVINO GenAI eviction and key
re-rotation), ``copies`` (dtype rounding, SET_ROWS / GET_ROWS / CPY).  Modules here import only
NumPy, ml_dtypes and the standard library (tests/reference/test_imports.py enforces it); import
the submodule you need, e.g. ``from opbench.reference import attention``.
"""
