"""The demo's report page: one self-contained HTML file (no script, no link outside its folder)
with the table and every picture, which sit beside it as PNGs; and demo.json, the table as data."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokensieve.demo.run import DemoReport, DemoRow

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:14px}
td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}figure{margin:2em 0}img{max-width:100%}
figcaption{font-size:13px;color:#555}.note{color:#a33}"""
COLUMNS = ("task", "method", "kind", "score", "vs dense", "GMACs", "MACs vs dense", "pruning speedup",
           "speedup over host")


def table_cells(row: DemoRow) -> tuple[str, ...]:
    """A row of the demo's table, as the page and the terminal print it."""
    speed = "—" if row.pruning_speedup is None else f"{row.pruning_speedup:.2f}x"
    host = "—" if row.host_speedup is None else f"{row.host_speedup:.2f}x"
    change = "—" if row.kind == "dense" else f"{100 * row.relative:+.1f}%"
    return (row.task, row.method, row.kind, f"{row.score:.4f} {row.metric}", change, f"{row.gmacs:.3f}",
            f"{row.macs_share:.3f}", speed, host)


def write_page(report: DemoReport) -> None:
    folder = report.page.parent
    (folder / "demo.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in table_cells(row)) + "</tr>"
                     for row in report.rows)
    figures = "\n".join(
        f'<figure><img src="{html.escape(p.path.name)}" width="{p.width}" height="{p.height}" '
        f'alt="{html.escape(p.caption)}"><figcaption>{html.escape(p.caption)}</figcaption></figure>'
        for p in report.pictures)
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in report.notes)
    report.page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tokensieve demo</title><style>{STYLE}</style></head>
<body>
<h1>tokensieve demo</h1>
<p>Each method the package ships trained, on its task's reference model, beside dense and the
training-free baselines of its comparison (their settings matched to the shipped method's MACs in the
committed full results): the first {report.samples} samples of each test split, scored by the code that
scores the full results. GMACs per sample (nlvr, retrieval: both towers). Speedups: medians of
{report.timing_rounds} interleaved rounds of the task's forward on {report.timing_batch} samples, at
{report.threads} threads; pruning's own speedup is against the same patched model with pruning disabled,
the other against the unpatched model. The whole demo took {report.seconds:.0f} s. A slice's scores
move by points from the whole split's: the curves below are the committed full comparisons. SViT on
the det model is left out of the demo's time (<code>tokensieve eval det svit</code> scores it).</p>
{notes}
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
{figures}
</body></html>
""")
