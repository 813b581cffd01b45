"""ROPE: case table, inputs and oracle wiring.  ``ne`` is ggml order: [head_dim, heads, tokens]."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from opbench.protocol import RopeParams

from ...reference import rope as rope_ref
from ..cases import Axis, Case, Impossible, Inputs, OpSpec, OutputSpec, uniform
from ..compare import Tolerance
from ..models import load as load_model

# (head_dim, n_dims): full and partial rotation of the head sizes real models use
HEAD_DIMS = ((64, 64), (64, 32), (80, 80), (80, 32), (96, 96), (128, 128), (128, 64),
             (256, 256), (256, 128))
SHAPES = ((1, 1), (4, 9), (3, 33))  # (heads, tokens): one decode token, odd prefills
YARN_CTX = 4096
#: the ``pos`` axis: "neg" mixes negative positions in (-3000, 0) (llama.cpp's K-shift passes
#: negative deltas to ggml_rope_ext) with small ones, "long" lies in [3000, 2^18), "huge" in
#: [2^18, 2^24]; an int P starts at P (just past a backend's cos/sin cache)
POSITION_RANGES = ["neg", "long", "huge"]
POSITION_VARIANTS = [("f32", "neox"), ("f32", "normal"), ("f16", "neox")]
SIZE_VARIANTS = [("f16", "neox"), ("f32", "normal"), ("bf16", "normal")]


def _plain_case(dtype: str, mode: str, ne: list[int], **extra) -> Case:
    """A llama-style RoPE case (full rotation, base 1e4, no scaling) of the given shape."""
    return Case.make("ROPE", type=dtype, ne=ne, n_dims=ne[0], mode=mode, fb=1e4, fs=1.0,
                     ef=0.0, af=1.0, ff=False, inv=False, **extra)


def positions(case: Case, rng: np.random.Generator, rows: int, tokens: int) -> np.ndarray:
    """Seeded positions in arbitrary order (not 0..n-1); below 3000 unless ``pos`` says."""
    where = case.get("pos")
    if where is None:
        return rng.integers(0, 3000, size=(rows, tokens))  # see compare.py on f32 angles
    if where == "neg":
        return rng.integers(-3000, 3000, size=(rows, tokens))
    if where == "long":
        return rng.integers(3000, 1 << 18, size=(rows, tokens))
    if where == "huge":
        return rng.integers(1 << 18, (1 << 24) + 1, size=(rows, tokens))
    return int(where) + rng.integers(0, 2 * tokens, size=(rows, tokens))


def largest_position(case: Case) -> int:
    """The largest position ``positions`` can draw for the case."""
    where, tokens = case.get("pos"), case["ne"][2]
    largest = {None: 2999, "neg": 2999, "long": 1 << 18, "huge": 1 << 24}.get(where)
    return largest if largest is not None else int(where) + 2 * tokens - 1


def mrope_sections(layout: str, n_dims: int) -> tuple[int, int, int, int]:
    """mrope pair counts per position stream.  ``qwen2vl``: Qwen2-VL's [16, 24, 24] scaled to
    n_dims (sum = n_dims/2); ``short`` sums to less than n_dims/2 and ``long`` to more, so
    ggml's sector index (pair mod sum) wraps or never reaches the last streams; ``four``
    gives the fourth stream a share."""
    pairs = n_dims // 2
    first = pairs // 4
    if layout == "qwen2vl":
        return (pairs - 2 * ((pairs - first) // 2), (pairs - first) // 2, (pairs - first) // 2, 0)
    if layout == "short":
        return (first, first, max(1, first // 2), 0)
    if layout == "long":
        return (pairs // 2, pairs // 2, pairs // 2, 0)
    if layout == "four":
        return (first, first, first, pairs - 3 * first)
    raise ValueError(f"sec={layout!r} must be one of qwen2vl, short, long, four")


def model_rope(case: Case) -> tuple[RopeParams, np.ndarray | None]:
    """A model case's RoPE: its layer kind's params and freq_factors, computed (like
    transformers' dynamic and longrope types) for a sequence reaching the largest position."""
    model = load_model(case["model"])
    kind = {"sliding": "sliding_attention", "full": "full_attention"}[case["layer"]]
    largest = largest_position(case)
    return model.rope_params(kind, seq_len=largest + 1)


def rope_params(case: Case) -> RopeParams:
    if case.get("model"):
        return model_rope(case)[0]
    mode = case["mode"]
    return RopeParams(
        n_dims=case["n_dims"], mode=mode, freq_base=case["fb"], freq_scale=case["fs"],
        ext_factor=case["ef"], attn_factor=case["af"], n_ctx_orig=YARN_CTX,
        sections=mrope_sections(case.get("sec", "qwen2vl"), case["n_dims"])
        if mode == "mrope" else None,
        inverse=bool(case["inv"]))


def oracle_kwargs(p: RopeParams, *, angles_only: bool = False) -> dict:
    """``p`` as keyword arguments of ``reference.rope.rope`` (its field names are the oracle's);
    ``angles_only``: of ``reference.rope.rope_angles``, which neither pairs nor inverts."""
    # shallow: every field is a scalar or a tuple of ints, and asdict's deep copy took 13 us
    # against 1.6 us
    kwargs = {field.name: getattr(p, field.name) for field in dataclasses.fields(p)}
    if angles_only:
        del kwargs["mode"], kwargs["inverse"]
    return kwargs


def perf_case(ne, mode, dtype="f32") -> Case:
    return Case.make("ROPE", type=dtype, ne=list(ne), n_dims=ne[0], mode=mode, fb=1e4, fs=1.0,
                     ef=0.0, af=1.0, ff=False, inv=False)


class RopeSpec(OpSpec):
    name = "ROPE"
    method = "rope"
    #: ROPE angles in float32 at positions of a few thousand carry ~1e-4 rad of error in any
    #: float32 implementation, hence the looser f32 NMSE; f16 and bf16 use the defaults
    tolerances = {"f32": Tolerance(nmse=1e-6, k=4.0, floor=1e-5)}
    axes = (
        Axis("type", ("f32", "f16", "bf16")),
        Axis("head", HEAD_DIMS),  # (head_dim, n_dims); see make_case
        Axis("shape", SHAPES),
        Axis("mode", ("normal", "neox", "mrope")),
        Axis("sec", (None, "qwen2vl", "short", "long", "four")),
        Axis("fb", (1e4, 1e6)),
        Axis("fs", (1.0, 0.25)),
        Axis("ef", (0.0, 1.0)),
        Axis("af", (1.0, 0.7)),
        Axis("ff", (False, True)),
        Axis("inv", (False, True)),
    )
    strength = 4  # every 4-way combination: each case is cheap
    impossible = (
        Impossible("mode", ("mrope",), "head", tuple(h for h in HEAD_DIMS if h[0] != h[1]),
                   "mrope (Qwen2-VL) rotates the whole head"),
        Impossible("mode", ("normal", "neox"), "sec", ("qwen2vl", "short", "long", "four"),
                   "sections belong to mrope only"),
        Impossible("mode", ("mrope",), "sec", (None,), "mrope needs sections"),
        Impossible("head", tuple(h for h in HEAD_DIMS if h[0] != h[1]), "sec",
                   ("qwen2vl", "short", "long", "four"),
                   "sections belong to mrope, which rotates the whole head"),
    )

    def make_case(self, row) -> Case:
        (head_dim, n_dims), (heads, tokens) = row["head"], row["shape"]
        sec = {"sec": row["sec"]} if row["sec"] else {}
        return Case.make("ROPE", type=row["type"], ne=[head_dim, heads, tokens], n_dims=n_dims,
                         mode=row["mode"], **sec, fb=row["fb"], fs=row["fs"], ef=row["ef"],
                         af=row["af"], ff=row["ff"], inv=row["inv"])

    def row_of(self, case: Case) -> dict:
        head_dim, heads, tokens = case["ne"]
        row = {a.name: case.get(a.name) for a in self.axes}
        return {**row, "head": (head_dim, case["n_dims"]), "shape": (heads, tokens)}

    def extra_cases(self) -> list[Case]:
        return [_plain_case(dtype, mode, [128, 4, 33], pos=pos)
                for pos in POSITION_RANGES for dtype, mode in POSITION_VARIANTS] + [
            _plain_case(dtype, mode, [128, 4, 9], inplace=1)  # out aliases x, as ggml allows
            for dtype, mode in POSITION_VARIANTS]

    def sizes(self, case: Case) -> dict[str, int]:
        head_dim, heads, tokens = case["ne"]
        return {"elems": head_dim * heads * tokens, "row": head_dim * heads,
                "pos": largest_position(case)}

    def past(self, threshold) -> list[Case]:
        """Just past a size threshold: more elements (tokens), wider rows (heads) or a
        largest position of ``value + 1``, for the NumPy and the numba rotations."""
        n = threshold.value + 1
        if threshold.size == "pos":
            return [_plain_case(d, m, [128, 4, 33], pos=n) for d, m in POSITION_VARIANTS]
        if threshold.size == "elems":
            tokens = -(-n // (128 * 4))
            return [_plain_case(d, m, [128, 4, tokens]) for d, m in SIZE_VARIANTS]
        if threshold.size == "row":
            return [_plain_case("f32", "normal", [128, -(-n // 128), 2])]
        return []

    def validate(self, case: Case) -> None:
        head_dim = case["ne"][0]
        if case["n_dims"] > head_dim or case["n_dims"] % 2:
            raise ValueError(f"n_dims={case['n_dims']} must be even and <= head_dim={head_dim}")

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        head_dim, heads, tokens = case["ne"]
        x = uniform(rng, (tokens, heads, head_dim), case.dtype)
        rows = 4 if case["mode"] == "mrope" else 1
        pos = positions(case, rng, rows, tokens).astype(np.int32)
        arrays = {"x": x, "pos": pos if rows == 4 else pos[0]}
        if case.get("model"):
            freq_factors = model_rope(case)[1]
            if freq_factors is not None:
                arrays["freq_factors"] = freq_factors.astype(np.float32)
        elif case["ff"]:
            arrays["freq_factors"] = rng.uniform(0.5, 4.0, case["n_dims"] // 2).astype(
                np.float32)
        return Inputs(arrays)

    def outputs(self, case: Case, inputs: Inputs) -> dict[str, OutputSpec]:
        init = "x" if case.get("inplace") else None
        return {"out": OutputSpec(inputs.arrays["x"].shape, case.dtype, init_from=init)}

    def call(self, backend, case, args, stream) -> None:
        x = args["out"] if case.get("inplace") else args["x"]  # in place: out starts as x
        backend.rope(x, args["pos"], args["out"], rope_params(case),
                     freq_factors=args.get("freq_factors"), stream=stream)

    def reference(self, case: Case, inputs: Inputs, dtype) -> dict[str, np.ndarray]:
        out = rope_ref.rope(inputs.arrays["x"], inputs.arrays["pos"],
                            freq_factors=inputs.arrays.get("freq_factors"), dtype=dtype,
                            **oracle_kwargs(rope_params(case)))
        return {"out": out}

    def cost(self, case: Case) -> float:
        return float(math.prod(case["ne"]))

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [perf_case((64, 4, 16), "neox"), perf_case((64, 4, 16), "normal")]
        return [perf_case((128, 32, 512), "neox"), perf_case((128, 32, 512), "normal"),
                perf_case((128, 8, 512), "neox"), perf_case((128, 32, 512), "neox", "f16")]

    def work(self, case, inputs, outputs) -> tuple[int, int]:
        x = inputs.arrays["x"]
        return 2 * x.nbytes + inputs.arrays["pos"].nbytes, 3 * x.size  # x*cos - y*sin per value
