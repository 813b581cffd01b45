"""The cpu backend's kernels split over threads: the bits must not depend on the thread count."""

import multiprocessing
import threading
import time

import numpy as np
import pytest

from opbench.backends.cpu import jit, kernels, parallel
from opbench.protocol import AttnParams, RopeParams

pytestmark = pytest.mark.skipif(not jit.installed(), reason="numba not installed")


def test_split_covers_the_range_once():
    for n, parts in [(10, 3), (2, 5), (0, 2), (7, 1)]:
        covered = [i for lo, hi in parallel.split(n, parts) for i in range(lo, hi)]
        assert covered == list(range(n))


def _rope_outputs(dtype, mode):
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (37, 3, 64)).astype(dtype)
    pos = rng.integers(0, 5000, 37).astype(np.int32)
    out = np.full(x.shape, np.nan, dtype)
    kernels.rope(x, pos, out, RopeParams(n_dims=48, mode=mode), None, None, use_jit=True)
    return out


def _attention_outputs(dtype, n_q, window=0, softcap=0.0, numba_loop=None, max_bias=0.0,
                       extras=False, key_chunk=None):
    """numba_loop: True / False forces the numba loop / the BLAS path (None: the size rule);
    key_chunk: the numba loop's keys per unit (70 keys: 16 makes five chunks)."""
    rng = np.random.default_rng(9)
    q = rng.uniform(-1, 1, (n_q, 8, 32)).astype(dtype)
    k = rng.uniform(-1, 1, (70, 2, 32)).astype(dtype)
    v = rng.uniform(-1, 1, (70, 2, 16)).astype(dtype)
    mask = rng.uniform(-1, 1, (n_q, 70)).astype(dtype) if extras else None
    sinks = rng.uniform(-1, 1, 8).astype(np.float32) if extras else None
    out = np.full((n_q, 8, 16), np.nan, dtype)
    lse = np.full((n_q, 8), np.nan, np.float32)
    p = AttnParams(scale=0.2, causal=True, window=window, softcap=softcap, max_bias=max_bias)
    with pytest.MonkeyPatch.context() as patch:
        if numba_loop is not None:
            patch.setattr(kernels, "ATTN_JIT_MAX_WORK", 1 << 62 if numba_loop else -1)
            patch.setattr(kernels, "ATTN_JIT_MAX_ROWS", 1 << 62 if numba_loop else -1)
        if key_chunk is not None:
            patch.setattr(kernels, "ATTN_JIT_KEY_CHUNK", key_chunk)
        kernels.attention(q, k, v, out, p, mask=mask, sinks=sinks, lse=lse)
    return out, lse


def _row_outputs():
    rng = np.random.default_rng(4)
    src = rng.uniform(-70000, 70000, (50, 3, 8)).astype(np.float32)
    cache = np.full((64, 3, 8), np.nan, np.float16)
    kernels.set_rows(cache, src, rng.permutation(64)[:50])
    back = np.full((40, 3, 8), np.nan, np.float32)
    kernels.get_rows(cache, rng.integers(0, 64, 40), back)
    keys = rng.uniform(-1, 1, (12, 4, 2, 16)).astype(np.float16)
    lut = rng.uniform(-1, 1, (9, 16)).astype(np.float32)
    kernels.kv_rotate(keys, np.array([3, 0, 7, 11]), rng.integers(0, 9, (4, 4)), lut,
                      "interleaved")
    return cache, back, keys


def _permuted_copy():
    rng = np.random.default_rng(6)
    src = rng.uniform(-70000, 70000, (9, 5, 16)).astype(np.float32)
    out = np.full((3, 9, 16), np.nan, np.float16)  # perm (1, 0, 2), every 2nd of 5 kept
    kernels.cpy(src, out, (1, 0, 2), 2)
    return out


def _contiguous_copy():
    rng = np.random.default_rng(7)
    src = rng.uniform(-70000, 70000, (50, 3, 8)).astype(np.float32)
    out = np.full(src.shape, np.nan, np.float16)
    kernels.cpy(src, out, (0, 1, 2), 1)  # the claimed chunks of jit.convert
    return out


