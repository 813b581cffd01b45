"""SET_ROWS, GET_ROWS and CPY: data movement with dtype conversion, judged bit-exactly."""

from __future__ import annotations

import itertools

import numpy as np

from opbench.protocol import numpy_dtype

from ...reference import copies as copy_ref
from ..cases import Case, Inputs, OpSpec, OutputSpec, itemsize, uniform

DTYPES = ["f32", "f16", "bf16"]
ROWS = [(1, 64), (8, 128), (3, 80)]  # (kv heads, head dim) of one token row


def _wide_uniform(rng, shape, dtype):
    """Values spanning many binades, so rounding (not only truncation) is exercised."""
    mantissa = rng.uniform(-1.0, 1.0, size=shape)
    return (mantissa * np.exp2(rng.integers(-12, 12, size=shape))).astype(numpy_dtype(dtype))


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


class SetRowsSpec(OpSpec):
    name = "SET_ROWS"
    method = "set_rows"
    exact = True
    variant_keys = ("type", "type_src", "row", "nr", "skip")

    def cases(self) -> list[Case]:
        grid = itertools.product(DTYPES, DTYPES, ROWS, [1, 7, 32], [0, 1])
        return [Case.make("SET_ROWS", type=dst, type_src=src, row=list(row), nr=nr,
                          nslots=nr * 2 + 5, skip=skip)
                for dst, src, row, nr, skip in grid]

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        row, n_rows, n_slots = tuple(case["row"]), case["nr"], case["nslots"]
        slots = rng.choice(n_slots, size=n_rows, replace=False).astype(np.int32)
        if case["skip"]:
            slots[rng.random(n_rows) < 0.3] = -1
            slots[0] = -1  # at least one skipped row in every skip case
        return Inputs({"dst": uniform(rng, (n_slots, *row), case["type"]),
                       "src": _wide_uniform(rng, (n_rows, *row), case["type_src"]),
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
        return float(case["nslots"] * np.prod(case["row"]))

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [set_rows_case("f32", "f16", (2, 64), 32, 64)]
        return [set_rows_case("f32", "f16", (8, 128), 4096, 16384)]

    def work(self, case, inputs, outputs) -> tuple[int, int]:
        src = inputs.arrays["src"]
        return src.nbytes + src.size * itemsize(case["type"]), 0


class GetRowsSpec(OpSpec):
    name = "GET_ROWS"
    method = "get_rows"
    exact = True
    variant_keys = ("type", "type_src", "row", "nr")

    def cases(self) -> list[Case]:
        grid = itertools.product(DTYPES, DTYPES, ROWS, [1, 7, 32])
        return [Case.make("GET_ROWS", type=dst, type_src=src, row=list(row), nr=nr,
                          nsrc=nr + 9)
                for dst, src, row, nr in grid]

    def make_inputs(self, case, rng) -> Inputs:
        row = tuple(case["row"])
        rows = rng.integers(0, case["nsrc"], size=case["nr"]).astype(np.int32)  # repeats ok
        return Inputs({"src": _wide_uniform(rng, (case["nsrc"], *row), case["type_src"]),
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
        values = int(np.prod(outputs["out"].shape))  # only the gathered rows are read
        return values * (itemsize(case["type_src"]) + itemsize(outputs["out"].dtype)), 0


PERMS = [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1)]
CPY_SHAPES = [(5, 3, 64), (17, 4, 128), (2, 33, 7)]


class CpySpec(OpSpec):
    name = "CPY"
    method = "cpy"
    exact = True
    variant_keys = ("type", "type_src", "ne", "perm", "step")

    def cases(self) -> list[Case]:
        grid = itertools.product(DTYPES, DTYPES, CPY_SHAPES, PERMS, [1, 2])
        return [Case.make("CPY", type_src=src, type=dst, ne=list(shape), perm=list(perm),
                          step=step)
                for src, dst, shape, perm, step in grid]

    def make_inputs(self, case, rng) -> Inputs:
        return Inputs({"src": _wide_uniform(rng, tuple(case["ne"]), case["type_src"])})

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
