"""The covering-array generator: every allowed t-way combination present, no forbidden pair."""

import itertools

import numpy as np
import pytest

from opbench.harness import covering


def _random_problem(seed):
    rng = np.random.default_rng(seed)
    axes = {f"a{i}": tuple(range(int(rng.integers(1, 6)))) for i in range(int(rng.integers(2, 8)))}
    names = list(axes)
    pairs = []
    for _ in range(int(rng.integers(0, 6))):
        a, b = rng.choice(len(names), 2, replace=False)
        va, vb = int(rng.integers(len(axes[names[a]]))), int(rng.integers(len(axes[names[b]])))
        if va > 0 and vb > 0:  # value 0 stays compatible with everything: always satisfiable
            pairs.append(((names[a], va), (names[b], vb)))
    return axes, covering.forbidden_pairs(pairs)


def _held(rows, names, strength):
    return set().union(*(covering.row_combinations(r, names, strength) for r in rows))


@pytest.mark.parametrize("strength", [2, 3])
@pytest.mark.parametrize("seed", range(25))
def test_every_allowed_combination_present_and_no_forbidden_pair(seed, strength):
    axes, forbidden = _random_problem(seed)
    rows = covering.covering_array(axes, strength, forbidden, seed=seed)
    names = list(axes)
    assert covering.combinations(axes, strength, forbidden) <= _held(rows, names, strength)
    for row in rows:
        for pair in itertools.combinations(row.items(), 2):
            assert frozenset(pair) not in forbidden, (row, pair)


def test_pairwise_array_is_far_smaller_than_the_product():
    axes = {f"a{i}": tuple(range(3)) for i in range(10)}
    rows = covering.covering_array(axes, 2)
    assert len(rows) <= 20 < 3 ** 10
    assert covering.pair_coverage(axes, set(), rows).fraction == 1.0


def test_accept_filter_is_honoured_and_start_rows_kept():
    axes = {"x": (0, 1, 2), "y": (0, 1, 2), "z": (0, 1)}
    start = [{"x": 2, "y": 2, "z": 1}]
    rows = covering.covering_array(axes, 2, accept=lambda r: r.get("x", 0) + r.get("z", 0) < 3,
                                   start_rows=start)
    assert rows[0] == start[0]
    assert all(r["x"] + r["z"] < 3 for r in rows[1:])


def test_a_pair_ruled_out_through_a_third_axis_must_be_declared():
    axes = {"mode": ("a", "b"), "x": (0, 1), "y": (0, 1)}
    forbidden = covering.forbidden_pairs([(("mode", "a"), ("x", 1)), (("mode", "b"), ("y", 1))])
    with pytest.raises(ValueError, match="declare the pair impossible"):
        covering.covering_array(axes, 2, forbidden)


def test_coverage_counts_possible_impossible_and_covered():
    axes = {"x": (0, 1), "y": (0, 1)}
    forbidden = covering.forbidden_pairs([(("x", 1), ("y", 1))])
    cov = covering.pair_coverage(axes, forbidden, [{"x": 0, "y": 0}, {"x": 1, "y": 0}])
    assert (cov.possible, cov.impossible, cov.covered) == (3, 1, 2)


def test_table_cache_round_trips_and_survives_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPBENCH_CACHE_DIR", str(tmp_path))
    calls = []

    def generate():
        calls.append(1)
        return covering.Table([{"hs": (64, 64), "flag": None}], 1)

    class Spec:
        pass

    first = covering.cached_table(generate, Spec)
    second = covering.cached_table(generate, Spec)
    assert first == second and len(calls) == 1 and second.rows[0]["hs"] == (64, 64)
    for path in tmp_path.rglob("*.json"):
        path.write_text("{not json")
    assert covering.cached_table(generate, Spec) == first and len(calls) == 2


def test_table_cache_keeps_the_tables_of_other_checkouts(tmp_path, monkeypatch):
    # two source versions used in turn (base and head of a cross-commit A/B) build once each
    monkeypatch.setenv("OPBENCH_CACHE_DIR", str(tmp_path))
    calls = []

    def generate():
        calls.append(1)
        return covering.Table([{"x": len(calls)}], 1)

    class Spec:
        pass

    version = {"source": ""}
    monkeypatch.setattr(covering.inspect, "getsource", lambda module: version["source"])
    for source in ("base", "head", "base", "head"):
        version["source"] = source
        covering.cached_table(generate, Spec)
    assert len(calls) == 2
    for index in range(20):  # many versions later, only the most recently used few are kept
        version["source"] = f"v{index}"
        covering.cached_table(generate, Spec)
    assert len(list(tmp_path.rglob("Spec-*.json"))) == covering.TABLES_KEPT_PER_OP