CALLS = {
    "rope f32 neox": lambda: _rope_outputs(np.float32, "neox"),
    "rope f16 normal": lambda: _rope_outputs(np.float16, "normal"),
    "attn f32 prefill": lambda: _attention_outputs(np.float32, 40, window=9, softcap=5.0),
    "attn f16 decode": lambda: _attention_outputs(np.float16, 1),
    "attn f32 prefill, numba loop": lambda: _attention_outputs(np.float32, 40, window=9,
                                                               softcap=5.0, numba_loop=True),
    "attn f16 decode, BLAS": lambda: _attention_outputs(np.float16, 1, numba_loop=False),
    "attn f16 decode, key chunks": lambda: _attention_outputs(np.float16, 1, extras=True,
                                                              key_chunk=16),
    "attn f32 prefill, numba loop, key chunks": lambda: _attention_outputs(
        np.float32, 40, window=9, max_bias=8.0, extras=True, numba_loop=True, key_chunk=16),
    "rows and kv_rotate": _row_outputs,
    "cpy permuted, rows in source order": _permuted_copy,
    "cpy contiguous, converted": _contiguous_copy,
}


def _bits(result):
    arrays = result if isinstance(result, tuple) else (result,)
    return [a.view(np.uint8).copy() for a in arrays]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_results_do_not_depend_on_the_thread_count(monkeypatch, name):
    monkeypatch.setattr(jit, "PARALLEL_ELEMENTS", 1)  # split even these small calls
    by_threads = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        by_threads[threads] = _bits(CALLS[name]())
    for threads in ("2", "3"):
        for one, many in zip(by_threads["1"], by_threads[threads]):
            assert np.array_equal(one, many), f"{name}: {threads} threads differ from 1"


CHUNKED = ["rope f32 neox", "rope f16 normal", "rows and kv_rotate",
           "cpy permuted, rows in source order", "cpy contiguous, converted"]


