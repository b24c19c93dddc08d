"""`avlink eval --sweep t_cond|steps|evals|cfg|link`: a metric against one sampling setting, the paper's Figure 3
study, the cost-quality curve of the ODE solvers, and the two guidance scales.

    avlink eval --sweep t_cond --ckpt DIR --data SYNCBENCH_DIR --task v2a --out DIR [--values 0.5 0.8 0.96 1]
    avlink eval --sweep steps  --ckpt DIR --data SYNCBENCH_DIR --task a2v --out DIR [--values 4 16 64]
                [--methods euler heun]
    avlink eval --sweep evals  --ckpt DIR --data SYNCBENCH_DIR --task v2a --out DIR [--values 16 32 64]
                [--methods euler midpoint heun]
    avlink eval --sweep cfg    --ckpt DIR --data SYNCBENCH_DIR --task a2v --out DIR --prompts captions
                [--values 1 2 3 4.5 6]
    avlink eval --sweep link   --ckpt DIR --data SYNCBENCH_DIR --task v2a --out DIR [--values 1 1.5 2 3]
    common options: [--precision fp32|bf16] [--prompts none|captions] [--batch N] [--sample-seed S] [--n N]

For every solver (--methods) and value, the linked model of --ckpt generates the other modality of each
SyncBench clip through `sample_link` (the one inference path), the outputs are written to
OUT/<method>/<sweep>=<value>/generated/, and `avlink eval` scores them there (metrics.json, metrics.md,
per_clip.csv). OUT/sweep.json, sweep.md and sweep.png put the model's values side by side with the
ground-truth ceiling and the shuffled floor.

`evals` puts network evaluations on the axis instead of steps: a solver of k evaluations per step
(`EVALS_PER_STEP`: Euler 1, midpoint and Heun 2) runs value / k steps, so solvers of different order are
compared at the same cost. A value that k does not divide is skipped for that solver, with a note in the
output. Guidance is not used there (scale 1), so one solver evaluation is one network evaluation.

`cfg` puts the classifier-free guidance scale on the axis (--steps steps each): the generated stream's prompt
against the null text, v_uncond + s * (v_cond - v_uncond). It needs prompts (`--prompts captions`); a guided
step evaluates the network on twice the batch, which the evaluations column counts.

`link` puts the guidance scale on the conditioning input on the axis (sample.link_guidance): the linked model
against its generated stream's generator alone, with or without prompts; a guided step runs the generator a
second time, which the evaluations column counts as well.

Prompts: none by default (AV-Link's text conditioning is optional); `--prompts captions` gives each clip its
SyncBench caption for both streams, as the shipped checkpoint's scorecard does. Clips are sampled `--batch` at
a time, each clip with its own noise streams of --sample-seed (sample.initial_noise: the same whatever --batch),
the scorecard's scheme, so `--prompts captions` at 64 Euler steps redoes its AV-Link row. `--precision bf16`
runs the network evaluations under bf16 autocast (pipeline.sampling_precision); the decoders stay fp32.

Media meets tensors through the checkpoint's codecs (system.load_system): V2A decodes the generated latent
through the audio VAE and the vocoder (--vocoder); A2V encodes the conditioning audio to its latent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from avlink.backbones.protocol import TextCond
from avlink.config import Task
from avlink.errors import UserError
from avlink.eval import report as rep
from avlink.eval.conditions import Conditioned, caption_texts, load_conditions, write_output
from avlink.eval.scoring import METRIC_GROUPS, EvalSettings, evaluate, parse_weights
from avlink.files import atomic_write
from avlink.flow.solvers import EVALS_PER_STEP, SOLVERS, steps_for_evals
from avlink.system import load_system

DEFAULT_VALUES: dict[str, tuple[float, ...]] = {
    "t_cond": (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.96, 1.0),
    "steps": (1, 2, 4, 8, 16, 32, 64),
    "evals": (4, 8, 16, 32, 64),
    "cfg": (1.0, 2.0, 3.0, 4.5, 6.0),
    "link": (1.0, 1.5, 2.0, 3.0),
}
AXIS_LABELS = {"t_cond": "t_cond (conditioning flow time)", "steps": "sampling steps",
               "evals": "network evaluations (steps x evaluations per step)",
               "cfg": "guidance scale (classifier-free, generated stream's prompt)",
               "link": "guidance scale (conditioning input: linked model against the generator alone)"}
# Drawn first when present; the sweep's JSON and table hold every metric.
PLOT_METRICS = ("onset_acc", "onset_ap", "av_align", "event_f1", "class_acc")


@dataclass(frozen=True)
class Point:
    """One setting of the sweep: what the solver runs for one (method, value)."""

    method: str
    value: float
    steps: int
    t_cond: float | None  # None: the model's own fixed conditioning time
    cfg_scale: float = 1.0  # classifier-free guidance on the generated stream's prompt (1: none)
    link_scale: float = 1.0  # guidance on the conditioning input (sample.link_guidance; 1: none)

    @property
    def evals(self) -> int:
        """Network evaluations per sample, in batch rows: a prompt-guided step runs the conditional and the null
        prompt, a link-guided one the generator alone besides."""
        per_step = (1 if self.cfg_scale == 1.0 else 2) + (0 if self.link_scale == 1.0 else 1)
        return self.steps * EVALS_PER_STEP[self.method] * per_step


def plan_point(sweep: str, method: str, value: float, steps: int) -> Point | None:
    """The point of (method, value); None where an evals value is not a whole number of the method's steps."""
    if sweep == "t_cond":
        return Point(method, value, steps, float(value))
    if sweep == "steps":
        return Point(method, value, int(value), None)
    if sweep == "cfg":
        return Point(method, value, steps, None, float(value))
    if sweep == "link":
        return Point(method, value, steps, None, link_scale=float(value))
    steps = steps_for_evals(method, int(value))
    return None if steps is None else Point(method, value, steps, None)


