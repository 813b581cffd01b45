"""SET_ROWS, GET_ROWS and CPY: data movement with dtype conversion, judged bit-exactly."""

from __future__ import annotations

import itertools
import math

import numpy as np

from opbench.protocol import numpy_dtype

from ...reference import copies as copy_ref
from .. import draws
from ..cases import (
    LARGE_OFFSET,
    Axis,
    Case,
    Impossible,
    Inputs,
    OpSpec,
    OutputSpec,
    itemsize,
    periodic_fill,
    uniform,
)

DTYPES = ("f32", "f16", "bf16")
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
ROWS = ((1, 8), (1, 64), (8, 128), (3, 80))  # (kv heads, head dim) of one token row
# table row counts past 32,767 and 65,535: a 16-bit index (signed or not) wraps there
BOUNDARY_COUNTS = (40000, 70000)
BOUNDARY_REASON = ("boundary row counts use the 8-value row: the index arithmetic is what they "
                   "test, and 70,000 rows of 1,024 values are 287 MB a case")


#: --large: f16 tables of 8-value rows, one row past 2**31 elements (4 GiB each)
LARGE_ROWS = LARGE_OFFSET // 8 + 1
#: --large CPY: [32769, 256, 256] f16 is 2**31 + 65,536 elements (4 GiB), moved transposed
LARGE_CPY_SHAPE = [LARGE_OFFSET // 65536 + 1, 256, 256]


def _wide_uniform(rng, shape, dtype):
    """Values spanning many binades, so rounding (not only truncation) is exercised."""
    if math.prod(shape) > LARGE_ROWS // 16:  # a large table repeats a random period (cases.py)
        return periodic_fill(_wide_uniform(rng, (1_000_003,), dtype), tuple(shape))
    # uniform in [-1, 1) times 2**e, e in [-12, 12), rounded to the dtype: one loop
    key_values, key_exponents = draws.draw_key(rng), draws.draw_key(rng)
    return draws.wide_uniform_as(key_values, key_exponents, shape, numpy_dtype(dtype), -12, 12)


def set_rows_case(src, dst, row, nr, nslots) -> Case:
    """A perf case: ``nr`` rows of shape ``row`` written into a table of ``nslots`` rows."""
    return Case.make("SET_ROWS", type=dst, type_src=src, row=list(row), nr=nr, nslots=nslots,
                     skip=0)


def get_rows_case(src, dst, row, nr, nsrc) -> Case:
    """A perf case: ``nr`` rows of shape ``row`` gathered from a table of ``nsrc`` rows."""
    return Case.make("GET_ROWS", type=dst, type_src=src, row=list(row), nr=nr, nsrc=nsrc)


def cpy_case(src, dst, ne, perm=(0, 1, 2)) -> Case:
    """A perf case: a copy of shape ``ne`` converted from ``src`` to ``dst``, permuted."""
    return Case.make("CPY", type_src=src, type=dst, ne=list(ne), perm=list(perm), step=1)


#: bit patterns per source dtype: quiet and signalling NaNs with payloads and both signs, +-Inf,
#: -0.0, subnormals, the largest finite values (never the runner's poison pattern)
_SPECIAL_BITS = {
    "f32": [0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFE00001, 0x7FA00000, 0xFF812345,
            0x7F800002, 0xFFBFFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001,
            0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF],
    "f16": [0x7E00, 0xFE00, 0x7E55, 0xFF01, 0x7C05, 0xFD00, 0x7DFF, 0xFC02, 0x7C00, 0xFC00,
            0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF],
    "bf16": [0x7FC0, 0xFFC0, 0x7FD5, 0xFFC1, 0x7F81, 0xFF85, 0x7FBF, 0xFF82, 0x7F80, 0xFF80,
             0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F],
}
#: values that round to something special on narrowing: overflow to +-Inf and the largest
#: finite value of f16 (65520 is the tie), its subnormals and underflow to +-0, ties to even
_NARROWING = [65504.0, 65519.0, 65520.0, -65520.0, 1e5, -3e38, 2.0**-24, 2.0**-25,
              -(2.0**-25) * 1.5, 2.0**-14, 1e-10, -1e-10, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
              1 + 2.0**-8, 1 + 3 * 2.0**-8]


def special_values(dtype: str) -> np.ndarray:
    """Every special pattern of ``dtype`` plus the narrowing edge cases it can hold."""
    np_dtype = numpy_dtype(dtype)
    raw = np.array(_SPECIAL_BITS[dtype], {2: np.uint16, 4: np.uint32}[np_dtype.itemsize])
    with np.errstate(over="ignore"):
        narrowing = np.array(_NARROWING).astype(np.float32).astype(np_dtype)
    return np.concatenate([raw.view(np_dtype), narrowing])


def _with_special_values(rng, values: np.ndarray, dtype: str) -> np.ndarray:
    """Each leading-dim row of ``values`` gets every special value at seeded random places."""
    specials = special_values(dtype)
    rows = values.reshape(len(values), -1)
    for row in rows:
        take = min(len(specials), row.size)
        row[rng.choice(row.size, size=take, replace=False)] = rng.permutation(specials)[:take]
    return values


def _source_values(rng, case: Case, shape) -> np.ndarray:
    """Wide-ranging values; with ``vals=special`` also every special value in every row."""
    values = _wide_uniform(rng, shape, case["type_src"])
    if case.get("vals") == "special":
        values = _with_special_values(rng, values, case["type_src"])
    return values


def _special_cases(op: str, **shape_params) -> list[Case]:
    """One ``vals=special`` case per (destination, source) dtype pair, its id in the order of
    the op's other ids (CPY names its source first), so one -p finds a dtype pair's cases."""
    def types(dst: str, src: str) -> dict:
        return {"type_src": src, "type": dst} if op == "CPY" else {"type": dst, "type_src": src}

    return [Case.make(op, **types(dst, src), **shape_params, vals="special")
            for dst, src in itertools.product(DTYPES, DTYPES)]


class _CopySpec(OpSpec):
    exact = True

    def converts(self, case: Case) -> bool:
        return case["type"] != case["type_src"]


class SetRowsSpec(_CopySpec):
    name = "SET_ROWS"
    method = "set_rows"
    axes = (Axis("type", DTYPES), Axis("type_src", DTYPES), Axis("row", ROWS),
            Axis("nr", (1, 7, 32)), Axis("nslots", (None,) + BOUNDARY_COUNTS),
            Axis("skip", (0, 1)))
    impossible = (Impossible("nslots", BOUNDARY_COUNTS, "row", ROWS[1:], BOUNDARY_REASON),)
    strength = 4

    def make_case(self, row) -> Case:
        return Case.make("SET_ROWS", type=row["type"], type_src=row["type_src"], row=row["row"],
                         nr=row["nr"], nslots=row["nslots"] or row["nr"] * 2 + 5,
                         skip=row["skip"])

    def row_of(self, case: Case) -> dict:
        small = case["nslots"] == case["nr"] * 2 + 5
        return {**super().row_of(case), "nslots": None if small else case["nslots"]}

    def extra_cases(self) -> list[Case]:
        return _special_cases("SET_ROWS", row=[2, 64], nr=7, nslots=19, skip=1)

    def large_cases(self) -> list[Case]:
        return [Case.make("SET_ROWS", type="f16", type_src="f32", row=[1, 8], nr=7,
                          nslots=LARGE_ROWS, skip=0)]

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        row, n_rows, n_slots = tuple(case["row"]), case["nr"], case["nslots"]
        slots = rng.choice(n_slots, size=n_rows, replace=False).astype(np.int32)
        if n_slots > BOUNDARY_COUNTS[0]:
            slots[-1] = n_slots - 1 - (n_slots - 1 in slots[:-1])  # a slot past the boundary
        if case["skip"]:
            slots[rng.random(n_rows) < 0.3] = -1
            slots[0] = -1  # at least one skipped row in every skip case
        return Inputs({"dst": uniform(rng, (n_slots, *row), case["type"]),
                       "src": _source_values(rng, case, (n_rows, *row)),
                       "slots": slots})

    def outputs(self, case, inputs) -> dict[str, OutputSpec]:
        dst = inputs.arrays["dst"]
        return {"dst": OutputSpec(dst.shape, case["type"], init_from="dst")}

    def call(self, backend, case, args, stream) -> None:
        backend.set_rows(args["dst"], args["src"], args["slots"], stream=stream)

    def reference(self, case, inputs, dtype) -> dict[str, np.ndarray]:
        a = inputs.arrays
        return {"dst": copy_ref.set_rows(a["dst"], a["src"], a["slots"])}

    def cost(self, case) -> float:
        return float(case["nslots"] * math.prod(case["row"]))

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [set_rows_case("f32", "f16", (2, 64), 32, 64)]
        return [set_rows_case("f32", "f16", (8, 128), 4096, 16384)]

    def work(self, case, inputs, outputs) -> tuple[int, int]:
        src = inputs.arrays["src"]
        return src.nbytes + src.size * itemsize(case["type"]), 0


class GetRowsSpec(_CopySpec):
    name = "GET_ROWS"
    method = "get_rows"
    axes = (Axis("type", DTYPES), Axis("type_src", DTYPES), Axis("row", ROWS),
            Axis("nr", (1, 7, 32)), Axis("nsrc", (None,) + BOUNDARY_COUNTS))
    impossible = (Impossible("nsrc", BOUNDARY_COUNTS, "row", ROWS[1:], BOUNDARY_REASON),)
    strength = 4

    def make_case(self, row) -> Case:
        return Case.make("GET_ROWS", type=row["type"], type_src=row["type_src"], row=row["row"],
                         nr=row["nr"], nsrc=row["nsrc"] or row["nr"] + 9)

    def row_of(self, case: Case) -> dict:
        small = case["nsrc"] == case["nr"] + 9
        return {**super().row_of(case), "nsrc": None if small else case["nsrc"]}

    def extra_cases(self) -> list[Case]:
        return _special_cases("GET_ROWS", row=[2, 64], nr=7, nsrc=16)

    def large_cases(self) -> list[Case]:
        return [Case.make("GET_ROWS", type="f32", type_src="f16", row=[1, 8], nr=7,
                          nsrc=LARGE_ROWS)]

    def make_inputs(self, case, rng) -> Inputs:
        row = tuple(case["row"])
        rows = rng.integers(0, case["nsrc"], size=case["nr"]).astype(np.int32)  # repeats ok
        if case["nsrc"] > BOUNDARY_COUNTS[0]:
            rows[-1] = case["nsrc"] - 1  # a row past the boundary
        return Inputs({"src": _source_values(rng, case, (case["nsrc"], *row)),
                       "rows": rows})

    def outputs(self, case, inputs) -> dict[str, OutputSpec]:
        return {"out": OutputSpec((case["nr"], *case["row"]), case["type"])}

    def call(self, backend, case, args, stream) -> None:
        backend.get_rows(args["src"], args["rows"], args["out"], stream=stream)

    def reference(self, case, inputs, dtype) -> dict[str, np.ndarray]:
        a = inputs.arrays
        return {"out": copy_ref.get_rows(a["src"], a["rows"], case["type"])}

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [get_rows_case("f16", "f32", (2, 64), 32, 64)]
        return [get_rows_case("f16", "f32", (8, 128), 4096, 8192)]

    def work(self, case, inputs, outputs) -> tuple[int, int]:
        values = int(math.prod(outputs["out"].shape))  # only the gathered rows are read
        return values * (itemsize(case["type_src"]) + itemsize(outputs["out"].dtype)), 0


PERMS = ((0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1))
CPY_SHAPES = ((5, 3, 64), (17, 4, 128), (2, 33, 7))


class CpySpec(_CopySpec):
    name = "CPY"
    method = "cpy"
    axes = (Axis("type_src", DTYPES), Axis("type", DTYPES), Axis("ne", CPY_SHAPES),
            Axis("perm", PERMS), Axis("step", (1, 2)))
    strength = 5  # every combination

    def extra_cases(self) -> list[Case]:
        table = []
        for perm, step in (((0, 1, 2), 1), ((2, 1, 0), 2)):  # contiguous, and strided
            table += _special_cases("CPY", ne=[5, 3, 64], perm=list(perm), step=step)
        return table

    def large_cases(self) -> list[Case]:
        """A transposed f16 move whose source and destination pass 2**31 elements."""
        return [Case.make("CPY", type_src="f16", type="f16", ne=LARGE_CPY_SHAPE,
                          perm=[1, 0, 2], step=1)]

    def sizes(self, case: Case) -> dict[str, int]:
        view = np.empty(case["ne"], np.int8).transpose(case["perm"])[:: case["step"]]
        return {"out_bytes": view.size * DTYPE_BYTES[case["type"]]}

    def past(self, threshold) -> list[Case]:
        """Outputs one row past ``out_bytes``: a widening, a narrowing and a permuted move."""
        if threshold.size != "out_bytes":
            return []
        out = []
        for src, dst, perm in (("f16", "f32", (0, 1, 2)), ("f32", "f16", (0, 1, 2)),
                               ("bf16", "bf16", (1, 0, 2))):
            row = 64 * 512  # elements of one [64, 512] slab
            rows = threshold.value // (row * DTYPE_BYTES[dst]) + 1
            shape = [rows, 64, 512] if perm[0] == 0 else [64, rows, 512]
            out.append(Case.make("CPY", type_src=src, type=dst, ne=shape, perm=list(perm),
                                 step=1))
        return out

    def make_inputs(self, case, rng) -> Inputs:
        return Inputs({"src": _source_values(rng, case, tuple(case["ne"]))})

    def outputs(self, case, inputs) -> dict[str, OutputSpec]:
        view = inputs.arrays["src"].transpose(case["perm"])[:: case["step"]]
        return {"out": OutputSpec(view.shape, case["type"])}

    def call(self, backend, case, args, stream) -> None:
        backend.cpy(args["src"], args["out"], tuple(case["perm"]), case["step"], stream=stream)

    def reference(self, case, inputs, dtype) -> dict[str, np.ndarray]:
        return {"out": copy_ref.cpy(inputs.arrays["src"], case["type"], perm=case["perm"],
                                    step=case["step"])}

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [cpy_case("f32", "f16", (64, 4, 64)),
                    cpy_case("f32", "f32", (64, 4, 64), (1, 0, 2))]
        return [cpy_case("f32", "f16", (4096, 8, 128)), cpy_case("f32", "f32", (4096, 8, 128)),
                cpy_case("f32", "f32", (4096, 8, 128), (1, 0, 2)),
                cpy_case("f32", "f32", (16384, 8, 128))]
