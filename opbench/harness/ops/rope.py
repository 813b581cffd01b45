"""ROPE: case table, inputs and oracle wiring.  ``ne`` is ggml order: [head_dim, heads, tokens]."""

from __future__ import annotations

import itertools

import numpy as np

from opbench.protocol import RopeParams

from ...reference import rope as rope_ref
from ..cases import Case, Inputs, OpSpec, OutputSpec, uniform

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


class RopeSpec(OpSpec):
    name = "ROPE"
    variant_keys = ("type", "mode", "n_dims", "fs", "ef", "af", "ff", "inv", "fb", "ne")

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
        p = rope_params(case)
        out = rope_ref.rope(
            inputs.arrays["x"], inputs.arrays["pos"], n_dims=p.n_dims, mode=p.mode,
            freq_base=p.freq_base, freq_scale=p.freq_scale, ext_factor=p.ext_factor,
            attn_factor=p.attn_factor, beta_fast=p.beta_fast, beta_slow=p.beta_slow,
            n_ctx_orig=p.n_ctx_orig, freq_factors=inputs.arrays.get("freq_factors"),
            sections=p.sections, inverse=p.inverse, dtype=dtype)
        return {"out": out}

    def cost(self, case: Case) -> float:
        return float(np.prod(case["ne"]))
