"""GateResult -> a markdown summary (pull-request comment, $GITHUB_STEP_SUMMARY) and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from opbench.perf.gate import CaseKey, GateResult, MethodMismatch, PerfChange, StatusChange
from opbench.perf.method import rerun_advice
from opbench.perf.stats import RunsComparison
from opbench.reports.markup import md_escape

MAX_ROWS = 100  # per list: a summary a reviewer can read, not a dump


def headline(result: GateResult) -> str:
    counts = (
        f"{len(result.newly_failing)} newly failing, "
        f"{len(result.newly_unsupported)} newly unsupported, "
        f"{len(result.regressions)} perf regressions"
    )
    if result.broken:
        counts += f", {len(result.broken)} crashed/timed out/errored"
    if result.timed_differently:
        counts += f", {len(result.timed_differently)} timed differently"
    if result.incomplete:
        counts += ", NEW incomplete"
    verdict = "FAILED" if result.failed else "passed"
    mark = "❌" if result.failed else "✅"
    return f"{mark} opbench gate {verdict}: {counts} ({result.compared} cases compared)"


def _examples(items: list, limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _backend_names(pairs: list[tuple[str, str]], result: GateResult) -> list[str]:
    """The backends of (kind, backend) pairs, with the kind where the other side has the
    backend under another kind (NEW's cpu perf records do not stand in for BASE's cpu
    scenario records): "cpu (scenario)", else just "cpu"."""
    shared = set(result.backends_on_both)
    return list(dict.fromkeys(f"{backend} ({kind})" if backend in shared else backend
                              for kind, backend in pairs))


def _pairing_hint(result: GateResult) -> str:
    """--base-backend/--new-backend when each side has one backend the other lacks entirely."""
    shared = set(result.backends_on_both)
    base_only = list(dict.fromkeys(b for _, b in result.missing_backends if b not in shared))
    new_only = list(dict.fromkeys(b for _, b in result.extra_backends if b not in shared))
    if len(base_only) == 1 and len(new_only) == 1:
        return (f"; to compare them with each other, give --base-backend {base_only[0]} "
                f"--new-backend {new_only[0]}")
    return ""


def backend_gap_note(result: GateResult) -> str:
    """A plain sentence when BASE and NEW name their backends differently, or one lacks a kind
    of records of a backend (so some or all of their cases cannot be matched), naming what
    each side lacks (a side that lacks nothing is left out); "" when they agree."""
    base_only = _backend_names(result.missing_backends, result)
    new_only = _backend_names(result.extra_backends, result)
    if not (base_only or new_only):
        return ""
    gaps = [(side, names, other) for side, names, other
            in (("BASE", base_only, "NEW"), ("NEW", new_only, "BASE")) if names]
    sides = ", ".join(f"{side}'s {'' if i else 'backend(s) '}{', '.join(names)} not in {other}"
                      for i, (side, names, other) in enumerate(gaps))
    start = "Nothing was compared" if result.compared == 0 else "Some cases were not compared"
    return f"{start}: {sides}{_pairing_hint(result)}."


def _instead(result: GateResult) -> str:
    """What NEW has where BASE's backend is missing: often the same kernels, named otherwise."""
    if not result.extra_backends:
        return ""
    names = [f"{backend} ({kind})" for kind, backend in result.extra_backends]
    return f"; NEW has {_examples(names)} instead{_pairing_hint(result)}"


def method_lines(result: GateResult) -> list[str]:
    """Per pair of methods: which side was timed how, the cases, and what to rerun."""
    groups: dict[tuple, list[MethodMismatch]] = {}
    for m in result.timed_differently:
        groups.setdefault((m.base_method.describe(), m.new_method.describe()), []).append(m)
    lines = []
    for (base, new), mismatches in groups.items():
        advice = rerun_advice(mismatches[0].base_method, mismatches[0].new_method)
        lines.append(f"{len(mismatches)} timing(s) not compared: BASE was run {base}, NEW "
                     f"{new}, and that alone changes the times; {advice}: "
                     + _examples([m.key.label() for m in mismatches]))
    return lines


