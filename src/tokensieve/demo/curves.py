"""Score against GMACs per task, from the committed full comparison (benchmarks/results/), with
each paper's claimed operating point (carried over to our dense model)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tokensieve.demo.cases import Case
from tokensieve.demo.pictures import Picture, new_figure, save

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
CURVE_PX = (640, 440)
# settings that vary along a curve, or that a family's label does without
ALONG_CURVE = {"keep", "r", "temperature", "layers", "guidance_width", "width", "heads"}


def committed_rows(case: Case, results: Path = RESULTS) -> list[dict] | None:
    """The rows of the task's committed comparison that were scored, or None where it is not
    there (an installed package without the source tree, or a comparison not run yet)."""
    path = results / case.results
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    return [row for row in rows if not math.isnan(row[case.score_key])]


def curve(path: Path, case: Case, rows: list[dict], metric: str, caption: str) -> Picture:
    """Each method family of `rows` as a line over its GMACs, dense as a star, the papers' claims as
    red crosses."""
    figure = new_figure(*CURVE_PX)
    axis = figure.add_axes((0.11, 0.12, 0.86, 0.78))
    dense = next(row for row in rows if row["method"] == "dense")
    families: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["method"] != "dense":
            families.setdefault(_family(row["method"]), []).append((row["gmacs"], row[case.score_key]))
    for family, points in sorted(families.items()):
        points.sort()
        axis.plot(*zip(*points, strict=True), marker="o", markersize=4, linewidth=1.2, label=family)
    axis.plot([dense["gmacs"]], [dense[case.score_key]], marker="*", markersize=12, color="black",
              linestyle="none", label="dense")
    for i, claim in enumerate(case.claims):
        point = (claim.macs_share * dense["gmacs"], claim.score(dense[case.score_key]))
        axis.plot(*point, marker="x", markersize=9, markeredgewidth=2, color="red", linestyle="none")
        axis.annotate(claim.label, point, fontsize=6, color="red", xytext=(6, 6 - 12 * i),
                      textcoords="offset points",
                      bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
    axis.set_xlabel("GMACs per sample")
    axis.set_ylabel(metric)
    axis.set_title(f"{case.task}: {metric} against GMACs (committed full results)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="lower right")
    return save(figure, path, CURVE_PX, caption)


def _family(method: str) -> str:
    """A row's method family: its name and the settings that stay the same along a curve
    ("MADTP(temperature=1.0, aligned=False) at 0.3 of dense MACs" → "MADTP(aligned=False)"), with
    what follows the settings ("…, guidance zeroed") kept."""
    name, _, rest = method.partition("(")
    settings, _, tail = rest.rpartition(")")
    kept = [part.strip() for part in re.split(r",\s*(?![^()\[\]]*[)\]])", settings)
            if part.strip() and part.split("=")[0].strip() not in ALONG_CURVE]
    family = name.strip() + (f"({', '.join(kept)})" if kept else "")
    tail = tail.strip(" ,")
    return f"{family}, {tail}" if tail and not tail.startswith("at ") else family
