"""The backend protocol: the one contract between the harness and every backend.

A backend is a class with a ``name``, an ``available()`` classmethod and one method per op it
implements.  Op methods take the backend's *own* arrays (made by ``to_device``) and write their
results into output arrays the harness allocated (poisoned with NaN, surrounded by guard
regions), so a kernel that writes too little or too much is caught.  Ops run on a stream; a
backend may return before the work is done, and the harness calls ``synchronize`` before
reading anything back.

Shapes are row-major and token-major.  Dtype names are ``f32``, ``f16``, ``bf16`` (storage);
indices are int32 unless said otherwise.

Op semantics (the oracles in ``opbench.reference`` are the normative definition):

``rope(x, pos, out, p, freq_factors=None, stream=None)``
    x, out ``[n_tokens, n_heads, head_dim]`` (same dtype); pos int32 ``[n_tokens]``, or
    ``[4, n_tokens]`` for ``mode="mrope"`` (ggml layout: section-major).  Dims past ``n_dims``
    are copied unchanged.  freq_factors float32 ``[n_dims // 2]`` divides theta when given.

``attention(q, k, v, out, p, mask=None, sinks=None, lse=None, paged=None, stream=None)``
    Contiguous: q ``[n_q, H, Dk]``, k ``[n_kv, Hkv, Dk]``, v ``[n_kv, Hkv, Dv]``, out
    ``[n_q, H, Dv]``; query i sits at position ``n_kv - n_q + i``, key j at j.  mask float32
    ``[n_q, n_kv]`` additive (may hold -inf); sinks float32 ``[H]``; lse float32 ``[n_q, H]``
    (natural log of the softmax denominator, sinks included).  Paged (``paged`` given): k, v are
    caches ``[num_blocks, block_size, Hkv, D]``; q holds the queries of all sequences packed,
    sequence s owning rows ``q_start[s]:q_start[s+1]``, whose local query i sits at position
    ``seq_lens[s] - q_len_s + i``; key t of sequence s is at slot
    ``block_table[s, t // block_size] * block_size + t % block_size``.  Score order:
    ``s = scale*q.k``; softcap ``c*tanh(s/c)``; ``+ mask``; ``+ slope_h*(kpos - qpos)`` (ALiBi);
    causal / window (key visible iff ``0 <= qpos - kpos < window``) set -inf.  A row with no
    visible key gives out 0 and lse -inf.

``kv_rotate(key_cache, block_indices, deltas, lut, layout, stream=None)``
    In place on key_cache ``[num_blocks, block_size, Hkv, D]``.  block_indices int32 ``[R]``;
    deltas int32 ``[R, 1]`` (per block, broadcast) or ``[R, block_size]`` (per token), in LUT
    rows; lut float32 ``[rows, D]``: cos half then sin half (sin already negated).  layout
    ``rotate_half`` (pairs j, j+D/2) or ``interleaved`` (pairs 2j, 2j+1).  Pair (a, b) becomes
    ``(a*c - b*s, b*c + a*s)`` with c, s the LUT entries of pair j.

``set_rows(dst, src, slots, stream=None)``: ``dst[slots[i]] = convert(src[i])``, slot -1 skips.
``get_rows(src, rows, out, stream=None)``: ``out[i] = convert(src[rows[i]])``.
``cpy(src, out, perm, step, stream=None)``: ``out = convert(src.transpose(perm)[::step])``
    (``step`` slices the first dim of the permuted view), rounding to nearest even.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

DTYPES = ("f32", "f16", "bf16")
ROPE_MODES = ("normal", "neox", "mrope")
ROTATE_LAYOUTS = ("rotate_half", "interleaved")


def numpy_dtype(name: str) -> np.dtype:
    """Storage dtype name -> NumPy dtype (bf16 through ml_dtypes)."""
    if name == "f32":
        return np.dtype(np.float32)
    if name == "f16":
        return np.dtype(np.float16)
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "f64":
        return np.dtype(np.float64)
    if name == "i32":
        return np.dtype(np.int32)
    raise ValueError(f"dtype={name!r} must be one of {DTYPES + ('f64', 'i32')}")


def dtype_name(dtype: Any) -> str:
    """NumPy dtype -> storage dtype name; inverse of numpy_dtype."""
    dt = np.dtype(dtype)
    for name in DTYPES + ("f64", "i32"):
        if numpy_dtype(name) == dt:
            return name
    raise ValueError(f"dtype {dt} has no opbench name")


@dataclass(frozen=True)
class RopeParams:
    """ggml's rope_ext parameters.  ``sections`` are mrope's pair counts per position stream."""

    n_dims: int
    mode: str = "normal"
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    sections: tuple[int, int, int, int] | None = None
    inverse: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ROPE_MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {ROPE_MODES}")
        if self.n_dims <= 0 or self.n_dims % 2:
            raise ValueError(f"n_dims={self.n_dims} must be even and > 0")
        if self.mode == "mrope" and (self.sections is None or len(self.sections) != 4):
            raise ValueError(f"sections={self.sections} must be 4 ints for mode='mrope'")

    def key(self) -> tuple:
        """Everything that changes the angles: what a sin/cos cache must be keyed on."""
        return dataclasses.astuple(self)


@dataclass(frozen=True)
class AttnParams:
    scale: float
    causal: bool = False
    window: int = 0  # 0: no sliding window
    softcap: float = 0.0  # 0: off
    max_bias: float = 0.0  # 0: no ALiBi


@dataclass(frozen=True)
class PagedKV:
    """Block table int32 [n_seqs, max_blocks], seq_lens int32 [n_seqs], q_start int32 [n_seqs+1].

    The three arrays are the backend's own arrays (already on the device)."""

    block_table: Any
    seq_lens: Any
    q_start: Any


