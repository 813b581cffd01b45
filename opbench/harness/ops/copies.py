"""SET_ROWS, GET_ROWS and CPY: data movement with dtype conversion, judged bit-exactly."""

from __future__ import annotations

import itertools

import numpy as np

from opbench.protocol import numpy_dtype

from ...reference import copies as copy_ref
from ..cases import Case, Inputs, OpSpec, OutputSpec, uniform

DTYPES = ["f32", "f16", "bf16"]
ROWS = [(1, 64), (8, 128), (3, 80)]  # (kv heads, head dim) of one token row


def _wide_uniform(rng, shape, dtype):
    """Values spanning many binades, so rounding (not only truncation) is exercised."""
    mantissa = rng.uniform(-1.0, 1.0, size=shape)
    return (mantissa * np.exp2(rng.integers(-12, 12, size=shape))).astype(numpy_dtype(dtype))


class SetRowsSpec(OpSpec):
    name = "SET_ROWS"
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


class GetRowsSpec(OpSpec):
    name = "GET_ROWS"
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


PERMS = [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1)]
CPY_SHAPES = [(5, 3, 64), (17, 4, 128), (2, 33, 7)]


class CpySpec(OpSpec):
    name = "CPY"
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
