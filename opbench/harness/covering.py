"""Covering arrays: tables in which every t-way combination of axis values appears in a row.

A case table built this way cannot leave a pair of variant values untested by accident: a
bug that needs two settings at once (GQA ratio 3 with sinks, bf16 with partial rotation) meets
at least one case that has both.  Pairs an op cannot accept together are declared up front
(``forbidden``) and only those are left out.

The generator is a deterministic greedy one (in the spirit of AETG): each new row starts
from a combination not covered yet and fills the other axes one at a time, in a seeded
order, with the value that covers the most new combinations; ties go to the value declared
first, so axes list their cheapest values first.  Of a few candidate rows the best is kept.
It is small and predictable, honours declared impossible pairs and a row filter, and can
grow a table from given rows, so the full table extends the pairwise one (``--quick``)
instead of being drawn apart from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

Row = dict[str, Any]
Setting = tuple[str, Any]  # (axis, value)


def _key(value: Any) -> Any:
    """Hashable form of an axis value (lists become tuples)."""
    return tuple(_key(v) for v in value) if isinstance(value, (list, tuple)) else value


def forbidden_pairs(pairs: Iterable[tuple[Setting, Setting]]) -> set[frozenset]:
    return {frozenset(((a, _key(va)), (b, _key(vb)))) for (a, va), (b, vb) in pairs}


def combinations(axes: dict[str, Sequence], strength: int,
                 forbidden: set[frozenset]) -> set[tuple[Setting, ...]]:
    """Every ``strength``-way combination of values over distinct axes, none holding a
    forbidden pair.  Settings inside a combination follow the axes' order."""
    names = list(axes)
    out: set[tuple[Setting, ...]] = set()
    for group in itertools.combinations(names, min(strength, len(names))):
        for values in itertools.product(*(axes[name] for name in group)):
            combo = tuple(zip(group, (_key(v) for v in values)))
            if not any(frozenset(p) in forbidden for p in itertools.combinations(combo, 2)):
                out.add(combo)
    return out


def row_combinations(row: Row, names: Sequence[str], strength: int) -> set[tuple]:
    settings = [(n, _key(row[n])) for n in names if n in row]
    return set(itertools.combinations(settings, min(strength, len(settings))))


class _Encoded:
    """Axis values as small ints (axis offset + value index), so that a sorted tuple of ids is
    a combination in axis order; the generator's inner loops work on these."""

    def __init__(self, axes: dict[str, Sequence], forbidden: set[frozenset]):
        self.names = list(axes)
        self.values = [list(axes[n]) for n in self.names]
        self.offsets = list(itertools.accumulate([0] + [len(v) for v in self.values]))[:-1]
        self.setting = {}
        for i, name in enumerate(self.names):
            for j, value in enumerate(self.values[i]):
                self.setting[(name, _key(value))] = self.offsets[i] + j
        self.forbidden = {tuple(sorted(self.setting[s] for s in pair)) for pair in forbidden
                          if all(s in self.setting for s in pair)}

    def combos(self, strength: int) -> list[tuple[int, ...]]:
        axis_ids = [[o + j for j in range(len(v))] for o, v in zip(self.offsets, self.values)]
        out = []
        for group in itertools.combinations(axis_ids, min(strength, len(axis_ids))):
            for combo in itertools.product(*group):
                if not any(p in self.forbidden for p in itertools.combinations(combo, 2)):
                    out.append(combo)
        return out

    def axis_of(self, setting: int) -> int:
        return max(i for i, o in enumerate(self.offsets) if o <= setting)

    def encode(self, row: Row) -> list[int]:
        return [self.setting[(n, _key(row[n]))] for n in self.names]

    def decode(self, ids: Sequence[int]) -> Row:
        return {n: self.values[i][ids[i] - self.offsets[i]] for i, n in enumerate(self.names)}


def _fits(setting: int, assigned: Sequence[int], forbidden: set) -> bool:
    return all((min(setting, o), max(setting, o)) not in forbidden for o in assigned)


def _leaves_room(setting: int, row: list[int], enc: _Encoded) -> bool:
    """Forward check: every axis still empty keeps a value compatible with the row."""
    assigned = [s for s in row if s >= 0] + [setting]
    return all(any(_fits(enc.offsets[axis] + j, assigned, enc.forbidden)
                   for j in range(len(enc.values[axis])))
               for axis in range(len(row)) if row[axis] < 0 and axis != enc.axis_of(setting))


def _fill(start, enc: _Encoded, strength, uncovered, accept, rng) -> list[int] | None:
    row = _sparse(enc, start)
    for axis in rng.permutation(len(row)):
        if row[axis] >= 0:
            continue
        assigned = sorted(s for s in row if s >= 0)
        best, best_gain = -1, -1
        for j in range(len(enc.values[axis])):  # ties go to the earlier (cheaper) value
            setting = enc.offsets[axis] + j
            if not _fits(setting, assigned, enc.forbidden):
                continue
            if not _leaves_room(setting, row, enc):
                continue
            if accept is not None:
                trial = row.copy()
                trial[axis] = setting
                if not accept(_partial(enc, trial)):
                    continue
            gain = sum(tuple(sorted((setting, *others))) in uncovered
                       for others in itertools.combinations(assigned, strength - 1))
            if gain > best_gain:
                best, best_gain = setting, gain
        if best < 0:
            return None
        row[axis] = best
    return row


def _partial(enc: _Encoded, ids: Sequence[int]) -> Row:
    return {n: enc.values[i][ids[i] - enc.offsets[i]]
            for i, n in enumerate(enc.names) if ids[i] >= 0}


