"""The report: synthetic seeded records of every kind -> report.md, report.html and plots."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import numpy as np
import pytest

from opbench.harness import store
from opbench.harness.records import environment, make_record
from opbench.perf import timing
from opbench.reports import plots, tables
from opbench.reports.console import format_perf_line
from opbench.reports.render import build_report, write_report

EVIL_CASE = "ROPE(type=f32,name=<script>alert(1)</script>)"
CEILINGS = {"copy_gbps": 20.0, "matmul_gflops": 200.0}
ENV = {"python": "3.11", "cpu_model": "Test CPU"}


def _record(rng, **fields) -> dict:
    base = dict(run_id="r1", device="cpu:0", env=ENV, dtype="f32")
    return make_record(**{**base, **fields})


def _test_records(rng) -> list[dict]:
    nmse_scale = {"f32": 1e-12, "f16": 1e-6, "bf16": 1e-4}
    records = []
    for backend in ("cpu", "torch"):
        for op in ("ROPE", "ATTN"):
            for dtype, scale in nmse_scale.items():
                for i in range(3):
                    nmse = scale * rng.lognormal(0, 1)
                    failing = (backend, op, dtype, i) == ("torch", "ATTN", "bf16", 0)
                    status = "FAIL" if failing else "OK"
                    records.append(_record(
                        rng, kind="test", backend=backend, op=op, dtype=dtype, status=status,
                        case_id=f"{op}(type={dtype},i={i})", params={"i": i},
                        metrics={"nmse": nmse, "max_abs_err": np.sqrt(nmse), "threshold": 1e-3,
                                 "n_bad": int(status == "FAIL")},
                        reason="nmse over threshold" if status == "FAIL" else None,
                    ))
    records.append(_record(rng, kind="test", backend="cpu", op="ROPE", status="FAIL",
                           case_id=EVIL_CASE, metrics={"nmse": 0.5, "threshold": 1e-3},
                           reason="<b>bad</b>"))
    records.append(_record(rng, kind="test", backend="torch", op="KV_ROTATE", status="UNSUPPORTED",
                           case_id="KV_ROTATE(type=f32)", reason="not implemented"))
    return records


def _perf(rng, median_ns: float, nbytes: int, flops: int | None = None) -> dict:
    ns = (median_ns * rng.lognormal(0, 0.05, 40)).astype(np.int64)
    samples = timing.Samples(ns, warmup=3, budget_ms=10)
    return timing.perf_block(samples, nbytes=nbytes, flops=flops, ceilings=CEILINGS)


def _perf_records(rng) -> list[dict]:
    records = []
    for backend, gbps in (("cpu", 8.0), ("torch", 12.0)):
        for mib in (1, 4, 16, 64):
            nbytes = mib * 2**20
            records.append(_record(
                rng, kind="perf", backend=backend, op="CPY", status="OK",
                case_id=f"CPY(type=f32,mib={mib})", params={"mib": mib},
                perf=_perf(rng, nbytes / gbps * (1 + 4 / mib), nbytes),
            ))
    return records


def _scenario_records(rng) -> list[dict]:
    records = []
    for split, devices in (("none", 1), ("layer", 2), ("layer", 4), ("head", 2), ("head", 4)):
        for rope_cache in (True, False):
            for graph_reuse in (True, False):
                ms = 10.0 / devices ** 0.7 * (1.0 if rope_cache else 1.3) * (
                    1.0 if graph_reuse else 1.15)
                records.append(_record(
                    rng, kind="scenario", backend="cpu", op="SCENARIO", status="OK",
                    case_id=f"SCENARIO(split={split},devices={devices},rc={rope_cache},"
                    f"gr={graph_reuse})",
                    params={"rope_cache": rope_cache, "graph_reuse": graph_reuse},
                    scenario={"split": split, "n_devices": devices, "steps": [1, 2, 3]},
                    perf=_perf(rng, ms * 1e6, 0),
                ))
    for devices in (1, 2, 4):  # what `opbench scenario --sweep devices=1..4 --split ring` writes
        steps = [{"nmse": float(1e-14 * devices * rng.uniform(1, 2)), "max_rel": 1e-7}
                 for _ in range(3)]
        records.append(_record(
            rng, kind="scenario", backend="cpu", op="SCENARIO", status="OK",
            case_id=f"SCENARIO(split=ring,devices={devices},sweep=1)", params={},
            scenario={"split": "ring", "n_devices": devices, "per_step": steps}))
    return records


def synthetic_records(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return _test_records(rng) + _perf_records(rng) + _scenario_records(rng)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    results = directory / "results.jsonl"
    with store.ResultWriter(results) as writer:
        for record in synthetic_records():
            writer.write(record)
    return build_report([results], directory / "out")


def test_report_files_exist_with_all_plots(report):
    assert report.markdown.exists() and report.html.exists()
    names = sorted(p.name for p in report.images)
    assert names == sorted(f"{stem}.png" for stem, *_ in plots.PLOTS)
    for image in report.images:
        assert image.read_bytes().startswith(b"\x89PNG")


def test_html_is_self_contained_with_embedded_images(report):
    page = report.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(plots.PLOTS)
    assert base64.b64decode(embedded[0]).startswith(b"\x89PNG")
    assert "src=\"plots/" not in page and "<link" not in page


def test_html_and_markdown_escape_case_ids(report):
    for text in (report.html.read_text(), report.markdown.read_text()):
        assert "<script>" not in text and "<b>bad</b>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_markdown_holds_the_expected_tables(report):
    text = report.markdown.read_text()
    for heading in ("Pass/fail matrix", "Worst errors per op", "Performance", "Scenarios"):
        assert f"## {heading}" in text
    # torch ATTN bf16 had one failure of three
    matrix = text.split("## Pass/fail matrix")[1].split("##")[0]
    assert "2/3 (1 failed)" in matrix and "unsupported" in matrix
    assert "![Plot: Error vs dtype](plots/error_vs_dtype.png)" in text


def test_pass_fail_matrix_cells():
    df = store.records_frame(synthetic_records())
    matrix = tables.pass_fail_matrix(df).set_index("op")
    assert matrix.loc["ATTN", "torch bf16"] == "2/3 (1 failed)"
    assert matrix.loc["ATTN", "cpu f32"] == "3/3"
    assert matrix.loc["KV_ROTATE", "torch f32"] == "unsupported"


def test_worst_errors_put_the_largest_nmse_first():
    df = store.records_frame(synthetic_records())
    worst = tables.worst_errors(df, per_op=2)
    rope = worst[worst["op"] == "ROPE"]
    assert rope.iloc[0]["case"] == EVIL_CASE and len(rope) == 2
    ratio = worst["error/threshold"]
    assert (ratio.groupby(worst["op"]).apply(lambda s: s.is_monotonic_decreasing)).all()


def test_worst_errors_read_per_output_metrics_as_the_runner_writes_them():
    """{output: {metric, value, threshold, n_bad}}: the worst output relative to its threshold
    judges the record; a NaN error is the worst of all; exact matches are not listed."""
    def attn(case, out, lse):
        return make_record(kind="test", backend="cpu", op="ATTN", case_id=case,
                                 status="OK", run_id="r", env={}, dtype="f32",
                                 metrics={"out": out, "lse": lse, "seconds": 0.1})
    records = [
        attn("A(small)", {"metric": "nmse", "value": 1e-9, "threshold": 1e-7, "n_bad": 0},
             {"metric": "nmse", "value": 5e-5, "threshold": 1e-4, "n_bad": 0}),
        attn("A(nan)", {"metric": "nmse", "value": float("nan"), "threshold": 1e-7, "n_bad": 4},
             {"metric": "nmse", "value": 0.0, "threshold": 1e-4, "n_bad": 0}),
        attn("A(exact)", {"metric": "bit-exact", "value": 0.0, "threshold": 0.0, "n_bad": 0},
             {"metric": "bit-exact", "value": 0.0, "threshold": 0.0, "n_bad": 0}),
    ]
    worst = tables.worst_errors(store.records_frame(records))
    assert list(worst["case"]) == ["A(nan)", "A(small)"]
    assert list(worst["output"]) == ["out", "lse"]  # lse is 0.5 of its threshold, out 0.01
    assert worst["error/threshold"].iloc[1] == pytest.approx(0.5)


def test_speedups_match_the_synthetic_factors():
    df = store.records_frame(synthetic_records())
    rope = tables.speedups(df, "rope_cache")
    reuse = tables.speedups(df, "graph_reuse")
    # 5 split/device configurations x 2 settings of the other toggle
    assert len(rope) == 10 and len(reuse) == 10
    assert rope["speedup"].between(1.2, 1.4).all()  # 1.3x with 5% sample noise
    assert reuse["speedup"].between(1.07, 1.25).all()


def test_device_scaling_table():
    df = store.records_frame(synthetic_records())
    scaling = tables.device_scaling(df)
    layer = scaling[scaling["split"] == "layer"].sort_values("devices")
    assert list(layer["devices"]) == [2, 4]
    assert layer["median_ms"].is_monotonic_decreasing


def test_missing_data_is_said_not_plotted(tmp_path):
    only_tests = [r for r in synthetic_records() if r["kind"] == "test"]
    files = write_report(store.records_frame(only_tests), tmp_path)
    text = files.markdown.read_text()
    assert [p.name for p in files.images] == ["error_vs_dtype.png"]
    assert "Not plotted: needs timed scenario records" in text
    assert "No data: no timed perf records." in text


def test_empty_results_give_a_report_not_a_crash(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    files = build_report([empty], tmp_path / "out")
    assert "No records" in files.markdown.read_text()


def test_perf_line_in_test_backend_ops_format():
    perf = {"n": 2304, "median_ns": 445_610, "bytes": 32770 * 1024, "gbps": 70.27,
            "bound": "memory", "fraction_of_ceiling": 0.41}
    line = format_perf_line("CPY(type=f32)", perf)
    assert line == ("CPY(type=f32): 2304 runs - 445.61 us/run - 32770 kB/run - 70.27 GB/s "
                    "(41% of copy bandwidth)")
    threads = format_perf_line("CPY(type=f32)", {**perf, "ceiling_threads": 2})
    assert threads.endswith("70.27 GB/s (41% of copy bandwidth, 2 cores)")
    for nbytes, size in ((32770 * 1024, "32 MiB"), (3 * 2**20, "3 MiB"), (98304, "96 kB")):
        resident = {**perf, "bytes": nbytes, "cache_resident": True,
                    "fraction_of_ceiling": None}
        assert format_perf_line("CPY(type=f32)", resident).endswith(
            f"70.27 GB/s, cache-resident (working set {size})")
    above = {**perf, "above_ceiling": True, "fraction_of_ceiling": None}
    assert format_perf_line("CPY(type=f32)", above).endswith(
        "70.27 GB/s, above the calibrated ceiling (run `opbench calibrate --force` on a quiet "
        "machine)")


def test_a_device_timers_perf_line_ends_with_the_hosts_enqueue():
    perf = {"n": 97, "median_ns": 7_680, "bytes": 32 << 20, "gbps": 4369.64, "bound": "memory",
            "launch_median_ns": 78_300, "launch_waits_for_device": False}
    assert format_perf_line("CPY(type=f32)", perf) == (
        "CPY(type=f32): 97 runs - 7.68 us/run - 32768 kB/run - 4369.64 GB/s - "
        "78.30 us/enqueue")
    waits = {**perf, "launch_waits_for_device": True}
    assert format_perf_line("CPY(type=f32)", waits).endswith(
        "78.30 us/enqueue, waits for the GPU")


def test_cli_report(tmp_path, capsys):
    from opbench.cli.main import main

    results = tmp_path / "results.jsonl"
    with store.ResultWriter(results) as writer:
        for record in synthetic_records(seed=1):
            writer.write(record)
    assert main(["report", str(results), "--out", str(tmp_path / "rep")]) == 0
    assert "(6 plots)" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report.html").exists()


def test_cli_report_bad_input_exit_2(tmp_path, capsys):
    from opbench.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema": 9}\n')
    assert main(["report", str(bad), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"opbench: error: {bad}:1: missing required field")
    assert main(["report", str(bad), "--out", str(bad)]) == 2
    assert "is not a directory" in capsys.readouterr().err


# -- a report people read ------------------------------------------------------------------------
def test_headline_comes_first_and_counts_outcomes(report):
    text = report.markdown.read_text()
    first = text.split("\n## ")[0]
    # 38 test records (1 evil FAIL, 1 torch ATTN bf16 FAIL, 1 UNSUPPORTED) + 20 scenarios
    assert "61 cases: 58 passed, 2 failed, 0 xfail, 1 unsupported." in first
    assert "no earlier run to compare with" in first
    page = report.html.read_text()
    assert page.index('id="headline"') < page.index("<h2>")


def test_a_case_rerun_into_one_file_counts_once(tmp_path):
    records = [r for r in synthetic_records() if r["kind"] == "test"]
    twice = tmp_path / "twice.jsonl"
    with store.ResultWriter(twice) as writer:
        for record in records + records:
            writer.write(record)
    text = build_report([twice], tmp_path / "out").markdown.read_text()
    assert "38 cases: 35 passed, 2 failed" in text
    assert "| ATTN | 3/3 |" in text  # cpu f32: three cases, not six


def test_environment_block_names_machine_versions_commit_and_runs():
    env = {**environment(), "git_commit": "abc123", "torch": "2.5", "gpus": ["H100"]}
    record = make_record(kind="test", backend="cpu", op="CPY", case_id="CPY(x)",
                               status="OK", run_id="r7", env=env)
    table = tables.environment_table(store.records_frame([record])).set_index("recorded")
    assert table.loc["commit", "value"] == "abc123"
    assert table.loc["GPU", "value"] == "H100"
    assert table.loc["torch", "value"] == "2.5"
    assert table.loc["numpy", "value"] == np.__version__
    assert table.loc["run r7", "value"].startswith("1 records 20")
    for name in ("machine", "CPU", "OS", "Python", "opbench", "ggml", "triton", "cupy"):
        assert name in table.index


def test_every_record_carries_the_versions_of_the_backends():
    env = environment()
    for name in ("torch", "ggml", "triton", "cupy", "machine", "gpus"):
        assert name in env


def test_status_counts_have_no_empty_index_column():
    counts = tables.status_counts(store.records_frame(synthetic_records()))
    assert list(counts.columns[:2]) == ["kind", "backend"]
    assert counts.columns.name is None and "" not in counts.columns


def test_perf_pivot_puts_backends_side_by_side_with_ratios():
    df = store.records_frame(synthetic_records())
    text, classes = tables.perf_pivot(df, baseline="cpu")
    assert list(text.columns) == ["op", "case", "MiB", "cpu (ms)", "torch (ms)", "torch / cpu"]
    assert len(text) == 4  # 4 CPY sizes, one row each
    decimals = {len(v.split(".")[1]) for v in text["cpu (ms)"]}
    assert len(decimals) == 1  # one format per column
    # torch is 1.5x faster (12 vs 8 GB/s): ratio 0.67, judged an improvement by the gate
    assert all(v.startswith("0.6") and "(faster)" in v for v in text["torch / cpu"])
    assert (classes["torch / cpu"] == "num faster").all()
    other, _ = tables.perf_pivot(df, baseline="torch")
    assert list(other.columns)[3:] == ["torch (ms)", "cpu (ms)", "cpu / torch"]
    with pytest.raises(ValueError, match="--baseline 'ggml' has no perf records"):
        tables.perf_pivot(df, baseline="ggml")


def test_html_tables_scroll_inside_the_page_and_colour_verdicts(report):
    page = report.html.read_text()
    assert page.count('<div class="scroll"><table>') == page.count("<table>")
    assert 'class="num faster"' in page and "position: sticky" in page
    assert '<td class="id">' in page  # long case ids wrap


def test_cli_report_against_a_base_counts_regressions(tmp_path, capsys):
    from opbench.cli.main import main

    rng = np.random.default_rng(5)
    base, new = [], []
    for records, median in ((base, 100e3), (new, 150e3)):
        records.append(_record(rng, kind="perf", backend="cpu", op="CPY", status="OK",
                               case_id="CPY(x)", perf=_perf(rng, median, 1 << 20)))
    paths = []
    for name, records in (("base", base), ("new", new)):
        with store.ResultWriter(tmp_path / f"{name}.jsonl") as writer:
            writer.write(records[0])
        paths.append(str(tmp_path / f"{name}.jsonl"))
    out = tmp_path / "rep"
    assert main(["report", paths[1], "--against", paths[0], "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "1 perf regressions, 0 improvements" in text
    assert "| regression | [perf] cpu/cpu:0 CPY(x) | 1.5" in text
    assert main(["report", paths[1], "--baseline", "nosuch", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("opbench: error: --baseline 'nosuch'")


def _against_files(tmp_path, rng, base_backend: str, new_backend: str) -> list[str]:
    """BASE with one backend, NEW 1.5x slower under another name."""
    paths = []
    for name, backend, median in (("base", base_backend, 100e3), ("new", new_backend, 150e3)):
        record = _record(rng, kind="perf", backend=backend, op="CPY", status="OK",
                         case_id="CPY(x)", perf=_perf(rng, median, 1 << 20))
        with store.ResultWriter(tmp_path / f"{name}.jsonl") as writer:
            writer.write(record)
        paths.append(str(tmp_path / f"{name}.jsonl"))
    return paths


def test_cli_report_against_differently_named_backends_says_nothing_was_compared(tmp_path):
    """A NEW whose backend is named otherwise matched nothing: the headline said a clean
    "0 perf regressions" where it had compared nothing."""
    from opbench.cli.main import main

    base, new = _against_files(tmp_path, np.random.default_rng(6), "cpu", "rv/slow.py:Slow")
    out = tmp_path / "rep"
    assert main(["report", new, "--against", base, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "0 cases compared" in text
    assert ("Nothing was compared: BASE's backend(s) cpu not in NEW, NEW's rv/slow.py:Slow not "
            "in BASE; to compare them with each other, give --base-backend cpu --new-backend "
            "rv/slow.py:Slow.") in text
    assert "Nothing was compared" in (out / "report.html").read_text()
    assert main(["report", new, "--against", base, "--out", str(out),
                 "--base-backend", "cpu", "--new-backend", "rv/slow.py:Slow"]) == 0
    text = (out / "report.md").read_text()
    assert "1 perf regressions" in text and "1 cases compared" in text
    assert "backend rv/slow.py:Slow against cpu" in text and "Nothing was compared" not in text


def _report_with_one_more_record(tmp_path, seed: int, side: str, record) -> str:
    """The markdown of `report NEW --against BASE` (cpu records both), ``record`` appended to
    the ``side`` ("base" or "new") file."""
    from opbench.cli.main import main

    base, new = _against_files(tmp_path, np.random.default_rng(seed), "cpu", "cpu")
    with store.ResultWriter(base if side == "base" else new) as writer:  # appends
        writer.write(record)
    out = tmp_path / "rep"
    assert main(["report", new, "--against", base, "--out", str(out)]) == 0
    return (out / "report.md").read_text()


def test_cli_report_names_a_backend_only_one_side_has(tmp_path):
    rng = np.random.default_rng(7)
    extra = _record(rng, kind="perf", backend="torch", op="CPY", status="OK", case_id="CPY(x)",
                    perf=_perf(rng, 1e5, 1 << 20))
    text = _report_with_one_more_record(tmp_path, 7, "new", extra)
    assert "Some cases were not compared: NEW's backend(s) torch not in BASE." in text
    assert "(none)" not in text  # a side that lacks nothing is left out


def test_cli_report_names_the_kind_of_records_a_backend_lacks(tmp_path):
    """BASE has cpu perf and cpu scenario records, NEW cpu perf only: the note said "BASE's
    backend(s) cpu not in NEW" although NEW has cpu."""
    scenario = _record(np.random.default_rng(8), kind="scenario", backend="cpu",
                       op="SCENARIO", status="OK", case_id="SCENARIO(split=layer)")
    text = _report_with_one_more_record(tmp_path, 8, "base", scenario)
    assert "Some cases were not compared: BASE's backend(s) cpu (scenario) not in NEW." in text
    assert "--base-backend" not in text  # renaming would not help: NEW has cpu


