"""The oracles depend on NumPy, ml_dtypes and the standard library only (README, Layout).

Every .py file under opbench/reference is parsed (never imported, so a forbidden import inside
a function or behind a try is caught too).  Relative imports may only reach sibling oracle
modules; dynamic imports (``importlib.import_module``, ``__import__``) are held to the same rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "opbench" / "reference"
ALLOWED_THIRD_PARTY = {"numpy", "ml_dtypes"}
OWN_PACKAGE = "opbench.reference"


def allowed(module: str) -> bool:
    root = module.split(".")[0]
    if root in ALLOWED_THIRD_PARTY or root in sys.stdlib_module_names:
        return True
    return module == OWN_PACKAGE or module.startswith(OWN_PACKAGE + ".")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute-or-marked module name) of every import in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
            elif node.level == 1:  # a sibling inside opbench.reference
                found.append((node.lineno, f"{OWN_PACKAGE}.{node.module or ''}".rstrip(".")))
            else:
                found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call) and _dynamic_import_target(node):
            found.append((node.lineno, _dynamic_import_target(node)))
    return found


def _dynamic_import_target(call: ast.Call) -> str | None:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "<?>"


def disallowed_imports(source: str) -> list[str]:
    tree = ast.parse(source)
    return [f"line {line}: {mod}" for line, mod in imported_modules(tree) if not allowed(mod)]


def reference_files() -> list[Path]:
    return sorted(REFERENCE_DIR.rglob("*.py"))


def test_reference_package_has_the_oracle_modules():
    names = {p.stem for p in reference_files()}
    assert {"__init__", "attention", "kv_cache", "copies"} <= names


@pytest.mark.parametrize("path", reference_files(), ids=lambda p: p.name)
def test_reference_imports_only_numpy_ml_dtypes_and_stdlib(path):
    bad = disallowed_imports(path.read_text())
    assert not bad, f"{path.name} imports outside numpy/ml_dtypes/stdlib: {bad}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch",
        "import scipy.special",
        "from pandas import DataFrame",
        "from opbench.harness import protocol",
        "from ..harness import protocol",
        "def f():\n    import cupy\n",
        "try:\n    import triton\nexcept ImportError:\n    pass\n",
        "import importlib\nimportlib.import_module('torch')",
        "__import__('ggml')",
    ],
)
def test_checker_flags_forbidden_imports(source):
    assert disallowed_imports(source)


@pytest.mark.parametrize(
    "source",
    ["import numpy as np", "from ml_dtypes import bfloat16", "import math, dataclasses",
     "from __future__ import annotations", "from .kv_cache import rotation_lut",
     "from opbench.reference import copies"],
)
def test_checker_accepts_allowed_imports(source):
    assert not disallowed_imports(source)
