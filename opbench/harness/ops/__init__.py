"""One OpSpec per op; adding an op means one oracle, one module here, one backend method."""

from __future__ import annotations

from ..cases import OpSpec
from .attn import AttnSpec
from .copies import CpySpec, GetRowsSpec, SetRowsSpec
from .kv_rotate import KvRotateSpec
from .rope import RopeSpec

SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (
    RopeSpec(), AttnSpec(), KvRotateSpec(), SetRowsSpec(), GetRowsSpec(), CpySpec())}

__all__ = ["SPECS"]