@pytest.mark.parametrize("name", CHUNKED)
def test_claimed_chunks_cover_every_item_as_one_direct_call_does(monkeypatch, name):
    """The calls split in claimed chunks equal one plain kernel call over everything (a chunk
    left out or run twice shows here; one thread against three would not see it, as both
    run the same chunks)."""
    monkeypatch.setattr(jit, "PARALLEL_ELEMENTS", 1 << 40)  # one direct call
    whole = _bits(CALLS[name]())
    monkeypatch.setattr(jit, "PARALLEL_ELEMENTS", 1)  # chunks of a few items
    for threads in ("1", "2"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        for one, chunked in zip(whole, _bits(CALLS[name]())):
            assert np.array_equal(one, chunked), f"{name}: {threads} thread(s) in chunks differ"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_split_by_kv_heads_equals_one_batch(monkeypatch, dtype):
    """Each part gets its own heads' ALiBi slopes and sinks: the split result is the
    one-batch result, bit for bit."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")
    rng = np.random.default_rng(2)
    q = rng.uniform(-1, 1, (20, 12, 16)).astype(dtype)
    k = rng.uniform(-1, 1, (50, 4, 16)).astype(dtype)
    v = rng.uniform(-1, 1, (50, 4, 8)).astype(dtype)
    sinks = rng.uniform(-1, 1, 12).astype(np.float32)
    p = AttnParams(scale=0.3, causal=True, max_bias=8.0)
    q_pos = np.arange(30, 50)
    split_out, split_lse = kernels.attend_heads(q, k, v, p, q_pos, None, sinks)
    whole_out, whole_lse = kernels.attend(q, k, v, p, q_pos, None, sinks)
    assert np.array_equal(split_out.view(np.uint32), whole_out.view(np.uint32))
    assert np.array_equal(split_lse.view(np.uint32), whole_lse.view(np.uint32))


def test_f16_to_f32_keeps_every_nan_payload_as_numpy_does():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert np.array_equal(jit.f16_to_f32(halves).view(np.uint32),
                          halves.astype(np.float32).view(np.uint32))


def test_attention_size_rule_takes_both_paths(monkeypatch):
    """The default sizes above sit on both sides of ATTN_JIT_MAX_WORK (else the agreement
    test below would compare one path with itself)."""
    calls = []
    monkeypatch.setattr(kernels, "_attend_jit", lambda *a: calls.append("numba"))
    monkeypatch.setattr(kernels, "attend_heads", lambda *a: calls.append("blas") or (0, 0))
    _attention_outputs(np.float16, 1)
    _attention_outputs(np.float32, 40)
    assert calls == ["numba", "blas"]


@pytest.mark.parametrize("key_chunk", [None, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_q, window, softcap, max_bias, extras",
                         [(1, 0, 0.0, 0.0, False), (40, 9, 5.0, 0.0, False),
                          (33, 0, 0.0, 8.0, True), (1, 0, 0.0, 0.0, True)])
def test_numba_attention_agrees_with_blas(dtype, n_q, window, softcap, max_bias, extras,
                                          key_chunk):
    """Small calls take the numba loop, large ones BLAS: both within float32 rounding of each
    other (the oracle judges each through the case tables).  With 16-key chunks the numba
    loop merges five chunks per query block (a window leaves some of them empty; a sink
    belongs to the first only)."""
    options = dict(window=window, softcap=softcap, max_bias=max_bias, extras=extras)
    jitted = _attention_outputs(dtype, n_q, numba_loop=True, key_chunk=key_chunk, **options)
    blas = _attention_outputs(dtype, n_q, numba_loop=False, **options)
    for a, b in zip(jitted, blas):
        assert not np.isnan(a).any()
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64),
                                   rtol=2e-3 if dtype == np.float16 else 1e-5, atol=1e-5)


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_split_parts_that_call_blas_hold_it_at_one_thread(monkeypatch):
    """Each part is a thread already: BLAS threads on top would oversubscribe the cores, and
    BLAS stays at one thread after (restoring it woke threads that spin)."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    monkeypatch.setattr(parallel, "_blas_held", False)
    seen = []
    with threadpool_limits(limits=3, user_api="blas"):  # the process's limits come back after
        if not _blas_threads():
            pytest.skip("NumPy's BLAS is not one threadpoolctl can see")
        parallel.run_split(lambda lo, hi: seen.append(_blas_threads()), 2)
        parallel.run_split(lambda lo, hi: seen.append(_blas_threads()), 2, calls_blas=True)
        after = _blas_threads()
    assert seen[:2] == [[3] * len(after)] * 2  # parts without BLAS leave it alone
    assert seen[2:] == [[1] * len(after)] * 2
    assert after == [1] * len(after)


# -- the crew of part threads ----------------------------------------------------------------
@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")


def test_the_parts_of_a_split_run_on_two_threads_at_once(two_threads):
    """Each part waits for the other inside the kernel: only two threads get past, so the
    part thread must take the part the caller cannot (repeated: it may be watching or asleep)."""
    barrier = threading.Barrier(2, timeout=60)
    names = set()

    def kernel(lo, hi):
        names.add(threading.current_thread().name)
        barrier.wait()

    for i in range(20):
        parallel.run_split(kernel, 2)
        time.sleep(0.003 * (i % 2))  # every other call finds the part thread past its watch
    assert len(names) == 2


def test_a_caller_that_outwaits_its_watch_sleeps_until_the_last_part_ends(two_threads):
    """The part thread's part takes far longer than the caller watches (~0.3 ms): the caller
    sleeps on the job's event, made then, and wakes when the part ends, not before.  (The
    caller's own part lasts long enough for a sleeping part thread to wake and claim the
    other.)"""
    ended = []

    def kernel(lo, hi):
        time.sleep(0.005 if lo == 0 else 0.03)
        ended.append(lo)

    def caller():
        for _ in range(5):
            parallel.run_split(kernel, 2)
            assert sorted(ended[-2:]) == [0, 1]

    thread = threading.Thread(target=caller)  # a lost wake-up must fail, not hang the suite
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(ended) == 10


def test_a_failing_part_raises_in_the_caller_and_the_crew_keeps_working(two_threads):
    def kernel(lo, hi):
        if lo > 0:
            raise ValueError(f"part from {lo}")

    with pytest.raises(ValueError, match="part from 5"):
        parallel.run_split(kernel, 10)
    covered = []
    parallel.run_split(lambda lo, hi: covered.extend(range(lo, hi)), 10)
    assert sorted(covered) == list(range(10))


def test_callers_on_several_threads_each_get_every_part_once(two_threads):
    """Several logical devices split their kernels at once: every call covers its range once."""
    counts = {k: np.zeros(1000, np.int64) for k in range(4)}

    def caller(k):
        for _ in range(50):
            parallel.run_split(lambda lo, hi: np.add.at(counts[k], np.arange(lo, hi), 1), 1000,
                               min_per_part=100)

    callers = [threading.Thread(target=caller, args=(k,)) for k in counts]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in callers)
    assert all((hits == 50).all() for hits in counts.values())


