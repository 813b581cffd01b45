"""The Triton backend as the harness sees it: availability, mode reporting, the cpu backend's
device model (devices, streams, events, async copies) around interpreted kernels, the decode
path choice, index checks, and one case of every op through the generic runner."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from opbench.backends.triton import TritonBackend
from opbench.backends.triton import backend as triton_backend
from opbench.harness.cases import Case
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
from opbench.harness.triton_testing import require_triton
from opbench.protocol import AttnParams, RopeParams
from opbench.reference import rope as rope_ref


@pytest.fixture
def backend():
    require_triton()
    b = TritonBackend(mode="interpreter")
    b.devices(2)
    yield b
    b.close()


def test_unavailable_without_triton_names_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    ok, reason = TritonBackend.available()
    assert not ok
    assert "pip install 'opbench[triton]'" in reason


def test_reports_interpreter_mode_and_refuses_a_timer(backend):
    info = backend.info()
    assert info["mode"] == "interpreter" and info["is_interpreter"] is True
    assert backend.is_interpreter
    assert backend.timer() is None  # interpreted kernels must never be timed as a GPU
    assert set(info) >= {"triton", "torch", "devices"}


def test_rejects_unknown_mode_and_options():
    require_triton()
    with pytest.raises(ValueError, match="mode="):
        TritonBackend(mode="rocm")
    with pytest.raises(ValueError, match="unknown"):
        TritonBackend(tile=3)


def _rope_inputs(backend, device, rng):
    x = rng.uniform(-1, 1, (3, 2, 8)).astype(np.float32)
    pos = np.array([5, 900, 17], np.int32)
    arrays = [backend.to_device(a, device) for a in (x, pos)]
    out = backend.to_device(np.full_like(x, np.nan), device)
    return x, pos, arrays, out


def test_ops_run_on_the_owning_devices_stream_and_events_order_them(backend):
    """ROPE on device 1's stream, held by a gate: nothing is written until the stream runs;
    device 0 waits on an event of device 1, then copies the result over."""
    rng = np.random.default_rng(0)
    p = RopeParams(n_dims=8, mode="neox")
    x, pos, (dx, dpos), dout = _rope_inputs(backend, 1, rng)
    stream1 = backend.stream(1)
    gate = backend.hold(stream1)
    backend.rope(dx, dpos, dout, p, stream=stream1)
    assert np.isnan(np.asarray(dout)).all()  # queued behind the gate, not run on the caller
    done = backend.record_event(stream1)
    backend.wait_event(backend.stream(0), done)
    copy = backend.copy_async(dout, 0, stream=backend.stream(0))
    gate.release()
    backend.synchronize()
    expected = rope_ref.rope(x, pos, n_dims=8, mode="neox")
    np.testing.assert_allclose(backend.to_host(copy), expected, rtol=1e-5, atol=1e-6)
    assert copy.device == backend.devices(2)[0]


def test_arrays_of_another_device_are_refused(backend):
    rng = np.random.default_rng(1)
    _, _, (dx, _), dout = _rope_inputs(backend, 0, rng)
    pos_on_1 = backend.to_device(np.array([1, 2, 3], np.int32), 1)
    with pytest.raises(ValueError, match="lives on"):
        backend.rope(dx, pos_on_1, dout, RopeParams(n_dims=8))


def test_bad_index_values_fail_at_synchronize_instead_of_touching_memory(backend):
    dst = backend.to_device(np.zeros((4, 8), np.float32))
    src = backend.to_device(np.ones((2, 8), np.float32))
    slots = backend.to_device(np.array([1, 4], np.int32))  # 4 is out of range
    backend.set_rows(dst, src, slots)
    with pytest.raises(ValueError, match="slots must lie in"):
        backend.synchronize()
    assert not backend.to_host(dst).any()


def test_decode_path_is_chosen_for_one_query_per_sequence(backend, monkeypatch):
    calls = []
    monkeypatch.setattr(TritonBackend, "launch_decode", lambda self, *a: calls.append("decode"))
    monkeypatch.setattr(TritonBackend, "launch_attention", lambda self, *a: calls.append("flash"))
    p = AttnParams(scale=0.5)
    for n_q in (1, 2):
        q = backend.to_device(np.ones((n_q, 2, 16), np.float32))
        kv = backend.to_device(np.ones((5, 1, 16), np.float32))
        out = backend.to_device(np.zeros((n_q, 2, 16), np.float32))
        backend.attention(q, kv, kv, out, p)
    backend.synchronize()
    assert calls == ["decode", "flash"]


def test_the_decode_shape_is_read_from_shapes_alone():
    """As many query rows as sequences is the decode shape whatever q_start holds: reading it
    would make the host wait for the GPU on every call."""
    torch = pytest.importorskip("torch")
    from opbench.protocol import PagedKV

    table = torch.zeros((3, 2), dtype=torch.int32)
    for n_q, starts, expected in ((3, [0, 1, 2, 3], True), (3, [0, 0, 2, 3], True),
                                  (4, [0, 1, 2, 4], False)):
        paged = PagedKV(table, torch.zeros(3, dtype=torch.int32),
                        torch.tensor(starts, dtype=torch.int32))
        assert triton_backend.one_query_per_sequence(torch.zeros((n_q, 1, 4)), paged) is expected


@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1, 1], [0, 3, 0, 2, 0], [2, 0, 1, 0, 2]],
                         ids=["one-each", "two-sequences", "uneven"])
def test_split_kv_decode_finds_each_rows_sequence(backend, q_lens):
    """The decode kernel takes a program per query row and searches q_start for its sequence,
    so rows packed unevenly (a sequence with several, others with none) still match."""
    from opbench.protocol import PagedKV
    from opbench.reference import attention as attn_ref

    rng = np.random.default_rng(7)
    n_seqs, heads, kv_heads, dim, block = 5, 4, 2, 16, 4
    seq_lens = np.array([9, 14, 5, 16, 3], np.int32)
    q = rng.uniform(-1, 1, (n_seqs, heads, dim)).astype(np.float32)
    k, v = (rng.uniform(-1, 1, (24, block, kv_heads, dim)).astype(np.float32) for _ in "kv")
    table = rng.permutation(24)[:20].reshape(n_seqs, 4).astype(np.int32)
    sinks = rng.uniform(-2, 2, heads).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    d = {n: backend.to_device(a) for n, a in
         dict(q=q, k=k, v=v, sinks=sinks, table=table, lens=seq_lens, starts=starts).items()}
    out = backend.empty(q.shape, np.float32)
    lse = backend.empty((n_seqs, heads), np.float32)
    params = AttnParams(scale=0.25, causal=True, max_bias=4.0)
    backend.attention(d["q"], d["k"], d["v"], out, params, sinks=d["sinks"], lse=lse,
                      paged=PagedKV(d["table"], d["lens"], d["starts"]))
    want, want_lse = attn_ref.paged_attention(q, k, v, table, seq_lens, np.array(q_lens),
                                              scale=0.25, causal=True, max_bias=4.0,
                                              sinks=sinks, return_lse=True)
    np.testing.assert_allclose(backend.to_host(out), want, atol=1e-5)
    np.testing.assert_allclose(backend.to_host(lse), want_lse, atol=1e-5)


ONE_CASE_PER_OP = {
    "ROPE": "ROPE(type=bf16,ne=[80,4,9],n_dims=32,mode=neox",
    "ATTN": "ATTN(type=f16,hs=[64,64],nh=12,nkvh=4,nq=5,nkv=37",
    "KV_ROTATE": "KV_ROTATE(type=bf16,layout=interleaved,delta=token,bs=8,hs=80",
    "SET_ROWS": "SET_ROWS(type=bf16,type_src=f32",
    "GET_ROWS": "GET_ROWS(type=f16,type_src=bf16",
    "CPY": "CPY(",
}


def _first_case(op: str, prefix: str) -> Case:
    for case in SPECS[op].cases():
        if case.id.startswith(prefix):
            return case
    raise AssertionError(f"no {op} case starts with {prefix!r}")


@pytest.mark.parametrize("op", list(ONE_CASE_PER_OP))
def test_one_case_of_every_op_passes_through_the_runner(backend, op):
    case = _first_case(op, ONE_CASE_PER_OP[op])
    record = run_case(backend, case, device=backend.devices(2)[1], device_name="cpu:1")
    assert record["status"] == "OK", f"{case.id}: {record['reason']}"


class _LaunchCounter(TritonBackend):
    """Counts kernel launches by name (on the stream's worker thread)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.launches: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.launches[name] = self.launches.get(name, 0) + 1

    def launch_rope(self, *args):
        self._count("rope")
        super().launch_rope(*args)

    def launch_attention(self, *args):
        self._count("attention")
        super().launch_attention(*args)

    def launch_decode(self, *args):
        self._count("decode")
        super().launch_decode(*args)

    def launch_attn_merge(self, *args):
        self._count("attn_merge")
        super().launch_attn_merge(*args)

    def launch_kv_rotate(self, *args):
        self._count("kv_rotate")
        super().launch_kv_rotate(*args)

    def launch_set_rows(self, *args):
        self._count("set_rows")
        super().launch_set_rows(*args)

    def launch_get_rows(self, *args):
        self._count("get_rows")
        super().launch_get_rows(*args)


SCENARIOS = {  # split, devices, graph reuse -> the launches that step loop must make
    "ring-graph-delay": (("ring", 2, True), {"rope", "attention", "attn_merge", "kv_rotate",
                                              "set_rows", "get_rows"}),
    "head-decode": (("head", 2, False), {"rope", "attention", "decode", "kv_rotate",
                                          "set_rows"}),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_runs_through_the_triton_kernels(name):
    """A split decode loop with eviction and stream delays (the ring one replaying a captured
    graph) matches the float64 model at every step, and its attention, RoPE, cache writes,
    rotations and merges are Triton launches."""
    require_triton()
    from opbench.harness.scenario.config import ScenarioSpec
    from opbench.harness.scenario.judge import run_scenario, scenario_options

    (split, devices, graph_reuse), expected = SCENARIOS[name]
    spec = ScenarioSpec(split=split, devices=devices, evict=True, graph_reuse=graph_reuse,
                        delay=True, layers=2, steps=2)
    backend = _LaunchCounter(mode="interpreter", **scenario_options(spec))
    try:
        result = run_scenario(backend, spec)
    finally:
        backend.close()
    assert result.ok, result.divergence.describe()
    assert set(backend.launches) >= expected, backend.launches


def test_cuda_mode_is_refused_without_a_gpu():
    torch = pytest.importorskip("torch")
    require_triton()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        triton_backend.resolve_mode("cuda")


@pytest.mark.gpu
@pytest.mark.slow  # compiles every quick-table kernel in one process: minutes on a fresh GPU
def test_native_gpu_run_passes_the_quick_tables(tmp_path):
    """On a GPU: a fresh process (the mode is per process) runs the quick tables natively
    (gpu_check.sh runs the same tables with sixteen workers instead)."""
    import os
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "opbench.cli.main", "test", "-b", "triton",
                          "--quick"], env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_package_imports_without_triton_and_torch():
    """In a process where neither can be imported, the backend module still imports and
    reports itself unavailable with the install command."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('triton', 'torch'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from opbench.backends.triton import TritonBackend\n"
        "print(TritonBackend.available())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr
    assert "False" in run.stdout and "opbench[triton]" in run.stdout


def test_tile_options_reach_the_kernel_that_takes_them():
    require_triton()
    backend = TritonBackend(mode="interpreter", block_n=16, num_warps=2, split_len=64)
    try:
        flash = backend._attention_tiles(64, decode=False)
        decode = backend._attention_tiles(64, decode=True)
    finally:
        backend.close()
    assert flash == {"block_m": 64, "block_n": 16, "num_warps": 2}
    assert decode == {"block_n": 16, "split_len": 64}


@pytest.mark.parametrize("interpreter, head_dim", [(True, 64), (False, 64), (False, 128),
                                                   (False, 256), (False, 576)])
def test_declared_thresholds_are_the_default_tiles(interpreter, head_dim):
    """The tables read TritonBackend.THRESHOLDS: they must name the tiles the kernels use."""
    kernels = require_triton()
    flash = kernels[1].default_tiles(interpreter, head_dim)
    decode = kernels[1].default_tiles(interpreter, head_dim, decode=True)
    declared = {(t.size, t.value) for t in TritonBackend.THRESHOLDS}
    assert ("nq", flash["block_m"]) in declared
    assert ("nkv", flash["block_n"]) in declared
    assert ("nkv", decode["block_n"]) in declared
    assert ("nkv", decode["split_len"]) in declared