def problem_lines(result: GateResult) -> list[str]:
    """One line per kind of finding that fails the gate (or, with --allow-missing, warns)."""
    lines = []
    if result.new_empty:
        lines.append("FAIL: NEW holds no records (did its run crash or write elsewhere?)")
    if result.missing_backends:
        names = [f"{backend} ({kind})" for kind, backend in result.missing_backends]
        lines.append(f"FAIL: NEW lacks {len(names)} backend(s) present in BASE: "
                     + _examples(names) + _instead(result))
    if result.missing_devices:
        names = [f"{backend}/{device} ({kind})" for kind, backend, device
                 in result.missing_devices]
        lines.append(f"FAIL: NEW lacks {len(names)} device(s) present in BASE: "
                     + _examples(names))
    cases = result.missing_cases
    if cases and not result.new_empty:
        level = "warning" if result.allow_missing else "FAIL"
        hint = "" if result.allow_missing else " (--allow-missing makes this a warning)"
        lines.append(f"{level}: NEW lacks {len(cases)} case(s) present in BASE{hint}: "
                     + _examples([k.label() for k in cases]))
    if result.broken:
        lines.append(f"FAIL: NEW holds {len(result.broken)} CRASH/TIMEOUT/ERROR record(s): "
                     + _examples([f"{c.key.label()} {c.new_status}" for c in result.broken]))
    lines += [f"FAIL: {line}" for line in method_lines(result)]
    if result.ambiguous:
        most = max(c.comparison.runs_needed for c in result.ambiguous)
        lines.append(f"note: {len(result.ambiguous)} timing change(s) the run-to-run spread "
                     f"cannot confirm (ambiguous, not a regression); to tell, rerun both sides"
                     f" with --repeat {most}: "
                     + _examples([c.key.label() for c in result.ambiguous]))
    for title, changes in (("newly failing", result.newly_failing),
                           ("newly unsupported", result.newly_unsupported),
                           ("perf regression(s)", result.regressions)):
        if changes:
            lines.append(f"FAIL: {len(changes)} {title}: "
                         + _examples([c.key.label() for c in changes]))
    return lines


def _status_rows(changes: list[StatusChange]) -> list[list[str]]:
    return [[c.key.label(), c.base_status, c.new_status, c.reason or ""] for c in changes]


def _perf_rows(changes: list[PerfChange]) -> list[list[str]]:
    rows = []
    for c in changes:
        cmp = c.comparison
        rows.append([
            c.key.label(),
            f"{c.base_ns / 1e3:.2f}",
            f"{c.new_ns / 1e3:.2f}",
            f"{cmp.ratio:.3f}",
            f"[{cmp.ci_low:.3f}, {cmp.ci_high:.3f}]",
            f"{cmp.p_slower if cmp.ratio >= 1 else cmp.p_faster:.2g}",  # the one-sided p that fits
        ])
    return rows


def _method_rows(mismatches: list[MethodMismatch]) -> list[list[str]]:
    return [[m.key.label(), m.base_method.describe(), m.new_method.describe()]
            for m in mismatches]


def _ambiguous_rows(changes: list[PerfChange]) -> list[list[str]]:
    return [row + [f"{c.comparison.n_base}/{c.comparison.n_new}",
                   str(c.comparison.runs_needed)]
            for row, c in zip(_perf_rows(changes), changes)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"\n… and {len(rows) - MAX_ROWS} more")
    return lines + [""]


STATUS_HEADER = ["case", "base", "new", "reason"]


def perf_header(quantile: float) -> list[str]:
    name = "median" if quantile == 0.5 else f"p{quantile * 100:g}"
    return ["case", f"base {name} (µs)", f"new {name} (µs)", "ratio new/base", "CI",
            "p (one-sided; Mann-Whitney on samples, Welch t on runs)"]


def _key_rows(keys: list[CaseKey]) -> list[list[str]]:
    return [[k.label()] for k in keys]


def statistic_name(quantile: float) -> str:
    return "medians" if quantile == 0.5 else f"{quantile * 100:g}th percentiles"


def _anchor_note(result: GateResult) -> str:
    changes = (result.regressions + result.improvements + result.unchanged
               + result.not_significant + result.ambiguous)
    anchored = sum(getattr(c.comparison, "anchored", False) for c in changes)
    if not anchored:
        return ""
    return (f" {anchored} case(s) from separate runs compare each run's times over the "
            "anchor timed in that run (the machine's speed divided out; the µs columns are raw).")