def test_a_call_from_inside_a_part_runs_on_that_thread(two_threads):
    inner = []

    def outer(lo, hi):
        parallel.run_split(lambda a, b: inner.append((threading.current_thread().name, a, b)),
                           4)

    parallel.run_split(outer, 2)
    assert sorted((a, b) for _, a, b in inner) == [(0, 4), (0, 4)]  # not split again


def _parts_meet_in_child() -> int:
    """How many threads ran the parts of a split whose parts wait for each other."""
    barrier, names = threading.Barrier(2, timeout=30), set()

    def kernel(lo, hi):
        names.add(threading.current_thread().name)
        barrier.wait()

    parallel.run_split(kernel, 2)
    return len(names)


def test_a_forked_child_gets_its_own_part_threads(two_threads):
    """The child inherits the crew object but not its threads: without a new crew the caller
    would run every part alone (correct, but on one core)."""
    parallel.run_split(lambda lo, hi: None, 4)  # the parent's crew exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_parts_meet_in_child).get(timeout=120) == 2


def test_the_gil_free_watch_sees_a_store_from_another_thread():
    """The part threads watch for work this way: a store from a thread holding the GIL must
    end the watch (it reads memory on every look), long before its rounds run out."""
    cell = np.zeros(1, np.int64)
    assert not jit.wait_for_change(cell, 0, 1000)
    assert jit.wait_for_change(cell, 7, 1)
    setter = threading.Timer(0.02, cell.__setitem__, (0, 1))
    setter.start()
    assert jit.wait_for_change(cell, 0, 2_000_000_000)  # ~1 min of looks; it sees the store
    setter.join()


# -- claimed chunks (the copies) -------------------------------------------------------------
def test_claims_from_two_threads_at_once_never_repeat_an_index():
    """Two threads claim from one counter at once: every index goes to one of them (a plain
    load, add and store handed out 10-40% of them twice: checked)."""
    import numba

    from opbench.backends.cpu import numba_kernels

    @numba.njit(nogil=True)
    def claim_many(counter, out):
        spin = 0.0
        for i in range(len(out)):
            out[i] = numba_kernels.claim_next(counter)
            for j in range(20):  # a little work between claims: the threads alternate often
                spin = spin * 0.5 + j  # (without it, one thread claimed runs of thousands)
        return spin

    counter, outs = np.zeros(1, np.int64), [np.zeros(200_000, np.int64) for _ in range(2)]
    claim_many(counter, outs[0][:1])  # compile before the race
    counter[0] = 0
    racers = [threading.Thread(target=claim_many, args=(counter, out)) for out in outs]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    claimed = np.sort(np.concatenate(outs))
    assert np.array_equal(claimed, np.arange(400_000))  # a plain one: ~1/3 repeated


def _claiming(chunks: int, seen: list, barrier=None, fail_on=None):
    """A kernel for ``run_claimed``: claims chunk indices until none is left, counting each
    done, the first of each thread's waiting at ``barrier``; chunk ``fail_on`` raises."""
    from opbench.backends.cpu import numba_kernels

    def kernel(counter, posted):
        numba_kernels.post(posted)
        first = True
        while (index := numba_kernels.claim_next(counter)) < chunks:
            if first and barrier is not None:
                barrier.wait()
            first = False
            if index == fail_on:
                raise ValueError(f"chunk {index}")
            seen.append((index, threading.current_thread().name))
            numba_kernels.chunk_done(counter)

    return kernel


def test_claimed_chunks_run_once_each_on_two_threads_at_once(two_threads):
    """Each thread's first chunk waits for the other's: the part thread must join in (it
    may be watching or asleep), and every chunk still runs exactly once."""
    barrier = threading.Barrier(2, timeout=60)
    for i in range(20):
        seen = []
        parallel.run_claimed(_claiming(9, seen, barrier), 9)
        assert sorted(index for index, _ in seen) == list(range(9))
        assert len({name for _, name in seen}) == 2
        time.sleep(0.003 * (i % 2))  # every other call finds the part thread past its watch


