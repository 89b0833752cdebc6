"""The self-contained HTML page (table and embedded chart) and `write_report`,
which writes it and the PNG atomically."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from tlserve.client.report.chart import _matplotlib, render_png
from tlserve.client.report.points import HTML_NAME, PNG_NAME, Point, front_members
from tlserve.client.report.budget import TABLE_HEADERS, Budget, Recommendation, default_notes, table_rows

# --- Page -------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.generated { color: #666; font-size: 0.9em; margin-top: 0; }
.recommendation { background: #f3f8f3; border-left: 4px solid #2ca02c; padding: 0.6em 1em; margin: 1em 0; }
.recommendation.none { background: #fbf3f3; border-left-color: #d62728; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.note { white-space: normal; color: #555; }
tr.front td { font-weight: 600; }
tr.recommended td { background: #fff4d6; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.notes { color: #444; font-size: 0.9em; }
""".strip()

# TABLE_HEADERS columns rendered right-aligned.
_NUMERIC_COLUMNS = {"p50 ms", "p95 ms", "img/s", "batch", "peak mem", "size", "params (M)", "GFLOPs", "accuracy"}


def render_html(
    points: Sequence[Point],
    *,
    title: str,
    png: bytes | None = None,
    recommendation: Recommendation | None = None,
    notes: Sequence[str] = (),
    generated: datetime | None = None,
) -> str:
    """One self-contained HTML page: the title, when it was generated, the recommendation,
    the chart (embedded as a data: URI), the table of every point with Pareto members
    marked, and notes (`default_notes` after the given ones). No external URL, no script;
    every string is escaped."""
    e = html.escape
    generated = generated or datetime.now(timezone.utc)
    front = front_members(points)
    front_ids = {id(p) for p in front}
    rows = table_rows(points, front)
    chosen = recommendation.point if recommendation else None

    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="generated">Generated {e(generated.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"))}</p>',
    ]
    if recommendation is not None:
        css = "recommendation" if chosen is not None else "recommendation none"
        out.append(f'<p class="{css}"><strong>Recommendation.</strong> {e(recommendation.reason)}</p>')
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<p><img alt="{e("accuracy against p50 latency: " + title)}" '
                   f'src="data:image/png;base64,{data}"></p>')
    out.append("<table>")
    out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADERS) + "</tr></thead>")
    out.append("<tbody>")
    for p, row in zip(points, rows):
        classes = []
        if id(p) in front_ids or p in front:
            classes.append("front")
        if chosen is not None and p == chosen:
            classes.append("recommended")
        attr = f' class="{" ".join(classes)}"' if classes else ""
        cells = []
        for header, value in zip(TABLE_HEADERS, row):
            cls = ' class="num"' if header in _NUMERIC_COLUMNS else ' class="note"' if header == "note" else ""
            cells.append(f"<td{cls}>{e(value)}</td>")
        out.append(f"<tr{attr}>" + "".join(cells) + "</tr>")
    out.append("</tbody>")
    out.append("</table>")
    all_notes = [*notes, *default_notes(points)]
    out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in all_notes) + "</ul>")
    out.append("</body>")
    out.append("</html>")
    return "\n".join(out) + "\n"


# --- Both files --------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    png: str
    html: str


def write_report(
    points: Sequence[Point],
    out_dir: str | os.PathLike[str],
    *,
    title: str,
    recommendation: Recommendation | None = None,
    budget: Budget | None = None,
    notes: Sequence[str] = (),
    chance_accuracy: float | None = None,
    width_px: int = 1200,
    height_px: int = 750,
    dpi: int = 100,
) -> ReportFiles:
    """Writes report.png and report.html (the PNG embedded) into out_dir, created if
    missing, and returns their paths. The budget drawn defaults to the recommendation's.
    Raises ChartUnavailable, before writing anything, without matplotlib."""
    _matplotlib()
    if budget is None and recommendation is not None:
        budget = recommendation.budget
    buffer = io.BytesIO()
    render_png(points, buffer, title=title, budget=budget,
               recommended=recommendation.point if recommendation else None,
               chance_accuracy=chance_accuracy, width_px=width_px, height_px=height_px, dpi=dpi)
    png = buffer.getvalue()
    page = render_html(points, title=title, png=png, recommendation=recommendation, notes=notes)
    os.makedirs(out_dir, exist_ok=True)
    png_path = os.path.join(out_dir, PNG_NAME)
    html_path = os.path.join(out_dir, HTML_NAME)
    _write_atomic(png_path, png)
    _write_atomic(html_path, page.encode("utf-8"))
    return ReportFiles(png=png_path, html=html_path)


def _write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
