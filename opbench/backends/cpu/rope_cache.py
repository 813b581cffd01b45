"""RoPE sin/cos tables: the angle math (ggml ``rope_yarn`` semantics) and a per-device cache.

The cache is keyed on *everything* that changes the values -- ``RopeParams.key()`` plus the
contents of freq_factors -- because the classic bug is a key that leaves one out (Gemma-3's
per-layer freq_base, or a layer's freq_factors) and hands one layer another layer's angles.
A table holds rows for positions 0..n-1, grows on demand and is gathered by position.
Negative positions and positions past the size cap are computed directly, with the very same
function, so cache on and cache off give bit-identical results.  So are positions whose rows
would make the table grow by more than it already holds and more than a few times the rows
this call asks for (a few tokens at position 200k): filling every row up to there costs far
more than the call, and a later call that reuses them grows the table by doubling.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from opbench.protocol import RopeParams

from ..common.yarn import rope_corr_dims


def rope_frequencies(p: RopeParams, freq_factors: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Per-pair angular frequency omega [n_dims/2] (theta = pos * omega) and mscale.

    YaRN mixes theta_interp = freq_scale*theta_extrap with theta_extrap linearly, and both are
    linear in the position, so the mix folds into the frequency."""
    n_pairs = p.n_dims // 2
    omega = (p.freq_base ** (-2.0 / p.n_dims)) ** np.arange(n_pairs, dtype=np.float64)
    if freq_factors is not None:
        omega = omega / freq_factors.astype(np.float64)
    mscale = p.attn_factor
    if p.ext_factor == 0.0:
        return omega * p.freq_scale, float(mscale)
    if p.n_ctx_orig <= 0:
        raise ValueError(f"n_ctx_orig={p.n_ctx_orig} must be > 0 when ext_factor != 0")
    low, high = rope_corr_dims(p)
    ramp = 1.0 - np.clip((np.arange(n_pairs) - low) / max(0.001, high - low), 0.0, 1.0)
    mix = ramp * p.ext_factor
    mscale *= 1.0 + 0.1 * math.log(1.0 / p.freq_scale)
    return omega * (p.freq_scale * (1.0 - mix) + mix), float(mscale)