def gate_markdown(result: GateResult, base_name: str = "BASE", new_name: str = "NEW") -> str:
    ci = f"{result.confidence:.0%}"
    statistic = statistic_name(result.quantile)
    perf_cols = perf_header(result.quantile)
    lines = [
        f"## {headline(result)}",
        "",
        f"Base: `{md_escape(base_name)}` · new: `{md_escape(new_name)}` · threshold "
        f"{result.threshold:.1%} · ratio of {statistic} with a bootstrap {ci} interval; "
        "a regression needs the whole interval past the threshold." + _anchor_note(result),
        "",
    ]
    problems = problem_lines(result)
    if problems:
        lines += [f"- {md_escape(line)}" for line in problems] + [""]
    sections = [
        ("Crashed, timed out or errored in new", STATUS_HEADER, _status_rows(result.broken)),
        ("Newly failing", STATUS_HEADER, _status_rows(result.newly_failing)),
        ("Newly unsupported", STATUS_HEADER, _status_rows(result.newly_unsupported)),
        ("Perf regressions", perf_cols, _perf_rows(result.regressions)),
        ("Fixed", STATUS_HEADER, _status_rows(result.fixed)),
        ("Other status changes", STATUS_HEADER, _status_rows(result.other_status_changes)),
        ("Improvements", perf_cols, _perf_rows(result.improvements)),
        ("Timed differently: not compared", ["case", "base", "new"],
         _method_rows(result.timed_differently)),
        ("Ambiguous: more runs needed", perf_cols + ["runs", "runs needed"],
         _ambiguous_rows(result.ambiguous)),
        ("Not significant", perf_cols, _perf_rows(result.not_significant)),
        ("Unchanged", perf_cols, _perf_rows(result.unchanged)),
        ("Missing from new", ["case"], _key_rows(result.missing)),
        ("New cases", ["case"], _key_rows(result.new_cases)),
    ]
    for title, header, rows in sections:
        if not rows:
            continue
        lines += [f"### {title} ({len(rows)})", ""] + _table(header, rows)
    return "\n".join(lines) + "\n"


def gate_junit(result: GateResult) -> str:
    """One testcase per compared case; fatal findings are <failure>s, except a CRASH/TIMEOUT/
    ERROR record in NEW, an <error> (the run went wrong, not the result); missing ones
    <skipped> (tolerated) or <failure>."""
    suite = ET.Element("testsuite", name="opbench.gate")
    failures = errors = 0
    broken = {c.key: c.new_status for c in result.broken}
    fatal = {c.key: f"newly failing: {c.base_status} -> {c.new_status} {c.reason or ''}"
             for c in result.newly_failing}
    fatal.update({c.key: f"newly unsupported: {c.reason or ''}" for c in result.newly_unsupported})
    fatal.update({c.key: _perf_message(c) for c in result.regressions})
    fatal.update({c.key: f"{c.new_status} in new: {c.reason or ''}" for c in result.broken})
    fatal.update({m.key: f"timed differently, not compared: BASE {m.base_method.describe()}, "
                  f"NEW {m.new_method.describe()}" for m in result.timed_differently})
    tolerated = set(result.missing_cases) if result.allow_missing else set()
    fatal.update({k: "missing from the new results" for k in result.missing
                  if k not in tolerated})
    passed = {c.key for group in (result.fixed, result.other_status_changes)
              for c in group} | {c.key for group in (result.improvements, result.unchanged,
                                                      result.not_significant,
                                                      result.ambiguous) for c in group}
    for key in sorted(set(fatal) | passed):
        case = ET.SubElement(suite, "testcase", classname=f"{key.kind}.{key.backend}",
                             name=key.case_id)
        if key in broken:
            errors += 1
            ET.SubElement(case, "error", type=broken[key],
                          message=fatal[key].strip()).text = fatal[key]
        elif key in fatal:
            failures += 1
            ET.SubElement(case, "failure", message=fatal[key].strip()).text = fatal[key]
    skipped = [k for k in result.missing if k not in fatal]
    for key in skipped:
        case = ET.SubElement(suite, "testcase", classname=f"{key.kind}.{key.backend}",
                             name=key.case_id)
        ET.SubElement(case, "skipped", message="missing from the new results")
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", str(len(skipped)))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _perf_message(change: PerfChange) -> str:
    cmp = change.comparison
    unit, test = ("runs", "Welch t") if isinstance(cmp, RunsComparison) else ("samples",
                                                                             "Mann-Whitney")
    if getattr(cmp, "anchored", False):
        unit += " (each sample over the anchor timed beside it)"
    return (f"perf regression: {cmp.ratio:.3f}x slower, {cmp.n_new}/{cmp.n_base} {unit}, "
            f"CI [{cmp.ci_low:.3f}, {cmp.ci_high:.3f}], {test} p={cmp.p_slower:.2g}")
