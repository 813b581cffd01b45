"""The ``torch`` backend: the ops written the way PyTorch users write them.

ROPE follows Hugging Face's ``rotate_half`` (neox, mrope) and GPT-J's ``rotate_every_two``
(normal) code: an ``inv_freq`` vector, ``freqs = pos * inv_freq``, ``cos``/``sin`` times the
attention scaling, cast to the input dtype, ``x*cos + rotate(x)*sin`` in the input dtype.  The
ggml parameters (YaRN ramp, mscale, freq_factors, mrope sections) all reduce to a per-pair
inverse frequency and one scaling, which is exactly what HF's ``ROPE_INIT_FUNCTIONS`` return.

ATTN goes through ``torch.nn.functional.scaled_dot_product_attention`` with an additive float
mask (bottom-right causal, window, user mask, ALiBi bias), the way HF builds ``attn_mask`` for
SDPA.  What SDPA cannot express (logit softcap, sinks, log-sum-exp) uses HF's "eager" path:
``q @ k.T``, ``tanh`` softcap (Gemma-2), a sink column (gpt-oss), ``softmax``, ``@ v``.  Paged KV
is gathered from the caches with the block table (torch indexing), one sequence at a time.

Arrays are torch tensors; CPU here, CUDA devices/streams/events when ``torch.cuda`` is there.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Any, Sequence

import numpy as np

from opbench.protocol import AttnParams, Backend, Option, RopeParams

from .common.device_ceilings import torch_cuda_ceilings
from .common.event_timer import torch_event_timer
from .common.host import flush_host_caches
from .common.yarn import yarn_corr_dims


class _OnFirstUse:
    """A module imported on its first attribute access, which then takes this stand-in's
    global name.  Every run that builds the default tables imports this module (for the
    backends' declared thresholds), and importing torch costs seconds that only a run of this
    backend needs."""

    def __init__(self, name: str, binding: str) -> None:
        self._name, self._binding = name, binding

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        globals()[self._binding] = module
        return getattr(module, attr)


# optional: the module must import without torch
_FOUND = importlib.util.find_spec("torch") is not None
torch = _OnFirstUse("torch", "torch") if _FOUND else None
F = _OnFirstUse("torch.nn.functional", "F") if _FOUND else None

INSTALL_HINT = "pip install 'opbench[torch]'"


def _torch_dtype(np_dtype: np.dtype):
    name = np.dtype(np_dtype).name
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}
    if name not in table:
        raise ValueError(f"dtype {name} has no torch equivalent here")
    return table[name]


# -- ROPE: inverse frequencies from ggml's parameters (HF ROPE_INIT_FUNCTIONS style) ----------

def rope_inv_freq(p: RopeParams, freq_factors=None, device=None):
    """float32 ``[n_dims/2]`` inverse frequencies on ``device`` and the float attention scaling.

    YaRN mixes interpolated (``freq_scale * theta``) and extrapolated theta per pair; since
    theta is linear in the position, the mix is a per-pair inverse frequency, as in HF's
    ``_compute_yarn_parameters``.  Built in float64 and rounded once to float32 (HF builds it
    in float32 in several steps; each step adds angle error at positions of thousands).
    Made where it is used: an upload from pageable host memory waits for the GPU's queue (the
    fifth H200 run timed torch's RoPE waiting for the device on every call)."""
    pairs = torch.arange(0, p.n_dims, 2, dtype=torch.float64, device=device)
    inv_freq = 1.0 / (p.freq_base ** (pairs / p.n_dims))
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.double().to(inv_freq.device)
    scaling = p.attn_factor
    if p.ext_factor != 0.0:
        low, high = yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast,
                                   p.beta_slow)
        ramp = ((torch.arange(p.n_dims // 2, dtype=torch.float64, device=device) - low)
                / max(0.001, high - low))
        extrapolation = (1.0 - ramp.clamp(0.0, 1.0)) * p.ext_factor
        inv_freq = inv_freq * p.freq_scale * (1.0 - extrapolation) + inv_freq * extrapolation
        scaling *= 1.0 + 0.1 * math.log(1.0 / p.freq_scale)
    else:
        inv_freq = inv_freq * p.freq_scale
    return inv_freq.float(), scaling


def mrope_pair_rows(sections: Sequence[int], n_pairs: int, device=None):
    """Which position stream each pair reads (Qwen2-VL ``mrope_section`` split, cycled): the
    number of section ends at or below the pair's sector, counted on ``device``."""
    sector = torch.arange(n_pairs, device=device) % sum(sections)
    ends = (sections[0], sections[0] + sections[1], sections[0] + sections[1] + sections[2])
    return sum((sector >= end).long() for end in ends)


def rope_cos_sin(pos, p: RopeParams, freq_factors, dtype):
    """cos, sin ``[n_tokens, 1, n_dims/2]`` in ``dtype`` (HF casts them to the input dtype)."""
    inv_freq, scaling = rope_inv_freq(p, freq_factors, pos.device)
    if p.mode == "mrope":
        rows = mrope_pair_rows(p.sections, p.n_dims // 2, pos.device)
        pair_pos = pos.long()[rows, :].T.float()  # [n_tokens, n_pairs]
        freqs = pair_pos * inv_freq
    else:
        freqs = pos.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    if p.inverse:
        sin = -sin
    return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)


def rotate_half(x):
    """HF Llama/NeoX: pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x):
    """GPT-J: pairs (2i, 2i+1)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x, cos, sin, mode: str):
    if mode == "normal":
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        return x * cos + rotate_every_two(x) * sin
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return x * cos + rotate_half(x) * sin


# -- ATTN ----------------------------------------------------------------------------------

def alibi_slopes(n_heads: int, max_bias: float):
    """ggml's slopes (soft_max / flash_attn_ext), float32 ``[H]``."""
    n_head_log2 = 2 ** math.floor(math.log2(n_heads))
    m0 = 2.0 ** (-max_bias / n_head_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    slopes = [m0 ** (h + 1) if h < n_head_log2 else m1 ** (2 * (h - n_head_log2) + 1)
              for h in range(n_heads)]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_bias(q_pos, k_pos, p: AttnParams, n_heads: int, mask=None):
    """Additive float32 bias ``[H or 1, n_q, n_kv]`` and the visibility ``[n_q, n_kv]``."""
    rel = q_pos[:, None] - k_pos[None, :]  # qpos - kpos
    visible = torch.ones_like(rel, dtype=torch.bool)
    if p.causal:
        visible &= rel >= 0
    if p.window > 0:
        visible &= rel < p.window
    bias = torch.zeros(rel.shape, dtype=torch.float32, device=rel.device)
    if mask is not None:
        bias = bias + mask.float()
    bias = bias.masked_fill(~visible, float("-inf"))[None]
    if p.max_bias > 0:
        slopes = alibi_slopes(n_heads, p.max_bias).to(rel.device)
        bias = bias - slopes[:, None, None] * rel.float()[None]
    return bias, visible & ~torch.isneginf(bias).all(dim=0)


def eager_attention(q, k, v, bias, p: AttnParams, sinks=None):
    """HF eager path: scores, softcap, bias, (sink column), softmax, @ v; also the lse.

    q ``[H, n_q, Dk]``; k, v already repeated to H heads.  Computes in float32 as HF does
    (``softmax(..., dtype=torch.float32)``)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * p.scale
    if p.softcap > 0:
        scores = torch.tanh(scores / p.softcap) * p.softcap
    scores = scores + bias
    if sinks is not None:
        sink_col = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)
        scores = torch.cat((scores, sink_col), dim=-1)
    lse = torch.logsumexp(scores, dim=-1)  # [H, n_q]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink takes probability mass but has no value
    return torch.matmul(probs, v.float()), lse


def sdpa_attention(q, k, v, bias, p: AttnParams):
    """SDPA with the bias as ``attn_mask`` and GQA through ``enable_gqa``."""
    gqa = q.shape[0] != k.shape[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None],
                                          attn_mask=bias.to(q.dtype)[None], scale=p.scale,
                                          enable_gqa=gqa)[0]


def attend(q, k, v, q_pos, k_pos, p: AttnParams, mask=None, sinks=None, want_lse=False):
    """One sequence: q ``[n_q, H, Dk]``, k/v ``[n_kv, Hkv, D]`` -> out ``[n_q, H, Dv]``, lse."""
    heads, kv_heads = q.shape[1], k.shape[1]
    bias, visible = attention_bias(q_pos, k_pos, p, heads, mask)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    lse = None
    if p.softcap > 0 or sinks is not None or want_lse:
        group = heads // kv_heads
        kh, vh = kh.repeat_interleave(group, dim=0), vh.repeat_interleave(group, dim=0)
        out, lse = eager_attention(qh, kh, vh, bias, p, sinks)
    else:
        out = sdpa_attention(qh, kh, vh, bias, p)
    # a row with no visible key: SDPA gives NaN; the contract is 0 (users zero it the same way)
    row_empty = ~visible.any(dim=-1)
    out = out.masked_fill(row_empty[None, :, None], 0.0)
    return out.transpose(0, 1), (lse.T if lse is not None else None)


# -- the backend -----------------------------------------------------------------------------

class TorchBackend(Backend):
    name = "torch"
    OPTIONS = (Option("rope_upcast", bool, False,
                      "compute RoPE in float32 for f16/bf16 inputs (default: in their dtype)"),)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if torch is None:
            return False, INSTALL_HINT
        try:
            torch.__version__  # noqa: B018 - the deferred import, which may fail
        except ImportError as exc:  # found but broken
            return False, f"{INSTALL_HINT} (import torch: {exc})"
        return True, ""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._cuda = torch is not None and torch.cuda.is_available()
        self._streams: dict[int, Any] = {}  # GPU index -> its stream (CUDA only)

    def info(self) -> dict:
        names = [torch.cuda.get_device_name(d) for d in self._devices] if self._cuda else ["cpu"]
        return {"torch": torch.__version__, "device": "cuda" if self._cuda else "cpu",
                "device_names": names, "threads": torch.get_num_threads()}

    def known_failures(self) -> list[tuple]:
        from .torch_known_failures import KNOWN_FAILURES

        return list(KNOWN_FAILURES)

    # -- devices and memory -----------------------------------------------------------------
    def devices(self, n: int = 1) -> list[Any]:
        if self._cuda:
            count = torch.cuda.device_count()
            self._devices = [torch.device("cuda", i % count) for i in range(n)]
        else:
            self._devices = [torch.device("cpu")] * n
        return self._devices

    def to_device(self, host: np.ndarray, device: Any = None) -> Any:
        device = device if device is not None else self._devices[0] or torch.device("cpu")
        host = np.ascontiguousarray(host)
        if host.dtype.name == "bfloat16":  # ml_dtypes bf16: same bits as torch.bfloat16
            tensor = torch.from_numpy(host.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(host.copy())
        return tensor.to(device)

    def to_host(self, arr: Any) -> np.ndarray:
        tensor = arr.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()

    def view(self, arr: Any, offset: int, shape: Sequence[int]) -> Any:
        n = int(np.prod(shape))
        return arr[offset : offset + n].view(tuple(shape))

    def synchronize(self, device: Any = None) -> None:
        if self._cuda:
            torch.cuda.synchronize(device)

    def flush_l2(self, device: Any = None) -> None:
        """On the CPU, evict the host's caches (``perf --cold``); on CUDA nothing yet."""
        if not self._cuda:
            flush_host_caches()

    def device_ceilings(self, device: Any = None) -> dict | None:
        """On CUDA the GPU's copy ceiling and L2 size, measured once; on the CPU None (the
        host's calibrated ceilings)."""
        if not self._cuda:
            return None
        return torch_cuda_ceilings(device if device is not None else torch.device("cuda", 0))

    def timer(self):
        """On CUDA: events on the first device's stream, the host's enqueue (torch's
        dispatcher) hidden behind a spin (``common.event_timer``); on the CPU none (the host
        clock)."""
        if not self._cuda:
            return None
        return torch_event_timer(torch, self.stream(self._devices[0]))

    # -- streams and events (CUDA only; CPU ops are synchronous) -----------------------------
    def stream(self, device: Any = None) -> Any:
        """The device's stream: one per GPU, made on first use (logical devices on one GPU
        share it), so the timer's events go where the ops run."""
        if not self._cuda:
            return None
        gpu = torch.device(device if device is not None else self._devices[0] or "cuda")
        index = gpu.index if gpu.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=torch.device("cuda", index))
        return self._streams[index]

    def record_event(self, stream: Any) -> Any:
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream: Any, event: Any) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    def copy_async(self, src: Any, dst_device: Any, stream: Any = None) -> Any:
        with self._on(stream):
            return src.to(dst_device, non_blocking=True)

    def _on(self, stream: Any):
        """Run the enclosed torch calls on ``stream`` (a no-op context on the CPU)."""
        if stream is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.cuda.stream(stream)

    # -- ops --------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors=None, stream=None) -> None:
        # HF's LLM path casts cos/sin to x.dtype and computes there; option rope_upcast=True
        # is HF's vision-tower style (apply_rotary_pos_emb_vision): float32 math, one rounding
        math_dtype = torch.float32 if self.options["rope_upcast"] else x.dtype
        with self._on(stream):
            cos, sin = rope_cos_sin(pos, p, freq_factors, math_dtype)
            rotated = apply_rope(x[..., : p.n_dims].to(math_dtype), cos, sin, p.mode)
            out[..., : p.n_dims] = rotated  # HF partial_rotary_factor: the rest passes through
            out[..., p.n_dims :] = x[..., p.n_dims :]

    def attention(self, q, k, v, out, p: AttnParams, mask=None, sinks=None, lse=None,
                  paged=None, stream=None) -> None:
        with self._on(stream):
            if paged is None:
                n_q, n_kv = q.shape[0], k.shape[0]
                q_pos = torch.arange(n_kv - n_q, n_kv, device=q.device)
                k_pos = torch.arange(n_kv, device=q.device)
                res, res_lse = attend(q, k, v, q_pos, k_pos, p, mask, sinks, lse is not None)
                out.copy_(res)
                if lse is not None:
                    lse.copy_(res_lse)
                return
            self._paged_attention(q, k, v, out, p, sinks, lse, paged)

    def _paged_attention(self, q, k_cache, v_cache, out, p, sinks, lse, paged) -> None:
        """Gather each sequence's keys from the caches by block table, then attend."""
        block_size = k_cache.shape[1]
        q_start = paged.q_start.tolist()
        seq_lens = paged.seq_lens.tolist()
        for s, kv_len in enumerate(seq_lens):
            n_blocks = -(-kv_len // block_size)
            blocks = paged.block_table[s, :n_blocks].long()
            k = k_cache[blocks].flatten(0, 1)[:kv_len]
            v = v_cache[blocks].flatten(0, 1)[:kv_len]
            rows = slice(q_start[s], q_start[s + 1])
            n_q = q_start[s + 1] - q_start[s]
            q_pos = torch.arange(kv_len - n_q, kv_len, device=q.device)
            k_pos = torch.arange(kv_len, device=q.device)
            res, res_lse = attend(q[rows], k, v, q_pos, k_pos, p, None, sinks, lse is not None)
            out[rows] = res
            if lse is not None:
                lse[rows] = res_lse

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout: str, stream=None) -> None:
        with self._on(stream):
            blocks = block_indices.long()
            half = key_cache.shape[-1] // 2
            rows = lut[deltas.long()][..., None, :]  # [R, B or 1, 1, D]: broadcast over heads
            cos, sin = rows[..., :half], rows[..., half:]
            keys = key_cache[blocks].float()
            if layout == "rotate_half":
                a, b = keys[..., :half], keys[..., half:]
                rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
            else:
                a, b = keys[..., ::2], keys[..., 1::2]
                rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
            key_cache[blocks] = rotated.to(key_cache.dtype)

    def set_rows(self, dst, src, slots, stream=None) -> None:
        with self._on(stream):
            keep = slots >= 0  # slot -1: skip the row
            dst[slots[keep].long()] = src[keep].to(dst.dtype)

    def get_rows(self, src, rows, out, stream=None) -> None:
        with self._on(stream):
            out.copy_(src[rows.long()])

    def cpy(self, src, out, perm: Sequence[int], step: int = 1, stream=None) -> None:
        with self._on(stream):
            out.copy_(src.permute(*perm)[::step])
