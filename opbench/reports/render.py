"""Tables and figures -> ``report.md`` (PNG files beside it) and a self-contained
``report.html`` (the same PNGs embedded as base64; every piece of text HTML-escaped).

Both documents are rendered from one list of ``Section``s so they always say the same thing:
a headline first (what passed and failed, what got slower or faster), then where the data came
from (machine, versions, commit, runs), then each table with the plots that illustrate it beside
it.  A case re-run into the same file counts once: the latest record wins, as in the gate.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from opbench.harness import store
from opbench.reports import plots, tables
from opbench.reports.markup import md_escape

PLOT_DIR = "plots"
DPI = 110


@dataclass
class Figure:
    stem: str
    title: str
    png: bytes | None = None
    missing: str = ""  # why it is not drawn


@dataclass
class Table:
    frame: pd.DataFrame
    classes: pd.DataFrame | None = None  # CSS classes per cell (same shape), HTML only
    caption: str = ""


@dataclass
class Section:
    title: str
    note: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    kind: str = ""  # "headline" is rendered as the page's lead
    beside: bool = True  # figures beside the tables (False: below, for wide tables)


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    images: list[Path]


@dataclass
class Comparison:
    """What the headline's regressions and improvements were measured against."""
    label: str  # e.g. "against base.jsonl" or "commit abc1234 against def5678"
    gate: object  # opbench.perf.gate.GateResult


# -- figures ---------------------------------------------------------------------------------------
def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figures(df: pd.DataFrame, stems: tuple[str, ...]) -> list[Figure]:
    figures = []
    for stem, title, build, needs in plots.PLOTS:
        if stem not in stems:
            continue
        fig = build(df)
        figures.append(Figure(stem, title, png=figure_png(fig) if fig is not None else None,
                              missing="" if fig is not None else f"Not plotted: needs {needs}."))
    return figures


# -- sections --------------------------------------------------------------------------------------
def _table(title: str, frame: pd.DataFrame, missing: str, *, classes=None, note="",
           figures=()) -> Section:
    if frame.empty:
        return Section(title, note=f"No data: {missing}.", figures=list(figures))
    return Section(title, note=note, tables=[Table(frame, classes)], figures=list(figures))


#: the headline's words when nothing was compared, for result files (--db says its own)
NOT_COMPARED = "no earlier run to compare with (give --against BASE.jsonl, or --db)"


def headline(df: pd.DataFrame, sources: list[str], comparison: Comparison | None,
             not_compared: str = NOT_COMPARED) -> Section:
    counts = tables.outcome_counts(df)
    cases = sum(counts.values())
    parts = [f"{cases} cases: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['xfail']} xfail, {counts['unsupported']} unsupported."
             if cases else "No test or scenario records."]
    if comparison is None:
        parts.append(f"Regressions and improvements: {not_compared}.")
    else:
        from opbench.reports.gate_summary import backend_gap_note, method_lines

        g = comparison.gate
        parts.append(f"{len(g.regressions)} perf regressions, {len(g.improvements)} "
                     f"improvements, {len(g.newly_failing)} newly failing, {len(g.fixed)} fixed "
                     f"({comparison.label}; {g.compared} cases compared).")
        parts.append(backend_gap_note(g))
        parts += [f"{line}." for line in method_lines(g)]
    parts.append(summary_line(df, sources))
    return Section("Headline", note=" ".join(p for p in parts if p), kind="headline",
                   tables=_comparison_tables(comparison))


def _comparison_tables(comparison: Comparison | None) -> list[Table]:
    if comparison is None:
        return []
    rows = [{"change": name, "case": c.key.label(), "ratio": f"{c.comparison.ratio:.2f}×",
             "before": tables.format_duration_ns(c.base_ns),
             "after": tables.format_duration_ns(c.new_ns)}
            for name, changes in (("regression", comparison.gate.regressions),
                                  ("improvement", comparison.gate.improvements))
            for c in changes]
    rows += [{"change": "newly failing", "case": c.key.label(), "ratio": "",
              "before": c.base_status, "after": c.new_status}
             for c in comparison.gate.newly_failing]
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    classes = pd.DataFrame("", index=frame.index, columns=frame.columns)
    classes["change"] = frame["change"].map({"regression": "slower", "improvement": "faster",
                                             "newly failing": "slower"})
    classes["case"] = "id"
    return [Table(frame, classes)]


