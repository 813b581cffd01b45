"""Case tables: size, stable ids, seeded inputs, quick subset coverage, validation."""

import numpy as np
import pytest

from opbench.harness.cases import Case, filter_cases
from opbench.harness.ops import SPECS
from opbench.protocol import numpy_dtype


@pytest.mark.parametrize("op", list(SPECS))
def test_full_and_quick_tables_cover_every_possible_pair(op):
    spec = SPECS[op]
    for cases in (spec.cases(), spec.quick_cases()):
        coverage = spec.coverage(cases)
        assert coverage.covered == coverage.possible > 0


@pytest.mark.parametrize("op", list(SPECS))
def test_no_case_holds_a_pair_declared_impossible(op):
    spec = SPECS[op]
    for case in spec.cases():
        row = spec.row_of(case)
        for rule in spec.impossible:
            assert not (row[rule.a] in rule.a_values and row[rule.b] in rule.b_values), (
                case.id, rule.reason)


def test_ids_are_unique_and_stable():
    ids = [c.id for spec in SPECS.values() for c in spec.cases()]
    assert len(ids) == len(set(ids))
    case = Case.make("ROPE", type="f32", ne=[128, 4, 9], n_dims=128, mode="neox", fb=10000.0)
    assert case.id == "ROPE(type=f32,ne=[128,4,9],n_dims=128,mode=neox,fb=10000)"


@pytest.mark.parametrize("op", sorted(SPECS))
def test_every_id_of_an_op_names_its_keys_in_one_order(op):
    """So one -p finds every case of a setting: CPY's special-value cases once named the
    destination dtype first where every other CPY case names the source first."""
    first_seen: dict[frozenset, tuple[str, str]] = {}
    for case in SPECS[op].cases():
        keys = [name for name, _ in case.items]
        for i, earlier in enumerate(keys):
            for later in keys[i + 1:]:
                order = first_seen.setdefault(frozenset((earlier, later)), (earlier, later))
                assert order == (earlier, later), f"{case.id} names {later} after {earlier}"


def test_seed_depends_on_id_and_run_seed_only():
    a = Case.make("CPY", ne=[1, 2, 3])
    assert a.seed(0) == Case.make("CPY", ne=[1, 2, 3]).seed(0)
    assert a.seed(0) != a.seed(1)
    assert a.seed(0) != Case.make("CPY", ne=[1, 2, 4]).seed(0)


@pytest.mark.parametrize("op", list(SPECS))
def test_quick_subset_is_a_smaller_part_of_the_full_table(op):
    spec = SPECS[op]
    cases, quick = spec.cases(), spec.quick_cases()
    assert set(quick) <= set(cases)
    assert len(quick) < len(cases) or spec.strength == 2  # a pairwise table is its own quick


@pytest.mark.parametrize("op", list(SPECS))
def test_every_case_maps_back_to_its_row(op):
    spec = SPECS[op]
    for row in spec.table().rows:
        case = spec.make_case(row)
        assert spec.make_case(spec.row_of(case)) == case


@pytest.mark.parametrize("op", [op for op, s in SPECS.items() if not hasattr(s, "run_check")])
def test_inputs_are_seeded_and_never_zero(op):
    spec = SPECS[op]
    case = spec.quick_cases()[0]
    a = spec.make_inputs(case, np.random.default_rng(case.seed()))
    b = spec.make_inputs(case, np.random.default_rng(case.seed()))
    for name, arr in a.arrays.items():
        assert np.array_equal(arr.view(np.uint8), b.arrays[name].view(np.uint8)), name
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
            assert np.any(arr.astype(np.float32) != 0), name


def test_filter_by_regex():
    cases = SPECS["ROPE"].cases()
    neox = filter_cases(cases, r"mode=neox")
    assert neox and all("mode=neox" in c.id for c in neox)


