"""``TritonBackend``: Triton kernels judged by the float64 oracles, on a GPU or on the CPU.

Two modes, chosen once per process (Triton decides when a kernel is decorated):

* ``interpreter`` (no GPU, or ``TRITON_INTERPRET=1``): Triton's interpreter runs the very same
  kernels on CPU tensors, on the worker-thread runtime (``backends/runtimes/threads.py``:
  logical devices, arrays that know their device, one worker-thread stream per device, events,
  async copies, fault injection): each op enqueues a Triton launch on the device's stream, on
  torch tensors that alias the harness's NumPy buffers (zero copy), so kernels write straight
  into the guarded output buffers.
* ``cuda``: native Triton on torch CUDA tensors, torch.cuda streams and events, a CUDA-event
  timer with an L2 flush (``runtime_cuda``), graph reuse through CUDA graphs (``graphs_cuda``;
  CI exercises it through fakes, docs/gpu.md has its runs on an H200).

The runtime is chosen once, when the backend is made, and held (``self.runtime``); what
differs between the two -- host-side checks, how a launch reaches the kernels, the scenario
primitives, the timer -- is one small object per runtime (``_Interpreted``, ``_OnCuda``), so
no method asks which runtime it runs on.

Each op's launch is one method (``launch_rope``, ``launch_attention``, ...) taking torch
tensors: override one in a subclass to test your own kernel (docs/backends-triton.md).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any

import numpy as np

from opbench.protocol import Option, PagedKV, Runtime, RuntimeBackend, SizeThreshold

from ..common.arg_checks import ArgChecks
from ..common.arrays import plain
from ..common.numpy_model import NumpyModelOps
from ..runtimes.threads import ThreadRuntime
from . import index_checks

#: the host-side argument checks of interpreter mode (NumPy arrays; int32 or int64 indices)
CHECKS = ArgChecks(index_dtypes=("int32", "int64"))
INSTALL_HINT = "pip install 'opbench[triton]'"
MODES = ("auto", "interpreter", "cuda")
FLASH_TILE_OPTIONS = ("block_m", "block_n", "num_warps")
DECODE_TILE_OPTIONS = ("block_n", "split_len")
TILE_OPTIONS = FLASH_TILE_OPTIONS + ("split_len",)

# The interpreter swaps triton.language's functions for the duration of a launch, process-wide:
# two streams interpreting kernels at once would restore each other's patches mid-kernel.
_INTERPRETER_LOCK = threading.Lock()
INTERPRETER_COPY_BLOCK = 1 << 16


def missing_modules() -> list[str]:
    return [name for name in ("triton", "torch") if not _importable(name)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked or half-installed module
        return False


def resolve_mode(requested: str = "auto") -> str:
    """"interpreter" or "cuda" for this process; TRITON_INTERPRET=1 forces the interpreter."""
    if requested not in MODES:
        raise ValueError(f"mode={requested!r} must be one of {MODES}")
    forced = os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "cuda" and forced:
        raise ValueError("mode='cuda' but TRITON_INTERPRET=1 is set in the environment")
    if requested == "interpreter" or forced:
        return "interpreter"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("mode='cuda' needs a CUDA device; torch sees none")
    return "interpreter"


def load_kernels(mode: str):
    """Import the kernel modules for ``mode`` (the interpreter flag must precede decoration)."""
    if mode == "interpreter":
        os.environ["TRITON_INTERPRET"] = "1"
        from . import interpreter_patches

        interpreter_patches.install()
    from . import kernels_attention, kernels_copy, kernels_kv, kernels_rope

    interpreted = type(kernels_rope.rope_kernel).__name__ == "InterpretedFunction"
    if interpreted != (mode == "interpreter"):
        have = "interpreter" if interpreted else "cuda"
        raise RuntimeError(f"Triton kernels were already loaded in {have} mode in this process;"
                           f" mode={mode!r} needs a fresh process")
    return kernels_rope, kernels_attention, kernels_kv, kernels_copy


def as_torch(arr):
    """Zero-copy torch view of a backend (NumPy) array; bf16 through its int16 bit pattern."""
    import torch

    if arr is None:
        return None
    a = plain(arr)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class TritonBackend(RuntimeBackend):
    """Options: ``OPTIONS`` (the worker-thread runtime's ``delay`` fault injection applies in
    interpreter mode; ``rope_cache`` and ``jit`` are accepted and have no effect: the kernels
    compute angles in-kernel).  ``runtime``: the runtime to run on instead of the mode's own
    (a ``ThreadRuntime`` for the interpreter, a ``CudaRuntime`` for cuda)."""

    name = "triton"
    OPTIONS = (
        Option("rope_cache", bool, True, "accepted, no effect (angles are computed in-kernel)"),
        Option("jit", bool, True, "accepted, no effect"),
    ) + ThreadRuntime.OPTIONS + (
        Option("mode", str, "auto", "where kernels run: a GPU (cuda) or Triton's interpreter",
               MODES),
        Option("decode_split", bool, True, "split-KV decode kernel for as many query rows as"
               " sequences (off: always flash)"),
        Option("block_m", int, None, "attention tile: query rows per program"),
        Option("block_n", int, None, "attention tile: keys per inner step"),
        Option("split_len", int, None, "keys per decode split"),
        Option("num_warps", int, None, "warps per flash-attention program"),
    )
    #: kernels_attention.default_tiles: interpreter block_m 64, block_n 128, split_len 512;
    #: GPU (GPU_TILES) block_m 64/32/16, block_n 32/16 (decode 64/32/16), split_len 256
    THRESHOLDS = tuple(
        [SizeThreshold("ATTN", "nq", m, f"a second query tile of block_m={m}")
         for m in (16, 32, 64)]
        + [SizeThreshold("ATTN", "nkv", n, f"a second key tile of block_n={n}")
           for n in (16, 32, 64, 128)]
        + [SizeThreshold("ATTN", "nkv", n, f"decode splits the keys (split_len={n}) and merges")
           for n in (256, 512)])

    def known_failures(self) -> list[tuple]:
        from .known_failures import KNOWN_FAILURES

        return list(KNOWN_FAILURES)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        missing = missing_modules()
        if missing:
            return False, f"{' and '.join(missing)} not installed: {INSTALL_HINT}"
        return True, ""

    def __init__(self, runtime: Runtime | None = None, **options: Any) -> None:
        super().__init__(runtime, **options)
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(reason)
        self.mode = resolve_mode(self.options["mode"])
        self.tiles = {name: self.options[name] for name in TILE_OPTIONS
                      if self.options[name] is not None}
        self.decode_split = self.options["decode_split"]
        (self.k_rope, self.k_attention, self.k_kv, self.k_copy) = load_kernels(self.mode)
        if runtime is None:
            runtime = self._default_runtime()
        self.runtime = runtime
        self.on = _OnCuda(runtime) if _is_cuda(runtime) else _Interpreted(runtime)

    def _default_runtime(self) -> Runtime:
        if self.mode == "cuda":
            from .runtime_cuda import CudaRuntime

            return CudaRuntime()
        return ThreadRuntime.from_options(self.options)

    @property
    def is_interpreter(self) -> bool:
        """True when kernels run in Triton's interpreter: correct, but no GPU timing."""
        return self.mode == "interpreter"

    def info(self) -> dict:
        import torch
        import triton

        return {"mode": self.mode, "is_interpreter": self.is_interpreter,
                "triton": triton.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "tiles": dict(self.tiles), **self.runtime.info()}

    # -- kernel launches: one method per kernel, torch tensors in; override to test yours -------
    def launch_rope(self, x, pos, out, p, freq_factors) -> None:
        self.k_rope.launch_rope(x, pos, out, p, freq_factors)

    def launch_attention(self, q, k, v, out, p, mask, sinks, lse, paged) -> None:
        """Flash attention (any number of queries per sequence)."""
        tiles = self._attention_tiles(q.shape[-1], decode=False)
        self.k_attention.launch_attention(q, k, v, out, p, mask, sinks, lse, paged, **tiles)

    def launch_decode(self, q, k, v, out, p, mask, sinks, lse, paged) -> None:
        """Split-KV decode (as many query rows as sequences) and the merge of its partials."""
        tiles = self._attention_tiles(q.shape[-1], decode=True)
        self.k_attention.launch_decode(q, k, v, out, p, mask, sinks, lse, paged, **tiles)

    def _attention_tiles(self, head_dim: int, decode: bool) -> dict:
        """The mode's default tiles for the flash or the decode kernel, overridden by the
        backend options that kernel takes."""
        tiles = self.k_attention.default_tiles(self.is_interpreter, head_dim, decode)
        takes = DECODE_TILE_OPTIONS if decode else FLASH_TILE_OPTIONS
        return {**tiles, **{k: v for k, v in self.tiles.items() if k in takes}}

    def launch_attn_merge(self, out, lse, part_out, part_lse) -> None:
        """Ring attention's in-place merge of two partial attentions."""
        self.k_attention.launch_attn_merge(out, lse, part_out, part_lse)

    def launch_kv_rotate(self, key_cache, block_indices, deltas, lut, layout) -> None:
        self.k_kv.launch_kv_rotate(key_cache, block_indices, deltas, lut, layout)

    def launch_set_rows(self, dst, src, slots) -> None:
        self.k_copy.launch_set_rows(dst, src, slots)

    def launch_get_rows(self, src, rows, out) -> None:
        self.k_copy.launch_get_rows(src, rows, out)

    def launch_cpy(self, src, out, perm, step) -> None:
        # the interpreter pays per program, not per element: big copies get big blocks
        block = INTERPRETER_COPY_BLOCK if self.is_interpreter and out.numel() > 1 << 16 else None
        self.k_copy.launch_cpy(src, out, perm, step, block=block)

    # -- ops: validate on the caller's thread, launch on the device's stream ---------------------
    def rope(self, x, pos, out, p, freq_factors=None, stream=None) -> None:
        self.on.check(CHECKS.rope, x, pos, out, p, freq_factors)
        self.on.enqueue("rope", dict(x=x, pos=pos, out=out, freq_factors=freq_factors), stream,
                        lambda t: self.launch_rope(t["x"], t["pos"], t["out"], p,
                                                   t["freq_factors"]))

    def attention(self, q, k, v, out, p, mask=None, sinks=None, lse=None, paged=None,
                  stream=None) -> None:
        self.on.check(CHECKS.attention, q, k, v, out, p, mask, sinks, lse, paged)
        arrays = dict(q=q, k=k, v=v, out=out, mask=mask, sinks=sinks, lse=lse)
        if paged is not None:
            arrays.update(block_table=paged.block_table, seq_lens=paged.seq_lens,
                          q_start=paged.q_start)
        # The decode/flash choice reads shapes only (one_query_per_sequence), so a CUDA-graph
        # capture records the decode kernel too, right for any q_start written before replay.
        self.on.enqueue("attention", arrays, stream, lambda t: self._attention(t, p, paged),
                        _check_paged if paged is not None else None)

    def _attention(self, t: dict, p, paged) -> None:
        paged_t = None
        if paged is not None:
            paged_t = PagedKV(t["block_table"], t["seq_lens"], t["q_start"])
        args = (t["q"], t["k"], t["v"], t["out"], p, t["mask"], t["sinks"], t["lse"], paged_t)
        if self.decode_split and one_query_per_sequence(t["q"], paged_t):
            self.launch_decode(*args)
        else:
            self.launch_attention(*args)

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        self.on.check(check_merge_shapes, out, lse, part_out, part_lse)
        arrays = dict(out=out, lse=lse, part_out=part_out, part_lse=part_lse)
        self.on.enqueue("attn_merge", arrays, stream, lambda t: self.launch_attn_merge(
            t["out"], t["lse"], t["part_out"], t["part_lse"]))

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None) -> None:
        self.on.check(CHECKS.kv_rotate, key_cache, block_indices, deltas, lut, layout)
        arrays = dict(key_cache=key_cache, block_indices=block_indices, deltas=deltas, lut=lut)
        self.on.enqueue("kv_rotate", arrays, stream, lambda t: self.launch_kv_rotate(
            t["key_cache"], t["block_indices"], t["deltas"], t["lut"], layout),
            lambda a: index_checks.check_kv_rotate(a["block_indices"], a["deltas"],
                                                   len(a["key_cache"]), len(a["lut"])))

    def set_rows(self, dst, src, slots, stream=None) -> None:
        self.on.check(CHECKS.rows, "set_rows", dst, src, slots, "slots", ("dst", "src"))
        self.on.enqueue("set_rows", dict(dst=dst, src=src, slots=slots), stream,
                        lambda t: self.launch_set_rows(t["dst"], t["src"], t["slots"]),
                        lambda a: index_checks.check_rows("set_rows", a["slots"], len(a["dst"])))

    def get_rows(self, src, rows, out, stream=None) -> None:
        self.on.check(CHECKS.rows, "get_rows", src, out, rows, "rows", ("src", "out"))
        self.on.enqueue("get_rows", dict(src=src, rows=rows, out=out), stream,
                        lambda t: self.launch_get_rows(t["src"], t["rows"], t["out"]),
                        lambda a: index_checks.check_rows("get_rows", a["rows"], len(a["src"])))

    def cpy(self, src, out, perm, step: int = 1, stream=None) -> None:
        perm = self.on.check(CHECKS.cpy, src, out, perm, step)
        perm = tuple(int(i) for i in perm)
        self.on.enqueue("cpy", dict(src=src, out=out), stream,
                        lambda t: self.launch_cpy(t["src"], t["out"], perm, step))

    # scenario primitives: NumPy on the worker-thread streams in interpreter mode (they are not
    # what this backend tests), torch on CUDA streams otherwise
    def matmul(self, a, b, out, stream=None) -> None:
        self.on.matmul(a, b, out, stream)

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        self.on.rms_norm(x, weight, out, eps, stream)

    def add(self, a, b, out, stream=None) -> None:
        self.on.add(a, b, out, stream)

    def timer(self):
        """CUDA events around one call; None in interpreter mode, where a time would measure
        Python, not the kernel (perf mode refuses a backend whose ``is_interpreter``)."""
        return self.on.timer()