class Backend:
    """Base class with the protocol's defaults.  Subclass it; override what you implement.

    A backend instance is created with keyword options (e.g. ``rope_cache=False``) and
    ``devices(n)`` is called before any op.  Unimplemented ops raise NotImplementedError and
    the harness reports them unsupported automatically (see ``implements``).
    """

    name: str = "base"

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._devices: list[Any] = [None]

    # -- discovery ------------------------------------------------------------------------
    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    def info(self) -> dict:
        """Facts for result records and ``opbench doctor``: mode, versions, device names."""
        return {}

    def known_failures(self) -> list[tuple]:
        """(case-id regex, reason with evidence[, may_pass]) entries this backend fails.

        Kept in a file beside the backend, never in the harness.  A failing case matching one
        is reported XFAIL (shown, not fatal); a passing one XPASS (the entry is stale) unless
        ``may_pass`` is true: a precision limit whose failure depends on the inputs."""
        return []

    def implements(self, method: str) -> bool:
        """Whether this class overrides the protocol method ``method`` (an op such as ``rope``,
        or an optional ability such as ``copy_async``): the base versions raise
        NotImplementedError.  The harness maps an op to its method (its ``OpSpec.method``)."""
        base = getattr(Backend, method, None)
        return base is not None and getattr(type(self), method, base) is not base

    def supports(self, case: Any) -> bool | str:
        """True, or a reason string why ``case`` is not supported.  Override it for the cases of
        an implemented op this backend refuses; an op whose method is not overridden is
        reported unsupported by the harness without asking."""
        return True

    # -- devices and memory ---------------------------------------------------------------
    def devices(self, n: int = 1) -> list[Any]:
        self._devices = [None] * n
        return self._devices

    def to_device(self, host: np.ndarray, device: Any = None) -> Any:
        return np.array(host, copy=True)

    def to_host(self, arr: Any) -> np.ndarray:
        return np.asarray(arr).copy()

    def view(self, arr: Any, offset: int, shape: Sequence[int]) -> Any:
        """A view of a flat array: elements offset.. reshaped (used for guard regions)."""
        n = int(np.prod(shape))
        return arr[offset : offset + n].reshape(tuple(shape))

    def synchronize(self, device: Any = None) -> None:
        """Block until all work queued on ``device`` (all devices if None) is done."""

    def close(self) -> None:
        """Release threads and device memory."""

    # -- streams, events, async copies (optional runtime features) -------------------------
    def stream(self, device: Any = None) -> Any:
        return None

    def record_event(self, stream: Any) -> Any:
        return None

    def wait_event(self, stream: Any, event: Any) -> None:
        pass

    def copy_async(self, src: Any, dst_device: Any, stream: Any = None) -> Any:
        raise NotImplementedError

    def timer(self) -> Callable[[Callable[[], None]], float] | None:
        """Optional: a function timing one synchronized call, returning nanoseconds."""
        return None

    # -- ops --------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors=None, stream=None) -> None:
        raise NotImplementedError

    def attention(
        self, q, k, v, out, p: AttnParams, mask=None, sinks=None, lse=None, paged=None, stream=None
    ) -> None:
        raise NotImplementedError

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout: str, stream=None) -> None:
        raise NotImplementedError

    def set_rows(self, dst, src, slots, stream=None) -> None:
        raise NotImplementedError

    def get_rows(self, src, rows, out, stream=None) -> None:
        raise NotImplementedError

    def cpy(self, src, out, perm: Sequence[int], step: int = 1, stream=None) -> None:
        raise NotImplementedError

    # -- scenario primitives (optional; what opbench.harness.scenario's model needs) ---------
    # Like the ops above they run on a stream (the arrays' device's stream by default), are
    # enqueued and may return before the work is done.  f32 arrays unless said otherwise.
    def matmul(self, a, b, out, stream=None) -> None:
        """out [m, n] = a [m, k] @ b [k, n], accumulated in float32 or better."""
        raise NotImplementedError

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        """out = x / sqrt(mean(x*x, last axis) + eps) * weight; x, out [n, d], weight [d]."""
        raise NotImplementedError

    def add(self, a, b, out, stream=None) -> None:
        """out = a + b (same shapes); out may be a."""
        raise NotImplementedError

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        """In place, (out, lse) <- online-softmax merge of (out, lse) and (part_out, part_lse):
        two attentions over disjoint key sets, ``reference.attention.merge_partials`` without
        sinks.  out, part_out [n_q, H, Dv]; lse, part_lse [n_q, H]; an lse of -inf contributes
        nothing (its out is ignored)."""
        raise NotImplementedError

    def write(self, dst, host: np.ndarray, stream=None) -> None:
        """Copy host data into the existing array ``dst`` (same shape; converted to dst's dtype),
        ordered on the stream.  The host array is snapshotted at the call, so the caller may
        reuse it at once.  This is how a replayed graph gets new positions, slots and lengths."""
        raise NotImplementedError

    def rope_for_layer(self, x, pos, out, p: RopeParams, layer: int, freq_factors=None,
                       stream=None) -> None:
        """``rope`` called by model layer ``layer`` (global index).  Backends whose sin/cos cache
        is organised per layer use it; the default ignores the layer."""
        self.rope(x, pos, out, p, freq_factors=freq_factors, stream=stream)

    def capture_begin(self, streams) -> None:
        """Start recording (not running) the work queued on ``streams`` (one stream or a list;
        events recorded and waited between them are part of the recording)."""
        raise NotImplementedError

    def capture_end(self, streams) -> Any:
        """Stop recording; return a graph: the recorded work, bound to the very arrays it was
        queued with (so replays read whatever those arrays hold by then)."""
        raise NotImplementedError

    def replay(self, graph: Any, stream=None) -> None:
        """Enqueue the recorded work again on the streams it was recorded on, with the same
        cross-stream ordering.  The previous replay of the graph must have completed."""
        raise NotImplementedError
