"""`avlink eval --sweep t_cond|steps`: a metric against one sampling setting, the paper's Figure 3 study.

    avlink eval --sweep t_cond --ckpt DIR --data SYNCBENCH_DIR --task v2a --out DIR [--values 0.5 0.8 0.96 1]
    avlink eval --sweep steps  --ckpt DIR --data SYNCBENCH_DIR --task a2v --out DIR [--values 4 16 64]
                [--methods euler heun]

For every solver (--methods) and value, the linked model of --ckpt generates the other modality of each
SyncBench clip through `sample_link` (the one inference path), the outputs are written to
OUT/<method>/<sweep>=<value>/generated/, and `avlink eval` scores them there (metrics.json, metrics.md,
per_clip.csv). OUT/sweep.json, sweep.md and sweep.png put the model's values side by side with the
ground-truth ceiling and the shuffled floor. Text prompts are not used: AV-Link's text conditioning is
optional.

The audio side goes through the checkpoint's VAE (see `load_checkpoint_vae`): V2A decodes the generated latent
to a mel and the vocoder (--vocoder) turns it into a wave; A2V encodes the conditioning audio to its latent.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avlink.checkpoint import atomic_write, load_link
from avlink.cli import UserError
from avlink.config import Task
from avlink.eval import report as rep
from avlink.eval.runner import METRIC_GROUPS, EvalSettings, evaluate, parse_weights
from avlink.flow.solvers import SOLVERS

DEFAULT_VALUES: dict[str, tuple[float, ...]] = {
    "t_cond": (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.96, 1.0),
    "steps": (1, 2, 4, 8, 16, 32, 64),
}
VAE_FILE = "vae.safetensors"
# Drawn first when present; the sweep's JSON and table hold every metric.
PLOT_METRICS = ("onset_acc", "onset_ap", "av_align", "event_f1", "class_acc")


def load_checkpoint_vae(folder: Path, clip: Any) -> torch.nn.Module:
    """The audio VAE of a checkpoint folder.

    The folder holds it as `vae.safetensors`: the AudioVAE state dict, with its architecture in the file's
    safetensors metadata ("hidden": channel width, "depth": residual blocks per level; read from the tensor
    shapes when absent). Its mel and latent geometry is the linked model's (config.json, clip.audio): the one
    the audio generator works in. Loading is strict: weights of another geometry or architecture are refused.
    """
    from avlink.codecs.vae import load_vae

    path = Path(folder) / VAE_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; the sweep needs the checkpoint's audio VAE there "
                        f"(an AudioVAE state dict saved as safetensors with 'hidden' and 'depth' metadata)")
    return load_vae(str(path), clip)


@dataclass
class Conditioned:
    """One SyncBench clip ready to condition the generation."""

    id: str
    x_cond: Tensor  # V2A: video (1, C, T, H, W) in [-1, 1]; A2V: scaled latent (1, Ta, Da)
    audio: np.ndarray  # the clip's wave at the model's rate, muxed into A2V outputs


def load_conditions(data: Path, n: int | None, task: Task, clip: Any, vae: Any,
                    split: str | None = "test") -> list[Conditioned]:
    """The first n clips of one split of a SyncBench folder (a folder made by `synth --split` holds train,
    val and test; scoring a model on the clips it trained on would flatter it). split None: every clip."""
    from avlink.codecs.mel import MelSpectrogram, fit_frames
    from avlink.data.datasets import load_item, syncbench_dataset
    from avlink.data.media import MediaError

    dataset = syncbench_dataset(data, split)
    if not dataset.items and split is not None:
        raise UserError(f"{data}: no clips of split {split!r} (use --split all for a folder without splits)")
    mel = MelSpectrogram(clip.audio)
    out = []
    for item in dataset.items[:n]:
        try:
            av = load_item(item, clip)
        except MediaError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        if task == "v2a":
            x_cond = av.video[None]  # (1, C, T, H, W)
        else:
            with torch.no_grad():
                spec = fit_frames(mel(av.audio[None]), clip.num_mel_frames)  # (1, n_mels, F)
                x_cond = vae.scale_latent(vae.encode(spec).mean)  # (1, Ta, Da)
        out.append(Conditioned(item.id, x_cond, av.audio.numpy()))
    if not out:
        raise UserError(f"{data}: no usable clips")
    return out


@torch.no_grad()
def write_output(task: Task, x: Tensor, cond: Conditioned, folder: Path, clip: Any, vae: Any,
                 vocoder: Any) -> None:
    """Decode one generated sample and write it as <id>.wav (V2A) or <id>.mp4 (A2V)."""
    from avlink.data import media

    if task == "v2a":
        spec = vae.decode(vae.unscale_latent(x))  # (1, n_mels, F)
        wave = vocoder(spec)[0].float().cpu().numpy()  # (F * hop,)
        media.write_audio(folder / f"{cond.id}.wav", np.clip(wave, -1.0, 1.0), clip.audio.sample_rate)
        return
    pixels = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, T, H, W)
    frames = pixels.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, C)
    media.write_video(folder / f"{cond.id}.mp4", frames, clip.video.fps, cond.audio, clip.audio.sample_rate)


def generate(model: Any, args: argparse.Namespace, method: str, value: float, conds: list[Conditioned],
             folder: Path, vae: Any, vocoder: Any) -> None:
    steps = int(value) if args.sweep == "steps" else args.steps
    t_cond = float(value) if args.sweep == "t_cond" else None
    clip = model.cfg.clip
    folder.mkdir(parents=True, exist_ok=True)
    for index, cond in enumerate(conds):
        x = sample_one(model, args.task, cond.x_cond, steps, method, t_cond, args.sample_seed + index)
        write_output(args.task, x, cond, folder, clip, vae, vocoder)


def sample_one(model: Any, task: Task, x_cond: Tensor, steps: int, method: str, t_cond: float | None,
               seed: int) -> Tensor:
    from avlink.sample import sample_link

    return sample_link(model, task, x_cond, steps=steps, method=method, t_cond=t_cond, seed=seed)


def check_values(sweep: str, values: list[float] | None) -> list[float]:
    values = list(values or DEFAULT_VALUES[sweep])
    if sweep == "steps" and any(v < 1 or v != int(v) for v in values):
        raise UserError(f"--values {values}: steps must be whole numbers >= 1")
    if sweep == "t_cond" and any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--values {values}: t_cond must lie in [0, 1]")
    return values


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def summarize(sweep: str, task: Task, values: list[float], reports: dict[str, list[rep.EvalReport]]
              ) -> dict[str, Any]:
    """The model's value of every metric per value and solver, beside ceiling and floor (JSON-ready)."""
    first = next(iter(reports.values()))[0]
    return {
        "sweep": sweep, "task": task, "values": values, "methods": list(reports),
        "metrics": {m.name: {"better": m.better, "ceiling": _finite(first.value(m.name, "ceiling")),
                             "floor": _finite(first.value(m.name, "floor")),
                             "model": {method: [_finite(r.value(m.name)) for r in rs]
                                       for method, rs in reports.items()}}
                    for m in first.metrics},
        "clips": first.clips,
    }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def sweep_markdown(summary: dict[str, Any]) -> str:
    names = list(summary["metrics"])
    lines = [f"# avlink eval sweep: {summary['sweep']} ({summary['task']}, {summary['clips']} clips)", "",
             "| solver | " + summary["sweep"] + " | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for method in summary["methods"]:
        for i, value in enumerate(summary["values"]):
            cells = " | ".join(_num(summary["metrics"][n]["model"][method][i]) for n in names)
            lines.append(f"| {method} | {value:g} | {cells} |")
    for row in ("ceiling", "floor"):
        cells = " | ".join(_num(summary["metrics"][n][row]) for n in names)
        lines.append(f"| {rep.ROW_TITLES[row]} | | {cells} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """One panel per metric: the model's curve per solver, ceiling and floor as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PLOT_METRICS if n in summary["metrics"]] or list(summary["metrics"])[:4]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        entry = summary["metrics"][name]
        for method, ys in entry["model"].items():
            ax.plot(summary["values"], [np.nan if y is None else y for y in ys], marker="o", label=method)
        for row, style in (("ceiling", "--"), ("floor", ":")):
            if entry[row] is not None:
                ax.axhline(entry[row], linestyle=style, color="grey", label=rep.ROW_TITLES[row])
        if summary["sweep"] == "steps":
            ax.set_xscale("log", base=2)
        ax.set_xlabel("t_cond (conditioning flow time)" if summary["sweep"] == "t_cond" else "sampling steps")
        ax.set_title(f"{name} ({entry['better']} is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run_sweep(args: argparse.Namespace) -> int:
    from avlink.codecs.vocoder import load_vocoder

    if args.ckpt is None or args.data is None:
        raise UserError("--sweep needs --ckpt (checkpoint folder) and --data (SyncBench folder)")
    values = check_values(args.sweep, args.values)
    unknown = [m for m in args.methods if m not in SOLVERS]
    if unknown:
        raise UserError(f"--methods {' '.join(unknown)}: unknown solver; choose from {', '.join(SOLVERS)}")
    try:
        model = load_link(args.ckpt)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    clip = model.cfg.clip
    vae = load_checkpoint_vae(args.ckpt, clip)
    vocoder = load_vocoder(args.vocoder, clip.audio) if args.task == "v2a" else None
    split = None if args.split == "all" else args.split
    conds = load_conditions(args.data, args.n, args.task, clip, vae, split)
    settings = EvalSettings(task=args.task, metrics=tuple(args.metrics or METRIC_GROUPS),
                            weights=parse_weights(args.weights), fps=clip.video.fps, duration=clip.duration,
                            seed=args.seed)
    cache: dict = {}  # reference features, the same for every value
    reports: dict[str, list[rep.EvalReport]] = {}
    for method in args.methods:
        for value in values:
            folder = Path(args.out) / method / f"{args.sweep}={value:g}"
            generate(model, args, method, value, conds, folder / "generated", vae, vocoder)
            report = evaluate(folder / "generated", args.data, settings, cache=cache,
                              only={c.id for c in conds})
            rep.write_report(report, folder)
            reports.setdefault(method, []).append(report)
            print(f"{method} {args.sweep}={value:g}: {report.clips} clips scored")
    summary = summarize(args.sweep, args.task, values, reports)
    out = Path(args.out)
    atomic_write(out / "sweep.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    text = sweep_markdown(summary)
    atomic_write(out / "sweep.md", lambda tmp: tmp.write_text(text))
    plot(summary, out / "sweep.png")
    print(text)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return 0