def check_merge_shapes(out, lse, part_out, part_lse) -> None:
    if out.ndim != 3 or part_out.shape != out.shape:
        raise ValueError(f"attn_merge: out {out.shape} and part_out {part_out.shape} must be"
                         " equal [n, H, D]")
    if not lse.shape == part_lse.shape == out.shape[:2]:
        raise ValueError(f"attn_merge: lse {lse.shape}, part_lse {part_lse.shape} must be "
                         f"{out.shape[:2]}")


# -- what differs between the two runtimes: one object each, chosen when the backend is made ----
def _is_cuda(runtime: Runtime) -> bool:
    return not isinstance(runtime, ThreadRuntime)


class _Interpreted(NumpyModelOps):
    """Interpreter mode on the worker-thread runtime: NumPy arrays, checked on the host (shapes,
    dtypes, then index values on the worker, since the interpreter would touch arbitrary memory
    for a bad index), launched on zero-copy torch views, one launch at a time."""

    def __init__(self, runtime: ThreadRuntime) -> None:
        self.runtime = runtime

    @staticmethod
    def check(check, *args):
        return check(*args)

    def enqueue(self, op: str, arrays: dict, stream, launch, check_indices=None) -> None:
        """Run ``launch`` (torch tensors in) on the stream; ``check_indices`` (NumPy arrays in)
        first."""

        def work(views: dict) -> None:
            if check_indices is not None:
                check_indices(views)
            tensors = {name: as_torch(arr) for name, arr in views.items()}
            with _INTERPRETER_LOCK:
                launch(tensors)

        self.runtime.run(op, arrays, stream, work)

    @staticmethod
    def timer():
        return None

    # NumpyModelOps's plumbing
    def _same_device(self, op: str, **arrays):
        return self.runtime.same_device(op, **arrays)

    def _submit(self, device, stream, work) -> None:
        self.runtime.submit(device, stream, work)


