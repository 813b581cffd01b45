"""Judging a backend's output against the float64 oracle.

Rules (see README "What opbench test does"):
- NMSE = sum((a-b)^2) / sum(b^2) under the op's threshold (test-backend-ops style figure);
- the precision rule: |a - b| <= k * E + floor * max|b| elementwise, where E is the largest
  error of the same oracle evaluated in the backend's precision (float32 math, output rounded
  to the storage dtype) -- so f16 is judged against what f16 can achieve;
- bit-exact for pure data movement, except that a conversion (dtype changes) may give any
  quiet NaN where the oracle has a NaN (the NaN rule, ``opbench.reference.nan_rule``);
- NaN anywhere fails; +-Inf must match in place and sign.
Thresholds live in each op's spec (``OpSpec.tolerances``, one row per dtype), falling back to
DEFAULT_TOLERANCES; never in per-backend branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..reference import copies as copy_ref
from ..reference import nan_rule


@dataclass(frozen=True)
class Tolerance:
    nmse: float
    k: float = 4.0
    floor: float = 1e-6


#: the tolerance of a dtype whose op's spec (``OpSpec.tolerances``) has no row for it
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "f32": Tolerance(nmse=1e-7, k=4.0, floor=1e-6),
    "f16": Tolerance(nmse=1e-6, k=2.0, floor=1e-4),
    "bf16": Tolerance(nmse=5e-5, k=2.0, floor=1e-3),
}


def default_tolerance(dtype: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["f32"])


@dataclass
class Verdict:
    ok: bool
    metric: str = ""
    value: float = 0.0
    threshold: float = 0.0
    n_bad: int = 0
    size: int = 0
    samples: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list)
    message: str = ""

    def describe(self, name: str) -> str:
        if self.ok:
            return ""
        head = f"{name}: {self.metric} = {self.value:.3g} > {self.threshold:.3g}" \
            if self.metric in ("nmse", "max_err") else f"{name}: {self.metric}"
        head += f"; {self.n_bad}/{self.size} bad"
        if self.message:
            head += f" ({self.message})"
        shown = ", ".join(f"[{','.join(map(str, i))}] expected {_show(e)} got {_show(a)}"
                          for i, e, a in self.samples)
        return head + (f"; first: {shown}" if shown else "")


def _show(value) -> str:
    return value if isinstance(value, str) else f"{value:.6g}"


def _samples(mask: np.ndarray, expected: np.ndarray, actual: np.ndarray, limit: int = 5):
    indices = np.argwhere(mask)[:limit]
    return [(tuple(int(i) for i in idx), float(expected[tuple(idx)]), float(actual[tuple(idx)]))
            for idx in indices]


def _special_values(expected: np.ndarray, actual: np.ndarray) -> Verdict | None:
    """NaN anywhere fails; infinities must agree in place and sign."""
    nan = np.isnan(actual) & ~np.isnan(expected)
    if nan.any():
        return Verdict(False, "NaN", n_bad=int(nan.sum()), size=actual.size,
                       samples=_samples(nan, expected, actual), message="NaN in output")
    inf_mismatch = (np.isinf(expected) | np.isinf(actual)) & (expected != actual)
    if inf_mismatch.any():
        return Verdict(False, "Inf mismatch", n_bad=int(inf_mismatch.sum()), size=actual.size,
                       samples=_samples(inf_mismatch, expected, actual))
    return None


def compare_exact(expected: np.ndarray, actual: np.ndarray, converted: bool = False) -> Verdict:
    """Bit-exact comparison for data movement (NaN payloads included).  ``converted``: the
    values changed dtype, so where the oracle has a NaN any quiet NaN is right (the NaN rule)."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return Verdict(False, "shape/dtype", message=f"expected {expected.shape} {expected.dtype}"
                       f", got {actual.shape} {actual.dtype}")
    if converted:
        diff = nan_rule.conversion_mismatch(expected, actual)
    else:
        diff = nan_rule.bits(expected) != nan_rule.bits(actual)
    if not diff.any():
        return Verdict(True, "bit-exact", size=expected.size)
    return Verdict(False, "bit-exact", n_bad=int(diff.sum()), size=expected.size,
                   samples=_bit_samples(diff, expected, actual),
                   message="NaN rule: a conversion gives a quiet NaN" if converted else "")


def _bit_samples(mask: np.ndarray, expected: np.ndarray, actual: np.ndarray, limit: int = 5):
    """First differing elements as bit patterns (values hide NaN payloads and signalling)."""
    return [(tuple(int(i) for i in idx), f"0x{int(nan_rule.bits(expected)[tuple(idx)]):x}",
             f"0x{int(nan_rule.bits(actual)[tuple(idx)]):x}")
            for idx in np.argwhere(mask)[:limit]]


