"""ATTN: contiguous and paged attention over the variants real models use."""

from __future__ import annotations

import math

import numpy as np

from opbench.protocol import AttnParams, PagedKV

from ...reference import attention as attn_ref
from ..cases import (
    LARGE_OFFSET,
    Axis,
    Case,
    Impossible,
    Inputs,
    OpSpec,
    OutputSpec,
    itemsize,
    uniform,
)
from ..compare import Tolerance

HEAD_SIZES = ((64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (192, 128), (576, 512))
# (H, Hkv): ratios 1, 2, 4, 8, 3, 5; H = 6, 12 and 5 are not powers of two (ALiBi slopes switch
# series at the largest power of two below H)
GQA = ((2, 2), (4, 2), (4, 1), (8, 1), (6, 2), (12, 4), (5, 1))
# (n_q, n_kv): decode and prefill; 37, 113, 257 and 1023 keys are multiples of no tile size
LENGTHS = ((1, 1), (1, 113), (3, 113), (5, 37), (1, 512), (3, 512), (32, 512), (16, 257),
           (1, 1023), (1, 1024), (32, 1024))
BLOCK_SIZE = 16
# cache block counts past 32,767 and 65,535, where a 16-bit block-table entry (signed or not)
# wraps; one-token blocks of one kv head at head dim 64 keep 70,000 blocks at 18 MB per cache
BOUNDARY_BLOCKS = (40000, 70000)
WIDE_INDEX = 32768  # the first block index an int16 cannot hold
# --large: f16 caches of one-token blocks at head dim 64, one block past 2**31 elements
# (4 GiB each for k and v)
LARGE_BLOCKS = LARGE_OFFSET // 64 + 1
MAX_WORK = 24e6  # n_q * n_kv * H * (Dk + Dv): keeps one case in the tens of milliseconds
AXES = (
    Axis("type", ("f32", "f16", "bf16")),
    Axis("hs", HEAD_SIZES),
    Axis("gqa", GQA, keys=("nh", "nkvh")),
    Axis("len", LENGTHS, keys=("nq", "nkv")),
    Axis("causal", (0, 1)),
    Axis("win", (0, 1)),
    Axis("mask", (0, 1)),
    Axis("sc", (0.0, 1.0)),
    Axis("mb", (0.0, 8.0)),
    Axis("sinks", (0, 1)),
    Axis("lse", (0, 1)),
    Axis("paged", (0, 2, 3, 4)),
)
FLAGS = {"causal": 0, "win": 0, "mask": 0, "sc": 0.0, "mb": 0.0, "sinks": 0, "lse": 0,
         "paged": 0}
# feature bundles the way real models combine them, kept whole in every table
BUNDLES = (
    ("f16", (256, 256), (8, 1), (3, 512), {"causal": 1, "win": 1, "sc": 1.0, "lse": 1}),
    ("bf16", (64, 64), (8, 1), (3, 512), {"causal": 1, "win": 1, "sinks": 1, "paged": 2}),
    ("f32", (128, 128), (4, 1), (1, 1024), {"causal": 1, "mb": 8.0, "lse": 1, "paged": 4}),
)


def _work(n_q, n_kv, heads, dk, dv) -> float:
    return n_q * n_kv * heads * (dk + dv)


FEWEST_HEADS = min(h for h, _ in GQA)
SMALLEST_HEAD = min(HEAD_SIZES, key=sum)


def _over_cap(hs, n_q, n_kv, heads=FEWEST_HEADS) -> bool:
    return _work(n_q, n_kv, heads, *hs) > MAX_WORK


def _case(dtype, hs, gqa, n_q, n_kv, flags) -> Case:
    return Case.make("ATTN", type=dtype, hs=list(hs), nh=gqa[0], nkvh=gqa[1], nq=n_q,
                     nkv=n_kv, **{**FLAGS, **flags})


def window_size(case: Case) -> int:
    """A model case's own window (``window=``), else a quarter of the keys when ``win``."""
    if case.get("window") is not None:
        return case["window"]
    return max(1, case["nkv"] // 4) if case["win"] else 0


def sequence_lengths(case: Case) -> list[tuple[int, int]]:
    """(kv_len, q_len) per sequence: paged cases hold several sequences of different lengths;
    with ``idle`` the second one has no queries this step (its cache is kept, its q_start
    entry repeats), so the sequences after it start their rows at its start; with ``idle=2``
    it has no keys either (a padding slot of a batch of fixed size: seq_len 0)."""
    n_seqs = case["paged"] or 1
    out = []
    for s in range(n_seqs):
        kv_len = max(1, case["nkv"] - s * (case["nkv"] // (n_seqs + 1)) - 3 * s)
        n_q = 0 if case.get("idle") and s == 1 else min(case["nq"], kv_len)
        if case.get("idle") == 2 and s == 1:
            kv_len = 0
        out.append((kv_len, n_q))
    return out


def block_size(case: Case) -> int:
    """Tokens per cache block of a paged case: ``bsz`` in the boundary cases, else 16."""
    return case.get("bsz") or BLOCK_SIZE


def boundary_cases() -> list[Case]:
    """Paged decode and a short chunk over caches of 40,000 and 70,000 one-token blocks whose
    block tables hold only entries past 32,767 (the last block among them)."""
    return [Case.make("ATTN", type=dtype, hs=[64, 64], nh=4, nkvh=1, nq=n_q, nkv=37,
                      **{**FLAGS, "causal": 1, "paged": 2}, bsz=1, nblk=n_blocks)
            for n_blocks in BOUNDARY_BLOCKS for dtype, n_q in (("f32", 1), ("f16", 3))]


def idle_sequence_cases() -> list[Case]:
    """A paged batch whose middle sequence has no queries (q_start repeats an entry): a
    sequence left out of one step, or a batch padded to a fixed size; decode and a short
    chunk, the chunk with lse (ggml has none, so it runs the decode); and a decode whose middle
    sequence is an empty padding slot (no queries, no keys)."""
    return [Case.make("ATTN", type=dtype, hs=[64, 64], nh=4, nkvh=2, nq=n_q, nkv=37,
                      **{**FLAGS, "causal": 1, "lse": lse, "paged": 3}, idle=idle)
            for dtype, n_q, lse, idle in (("f32", 1, 0, 1), ("f16", 3, 1, 1), ("f32", 1, 0, 2))]


def _block_order(rng, case: Case, n_used: int) -> tuple[np.ndarray, int]:
    """The cache's block count and a random order of the blocks the tables use (past the
    int16 range in the boundary cases, so a narrowed entry reads another block)."""
    n_blocks = case.get("nblk")
    if not n_blocks:
        n_blocks = n_used + 3  # spare blocks hold garbage no one may read
        return rng.permutation(n_blocks).astype(np.int32), n_blocks
    wide = WIDE_INDEX + rng.choice(n_blocks - 1 - WIDE_INDEX, size=n_used - 1, replace=False)
    return rng.permutation(np.append(wide, n_blocks - 1)).astype(np.int32), n_blocks


def perf_case(dtype, hs, nh, nkvh, nq, nkv, **flags) -> Case:
    return Case.make("ATTN", type=dtype, hs=list(hs), nh=nh, nkvh=nkvh, nq=nq, nkv=nkv,
                     **{**FLAGS, **flags})


def visible_keys(n_q: int, n_kv: int, causal: bool, window: int) -> int:
    """Keys each query attends to, summed over queries (queries sit at the end of the keys)."""
    total = 0
    for i in range(n_q):
        last = n_kv - n_q + i if causal else n_kv - 1
        seen = last + 1
        if window:
            seen = min(seen, window)
        total += max(0, seen)
    return total


class AttnSpec(OpSpec):
    name = "ATTN"
    method = "attention"
    tolerances = {"f32": Tolerance(nmse=1e-7, k=8.0, floor=1e-5),
                  "f16": Tolerance(nmse=5e-6, k=4.0, floor=1e-3),
                  "bf16": Tolerance(nmse=1e-4, k=4.0, floor=8e-3)}
    axes = AXES
    strength = 3
    impossible = (
        Impossible("mask", (1,), "paged", (2, 3, 4), "masks are per sequence; paged batches "
                   "several sequences of different lengths"),
        *(Impossible("hs", (hs,), "len", tuple(n for n in LENGTHS if _over_cap(hs, *n)),
                     "over the per-case work cap (MAX_WORK) even at the fewest heads")
          for hs in HEAD_SIZES if any(_over_cap(hs, *n) for n in LENGTHS)),
        *(Impossible("gqa", (g,), "len", tuple(n for n in LENGTHS
                                               if _over_cap(SMALLEST_HEAD, *n, heads=g[0])),
                     "over the per-case work cap (MAX_WORK) even at the smallest head size")
          for g in GQA if any(_over_cap(SMALLEST_HEAD, *n, heads=g[0]) for n in LENGTHS)),
    )

    def accept(self, row) -> bool:
        if not {"hs", "gqa", "len"} <= row.keys():
            return True
        return _work(*row["len"], row["gqa"][0], *row["hs"]) <= MAX_WORK

    def extra_rows(self) -> list[dict]:
        return [{"type": t, "hs": hs, "gqa": gqa, "len": n, **FLAGS, **flags}
                for t, hs, gqa, n, flags in BUNDLES]

    def extra_cases(self) -> list[Case]:
        # ALiBi with max_bias in (0, 1] (slopes just below one): a backend that takes
        # max_bias <= 1 for "no ALiBi" passes every case at the axis' 8.0
        small_bias = _case("f32", (64, 64), (4, 2), 3, 37, {"causal": 1, "mb": 0.5})
        return boundary_cases() + idle_sequence_cases() + [small_bias]

    def large_cases(self) -> list[Case]:
        return [Case.make("ATTN", type="f16", hs=[64, 64], nh=4, nkvh=1, nq=1, nkv=37,
                          **{**FLAGS, "causal": 1, "paged": 2}, bsz=1, nblk=LARGE_BLOCKS)]

    def sizes(self, case: Case) -> dict[str, int]:
        return {"nq": case["nq"], "nkv": case["nkv"]}

    def past(self, threshold) -> list[Case]:
        """Just past a query threshold: a prefill from position 0 (nq = nkv), causal and with a
        window, so early queries sit before the window's length.  Just past a key threshold:
        decode (one query) and a short chunk, contiguous and paged."""
        n = threshold.value + 1
        if threshold.size == "nq":
            return [_case("f32", (64, 64), (4, 2), n, n, flags)
                    for flags in ({"causal": 1, "win": 1}, {"causal": 1})]
        if threshold.size == "nkv":
            return [_case("f32", (64, 64), (4, 2), n_q, n, flags)
                    for n_q, flags in ((1, {"causal": 1}), (3, {"causal": 1}),
                                       (1, {"causal": 1, "paged": 2}))]
        return []

    def validate(self, case: Case) -> None:
        if case["nh"] % case["nkvh"]:
            raise ValueError(f"nh={case['nh']} must be a multiple of nkvh={case['nkvh']}")
        if case["paged"] and case["mask"]:
            raise ValueError("mask=1 cannot be combined with paged (masks are per sequence)")

    def make_inputs(self, case: Case, rng: np.random.Generator) -> Inputs:
        dk, dv = case["hs"]
        heads, kv_heads = case["nh"], case["nkvh"]
        arrays: dict[str, np.ndarray] = {}
        if case["paged"]:
            arrays.update(self._paged_inputs(case, rng, dk, dv))
        else:
            arrays["q"] = uniform(rng, (case["nq"], heads, dk), case.dtype)
            arrays["k"] = uniform(rng, (case["nkv"], kv_heads, dk), case.dtype)
            arrays["v"] = uniform(rng, (case["nkv"], kv_heads, dv), case.dtype)
        if case["mask"]:
            arrays["mask"] = self._mask(case, rng)
        if case["sinks"]:
            arrays["sinks"] = rng.uniform(-2.0, 2.0, heads).astype(np.float32)
        return Inputs(arrays)

    def _paged_inputs(self, case, rng, dk, dv) -> dict[str, np.ndarray]:
        lengths = sequence_lengths(case)
        tokens = block_size(case)
        blocks_per_seq = [math.ceil(kv / tokens) for kv, _ in lengths]
        order, num_blocks = _block_order(rng, case, sum(blocks_per_seq))
        table = np.full((len(lengths), max(blocks_per_seq)), -1, dtype=np.int32)
        start = 0
        for s, n_blocks in enumerate(blocks_per_seq):
            table[s, :n_blocks] = order[start:start + n_blocks]
            start += n_blocks
        q_lens = [q for _, q in lengths]
        kv_heads = case["nkvh"]
        return {
            "q": uniform(rng, (sum(q_lens), case["nh"], dk), case.dtype),
            "k": uniform(rng, (num_blocks, tokens, kv_heads, dk), case.dtype),
            "v": uniform(rng, (num_blocks, tokens, kv_heads, dv), case.dtype),
            "block_table": table,
            "seq_lens": np.array([kv for kv, _ in lengths], dtype=np.int32),
            "q_start": np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
        }

    def _mask(self, case, rng) -> np.ndarray:
        n_q, n_kv = case["nq"], case["nkv"]
        mask = rng.uniform(-2.0, 0.0, (n_q, n_kv))
        mask[rng.random((n_q, n_kv)) < 0.1] = -np.inf
        # keep the diagonal key visible so no row is entirely masked by accident
        for i in range(n_q):
            mask[i, min(n_kv - 1, max(0, n_kv - n_q + i))] = 0.0
        return mask.astype(np.float32)

    def outputs(self, case: Case, inputs: Inputs) -> dict[str, OutputSpec]:
        n_q_total, heads = inputs.arrays["q"].shape[:2]
        outs = {"out": OutputSpec((n_q_total, heads, case["hs"][1]), case.dtype)}
        if case["lse"]:
            outs["lse"] = OutputSpec((n_q_total, heads), "f32")
        return outs

    def params(self, case: Case) -> AttnParams:
        scale = case.get("scale") or 1.0 / math.sqrt(case["hs"][0])  # model cases: their own
        return AttnParams(scale=scale, causal=bool(case["causal"]),
                          window=window_size(case), softcap=float(case["sc"]),
                          max_bias=float(case["mb"]))

    def call(self, backend, case, args, stream) -> None:
        paged = None
        if case["paged"]:
            paged = PagedKV(args["block_table"], args["seq_lens"], args["q_start"])
        backend.attention(args["q"], args["k"], args["v"], args["out"], self.params(case),
                          mask=args.get("mask"), sinks=args.get("sinks"), lse=args.get("lse"),
                          paged=paged, stream=stream)

    def reference(self, case: Case, inputs: Inputs, dtype) -> dict[str, np.ndarray]:
        a, p = inputs.arrays, self.params(case)
        options = dict(scale=p.scale, causal=p.causal, window=p.window, softcap=p.softcap,
                       max_bias=p.max_bias, sinks=a.get("sinks"), return_lse=True, dtype=dtype)
        if case["paged"]:
            q_lens = np.diff(a["q_start"])
            out, lse = attn_ref.paged_attention(a["q"], a["k"], a["v"], a["block_table"],
                                                a["seq_lens"], q_lens, **options)
        else:
            out, lse = attn_ref.attention(a["q"], a["k"], a["v"], mask=a.get("mask"), **options)
        return {"out": out, "lse": lse} if case["lse"] else {"out": out}

    def cost(self, case: Case) -> float:
        return _work(case["nq"], case["nkv"], case["nh"], *case["hs"])

    def perf_cases(self, sizes: str) -> list[Case]:
        """Llama-3-8B-like (32 heads, 8 kv heads, head 128), Gemma-2-like (head 256, softcap 50,
        sliding window), decode against 4k/8k/32k of context."""
        if sizes == "small":
            return [perf_case("f32", (64, 64), 4, 2, 8, 8, causal=1),
                    perf_case("f16", (64, 64), 4, 2, 1, 64, causal=1, paged=1),
                    perf_case("f32", (64, 64), 4, 2, 8, 8, causal=1, win=1, sc=50.0)]
        llama = ((128, 128), 32, 8)
        return [perf_case("f32", *llama, 512, 512, causal=1),
                perf_case("f16", *llama, 1, 4096, causal=1),
                perf_case("f16", *llama, 1, 8192, causal=1),
                perf_case("f16", *llama, 1, 32768, causal=1),
                perf_case("f16", *llama, 1, 4096, causal=1, paged=1),
                perf_case("f16", *llama, 1, 32768, causal=1, paged=1),
                perf_case("f32", (256, 256), 16, 8, 512, 512, causal=1, win=1, sc=50.0)]

    def work(self, case, inputs=None, outputs=None) -> tuple[int, int]:
        """From the case alone: every query and its visible keys (whole blocks when paged)."""
        dk, dv = case["hs"]
        heads, kv_heads, size = case["nh"], case["nkvh"], itemsize(case.dtype)
        seqs = sequence_lengths(case) if case["paged"] else [(case["nkv"], case["nq"])]
        pairs = sum(visible_keys(q, kv, bool(case["causal"]), window_size(case))
                    for kv, q in seqs)
        n_q = sum(q for _, q in seqs)
        n_kv = sum(kv for kv, _ in seqs)
        if case["paged"]:  # whole blocks are read
            tokens = block_size(case)
            n_kv = sum(math.ceil(kv / tokens) * tokens for kv, _ in seqs)
        nbytes = size * (2 * n_q * heads * dk + n_kv * kv_heads * (dk + dv))
        return nbytes, 2 * pairs * heads * (dk + dv)
