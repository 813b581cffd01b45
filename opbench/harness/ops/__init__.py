"""One OpSpec per op: adding an op is one oracle, one module here and its line in SPECS, one
protocol method and one method per backend (docs/adding-an-op.md)."""

from __future__ import annotations

from typing import Any

from ..cases import Case, OpSpec
from .attn import AttnSpec
from .copies import CpySpec, GetRowsSpec, SetRowsSpec
from .copy_async import CopyAsyncSpec
from .kv_rotate import KvRotateSpec
from .rope import RopeSpec

SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (
    RopeSpec(), AttnSpec(), KvRotateSpec(), SetRowsSpec(), GetRowsSpec(), CpySpec(),
    CopyAsyncSpec())}


def support(backend: Any, case: Case) -> bool | str:
    """True, or why ``backend`` cannot run ``case``: its own refusal (``Backend.supports``), or
    the op's method (``OpSpec.method``) not implemented by the backend's class."""
    verdict = backend.supports(case)
    if verdict is not True:
        return verdict
    spec = SPECS.get(case.op)
    if spec is None or not backend.implements(spec.method):
        return f"{backend.name} does not implement {case.op}"
    return True


__all__ = ["SPECS", "support"]
