"""Cases and op specs: what to run (data) and how to run and judge it (one OpSpec per op).

A case is op + params (shapes, dtypes, variants) + seed.  Its id is stable and greppable,
``ROPE(type=f32,ne=[128,4,9],n_dims=128,mode=neox,...)``; the seed comes from the id and the
run's ``--seed``, so a case gets the same inputs whatever table it sits in.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from opbench.protocol import Backend, SizeThreshold, numpy_dtype

from .compare import Tolerance, default_tolerance

#: perf mode's size classes: real model shapes, or the same structure on tiny shapes
PERF_SIZES = ("full", "small")


def format_value(value: Any) -> str:
    """Render a param value the way test-backend-ops prints it: 10000 not 10000.0, [a,b]."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Case:
    op: str
    items: tuple[tuple[str, Any], ...]  # ordered (name, value) pairs; order is the id's order

    @staticmethod
    def make(op: str, **params: Any) -> Case:
        frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items())
        return Case(op, frozen)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.items)

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)

    @property
    def id(self) -> str:
        body = ",".join(f"{k}={format_value(v)}" for k, v in self.items)
        return f"{self.op}({body})"

    @property
    def dtype(self) -> str:
        return str(self.get("type", "f32"))

    def seed(self, run_seed: int = 0) -> int:
        return zlib.crc32(self.id.encode()) ^ (run_seed * 0x9E3779B1 & 0xFFFFFFFF)

    def __str__(self) -> str:
        return self.id


@dataclass
class Inputs:
    """Host arrays handed to the backend (already in storage dtypes) plus plain values."""

    arrays: dict[str, np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSpec:
    shape: tuple[int, ...]
    dtype: str
    init_from: str | None = None  # in/out buffer: starts as this input (in-place ops)


class OpSpec:
    """Everything opbench knows about one op: how it is swept, fed, run, judged and timed.

    Subclasses are data plus small methods; nothing about an op lives outside its spec (see
    docs/adding-an-op.md)."""

    name: str = ""
    #: the ``Backend`` method that runs the op (protocol.py); a backend implements the op when
    #: its class overrides that method
    method: str = ""
    #: params whose every value the --quick subset must cover
    variant_keys: tuple[str, ...] = ()
    #: data movement: compared bit-exactly
    exact: bool = False
    #: dtype -> Tolerance of a judged op; a dtype not listed gets compare.default_tolerance
    tolerances: Mapping[str, Tolerance] = {}

    def cases(self) -> list[Case]:
        raise NotImplementedError

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        raise NotImplementedError

    def outputs(self, case: Case, inputs: Inputs) -> dict[str, OutputSpec]:
        raise NotImplementedError

    def call(self, backend: Backend, case: Case, args: dict[str, Any], stream: Any) -> None:
        """Invoke the backend; ``args`` maps input and output names to device arrays."""
        raise NotImplementedError

    def reference(self, case: Case, inputs: Inputs, dtype: Any) -> dict[str, np.ndarray]:
        """The oracle evaluated in compute ``dtype`` (float64, or float32 for the precision
        rule), one array per output name."""
        raise NotImplementedError

    def converts(self, case: Case) -> bool:
        """Whether an exact op's case changes dtype: its NaNs then follow the NaN rule for
        conversions (any quiet NaN) instead of keeping their bits."""
        return False

    def validate(self, case: Case) -> None:
        """Raise ValueError naming the parameter when a case's params are inconsistent."""

    def cost(self, case: Case) -> float:
        """Rough work estimate, used to order and balance cases."""
        return 1.0

    def tolerance(self, dtype: str) -> Tolerance:
        return self.tolerances.get(dtype) or default_tolerance(dtype)

    def perf_cases(self, sizes: str) -> list[Case]:
        """Perf mode's cases for size class ``sizes`` (one of PERF_SIZES); none by default."""
        return []

    def work(self, case: Case, inputs: Inputs, outputs: Mapping[str, OutputSpec]
             ) -> tuple[int, int]:
        """(bytes read + written, flops) of one call: what the op must touch, not what a given
        implementation happens to touch.  Default: every input read, every output written."""
        read = sum(a.nbytes for a in inputs.arrays.values())
        written = sum(int(np.prod(o.shape)) * itemsize(o.dtype) for o in outputs.values())
        return read + written, 0

    def sizes(self, case: Case) -> dict[str, int]:
        """The case's sizes by ``SizeThreshold.size`` name (what a threshold is measured on)."""
        return {}

    def past(self, threshold: SizeThreshold) -> list[Case]:
        """Cases just past one declared backend size threshold of this op (``value + 1``)."""
        return []

    def threshold_cases(self, backends: tuple[str, ...] | None = None) -> list[Case]:
        """Cases past every threshold of this op the built-in ``backends`` declare (all of
        them by default): the full table holds these, --quick those of the cpu backend."""
        from .thresholds import declared

        cases: list[Case] = []
        for threshold in declared(self.name, backends):
            cases += [c for c in self.past(threshold) if c not in cases]
        return cases

    def quick_cases(self, seed: int = 0) -> list[Case]:
        """The --quick subset: every variant value at least once, a few cheap extras, and a
        case past each size threshold of the cpu backend."""
        subset = quick_subset(self.cases(), self.variant_keys, seed=seed, cost=self.cost)
        return subset + [c for c in self.threshold_cases(("cpu",)) if c not in subset]


def itemsize(dtype: str) -> int:
    return numpy_dtype(dtype).itemsize


def uniform(rng: np.random.Generator, shape: Iterable[int], dtype: str, lo=-1.0, hi=1.0):
    """Seeded uniform values rounded to the storage dtype; never an all-zero array."""
    values = rng.uniform(lo, hi, size=tuple(shape))
    return values.astype(numpy_dtype(dtype))


def filter_cases(cases: Iterable[Case], pattern: str | None) -> list[Case]:
    if not pattern:
        return list(cases)
    regex = re.compile(pattern)
    return [c for c in cases if regex.search(c.id)]


def quick_subset(cases: list[Case], variant_keys: tuple[str, ...], seed: int = 0,
                 extra: int = 24, cost=None) -> list[Case]:
    """A seeded subset in which every value of every variant key appears at least once.

    Greedy set cover over (key, value) features, visiting cases in a seeded random order, then
    ``extra`` more cases drawn at random from the cheaper half (``cost``), so combinations get
    some coverage too while the subset stays fast."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cases))
    wanted = {(k, c.get(k)) for c in cases for k in variant_keys if k in c.params}
    chosen: list[Case] = []
    for index in order:
        case = cases[index]
        features = {(k, case.get(k)) for k in variant_keys if k in case.params}
        if features & wanted:
            chosen.append(case)
            wanted -= features
    rest = [c for c in cases if c not in set(chosen)]
    if cost is not None and rest:
        rest.sort(key=cost)
        rest = rest[: max(1, len(rest) // 2)]
    picks = rng.permutation(len(rest))[:extra]
    return chosen + [rest[i] for i in sorted(picks)]