@pytest.mark.parametrize("argv, message", [
    (["--base-backend", "cpu"], "--base-backend and --new-backend go together"),
    (["--base-backend", "cpu", "--new-backend", "gpu"], "has no records of backend 'gpu'"),
])
def test_cli_report_backend_pairing_errors_are_one_line_exit_2(tmp_path, capsys, argv,
                                                               message):
    from opbench.cli.main import main

    base, new = _against_files(tmp_path, np.random.default_rng(8), "cpu", "mine")
    out = str(tmp_path / "rep")
    assert main(["report", new, "--against", base, "--out", out, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["report", new, "--out", out, "--base-backend", "cpu", "--new-backend",
                 "mine"]) == 2
    assert "pair backends for --against" in capsys.readouterr().err


# -- in a real browser ---------------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PAGE_WIDTH = 1280


def _chromium() -> str:
    import shutil

    for name in (os.environ.get("OPBENCH_CHROMIUM"), "chromium", "chromium-browser"):
        path = name and shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (apt-get install chromium, or set OPBENCH_CHROMIUM)")


def test_report_in_a_real_browser(report, tmp_path):
    """report.html in headless Chromium at 1280 px: no console error, every image decoded,
    nothing wider than the page, the headline present.  OPBENCH_SCREENSHOTS=DIR keeps the
    screenshot for a person to look at."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install 'opbench[browser]' to drive chromium")
    executable = _chromium()
    shots = Path(os.environ.get("OPBENCH_SCREENSHOTS") or tmp_path)
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, args=CHROMIUM_FLAGS,
            headless=True, viewport={"width": PAGE_WIDTH, "height": 900})
        try:
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(report.html.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth])")
            width = page.evaluate("document.scrollingElement.scrollWidth")
            lead = page.inner_text("#headline")
            page.screenshot(path=str(shots / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert len(images) == len(plots.PLOTS)
    assert all(done and natural > 0 for done, natural in images), images
    assert width <= PAGE_WIDTH
    assert lead.startswith("61 cases: 58 passed, 2 failed")


def test_scenario_time_records_draw_the_scenario_plots(tmp_path, capsys):
    """`opbench scenario --time` writes the timed records the speedup and scaling plots need."""
    from opbench.cli.main import main

    results = tmp_path / "scenarios.jsonl"
    assert main(["scenario", "--matrix", "-p", r"split=layer,devices=[12],.*evict=off,delay=off",
                 "--time", "--layers", "4", "--steps", "3", "-q", "--results",
                 str(results)]) == 0
    records = store.read_records(results)
    assert len(records) >= 4  # rope_cache and graph_reuse on and off, on 1 and 2 devices
    for record in records:
        assert len(record["scenario"]["step_ns"]) == 4  # the prefill and 3 decode steps
        assert record["perf"]["n"] == 3 and record["perf"]["median_ns"] > 0
    files = build_report([results], tmp_path / "out")
    assert {p.name for p in files.images} == {"toggle_speedups.png", "device_scaling.png"}


def test_sweep_records_draw_error_against_world_size(tmp_path):
    """`opbench scenario --sweep` records plot worst error per device count for each sequence
    split; a report of the same scenarios at one device count has no such plot."""
    from opbench.cli.main import main

    sweep = tmp_path / "sweep.jsonl"
    assert main(["scenario", "--sweep", "devices=1..2", "--layers", "2", "--steps", "1", "-q",
                 "--results", str(sweep)]) == 0
    table = tables.error_vs_world_size(store.records_frame(store.read_records(sweep)))
    assert sorted(table["split"].unique()) == ["ring", "stripe", "zigzag"]
    assert list(table["devices"]) == [1, 2] * 3 and (table["nmse"] > 0).all()
    files = build_report([sweep], tmp_path / "swept")
    assert "error_vs_world_size.png" in {p.name for p in files.images}

    one_count = tmp_path / "one.jsonl"
    one_count.write_text("".join(line for line in sweep.read_text().splitlines(keepends=True)
                                 if '"devices": 1,' in line))
    files = build_report([one_count], tmp_path / "single")
    assert "error_vs_world_size.png" not in {p.name for p in files.images}
    assert "Not plotted: needs ring/zigzag/stripe" in files.markdown.read_text()