def plan(sweep: str, methods: list[str], values: list[float], steps: int) -> tuple[dict[str, list], list[str]]:
    """Every method's points, value by value (None: skipped), and one note per skipped point."""
    points: dict[str, list[Point | None]] = {}
    notes = []
    for method in methods:
        points[method] = [plan_point(sweep, method, value, steps) for value in values]
        for value, point in zip(values, points[method], strict=True):
            if point is None:
                notes.append(f"{method} at {value:g} evaluations: skipped, {EVALS_PER_STEP[method]} evaluations "
                             f"per step do not divide it")
    return points, notes


@dataclass
class SweepRun:
    """What every point of a sweep shares, prepared once."""

    args: argparse.Namespace
    model: Any
    conds: list[Conditioned]
    texts: TextCond | None  # every clip's caption, tokens (N, L, Dt); None: no prompt
    settings: EvalSettings
    codecs: dict[str, Any]  # system.System.codecs
    source: dict[str, Any]  # what decides a point's files besides the point itself (`point_source`)
    cache: dict = field(default_factory=dict)  # reference features, the same for every point


def generate(run: SweepRun, point: Point, folder: Path) -> None:
    """Generate and write every clip at one point, --batch clips at a time (module docstring: seeds)."""
    from avlink.pipeline import sampling_precision
    from avlink.sample import sample_batches

    args = run.args
    folder.mkdir(parents=True, exist_ok=True)
    batches = sample_batches(run.model, args.task, [c.x_cond for c in run.conds], batch=args.batch,
                             seed=args.sample_seed, text=run.texts,
                             autocast=lambda: sampling_precision(args.precision, run.conds[0].x_cond.device),
                             steps=point.steps, method=point.method, t_cond=point.t_cond, cfg_scale=point.cfg_scale,
                             link_scale=point.link_scale)
    for start, x in batches:  # x: (B, ...) the generated modality, fp32 whatever the precision
        for i in range(x.shape[0]):
            write_output(args.task, x[i:i + 1], run.conds[start + i], folder, run.model.cfg.clip, run.codecs)