def compare_close(expected: np.ndarray, low_precision, actual: np.ndarray,
                  tol: Tolerance, low_rounded_to: np.dtype | None = None) -> Verdict:
    """NMSE and the precision rule against the float64 oracle ``expected``.

    ``low_precision``: the oracle computed in float32 (an array, or a function returning it:
    asked for only when some error passes the floor, since an element within the floor is
    within every bound).  ``low_rounded_to``: the dtype that oracle is rounded to, when it is;
    then it is asked for only when an error also passes a cheap lower bound of its error (see
    ``_rounding_distance``), and the verdict is the same as with it."""
    exp = np.asarray(expected, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if exp.shape != act.shape:
        return Verdict(False, "shape", message=f"expected {exp.shape}, got {act.shape}")
    if np.isfinite(exp).all() and np.isfinite(act).all():
        # the common case, without the masks below (a third of the passes over the data)
        finite = None
        err = np.abs(act - exp)
        denom = _sum_of_squares(exp)
    else:
        special = _special_values(exp, act)
        if special:
            return special
        finite = np.isfinite(exp)
        with np.errstate(invalid="ignore"):  # inf - inf where both agree: masked out below
            err = np.where(finite, np.abs(act - exp), 0.0)
        denom = _sum_of_squares(np.where(finite, exp, 0.0))
    squares = _sum_of_squares(err)
    nmse = squares / denom if denom > 0 else squares
    scale = _largest_magnitude(exp if finite is None else exp[finite])
    bound = tol.floor * max(scale, 1e-30)
    largest = float(np.max(err, initial=0.0))
    if largest > bound and low_rounded_to is not None:
        # E >= this distance, so when it already covers every error no element can be bad
        # under the full bound either: the float32 oracle is not needed to pass
        cheap = bound + tol.k * _rounding_distance(exp, err, low_rounded_to)
        if largest <= cheap:
            bound = cheap
    if largest > bound:
        bound += tol.k * _largest_error(low_precision, exp, finite)
    bad = err > bound
    if nmse > tol.nmse:
        return Verdict(False, "nmse", nmse, tol.nmse, int(bad.sum()), exp.size,
                       _samples(bad if bad.any() else err == err.max(), exp, act))
    if bad.any():
        return Verdict(False, "max_err", float(err.max()), bound, int(bad.sum()), exp.size,
                       _samples(bad, exp, act))
    return Verdict(True, "nmse", nmse, tol.nmse, 0, exp.size)


def _sum_of_squares(values: np.ndarray) -> float:
    flat = values.reshape(-1)
    return float(np.dot(flat, flat))


def _largest_magnitude(values: np.ndarray) -> float:
    """max |values| without a temporary; 1.0 for no values."""
    return float(max(values.max(), -values.min())) if values.size else 1.0


#: elements whose distance to the storage dtype's grid is measured for ``_rounding_distance``
ROUNDING_SAMPLE = 256


def _rounding_distance(exp: np.ndarray, err: np.ndarray, dtype: np.dtype) -> float:
    """A lower bound of the float32 oracle's largest error when that oracle is rounded to
    ``dtype``: each of its elements is a value of ``dtype`` (or not finite), so at element j
    its error is at least the distance from ``exp[j]`` to the nearest value of ``dtype``.  The
    largest such distance over a strided sample and the element of the largest error."""
    flat = exp.reshape(-1)
    step = max(1, flat.size // ROUNDING_SAMPLE)
    sample = np.append(flat[::step], flat[int(np.argmax(err))] if err.size else 0.0)
    nearest = copy_ref.round_to(sample, dtype).astype(np.float64)
    distance = np.abs(nearest - sample)
    distance = distance[np.isfinite(distance)]  # past the dtype's range, or not finite
    return float(distance.max()) if distance.size else 0.0


def _largest_error(low_precision, exp: np.ndarray, finite: np.ndarray | None) -> float:
    """The float32 oracle's largest error against the float64 one, over finite elements
    (``finite`` None: all are)."""
    low = np.asarray(low_precision() if callable(low_precision) else low_precision, np.float64)
    if finite is None:
        return float(np.max(np.abs(low - exp), initial=0.0))
    with np.errstate(invalid="ignore"):
        low_err = np.where(finite, np.abs(low - exp), 0.0)
    return float(np.max(low_err, initial=0.0))