def summary_line(df: pd.DataFrame, sources: list[str]) -> str:
    if df.empty:
        return f"No records in {', '.join(sources) or 'the given files'}."
    kinds = df["kind"].value_counts().to_dict()
    described = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    backends = ", ".join(sorted(df["backend"].astype(str).unique()))
    return f"{len(df)} records ({described}) from {len(sources)} source(s); backends: {backends}."


def id_classes(frame: pd.DataFrame, *names: str) -> pd.DataFrame:
    classes = pd.DataFrame("", index=frame.index, columns=frame.columns)
    for name in names:
        if name in classes.columns:
            classes[name] = "id"
    return classes


def body_sections(df: pd.DataFrame, baseline: str | None) -> list[Section]:
    pivot, pivot_classes = tables.perf_pivot(df, baseline)
    failures = tables.failures(df)
    worst = tables.worst_errors(df)
    scenarios = tables.scenario_table(df)
    return [
        _table("Environment", tables.environment_table(df), "no records"),
        _table("Status counts", tables.status_counts(df), "no records"),
        _table("Pass/fail matrix (op × backend × dtype)", tables.pass_fail_matrix(df),
               "no test records"),
        _table("Failures", failures, "no failing records",
               classes=id_classes(failures, "case", "reason"),
               note="The reason names the first bad indices with the expected and actual values."),
        _table("Worst errors per op", worst, "no test records with error metrics",
               classes=id_classes(worst, "case"),
               figures=_figures(df, ("error_vs_dtype",))),
        _table("Performance", pivot, "no timed perf records", classes=pivot_classes,
               note="Median time per call, one unit per column; the ratio is the time over the "
                    "baseline's (red: slower, green: faster, by the gate's test; grey: within "
                    "the threshold; no colour: not significant).",
               figures=_figures(df, ("throughput_vs_size", "fraction_of_ceiling"))),
        _table("Scenarios", scenarios, "no scenario records",
               classes=id_classes(scenarios, "case", "reason"),
               figures=_figures(df, ("toggle_speedups", "device_scaling",
                                         "error_vs_world_size"))),
    ]


