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
    variant_keys = ("type", "mode", "n_dims", "fs", "ef", "af", "ff", "inv", "fb", "ne")
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
        return out

    def validate(self, case: Case) -> None:
        head_dim = case["ne"][0]
        if case["n_dims"] > head_dim or case["n_dims"] % 2:
            raise ValueError(f"n_dims={case['n_dims']} must be even and <= head_dim={head_dim}")

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        head_dim, heads, tokens = case["ne"]
        x = uniform(rng, (tokens, heads, head_dim), case.dtype)
        # arbitrary order and values, not 0..n-1; kept below a few thousand (see compare.py)
        rows = 4 if case["mode"] == "mrope" else 1
        pos = rng.integers(0, 3000, size=(rows, tokens)).astype(np.int32)
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