def test_rope_validation_names_the_parameter():
    bad = Case.make("ROPE", type="f32", ne=[64, 1, 1], n_dims=65, mode="neox")
    with pytest.raises(ValueError, match="n_dims=65 must be even and <= head_dim=64"):
        SPECS["ROPE"].validate(bad)


def test_known_failure_may_pass_turns_xpass_into_ok():
    from opbench.harness.runner import KnownFailures, _apply_known

    strict = KnownFailures([(r"^ROPE", "limit 1e-3")])
    lenient = KnownFailures([(r"^ROPE", "limit 1e-3", True)])
    for known, expected in ((strict, "XPASS"), (lenient, "OK")):
        record = {"case_id": "ROPE(type=f32)", "status": "OK", "reason": None}
        _apply_known(record, known)
        assert record["status"] == expected
    failing = {"case_id": "ROPE(type=f32)", "status": "FAIL", "reason": "nmse"}
    _apply_known(failing, lenient)
    assert failing["status"] == "XFAIL"


def _just_past(spec, case, threshold) -> bool:
    size = spec.sizes(case).get(threshold.size)
    return size is not None and threshold.value < size <= threshold.value + max(
        1, threshold.value // 8)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cupy"])
def test_full_tables_reach_past_every_declared_threshold(backend):
    from opbench.harness.ops import SPECS
    from opbench.harness.thresholds import builtin_classes

    thresholds = builtin_classes()[backend].THRESHOLDS
    assert thresholds, f"{backend} declares no size threshold"
    for threshold in thresholds:
        spec = SPECS[threshold.op]
        assert any(_just_past(spec, c, threshold) for c in spec.cases()), threshold


def test_quick_tables_reach_past_every_cpu_threshold():
    from opbench.backends.cpu import CpuBackend
    from opbench.harness.ops import SPECS

    for threshold in CpuBackend.THRESHOLDS:
        spec = SPECS[threshold.op]
        assert any(_just_past(spec, c, threshold) for c in spec.quick_cases()), threshold


# -- boundary block counts and --large --------------------------------------------------------
def _used_blocks(case, arrays) -> np.ndarray:
    if case.op == "KV_ROTATE":
        return arrays["block_indices"]
    table, lens = arrays["block_table"], arrays["seq_lens"]
    return np.concatenate([row[: -(-int(n) // case["bsz"])] for row, n in zip(table, lens)])


@pytest.mark.parametrize("op", ["KV_ROTATE", "ATTN"])
def test_boundary_block_cases_use_only_indices_past_int16(op):
    """In full and quick: every block used lies past 32,767; at 70,000 blocks, also one past
    65,535 (where a uint16 index wraps)."""
    spec = SPECS[op]
    boundary = [c for c in spec.cases() if c.get("nblk", 0) > 32767]
    assert {c["nblk"] for c in boundary} == {40000, 70000}
    assert {c["nblk"] for c in spec.quick_cases() if c.get("nblk", 0) > 32767} == {40000, 70000}
    for case in boundary:
        arrays = spec.make_inputs(case, np.random.default_rng(case.seed())).arrays
        used = _used_blocks(case, arrays)
        assert used.min() >= 32768 and used.max() == case["nblk"] - 1
        assert len(np.unique(used)) == len(used)


def _largest_tensor_elements(case) -> int:
    """Elements of the op's largest tensor, from the case alone (no 4 GiB allocation)."""
    p = case.params
    return {"SET_ROWS": lambda: p["nslots"] * int(np.prod(p["row"])),
            "GET_ROWS": lambda: p["nsrc"] * int(np.prod(p["row"])),
            "KV_ROTATE": lambda: p["nblk"] * p["bs"] * p["nkvh"] * p["hs"],
            "ATTN": lambda: p["nblk"] * p["bsz"] * p["nkvh"] * p["hs"][0],
            "CPY": lambda: int(np.prod(p["ne"]))}[case.op]()


def test_large_cases_pass_2_31_elements_once_per_index_taking_op():
    large = {op: spec.large_cases() for op, spec in SPECS.items() if spec.large_cases()}
    assert set(large) == {"SET_ROWS", "GET_ROWS", "KV_ROTATE", "ATTN", "CPY"}
    for op, cases in large.items():
        assert len(cases) == 1 and not set(cases) & set(SPECS[op].cases())
        assert 2**31 < _largest_tensor_elements(cases[0]) < 2**31 + 2**17, cases[0].id


def test_large_cases_warn_of_host_memory_short_of_their_need(tmp_path, capsys):
    from opbench.backends.common.host import available_memory_bytes
    from opbench.cli.common import LARGE_HOST_GIB, warn_if_large_cases_outgrow_memory

    assert set(LARGE_HOST_GIB) == {c.op for s in SPECS.values() for c in s.large_cases()}
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20971520 kB\n")
    available = available_memory_bytes(str(meminfo))
    assert available == 20 * 2**30
    assert available_memory_bytes(str(tmp_path / "missing")) is None
    cases = [c for op in ("GET_ROWS", "ATTN", "CPY") for c in SPECS[op].large_cases()]
    warn_if_large_cases_outgrow_memory(cases, available)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[3] for line in lines] == ["CPY"]  # 25 GiB > 20; 11 and 19 fit
    assert "needs about 25 GiB of host memory" in lines[0] and "20.0 GiB is available" in lines[0]
    warn_if_large_cases_outgrow_memory(cases, None)  # unreadable: no guess, no line
    assert capsys.readouterr().err == ""


def test_periodic_fill_differs_where_a_wrapped_offset_lands():
    from opbench.harness import cases as case_module

    period = case_module.FILL_PERIOD
    assert 2**31 % period and 2**32 % period
    filled = case_module.periodic_fill(np.arange(7, dtype=np.float32), (3, 5))
    assert filled.tolist() == [[0, 1, 2, 3, 4], [5, 6, 0, 1, 2], [3, 4, 5, 6, 0]]


def test_list_large_and_refusals(capsys):
    from opbench.cli.main import main

    assert main(["list", "--large"]) == 0
    assert len(capsys.readouterr().out.split()) == 5
    assert main(["test", "--large", "--quick"]) == 2
    assert "--large is its own case set" in capsys.readouterr().err


@pytest.mark.parametrize("lo, hi", [(-1.0, 1.0), (-2.0, 0.0), (0.5, 4.0)])
def test_draw_uniform_is_the_counter_generator_keyed_by_the_cases_generator(lo, hi):
    """A case's values: ``draws.uniform_numpy`` (the NumPy model) for the key the case's own
    generator draws next, so the case seed decides them; in [lo, hi)."""
    from opbench.harness import draws
    from opbench.harness.cases import draw_uniform

    for seed in range(5):
        got = draw_uniform(np.random.default_rng(seed), (9, 31), lo, hi)
        key = np.random.default_rng(seed).bit_generator.random_raw()
        assert got.tobytes() == draws.uniform_numpy(key, (9, 31), lo, hi).tobytes()
        assert got.shape == (9, 31) and lo <= got.min() and got.max() < hi


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_wide_values_are_the_exact_products_ldexp_gives(dtype):
    """Keyed by the case generator's next two draws; rounded once (``draws.round_to``)."""
    from opbench.harness import draws
    from opbench.harness.ops.copies import _wide_uniform

    for seed in range(5):
        rng = np.random.default_rng(seed)
        mantissa = draws.uniform_numpy(rng.bit_generator.random_raw(), (40, 24))
        exponent = draws.integers_numpy(rng.bit_generator.random_raw(), (40, 24), -12, 12)
        expected = draws.round_to(np.ldexp(mantissa, exponent), numpy_dtype(dtype))
        got = _wide_uniform(np.random.default_rng(seed), (40, 24), dtype)
        assert got.tobytes() == expected.tobytes()
        assert np.ptp(np.log2(np.abs(got.astype(np.float64)))) > 16