def _wait_until_asleep(crew) -> None:
    deadline = time.monotonic() + 30
    while not crew.asleep():  # past its watch (~0.3 ms) the part thread sleeps on an event
        assert time.monotonic() < deadline, "the part thread never went to sleep"
        time.sleep(0.002)


def _claiming_slowly(chunks: int, seen: list):
    """A kernel for ``run_claimed`` whose every chunk takes 5 ms without the GIL: a part
    thread woken for the call has time to claim chunks too."""
    from opbench.backends.cpu import numba_kernels

    def kernel(counter, posted):
        numba_kernels.post(posted)
        while (index := numba_kernels.claim_next(counter)) < chunks:
            time.sleep(0.005)
            seen.append((index, threading.current_thread().name))
            numba_kernels.chunk_done(counter)

    return kernel


def test_a_small_claimed_call_leaves_a_sleeping_crew_asleep(two_threads):
    """Below WAKE_ELEMENTS, with every part thread asleep, the caller runs every chunk and
    wakes no one; at WAKE_ELEMENTS the part thread is woken and runs chunks too."""
    crew, me = parallel._crew(), threading.current_thread().name
    for _ in range(3):
        _wait_until_asleep(crew)
        seen = []
        parallel.run_claimed(_claiming_slowly(6, seen), 6, elements=parallel.WAKE_ELEMENTS - 1)
        assert sorted(index for index, _ in seen) == list(range(6))
        assert {name for _, name in seen} == {me}
        assert crew.asleep()
    _wait_until_asleep(crew)
    seen, barrier = [], threading.Barrier(2, timeout=60)  # each thread's first chunk waits
    parallel.run_claimed(_claiming(9, seen, barrier), 9, elements=parallel.WAKE_ELEMENTS)
    assert sorted(index for index, _ in seen) == list(range(9))
    assert len({name for _, name in seen}) == 2


def test_a_small_claimed_call_splits_while_a_part_thread_is_awake(two_threads, monkeypatch):
    """A part thread still watching for work (calls back to back) joins at any size: each
    thread's first chunk waits for the other's."""
    crew = parallel._crew()
    barrier, awake = threading.Barrier(2, timeout=60), []

    def part(lo, hi):  # both parts at once: the part thread is at work, not asleep
        barrier.wait()
        awake.append(not crew.asleep())
        barrier.wait()  # neither leaves its part before both have looked

    parallel.run_split(part, 2)
    assert awake == [True, True]
    monkeypatch.setattr(crew, "asleep", lambda: False)  # as right after a call: watching
    seen = []
    parallel.run_claimed(_claiming(9, seen, barrier), 9, elements=1)
    assert sorted(index for index, _ in seen) == list(range(9))
    assert len({name for _, name in seen}) == 2


def test_a_claimed_call_from_inside_a_part_runs_every_chunk_on_that_thread(two_threads):
    seen = []
    parallel.run_split(lambda lo, hi: parallel.run_claimed(_claiming(5, seen), 5) if lo == 0
                       else None, 2)
    assert sorted(index for index, _ in seen) == list(range(5))
    assert len({name for _, name in seen}) == 1


def test_a_failing_claimed_chunk_raises_in_the_caller(two_threads):
    """The failing chunk is never counted: the caller waits for the job's end and raises,
    whichever thread ran it; the crew keeps working after."""
    barrier = threading.Barrier(2, timeout=60)
    for fail_on in (0, 1, 8):
        with pytest.raises(ValueError, match=f"chunk {fail_on}"):
            parallel.run_claimed(_claiming(9, [], barrier, fail_on=fail_on), 9)
        barrier.reset()
    seen = []
    parallel.run_claimed(_claiming(9, seen, barrier), 9)
    assert sorted(index for index, _ in seen) == list(range(9))


def test_the_caller_returns_when_every_chunk_is_counted():
    """The count, not the part threads' return to Python, ends a claimed split."""
    from opbench.backends.cpu import numba_kernels

    counter = np.zeros(2, np.int64)
    for _ in range(3):
        assert not jit.wait_for_count(counter, 1, 3, 1000)
        numba_kernels.claim_next(counter)
        numba_kernels.chunk_done(counter)
    assert list(counter) == [3, 3] and jit.wait_for_count(counter, 1, 3, 1)
