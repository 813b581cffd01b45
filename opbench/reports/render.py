"""Tables and figures -> ``report.md`` (PNG files beside it) and a self-contained
``report.html`` (the same PNGs embedded as base64; every piece of text HTML-escaped).

Both documents are rendered from one list of ``Section``s so they always say the same thing.
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
class Section:
    title: str
    note: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    image: str | None = None  # file name under PLOT_DIR
    png: bytes | None = None


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    images: list[Path]


# -- sections --------------------------------------------------------------------------------------
def _table_section(title: str, table: pd.DataFrame, missing: str) -> Section:
    if table.empty:
        return Section(title, note=f"No data: {missing}.")
    return Section(title, tables=[("", table)])


def table_sections(df: pd.DataFrame) -> list[Section]:
    return [
        _table_section("Status counts", tables.status_counts(df), "no records"),
        _table_section("Pass/fail matrix (op × backend × dtype)", tables.pass_fail_matrix(df),
                       "no test records"),
        _table_section("Failures", tables.failures(df), "no failing records"),
        _table_section("Worst errors per op", tables.worst_errors(df),
                       "no test records with error metrics"),
        _table_section("Performance", tables.perf_table(df), "no timed perf records"),
        _table_section("Scenarios", tables.scenario_table(df), "no scenario records"),
    ]


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def plot_sections(df: pd.DataFrame) -> list[Section]:
    sections = []
    for stem, title, build, needs in plots.PLOTS:
        fig = build(df)
        if fig is None:
            sections.append(Section(f"Plot: {title}", note=f"Not plotted: needs {needs}."))
        else:
            sections.append(Section(f"Plot: {title}", image=f"{stem}.png", png=figure_png(fig)))
    return sections


def summary_line(df: pd.DataFrame, sources: list[str]) -> str:
    if df.empty:
        return f"No records in {', '.join(sources) or 'the given files'}."
    kinds = df["kind"].value_counts().to_dict()
    described = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    backends = ", ".join(sorted(df["backend"].astype(str).unique()))
    return f"{len(df)} records ({described}) from {len(sources)} file(s); backends: {backends}."


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


def render_markdown(title: str, summary: str, sections: list[Section]) -> str:
    parts = [f"# {md_escape(title)}", "", md_escape(summary), ""]
    for section in sections:
        parts += [f"## {md_escape(section.title)}", ""]
        if section.note:
            parts += [md_escape(section.note), ""]
        for caption, table in section.tables:
            parts += ([md_escape(caption), ""] if caption else []) + [markdown_table(table), ""]
        if section.image:
            parts += [f"![{md_escape(section.title)}]({PLOT_DIR}/{section.image})", ""]
    return "\n".join(parts)


# -- HTML ------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td { font-family: ui-monospace, monospace; }
img { max-width: 100%; }
.note { color: #666; font-style: italic; }
"""


def html_table(table: pd.DataFrame) -> str:
    return formatted(table).to_html(index=False, escape=True, border=0)


def render_html(title: str, summary: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{esc(summary)}</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{esc(section.note)}</p>')
        for caption, table in section.tables:
            if caption:
                parts.append(f"<p>{esc(caption)}</p>")
            parts.append(html_table(table))
        if section.png:
            data = base64.b64encode(section.png).decode("ascii")
            parts.append(f'<img alt="{esc(section.title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts)


# -- entry points ----------------------------------------------------------------------------------
def write_report(
    df: pd.DataFrame, out_dir: str | Path, *, sources: list[str] | None = None,
    title: str = "opbench report",
) -> ReportFiles:
    """Write report.md, report.html and plots/*.png for the results DataFrame ``df``."""
    out = Path(out_dir)
    (out / PLOT_DIR).mkdir(parents=True, exist_ok=True)
    sections = table_sections(df) + plot_sections(df)
    images = []
    for section in sections:
        if section.png:
            image = out / PLOT_DIR / section.image
            image.write_bytes(section.png)
            images.append(image)
    summary = summary_line(df, sources or [])
    markdown = out / "report.md"
    markdown.write_text(render_markdown(title, summary, sections), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(title, summary, sections), encoding="utf-8")
    return ReportFiles(markdown, page, images)


def build_report(paths, out_dir: str | Path) -> ReportFiles:
    """Load result files (``store.ResultFileError`` on bad input) and write the report."""
    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return write_report(store.load_results(paths), out_dir, sources=paths)