def sample_one(model: Any, task: Task, x_cond: Tensor, steps: int, method: str, t_cond: float | None,
               seed: int) -> Tensor:
    from avlink.sample import sample_link

    return sample_link(model, task, x_cond, steps=steps, method=method, t_cond=t_cond, seed=seed)


def check_values(sweep: str, values: list[float] | None) -> list[float]:
    values = list(values or DEFAULT_VALUES[sweep])
    if sweep in ("steps", "evals") and any(v < 1 or v != int(v) for v in values):
        raise UserError(f"--values {' '.join(f'{v:g}' for v in values)}: {sweep} must be whole numbers >= 1")
    if sweep == "t_cond" and any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--values {' '.join(f'{v:g}' for v in values)}: t_cond must lie in [0, 1]")
    if sweep in ("cfg", "link") and any(not (np.isfinite(v) and v >= 0.0) for v in values):
        raise UserError(f"--values {' '.join(f'{v:g}' for v in values)}: guidance scales must be >= 0")
    return values


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def summarize(sweep: str, task: Task, values: list[float], points: dict[str, list[Point | None]],
              reports: dict[str, list[rep.EvalReport | None]], **settings: Any) -> dict[str, Any]:
    """The model's value of every metric per value and solver (None where skipped), beside ceiling and floor,
    with each point's steps and network evaluations (JSON-ready). settings: how the samples were made."""
    first = next(r for rs in reports.values() for r in rs if r is not None)
    return {
        "sweep": sweep, "task": task, "values": values, "methods": list(reports), **settings,
        "steps": {m: [None if p is None else p.steps for p in ps] for m, ps in points.items()},
        "evals": {m: [None if p is None else p.evals for p in ps] for m, ps in points.items()},
        "metrics": {m.name: {"better": m.better, "ceiling": _finite(first.value(m.name, "ceiling")),
                             "floor": _finite(first.value(m.name, "floor")),
                             "model": {method: [None if r is None else _finite(r.value(m.name)) for r in rs]
                                       for method, rs in reports.items()}}
                    for m in first.metrics},
        "clips": first.clips,
    }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def sweep_markdown(summary: dict[str, Any]) -> str:
    names = list(summary["metrics"])
    sweep = summary["sweep"]
    keys = {"t_cond": ["t_cond"], "steps": ["steps", "evaluations"], "evals": ["evaluations", "steps"],
            "cfg": ["guidance", "evaluations"], "link": ["guidance", "evaluations"]}[sweep]
    settings = ", ".join(f"{k} {summary[k]}" for k in ("precision", "prompts", "batch", "sample_seed")
                         if k in summary)
    lines = [f"# avlink eval sweep: {sweep} ({summary['task']}, {summary['clips']} clips"
             + (f"; {settings}" if settings else "") + ")", "",
             "| solver | " + " | ".join(keys) + " | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(keys) + "---:|" * len(names)]
    for method in summary["methods"]:
        for i, value in enumerate(summary["values"]):
            steps = summary["steps"][method][i]
            if steps is None:
                continue
            key = {"t_cond": f"{value:g}", "guidance": f"{value:g}", "steps": str(steps),
                   "evaluations": str(summary["evals"][method][i])}
            cells = " | ".join(_num(summary["metrics"][n]["model"][method][i]) for n in names)
            lines.append(f"| {method} | " + " | ".join(key[k] for k in keys) + f" | {cells} |")
    for row in ("ceiling", "floor"):
        cells = " | ".join(_num(summary["metrics"][n][row]) for n in names)
        lines.append(f"| {rep.ROW_TITLES[row]} |" + " |" * len(keys) + f" {cells} |")
    lines += [""] + [f"- {note}" for note in summary.get("notes", [])]
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """One panel per metric: the model's curve per solver, ceiling and floor as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PLOT_METRICS if n in summary["metrics"]] or list(summary["metrics"])[:4]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        entry = summary["metrics"][name]
        for method, ys in entry["model"].items():
            kept = [(x, y) for x, y, s in zip(summary["values"], ys, summary["steps"][method], strict=True)
                    if s is not None and y is not None]  # skipped points leave no gap in the line
            if kept:
                ax.plot(*zip(*kept, strict=True), marker="o", label=method)
        for row, style in (("ceiling", "--"), ("floor", ":")):
            if entry[row] is not None:
                ax.axhline(entry[row], linestyle=style, color="grey", label=rep.ROW_TITLES[row])
        if summary["sweep"] in ("steps", "evals"):
            ax.set_xscale("log", base=2)
            ax.set_xticks(summary["values"], [f"{v:g}" for v in summary["values"]])
        ax.set_xlabel(AXIS_LABELS[summary["sweep"]])
        ax.set_title(f"{name} ({entry['better']} is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{summary['task'].upper()}: {summary['sweep']} sweep, {summary['clips']} clips, "
                 f"{summary.get('precision', 'fp32')}, prompts: {summary.get('prompts', 'none')}",
                 fontsize="medium")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def check_args(args: argparse.Namespace) -> list[float]:
    """Everything the sweep can refuse before it loads anything; the values to sweep."""
    from avlink.pipeline import check_precision

    if args.ckpt is None or args.data is None:
        raise UserError("--sweep needs --ckpt (checkpoint folder) and --data (SyncBench folder)")
    values = check_values(args.sweep, args.values)
    unknown = [m for m in args.methods if m not in SOLVERS]
    if unknown:
        raise UserError(f"--methods {' '.join(unknown)}: unknown solver; choose from {', '.join(SOLVERS)}")
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: need at least 1 clip per batch")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: need at least 1")
    if args.sweep == "cfg" and args.prompts != "captions":
        raise UserError("--sweep cfg: guidance compares a prompt with the null text; add --prompts captions")
    check_precision(args.precision, "cpu")
    return values


def run_sweep(args: argparse.Namespace) -> int:
    values = check_args(args)
    points, notes = plan(args.sweep, args.methods, values, args.steps)
    for note in notes:
        print(note)
    if all(p is None for ps in points.values() for p in ps):
        raise UserError(f"--values {' '.join(f'{v:g}' for v in values)}: no solver of --methods can run any "
                        f"of them")
    run = prepare_run(args)
    reports: dict[str, list[rep.EvalReport | None]] = {}
    wall: dict[str, list[float | None]] = {}
    for method, method_points in points.items():
        for point in method_points:
            report, seconds = (None, None) if point is None else score_point(run, point)
            reports.setdefault(method, []).append(report)
            wall.setdefault(method, []).append(seconds)
    summary = summarize(args.sweep, args.task, values, points, reports, precision=args.precision,
                        prompts=args.prompts, batch=args.batch, sample_seed=args.sample_seed,
                        split=args.split, notes=notes, wall_s=wall)
    write_summary(summary, Path(args.out))
    return 0


def prepare_run(args: argparse.Namespace) -> SweepRun:
    # a damaged or missing file: one line (WeightsError, UserError)
    system = load_system(args.ckpt, vocoder=args.vocoder if args.task == "v2a" else None)
    model, clip = system.model, system.clip
    split = None if args.split == "all" else args.split
    conds = load_conditions(args.data, args.n, args.task, clip, system.codecs, split)
    texts = caption_texts(model, args.data, conds) if args.prompts == "captions" else None
    settings = EvalSettings(task=args.task, metrics=tuple(args.metrics or METRIC_GROUPS),
                            weights=parse_weights(args.weights), fps=clip.video.fps, duration=clip.duration,
                            seed=args.seed, clip=clip)
    return SweepRun(args, model, conds, texts, settings, system.codecs, run_source(args, conds, settings))


POINT_FILE = "point.json"  # how a point's files were made; written last, so only a finished point has it


def digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of files."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_source(args: argparse.Namespace, conds: list[Conditioned], settings: EvalSettings) -> dict[str, Any]:
    """What decides the files of every point of this run: the weights (by content), the clips, the sampling
    and scoring settings."""
    from avlink.data.syncbench import METADATA

    ckpt = Path(args.ckpt)
    weights = sorted(ckpt.glob("*.safetensors")) + [ckpt / "config.json"]
    return {"ckpt": digest(weights), "data": str(Path(args.data).resolve()),
            "metadata": digest([Path(args.data) / METADATA]), "task": args.task, "clips": [c.id for c in conds],
            "precision": args.precision, "prompts": args.prompts, "batch": args.batch,
            "sample_seed": args.sample_seed, "vocoder": args.vocoder, "eval": settings.to_json()}


def point_source(run: SweepRun, point: Point) -> dict[str, Any]:
    guided = ({} if point.cfg_scale == 1.0 else {"cfg_scale": point.cfg_scale}) | (
        {} if point.link_scale == 1.0 else {"link_scale": point.link_scale})  # unguided points keep their source
    return {**run.source, "method": point.method, "steps": point.steps, "t_cond": point.t_cond, **guided}


def finished_point(folder: Path, source: dict[str, Any]) -> tuple[rep.EvalReport, float] | None:
    """The report and wall seconds of a point this sweep (or a killed one before it) already scored."""
    marker, metrics = folder / POINT_FILE, folder / rep.FILES["json"]
    if not (marker.is_file() and metrics.is_file()):
        return None
    done = json.loads(marker.read_text())
    if done.get("source") != source:
        return None
    return report_from_json(json.loads(metrics.read_text())), done["wall_s"]


def report_from_json(data: dict[str, Any]) -> rep.EvalReport:
    """The parts of a metrics.json the sweep's summary reads (values, better, clips)."""
    metrics = data["metrics"]
    return rep.EvalReport(
        task=data["task"], generated=data["generated"], reference=data["reference"], clips=data["clips"],
        metrics=[rep.MetricInfo(name, m["better"], m["description"]) for name, m in metrics.items()],
        rows={row: {name: m[row] for name, m in metrics.items()} for row in rep.ROWS},
        used={name: m["clips"] for name, m in metrics.items()}, notes=data.get("notes", []),
        settings=data.get("settings", {}))


def score_point(run: SweepRun, point: Point) -> tuple[rep.EvalReport, float]:
    """Generate every clip at one point and score them; the report, and the wall seconds it all took. A point
    already finished from the same source is read back instead, so a killed sweep goes on where it stopped."""
    args = run.args
    folder = Path(args.out) / point.method / f"{args.sweep}={point.value:g}"
    source = point_source(run, point)
    label = f"{point.method} {args.sweep}={point.value:g} ({point.steps} steps, {point.evals} evaluations)"
    finished = finished_point(folder, source)
    if finished is not None:
        print(f"{label}: already scored in {folder}, reused")
        return finished
    (folder / POINT_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    generate(run, point, folder / "generated")
    report = evaluate(folder / "generated", args.data, run.settings, cache=run.cache,
                      only={c.id for c in run.conds})
    rep.write_report(report, folder)
    seconds = round(time.perf_counter() - started, 1)
    text = json.dumps({"source": source, "wall_s": seconds}, indent=2)
    atomic_write(folder / POINT_FILE, lambda tmp: tmp.write_text(text + "\n"))
    print(f"{label}: {report.clips} clips scored in {seconds:.0f} s")
    return report, seconds


def write_summary(summary: dict[str, Any], out: Path) -> None:
    atomic_write(out / "sweep.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    text = sweep_markdown(summary)
    atomic_write(out / "sweep.md", lambda tmp: tmp.write_text(text))
    plot(summary, out / "sweep.png")
    print(text)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
