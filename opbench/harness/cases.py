"""Cases and op specs: what to run (data) and how to run and judge it (one OpSpec per op).

A case is op + params (shapes, dtypes, variants) + seed.  Its id is stable and greppable,
``ROPE(type=f32,ne=[128,4,9],n_dims=128,mode=neox,...)``; the seed comes from the id and the
run's ``--seed``, so a case gets the same inputs whatever table it sits in.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from opbench.protocol import Backend, SizeThreshold, numpy_dtype

from . import covering, draws
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

    # the id and the lookup table are read many times per case run: computed once per case
    @functools.cached_property
    def _values(self) -> dict[str, Any]:
        return dict(self.items)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    @functools.cached_property
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


@dataclass(frozen=True)
class Axis:
    """One variant axis of an op's table: a name and the values the table sweeps.

    ``keys`` spreads a composite value over several case params (``gqa`` = (nh, nkvh));
    without it the axis is the case param of the same name."""

    name: str
    values: tuple
    keys: tuple[str, ...] = ()

    def of(self, case: Case) -> Any:
        if self.keys:
            return tuple(case.get(k) for k in self.keys)
        return case.get(self.name)

    def spread(self, value: Any) -> dict[str, Any]:
        return dict(zip(self.keys, value)) if self.keys else {self.name: value}


@dataclass(frozen=True)
class Impossible:
    """Values of two axes the op does not accept together, and why.  Every pair of
    ``a_values`` x ``b_values`` is left out of the coverage requirement."""

    a: str
    a_values: tuple
    b: str
    b_values: tuple
    reason: str

    def pairs(self):
        return [((self.a, va), (self.b, vb)) for va in self.a_values for vb in self.b_values]


class OpSpec:
    """Everything opbench knows about one op: how it is swept, fed, run, judged and timed.

    Subclasses are data plus small methods; nothing about an op lives outside its spec (see
    docs/adding-an-op.md).

    The table is declared, not listed: ``axes`` (values per variant axis), ``impossible``
    (pairs the op rejects, with the reason) and ``strength`` (2 = every pair of values of any
    two axes appears in some case; 3 = every triple).  ``cases()`` is a covering array of that
    strength grown from a pairwise one that starts with ``extra_rows()`` (combinations real
    models use); ``quick_cases()`` is that pairwise array."""

    name: str = ""
    #: the ``Backend`` method that runs the op (protocol.py); a backend implements the op when
    #: its class overrides that method
    method: str = ""
    axes: tuple[Axis, ...] = ()
    impossible: tuple[Impossible, ...] = ()
    strength: int = 2
    #: data movement: compared bit-exactly
    exact: bool = False
    #: dtype -> Tolerance of a judged op; a dtype not listed gets compare.default_tolerance
    tolerances: Mapping[str, Tolerance] = {}

    @property
    def variant_keys(self) -> tuple[str, ...]:
        return tuple(axis.name for axis in self.axes)

    def axis_values(self) -> dict[str, tuple]:
        return {axis.name: tuple(axis.values) for axis in self.axes}

    def forbidden(self) -> set[frozenset]:
        return covering.forbidden_pairs(p for rule in self.impossible for p in rule.pairs())

    #: ``accept(row) -> bool`` rules out rows for more than a pair (a work cap over three
    #: axes), partial rows included; None: every row without an impossible pair is fine
    accept = None

    def extra_rows(self) -> list[dict[str, Any]]:
        """Rows every table keeps whole (feature bundles of real models), axis -> value."""
        return []

    def make_case(self, row: dict[str, Any]) -> Case:
        """The case of one table row; override to add derived params (sizes from counts)."""
        params: dict[str, Any] = {}
        for axis in self.axes:
            params.update(axis.spread(row[axis.name]))
        return Case.make(self.name, **params)

    def row_of(self, case: Case) -> dict[str, Any]:
        return {axis.name: covering._key(axis.of(case)) for axis in self.axes}

    def table(self) -> covering.Table:
        cached = self.__dict__.get("_table")
        if cached is None:
            cached = covering.cached_table(self._generate_table, type(self))
            self.__dict__["_table"] = cached
        return cached

    def _generate_table(self) -> covering.Table:
        """A pairwise array first (the --quick set), then rows up to ``strength``."""
        axes, forbidden = self.axis_values(), self.forbidden()
        pairs = covering.covering_array(axes, 2, forbidden, self.accept,
                                        start_rows=self.extra_rows())
        rows = pairs
        if self.strength > 2:
            rows = covering.covering_array(axes, self.strength, forbidden, self.accept,
                                           start_rows=pairs)
        return covering.Table(rows, len(pairs))

    def _cases_of(self, rows) -> list[Case]:
        unique = {case.id: case for case in map(self.make_case, rows)}
        return sorted(unique.values(), key=lambda c: c.id)

    def extra_cases(self) -> list[Case]:
        """Hand-placed cases kept beside the covering array (special values, position
        ranges); --quick takes one per value of each param no axis sweeps."""
        return []

    def cases(self) -> list[Case]:
        """The covering array, the extra cases and the cases past every backend threshold."""
        table = self._cases_of(self.table().rows)
        return _union(table, self.extra_cases(), self.threshold_cases())

    def quick_cases(self, seed: int = 0) -> list[Case]:
        """The --quick subset: the pairwise array the full table grows from (fixed; ``seed``
        changes the inputs, not the selection), extra cases covering each value of params no
        axis sweeps, and a case past each size threshold of the cpu backend."""
        table = self.table()
        extras = self.extra_cases()
        swept = {k for axis in self.axes for k in (axis.keys or (axis.name,))}
        loose = tuple(sorted({k for c in extras for k in c.params} - swept))
        return _union(self._cases_of(table.rows[:table.n_pairwise]),
                      quick_subset(extras, loose, seed=seed, extra=0) if extras else [],
                      self.threshold_cases(("cpu",)))

    def coverage(self, cases: Iterable[Case]) -> covering.Coverage:
        """How many of the op's possible value pairs ``cases`` hold."""
        return covering.pair_coverage(self.axis_values(), self.forbidden(),
                                      map(self.row_of, cases))

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        raise NotImplementedError

    def outputs(self, case: Case, inputs: Inputs) -> dict[str, OutputSpec]:
        raise NotImplementedError

    def call(self, backend: Backend, case: Case, args: dict[str, Any], stream: Any) -> None:
        """Invoke the backend; ``args`` maps input and output names to device arrays."""
        raise NotImplementedError

    def reference(self, case: Case, inputs: Inputs, dtype: Any) -> dict[str, np.ndarray]:
        """The oracle evaluated in compute ``dtype`` (float64, or float32 for the precision
        rule), one array per output name (an output of ``judged_rows``: those rows only)."""
        raise NotImplementedError

    def judged_rows(self, case: Case, inputs: Inputs) -> dict[str, np.ndarray]:
        """In-place outputs the op writes only a few leading-dim rows of: name -> those rows
        (sorted, distinct).  ``reference`` returns just those rows, the judge compares them,
        and every other row must keep the output's initial contents bit for bit, so neither
        the oracle nor the judge holds a float64 copy of a whole multi-GiB cache.  Default:
        every output judged whole."""
        return {}

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
        written = sum(int(math.prod(o.shape)) * itemsize(o.dtype) for o in outputs.values())
        return read + written, 0

    def sizes(self, case: Case) -> dict[str, int]:
        """The case's sizes by ``SizeThreshold.size`` name (what a threshold is measured on)."""
        return {}

    def past(self, threshold: SizeThreshold) -> list[Case]:
        """Cases just past one declared backend size threshold of this op (``value + 1``)."""
        return []

    def large_cases(self) -> list[Case]:
        """``--large``: cases whose element offsets pass 2**31 (a tensor of more than 2**31
        elements, gigabytes each), kept out of the default tables."""
        return []

    def threshold_cases(self, backends: tuple[str, ...] | None = None) -> list[Case]:
        """Cases past every threshold of this op the built-in ``backends`` declare (all of
        them by default): the full table holds these, --quick those of the cpu backend."""
        from .thresholds import declared

        cases: list[Case] = []
        for threshold in declared(self.name, backends):
            cases += [c for c in self.past(threshold) if c not in cases]
        return cases