def _covered(ids: Sequence[int], strength: int) -> set[tuple[int, ...]]:
    return set(itertools.combinations(sorted(ids), strength))


def covering_array(axes: dict[str, Sequence], strength: int = 2, forbidden=frozenset(),
                   accept: Callable[[Row], bool] | None = None, seed: int = 0,
                   candidates: int = 3, start_rows: Sequence[Row] = ()) -> list[Row]:
    """Rows (axis -> value) covering every ``strength``-way combination of ``axes`` values.

    ``forbidden``: pairs no row may hold (from ``forbidden_pairs``).  ``accept(partial_row)``
    rejects rows for reasons beyond pairs (a work cap over three axes); it must say False
    only when no completion of the partial row could be accepted.  ``start_rows`` are kept
    as they are and count towards coverage.  Pairs left uncovered raise ValueError; wider
    combinations that ``accept`` rules out are skipped."""
    enc = _Encoded(axes, set(forbidden))
    strength = min(strength, len(enc.names))
    todo = enc.combos(strength)
    uncovered = set(todo)
    rows = [enc.encode(r) for r in start_rows]
    for ids in rows:
        uncovered -= _covered(ids, strength)
    rng = np.random.default_rng(seed)
    for start in todo:  # each row starts from the first combination still uncovered
        if start not in uncovered:
            continue
        options = []
        if not _leaves_room(start[-1], _sparse(enc, start[:-1]), enc):
            if strength <= 2:
                raise ValueError(f"{_partial(enc, _sparse(enc, start))} leaves no value for a"
                                 " third axis: declare the pair impossible")
            uncovered.discard(start)  # two declared pairs rule it out through a third axis
            continue
        for _ in range(4 * candidates):  # a dead end is retried in another axis order
            row = _fill(start, enc, strength, uncovered, accept, rng)
            options += [row] if row is not None else []
            if len(options) == candidates:
                break
        if not options:
            if strength <= 2:
                raise ValueError(f"no accepted row holds {_partial(enc, _sparse(enc, start))}"
                                 ": declare the pair impossible")
            uncovered.discard(start)  # ruled out by accept(): not a pair, so not required
            continue
        best = max(options, key=lambda r: len(_covered(r, strength) & uncovered))
        rows.append(best)
        uncovered -= _covered(best, strength)
    return [enc.decode(r) for r in rows]


def _sparse(enc: _Encoded, combo: Sequence[int]) -> list[int]:
    ids = [-1] * len(enc.names)
    for setting in combo:
        ids[enc.axis_of(setting)] = setting
    return ids


def cache_dir() -> Path:
    """``tables`` in opbench's cache folder: $OPBENCH_CACHE_DIR, else $XDG_CACHE_HOME/opbench,
    else ~/.cache/opbench (the same folder the ceilings and built emulator kernels use)."""
    if os.environ.get("OPBENCH_CACHE_DIR"):
        return Path(os.environ["OPBENCH_CACHE_DIR"]) / "tables"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "opbench" / "tables"


@dataclass
class Table:
    """A covering array whose first ``n_pairwise`` rows already cover every pair."""

    rows: list[Row]
    n_pairwise: int


def cached_table(generate: Callable[[], Table], spec_class: type) -> Table:
    """``generate()``, memoised on disk: a table of strength 3 or 4 takes seconds to build.

    The key is the source of the modules of the spec's classes (its own and OpSpec's) and of
    this module, so any edit to the declaration or the generator builds the table afresh; a
    cache that cannot be read or written is simply not used."""
    modules = {inspect.getmodule(c) for c in spec_class.__mro__ if c is not object}
    modules.add(inspect.getmodule(cached_table))
    sources = "".join(sorted(inspect.getsource(m) for m in modules))
    key = hashlib.sha256(f"{spec_class.__qualname__}\0{sources}".encode()).hexdigest()[:24]
    path = cache_dir() / f"{spec_class.__name__}-{key}.json"
    try:
        saved = json.loads(path.read_text())
        table = Table([{k: _key(v) for k, v in row.items()} for row in saved["rows"]],
                      int(saved["n_pairwise"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    else:
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: _forget_old_tables deletes it last
        return table
    table = generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
            json.dump({"rows": table.rows, "n_pairwise": table.n_pairwise}, handle)
        os.replace(handle.name, path)
        _forget_old_tables(path.parent, spec_class.__name__)
    except OSError:
        pass
    return table


# Tables of other source versions are kept a while: two checkouts side by side (a cross-commit
# A/B, a worktree per branch) each need their own and would otherwise rebuild every time.
TABLES_KEPT_PER_OP = 8


def _forget_old_tables(folder: Path, spec_name: str) -> None:
    """Delete all but the ``TABLES_KEPT_PER_OP`` most recently used tables of one op."""
    tables = sorted(folder.glob(f"{spec_name}-*.json"), key=_mtime, reverse=True)
    for stale in tables[TABLES_KEPT_PER_OP:]:
        stale.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass
class Coverage:
    possible: int  # pairs of values of two axes the op accepts together
    impossible: int  # pairs declared impossible
    covered: int  # possible pairs some row holds

    @property
    def fraction(self) -> float:
        return self.covered / self.possible if self.possible else 1.0


def pair_coverage(axes: dict[str, Sequence], forbidden: set[frozenset],
                  rows: Iterable[Row]) -> Coverage:
    everything = combinations(axes, 2, set())
    possible = combinations(axes, 2, forbidden)
    held: set = set()
    for row in rows:
        held |= row_combinations(row, list(axes), 2)
    return Coverage(len(possible), len(everything) - len(possible), len(held & possible))
