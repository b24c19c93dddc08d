"""What `avlink eval` writes: metrics.json (everything), metrics.md (the table a person reads) and
per_clip.csv (one line per clip, to find the worst ones). Every file is written atomically.

The table has three columns of values: the generated clips, ground truth scored against itself (the ceiling)
and ground truth in shuffled pairs (the floor), so a reader sees where a model sits between them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from avlink.files import atomic_write

ROWS = ("model", "ceiling", "floor")
ROW_TITLES = {"model": "generated", "ceiling": "ground truth (ceiling)", "floor": "shuffled pairs (floor)"}
FILES = {"json": "metrics.json", "markdown": "metrics.md", "csv": "per_clip.csv"}


@dataclass(frozen=True)
class MetricInfo:
    name: str
    better: Literal["higher", "lower"]
    description: str


@dataclass(frozen=True)
class Problem:
    """A file left out of the evaluation, and why."""

    file: str
    reason: str


@dataclass
class EvalReport:
    task: str
    generated: str
    reference: str
    clips: int  # pairs scored
    metrics: list[MetricInfo]  # table order
    rows: dict[str, dict[str, float | None]]  # row (ROWS) -> metric -> value; None: does not apply
    used: dict[str, int]  # metric -> clips that entered its model value
    per_clip: list[dict[str, Any]] = field(default_factory=list)  # model row, one dict per clip
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unpaired: list[Problem] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def value(self, metric: str, row: str = "model") -> float | None:
        return self.rows.get(row, {}).get(metric)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(report: EvalReport) -> dict[str, Any]:
    """A JSON-ready dict; NaN and infinite values become null."""
    return {
        "task": report.task, "generated": report.generated, "reference": report.reference,
        "clips": report.clips, "settings": report.settings,
        "metrics": {m.name: {"better": m.better, "description": m.description,
                             "clips": report.used.get(m.name, 0),
                             **{row: _finite_or_none(report.rows[row].get(m.name)) for row in ROWS}}
                    for m in report.metrics},
        "notes": report.notes,
        "problems": [vars(p) for p in report.problems],
        "unpaired": [vars(p) for p in report.unpaired],
    }


def _cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def markdown(report: EvalReport) -> str:
    lines = [f"# avlink eval: {report.task}", "",
             f"generated `{report.generated}` against reference `{report.reference}`: "
             f"{report.clips} clips scored.",
             "", "| metric | " + " | ".join(ROW_TITLES[r] for r in ROWS) + " | clips | better |",
             "|---|" + "---:|" * len(ROWS) + "---:|---|"]
    for m in report.metrics:
        values = " | ".join(_cell(report.rows[row].get(m.name)) for row in ROWS)
        lines.append(f"| {m.name} | {values} | {report.used.get(m.name, 0)} | {m.better} |")
    lines += ["", "n/a: the sanity row does not apply (a set-level metric, or a score of one file); -: undefined on "
              "these clips.", ""]
    lines += ["## Metrics", ""] + [f"- **{m.name}**: {m.description}" for m in report.metrics]
    for title, items in (("Notes", report.notes),
                         ("Files left out", [f"`{p.file}`: {p.reason}" for p in report.problems]),
                         ("Unpaired files", [f"`{p.file}`: {p.reason}" for p in report.unpaired])):
        if items:
            lines += ["", f"## {title}", ""] + [f"- {item}" for item in items]
    return "\n".join(lines) + "\n"


def per_clip_csv(report: EvalReport) -> str:
    columns: list[str] = []
    for row in report.per_clip:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in report.per_clip:
        writer.writerow({k: ("" if _finite_or_none(v) is None else v) for k, v in row.items()})
    return buffer.getvalue()


def write_report(report: EvalReport, out_dir: Path | str) -> dict[str, Path]:
    """Write the three files into out_dir; returns their paths by kind."""
    out = Path(out_dir)
    texts = {"json": json.dumps(to_json(report), indent=2) + "\n", "markdown": markdown(report),
             "csv": per_clip_csv(report)}
    paths = {kind: out / name for kind, name in FILES.items()}
    for kind, text in texts.items():
        atomic_write(paths[kind], lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return paths
