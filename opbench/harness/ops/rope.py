"""ROPE: case table, inputs and oracle wiring.  ``ne`` is ggml order: [head_dim, heads, tokens]."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from opbench.protocol import RopeParams

from ...reference import rope as rope_ref
from ..cases import Case, Inputs, OpSpec, OutputSpec, uniform
from ..compare import Tolerance

# (head_dim, n_dims): full and partial rotation of the head sizes real models use
HEAD_DIMS = [(64, 64), (64, 32), (80, 80), (80, 32), (128, 128), (128, 64), (256, 256),
             (256, 128)]
# mrope sections in pairs (Qwen2-VL uses [16, 24, 24] for head_dim 128); sum may be < n_dims/2
MROPE_SECTIONS = {64: (8, 12, 12, 0), 80: (10, 10, 10, 10), 128: (16, 24, 24, 0),
                  256: (32, 48, 48, 0), 32: (4, 6, 6, 0)}
SHAPES = [(1, 1), (4, 9)]  # (heads, tokens): a single decode token and an odd prefill
YARN_CTX = 4096
#: the ``pos`` axis: "neg" mixes negative positions in (-3000, 0) (llama.cpp's K-shift passes
#: negative deltas to ggml_rope_ext) with small ones, "long" lies in [3000, 2^18), "huge" in
#: [2^18, 2^24]; an int P starts at P (just past a backend's cos/sin cache)
POSITION_RANGES = ["neg", "long", "huge"]
POSITION_VARIANTS = [("f32", "neox"), ("f32", "normal"), ("f16", "neox")]
SIZE_VARIANTS = [("f32", "normal"), ("f16", "neox"), ("bf16", "normal")]


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


def rope_params(case: Case) -> RopeParams:
    mode = case["mode"]
    return RopeParams(
        n_dims=case["n_dims"], mode=mode, freq_base=case["fb"], freq_scale=case["fs"],
        ext_factor=case["ef"], attn_factor=case["af"], n_ctx_orig=YARN_CTX,
        sections=MROPE_SECTIONS[case["n_dims"]] if mode == "mrope" else None,
        inverse=bool(case["inv"]))


def oracle_kwargs(p: RopeParams, *, angles_only: bool = False) -> dict:
    """``p`` as keyword arguments of ``reference.rope.rope`` (its field names are the oracle's);
    ``angles_only``: of ``reference.rope.rope_angles``, which neither pairs nor inverts."""
    kwargs = dataclasses.asdict(p)
    if angles_only:
        del kwargs["mode"], kwargs["inverse"]
    return kwargs


def perf_case(ne, mode, dtype="f32") -> Case:
    return Case.make("ROPE", type=dtype, ne=list(ne), n_dims=ne[0], mode=mode, fb=1e4, fs=1.0,
                     ef=0.0, af=1.0, ff=False, inv=False)


class RopeSpec(OpSpec):
    name = "ROPE"
    method = "rope"
    variant_keys = ("type", "mode", "n_dims", "fs", "ef", "af", "ff", "inv", "fb", "ne", "pos")
    #: ROPE angles in float32 at positions of a few thousand carry ~1e-4 rad of error in any
    #: float32 implementation, hence the looser f32 NMSE; f16 and bf16 use the defaults
    tolerances = {"f32": Tolerance(nmse=1e-6, k=4.0, floor=1e-5)}

    def cases(self) -> list[Case]:
        out = []
        grid = itertools.product(HEAD_DIMS, ["normal", "neox", "mrope"], [1.0, 0.25],
                                 [0.0, 1.0], [1.0, 0.7], [False, True], [False, True],
                                 ["f32", "f16", "bf16"])
        for (head_dim, n_dims), mode, fs, ef, af, ff, inv, dtype in grid:
            if mode == "mrope" and n_dims != head_dim:
                continue  # Qwen2-VL rotates the whole head
            fb = 1e6 if (head_dim + int(ff)) % 2 else 1e4  # Gemma-3 global vs local base
            for heads, tokens in SHAPES:
                out.append(Case.make("ROPE", type=dtype, ne=[head_dim, heads, tokens],
                                     n_dims=n_dims, mode=mode, fb=fb, fs=fs, ef=ef, af=af,
                                     ff=ff, inv=inv))
        out += [_plain_case(dtype, mode, [128, 4, 33], pos=pos)
                for pos in POSITION_RANGES for dtype, mode in POSITION_VARIANTS]
        return out + [c for c in self.threshold_cases() if c not in out]

    def sizes(self, case: Case) -> dict[str, int]:
        head_dim, heads, tokens = case["ne"]
        where = case.get("pos")
        largest = {None: 2999, "neg": 2999, "long": 1 << 18, "huge": 1 << 24}.get(where)
        return {"elems": head_dim * heads * tokens, "row": head_dim * heads,
                "pos": largest if largest is not None else int(where) + 2 * tokens - 1}

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
        if case["ff"]:
            arrays["freq_factors"] = rng.uniform(0.5, 4.0, case["n_dims"] // 2).astype(
                np.float32)
        return Inputs(arrays)

    def outputs(self, case: Case, inputs: Inputs) -> dict[str, OutputSpec]:
        return {"out": OutputSpec(inputs.arrays["x"].shape, case.dtype)}

    def call(self, backend, case, args, stream) -> None:
        backend.rope(args["x"], args["pos"], args["out"], rope_params(case),
                     freq_factors=args.get("freq_factors"), stream=stream)

    def reference(self, case: Case, inputs: Inputs, dtype) -> dict[str, np.ndarray]:
        out = rope_ref.rope(inputs.arrays["x"], inputs.arrays["pos"],
                            freq_factors=inputs.arrays.get("freq_factors"), dtype=dtype,
                            **oracle_kwargs(rope_params(case)))
        return {"out": out}

    def cost(self, case: Case) -> float:
        return float(np.prod(case["ne"]))

    def perf_cases(self, sizes: str) -> list[Case]:
        if sizes == "small":
            return [perf_case((64, 4, 16), "neox"), perf_case((64, 4, 16), "normal")]
        return [perf_case((128, 32, 512), "neox"), perf_case((128, 32, 512), "normal"),
                perf_case((128, 8, 512), "neox"), perf_case((128, 32, 512), "neox", "f16")]

    def work(self, case, inputs, outputs) -> tuple[int, int]:
        x = inputs.arrays["x"]
        return 2 * x.nbytes + inputs.arrays["pos"].nbytes, 3 * x.size  # x*cos - y*sin per value