def _union(*groups: list[Case]) -> list[Case]:
    seen: set[Case] = set()
    out = []
    for case in (c for group in groups for c in group):
        if case not in seen:
            seen.add(case)
            out.append(case)
    return out


def itemsize(dtype: str) -> int:
    return numpy_dtype(dtype).itemsize


#: element offsets past this need 64-bit index arithmetic: the --large cases pass it
LARGE_OFFSET = 2**31
#: tensors with more elements repeat a random period instead of drawing every value in float64
#: (16 GB for 2**31 values); the period is a prime, so offsets 2**31 or 2**32 apart (where a
#: wrapped 32-bit offset lands) hold different values
_FILL_LIMIT = 2**27
FILL_PERIOD = 1_000_003


def uniform(rng: np.random.Generator, shape: Iterable[int], dtype: str, lo=-1.0, hi=1.0):
    """Seeded uniform values rounded to the storage dtype; never an all-zero array."""
    shape = tuple(shape)
    key = draws.draw_key(rng)
    if math.prod(shape) > _FILL_LIMIT:
        return periodic_fill(draws.uniform_as(key, FILL_PERIOD, numpy_dtype(dtype), lo, hi), shape)
    return draws.uniform_as(key, shape, numpy_dtype(dtype), lo, hi)


def draw_uniform(rng: np.random.Generator, shape, lo=-1.0, hi=1.0) -> np.ndarray:
    """Seeded float64 values in [lo, hi): ``draws.uniform`` keyed by one raw draw of ``rng``
    (6-8x faster than ``rng.uniform``, which drew the inputs before the fourteenth pass)."""
    return draws.uniform(draws.draw_key(rng), shape, lo, hi)


def periodic_fill(period: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An array of ``shape`` repeating ``period`` (in its dtype), written chunk by chunk."""
    out = np.empty(math.prod(shape), period.dtype)
    for start in range(0, out.size, period.size):
        chunk = out[start:start + period.size]
        chunk[...] = period[:chunk.size]
    return out.reshape(shape)


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