class _OnCuda:
    """cuda mode: torch CUDA tensors, launched through the CUDA runtime (recorded while a graph
    capture is open); its own shape checks; torch scenario primitives; CUDA-event timing."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def check(self, check, *args):
        """Shape checks only (the interpreter's checks expect NumPy dtypes)."""
        return self.runtime.check(check.__name__, *args)

    def enqueue(self, op: str, arrays: dict, stream, launch, check_indices=None) -> None:
        self.runtime.run(op, arrays, stream, launch)

    def timer(self):
        return self.runtime.timer()

    def matmul(self, a, b, out, stream=None) -> None:
        self.runtime.matmul(a, b, out, stream)

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        self.runtime.rms_norm(x, weight, out, eps, stream)

    def add(self, a, b, out, stream=None) -> None:
        self.runtime.add(a, b, out, stream)


def _check_paged(a: dict) -> None:
    index_checks.check_paged(len(a["q"]), a["k"].shape[0], a["k"].shape[1], a["block_table"],
                             a["seq_lens"], a["q_start"])


def one_query_per_sequence(q, paged) -> bool:
    """The decode shape: as many query rows as sequences (n_q == 1 for contiguous attention).
    From shapes only: reading q_start would make the host wait for the GPU on every call (the
    fifth H200 run) and cannot be captured; the decode kernel finds each row's sequence."""
    if paged is None:
        return q.shape[0] == 1
    n_seqs = paged.block_table.shape[0]
    return n_seqs > 0 and q.shape[0] == n_seqs