def cos_sin_rows(
    positions: np.ndarray, omega: np.ndarray, mscale: float, inverse: bool
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mscale*cos, +-mscale*sin) [n, n_pairs]; angles in float64 so large positions
    keep their accuracy (the table is computed once, the rotation itself is float32)."""
    theta = positions.astype(np.float64)[:, None] * omega
    cos = (np.cos(theta) * mscale).astype(np.float32)
    sin = (np.sin(theta) * (-mscale if inverse else mscale)).astype(np.float32)
    return cos, sin


class _Table:
    def __init__(self, omega: np.ndarray, mscale: float, inverse: bool) -> None:
        self.omega, self.mscale, self.inverse = omega, mscale, inverse
        self.cos = np.empty((0, len(omega)), np.float32)
        self.sin = np.empty((0, len(omega)), np.float32)

    def grow(self, n_rows: int) -> None:
        start = len(self.cos)
        cos, sin = cos_sin_rows(np.arange(start, n_rows), self.omega, self.mscale, self.inverse)
        self.cos = np.concatenate([self.cos, cos])
        self.sin = np.concatenate([self.sin, sin])


class RopeCache:
    """LRU of cos/sin tables, one per distinct parameter set.  One per logical device."""

    #: a call may grow a table by up to this many times its own row count (or the table's size)
    GROWTH_PER_ROW = 4

    def __init__(self, max_tables: int = 64, max_rows: int = 1 << 18) -> None:
        self.max_tables, self.max_rows = max_tables, max_rows
        self._tables: OrderedDict[tuple, _Table] = OrderedDict()
        self._lock = threading.Lock()  # a device has one stream, but be safe if shared
        self.misses = 0

    @staticmethod
    def key(p: RopeParams, freq_factors: np.ndarray | None) -> tuple:
        ff = None if freq_factors is None else (freq_factors.dtype.str, freq_factors.tobytes())
        return p.key() + (ff,)

    def table(self, p: RopeParams, freq_factors: np.ndarray | None) -> _Table:
        key = self.key(p, freq_factors)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                self.misses += 1
                table = _Table(*rope_frequencies(p, freq_factors), p.inverse)
                self._tables[key] = table
                if len(self._tables) > self.max_tables:
                    self._tables.popitem(last=False)
            self._tables.move_to_end(key)
            return table

    def lookup(self, table: _Table, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin rows [n, n_pairs] for int positions [n] (read-only: they may be the
        table's own rows)."""
        run = self._consecutive_rows(table, positions)
        if run is not None:
            return table.cos[run], table.sin[run]
        cos, sin, rows = self.lookup_rows(table, positions)
        return cos[rows], sin[rows]

    def lookup_rows(self, table: _Table, positions: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``lookup`` without the gather: (cos, sin, rows), row i of the answer being cos[rows[i]]
        and sin[rows[i]] -- the table itself and the positions when the table holds every
        row, so a kernel reads the rows in place.  (Gathered apart, the rows were read from a
        table the kernel's own streaming had evicted: a random 512-row gather took 485 us
        after a [512, 32, 128] rotation, 115 us warm.)"""
        in_table = (positions >= 0) & (positions < self.max_rows)
        needed = int(positions[in_table].max(initial=-1)) + 1
        if needed > len(table.cos):
            self._grow(table, positions[in_table], len(positions))
            in_table &= positions < len(table.cos)  # far rows: computed directly
        if in_table.all():
            return table.cos, table.sin, positions
        return (*self._lookup_mixed(table, positions, in_table), np.arange(len(positions)))

    def _consecutive_rows(self, table: _Table, positions: np.ndarray) -> slice | None:
        """The table rows of positions p, p+1, ..., p+n-1 (a prefill, a decode step), growing
        the table if it may: a slice, so the rows are handed out without a gather (with the
        cheaper key, a 512-token call took 0.87-0.94x the time, a one-token call 0.81x).
        None for any other positions, or rows the table may not grow to."""
        n = len(positions)
        first = int(positions[0]) if n else -1
        if first < 0 or first + n > self.max_rows or not np.array_equal(
                positions, np.arange(first, first + n)):
            return None
        self._grow(table, positions, n)  # nothing to do when the table holds them already
        return slice(first, first + n) if first + n <= len(table.cos) else None

    def _grow(self, table: _Table, positions: np.ndarray, asked: int) -> None:
        """Grow to the rows needed, at least doubling, but by at most the table's size (or 256)
        or GROWTH_PER_ROW rows per row asked; positions past that reach stay outside (computed
        directly).  No minimum growth: every small case of the suite has parameters of its
        own, and filling 256 rows whatever the call needed cost a small ROPE case 1.23x (1061
        against 861 us a case, 40 seeded cases, first run each, eight interleaved rounds)."""
        rows = len(table.cos)
        reach = min(self.max_rows, rows + max(rows, 256, self.GROWTH_PER_ROW * asked))
        needed = int(positions[positions < reach].max(initial=-1)) + 1
        if needed > rows:
            with self._lock:
                table.grow(min(reach, max(needed, 2 * rows)))

    @staticmethod
    def _lookup_mixed(table: _Table, positions: np.ndarray, in_table: np.ndarray):
        # negative (or huge) positions have no table row: compute those rows directly
        cos = np.empty((len(positions), len(table.omega)), np.float32)
        sin = np.empty_like(cos)
        rows = positions[in_table]
        cos[in_table], sin[in_table] = table.cos[rows], table.sin[rows]
        outside = ~in_table
        cos[outside], sin[outside] = cos_sin_rows(
            positions[outside], table.omega, table.mscale, table.inverse
        )
        return cos, sin


def direct_cos_sin(p: RopeParams, freq_factors, positions) -> tuple[np.ndarray, np.ndarray]:
    """The cache-off path: angles computed on every call."""
    omega, mscale = rope_frequencies(p, freq_factors)
    return cos_sin_rows(positions, omega, mscale, p.inverse)