# -- markdown --------------------------------------------------------------------------------------
def format_cell(value) -> str:
    """Numbers to 4 significant digits (1.717e-04, 667.8), integral floats as ints."""
    if isinstance(value, float):
        if pd.isna(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    return table.map(format_cell)


def markdown_table(table: pd.DataFrame) -> str:
    table = formatted(table)
    header = "| " + " | ".join(md_escape(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(md_escape(v) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {md_escape(title)}", ""]
    for section in sections:
        if section.kind != "headline":
            parts += [f"## {md_escape(section.title)}", ""]
        if section.note:
            parts += [md_escape(section.note), ""]
        for table in section.tables:
            parts += ([md_escape(table.caption), ""] if table.caption else [])
            parts += [markdown_table(table.frame), ""]
        for figure in section.figures:
            if figure.png:
                parts += [f"![Plot: {md_escape(figure.title)}]({PLOT_DIR}/{figure.stem}.png)", ""]
            else:
                parts += [f"*{md_escape(figure.title)}* — {md_escape(figure.missing)}", ""]
    return "\n".join(parts)


# -- HTML ------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222;
       padding: 0 16px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 2px; margin-top: 1.6em; }
.headline { font-size: 1.15em; background: #f6f8fa; border-left: 4px solid #0969da;
            padding: 0.6em 1em; }
.pair { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.pair > .tables { flex: 1 1 560px; min-width: 0; }
.pair > .figures { flex: 1 1 480px; min-width: 0; }
.scroll { overflow: auto; max-height: 36em; max-width: 100%; margin: 0.5em 0 1em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; position: sticky; top: 0; z-index: 1; }
td { font-family: ui-monospace, monospace; }
td.id { overflow-wrap: anywhere; min-width: 16em; max-width: 36em; }
td.num { text-align: right; white-space: nowrap; }
td.slower { background: #ffd7d5; }
td.faster { background: #d3f5d8; }
td.same { color: #666; }
figure { margin: 0 0 1em; }
img { max-width: 100%; height: auto; }
.note { color: #555; }
"""


def _cells(row, classes_row) -> str:
    esc = html.escape
    cells = []
    for i, value in enumerate(row):
        css = classes_row[i] if classes_row is not None else ""
        attr = f' class="{esc(css.strip())}"' if css.strip() else ""
        cells.append(f"<td{attr}>{esc(format_cell(value))}</td>")
    return "".join(cells)


def html_table(table: Table) -> str:
    frame = table.frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    classes = table.classes.reindex(index=frame.index, columns=frame.columns).fillna("") \
        if table.classes is not None else None
    rows = [f"<tr>{_cells(row, None if classes is None else list(classes.loc[index]))}</tr>"
            for index, row in zip(frame.index, frame.itertuples(index=False))]
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></div>")


def _html_figures(figures: list[Figure]) -> str:
    esc = html.escape
    parts = []
    for figure in figures:
        if figure.png:
            data = base64.b64encode(figure.png).decode("ascii")
            parts.append(f'<figure><img alt="{esc(figure.title)}" '
                         f'src="data:image/png;base64,{data}"></figure>')
        else:
            parts.append(f'<p class="note"><em>{esc(figure.title)}</em> — '
                         f"{esc(figure.missing)}</p>")
    return "".join(parts)


def _html_section(section: Section) -> str:
    esc = html.escape
    if section.kind == "headline":
        lead = f'<p class="headline" id="headline">{esc(section.note)}</p>'
        return lead + "".join(html_table(t) for t in section.tables)
    parts = [f"<h2>{esc(section.title)}</h2>"]
    if section.note:
        parts.append(f'<p class="note">{esc(section.note)}</p>')
    tables_html = "".join(html_table(t) for t in section.tables)
    if section.figures and section.tables and section.beside:
        parts.append(f'<div class="pair"><div class="tables">{tables_html}</div>'
                     f'<div class="figures">{_html_figures(section.figures)}</div></div>')
    else:
        parts.append(tables_html + _html_figures(section.figures))
    return "\n".join(parts)


def render_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        *(_html_section(section) for section in sections),
        "</body></html>",
    ]
    return "\n".join(parts)


# -- entry points ----------------------------------------------------------------------------------
def write_report(
    df: pd.DataFrame, out_dir: str | Path, *, sources: list[str] | None = None,
    title: str = "opbench report", baseline: str | None = None,
    comparison: Comparison | None = None, extra: list[Section] | None = None,
    not_compared: str = NOT_COMPARED,
) -> ReportFiles:
    """Write report.md, report.html and plots/*.png for the results DataFrame ``df``.
    ValueError when ``baseline`` names a backend without perf records."""
    out = Path(out_dir)
    df = tables.latest_per_case(df)
    sections = [headline(df, sources or [], comparison, not_compared),
                *body_sections(df, baseline),
                *(extra or [])]
    (out / PLOT_DIR).mkdir(parents=True, exist_ok=True)
    images = []
    for figure in (f for s in sections for f in s.figures if f.png):
        image = out / PLOT_DIR / f"{figure.stem}.png"
        image.write_bytes(figure.png)
        images.append(image)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(title, sections), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(title, sections), encoding="utf-8")
    return ReportFiles(markdown, page, images)


def build_report(paths, out_dir: str | Path, *, baseline: str | None = None,
                 against=None, pair: tuple[str, str] | None = None) -> ReportFiles:
    """Load result files (``store.ResultFileError`` on bad input) and write the report;
    ``against``: result files of an earlier run, compared by the gate for the headline;
    ``pair``: (backend of ``against``, backend of ``paths``) to compare with each other, as
    the gate's --base-backend/--new-backend (ValueError when a side lacks its backend)."""
    from opbench.perf.gate import gate, pair_backends

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    comparison = None
    if against:
        against = [str(p) for p in ([against] if isinstance(against, (str, Path)) else against)]
        base, new = store.read_many(against), store.read_many(paths)
        label = f"against {', '.join(against)}"
        if pair:
            base, new = pair_backends(base, new, *pair)
            label += f", backend {pair[1]} against {pair[0]}"
        comparison = Comparison(label, gate(base, new))
    return write_report(store.load_results(paths), out_dir, sources=paths, baseline=baseline,
                        comparison=comparison)
