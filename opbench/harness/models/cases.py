"""ROPE, ATTN, KV_ROTATE, SET_ROWS and GET_ROWS cases at one model's exact parameters.

Every distinct layer kind (sliding/full, local/global RoPE) gets prefill and decode shapes;
ROPE runs at small positions and at positions reaching the model's maximum context.  A case
names its model (``model=``) and layer kind (``layer=``); the op specs take RoPE frequencies,
freq_factors, windows and the attention scale from the model, so a case rebuilds the same way
in a worker process.
"""

from __future__ import annotations

from ..cases import Case
from . import Model, load, rope_ready

PREFILL, DECODE = 7, 1  # tokens per ROPE case
ATTN_PREFILL = 16
ATTN_CONTEXT = 1023  # keys of a full-attention decode case: a multiple of no tile size
KV_BLOCK = 16


def model_cases(ref: str) -> list[Case]:
    model = load(ref)
    out = []
    for kind in model.kinds:
        if rope_ready(model) is None:
            out += rope_cases(model, ref, kind) + kv_rotate_cases(model, ref, kind)
        out += attn_cases(model, ref, kind)
    return out + copy_cases(model, ref)


def _short(kind: str) -> str:
    return kind.split("_")[0]


def rope_cases(model: Model, ref: str, kind: str) -> list[Case]:
    """Prefill and decode, at positions < 3000 and ending at the maximum context."""
    out = []
    for tokens in (PREFILL, DECODE):
        for pos in (None, model.max_ctx - 2 * tokens):
            where = {} if pos is None else {"pos": pos}
            out.append(Case.make("ROPE", type="f32", ne=[model.rope_head_dim, model.n_heads,
                                                         tokens],
                                 n_dims=model.rope_dim, mode=model.mode, inv=False,
                                 model=ref, layer=_short(kind), **where))
    return out


def attn_cases(model: Model, ref: str, kind: str) -> list[Case]:
    """Prefill from position 0, decode over a context past the window, decode paged."""
    window = model.kinds[kind].window
    context = window + 37 if window else ATTN_CONTEXT
    common = dict(hs=[model.head_dim, model.v_head_dim], nh=model.n_heads, nkvh=model.n_kv_heads)
    flags = dict(causal=1, win=int(bool(window)), mask=0, sc=model.softcap,
                 mb=8.0 if model.alibi else 0.0, sinks=int(model.sinks), lse=0)
    shapes = ((ATTN_PREFILL, ATTN_PREFILL, 0), (DECODE, context, 0), (3, context, 2))
    return [Case.make("ATTN", type="f32", **common, nq=nq, nkv=nkv, **flags, paged=paged,
                      window=window, scale=model.attn_scale, model=ref, layer=_short(kind))
            for nq, nkv, paged in shapes]


def kv_rotate_cases(model: Model, ref: str, kind: str) -> list[Case]:
    """Re-rotation of cached keys at the kind's RoPE base, per block and per token."""
    layout = "interleaved" if model.mode == "normal" else "rotate_half"
    theta = model.kinds[kind].theta
    return [Case.make("KV_ROTATE", type="f32", layout=layout, delta=delta, bs=KV_BLOCK,
                      hs=model.rope_dim, nkvh=model.rope_kv_heads, nrot=5, nblk=8, base=theta,
                      model=ref, layer=_short(kind))
            for delta in ("block", "token")]


def copy_cases(model: Model, ref: str) -> list[Case]:
    """Writing a prefill's and a decode step's KV rows into the cache, and reading them back,
    in f32 and into an f16 cache (the row shape is the same in every layer)."""
    row = list(model.cache_row)
    out = []
    for dst, src in (("f32", "f32"), ("f16", "f32")):
        for n in (PREFILL, DECODE):
            out.append(Case.make("SET_ROWS", type=dst, type_src=src, row=row, nr=n,
                                 nslots=2 * n + 5, skip=0, model=ref))
            out.append(Case.make("GET_ROWS", type=src, type_src=dst, row=row, nr=n, nsrc=n + 9,
                                 model=ref))
    return out
