"""`avlink demo`: the main job on the embedded default, from the shipped checkpoints alone.

    avlink demo [--n 6] [--out outputs/demo] [--steps 64] [--ckpt checkpoints/tiny] [--seed 0]
                [--vocoder hifigan]

1. Renders `--n` SyncBench clips of one model window each. Their seeds start at DEMO_SEED, past the seed
   ranges of the train, val and test splits (SPLIT_SEEDS + SPLIT_SIZE each), so no checkpoint has trained or
   been tuned on them. They go to OUT/clips/ as a SyncBench folder (mp4 + metadata.jsonl with the true event
   times and captions), which the evaluation reads as its reference.
2. For each clip, through `Pipeline` (the one inference path), with the clip's caption as prompt and noise
   seed `--seed` + clip index: V2A on its silent video and A2V on its audio, each with the Fusion Blocks
   (AV-Link) and without them (the frozen generator alone, same prompt, seed and length: the no-fusion
   baseline). The conditioning is read back from the mp4, as a user's file would be.
3. Writes, per clip: `<id>.v2a.mp4` and `<id>.v2a.no-fusion.mp4` (the clip's video stream copied, the
   generated sound muxed in), `<id>.a2v.mp4` and `<id>.a2v.no-fusion.mp4` (the generated frames upscaled
   UPSCALE times for viewing, the clip's own sound), where the checkpoint has a video upsampler also
   `<id>.a2v.upsampled.mp4` (AV-Link's frames through it, at its rate, shown at the same size), and `<id>.png`,
   a contact sheet (viz.py): the clip's frames, its sound, both generated sounds and both generated videos
   (and the upsampled one under AV-Link's) on one time axis, with the true event times and the events detected
   in each generated row marked.
4. Scores the exact model outputs (OUT/eval/<system>/generated/: the 16-bit wav, the video at model size)
   with the evaluation (eval/scoring.py) against OUT/clips/: onset (V2A), events, AV-Align, and class accuracy
   where the checkpoint folder has the SyncBench classifiers (classifiers.safetensors). The evaluation's own
   files (metrics.json, metrics.md, per_clip.csv) stay beside each system's outputs.
5. Writes OUT/report.md: per task a table with the ground-truth ceiling, AV-Link, no fusion and the
   shuffled-pairs floor, links to every file, and the measured wall time; then prints where to look.

Without a complete checkpoint folder it says how to make one (`make checkpoints`) in one line, exit status 2,
and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avlink.config import Task
from avlink.data.syncbench import SPLIT_SEEDS, SPLIT_SIZE, SyncClip, clip_id, render_clip
from avlink.errors import UserError
from avlink.files import atomic_write

# First seed of the demo clips: past every split's range, so no split (and no training run) has them.
DEMO_SEED = max(SPLIT_SEEDS.values()) + SPLIT_SIZE
DEMO_SPLIT = "demo"  # the clips' id prefix and their `split` in metadata.jsonl
UPSCALE = 8  # nearest-neighbour factor of the A2V videos written for viewing (16x16 -> 128x128 for tiny)
# system -> (task, with the Fusion Blocks)
SYSTEMS: dict[str, tuple[Task, bool]] = {
    "v2a": ("v2a", True), "v2a.no-fusion": ("v2a", False),
    "a2v": ("a2v", True), "a2v.no-fusion": ("a2v", False),
}
TASK_TITLES = {"v2a": "V2A: sound for the silent video", "a2v": "A2V: video for the sound"}
# Metric groups per task; class_acc joins them where the checkpoint has the SyncBench classifiers.
METRICS: dict[Task, tuple[str, ...]] = {"v2a": ("onset", "events", "av_align"), "a2v": ("events", "av_align")}


@dataclass
class DemoClip:
    """A rendered demo clip and where its mp4 is."""

    id: str
    path: Path
    clip: SyncClip

    @property
    def caption(self) -> str:
        return str(self.clip.meta["caption"])

    @property
    def events(self) -> list[float]:
        return [float(t) for t in self.clip.meta["events"]]


@dataclass
class Generated:
    """What the four systems made of one clip: waves (n,) at the model's rate, frames (T, H, W, 3) uint8."""

    waves: dict[str, np.ndarray] = field(default_factory=dict)  # "v2a", "v2a.no-fusion"
    videos: dict[str, np.ndarray] = field(default_factory=dict)  # "a2v", "a2v.no-fusion"
    # "a2v" through the checkpoint's video upsampler, where it has one: (T * st, H * ss, W * ss, 3)
    upsampled: dict[str, np.ndarray] = field(default_factory=dict)


class Timer:
    """Wall time per stage, so the report says where the time went."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def add(self, stage: str, since: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - since

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# --- checkpoint ---------------------------------------------------------------------------------------------


def check_checkpoint(folder: Path) -> None:
    """One line saying how to get checkpoints, before anything is written, when the folder is not complete."""
    from avlink.system import FILES

    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        what = (f"incomplete checkpoint (no {', '.join(missing)})" if folder.is_dir()
                else "no checkpoint folder")
        raise UserError(f"{folder}: {what}; make the shipped ones with `make checkpoints` "
                        "(trains them on this machine), or pass --ckpt DIR")


def default_checkpoint() -> Path:
    from avlink.pipeline import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


# --- clips --------------------------------------------------------------------------------------------------


def render_clips(folder: Path, n: int, duration: float, preset: str) -> list[DemoClip]:
    """Render demo clips 0..n-1 into folder as a SyncBench folder (mp4s + metadata.jsonl, rewritten whole)."""
    from avlink.data import media

    folder.mkdir(parents=True, exist_ok=True)
    clips, rows = [], []
    for i in range(n):
        seed = DEMO_SEED + i
        cid = clip_id(DEMO_SPLIT, seed)
        clip = render_clip(seed, duration)
        path = folder / f"{cid}.mp4"
        media.write_video(path, clip.frames, clip.fps, clip.audio, clip.sample_rate)
        rows.append({"id": cid, "file": path.name, "split": DEMO_SPLIT, "preset": preset, **clip.meta})
        clips.append(DemoClip(cid, path, clip))
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(folder / "metadata.jsonl", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return clips


# --- generation ---------------------------------------------------------------------------------------------


def generate(pipe: Any, clip: DemoClip, steps: int, seed: int) -> Generated:
    """V2A and A2V of one clip, each with and without the Fusion Blocks, same prompt and seed."""
    frames = pipe.read_video(clip.path)  # (T, H, W, 3) at the model's fps and size
    wave = pipe.read_audio(clip.path)  # (N,) at the model's rate
    options = {"prompt": clip.caption, "steps": steps, "seed": seed}
    out = Generated()
    for system, (task, fusion) in SYSTEMS.items():
        if task == "v2a":
            out.waves[system] = pipe.video_to_audio(frames, fusion=fusion, **options)
        else:
            out.videos[system] = pipe.audio_to_video(wave, fusion=fusion, **options)
            if fusion and pipe.upsampler is not None:
                out.upsampled[system] = pipe.upsample(out.videos[system], wave, seed=seed)
    return out


def write_outputs(out: Path, pipe: Any, clip: DemoClip, made: Generated) -> None:
    """The files to watch (OUT/<id>.<system>.mp4) and the exact outputs the evaluation reads."""
    from avlink.data import media

    for system, wave in made.waves.items():
        media.mux_audio(clip.path, wave, pipe.sample_rate, out / f"{clip.id}.{system}.mp4")
        media.write_audio(generated_folder(out, system) / f"{clip.id}.wav", wave, pipe.sample_rate)
    for system, frames in made.videos.items():
        media.write_video(out / f"{clip.id}.{system}.mp4", frames, pipe.fps, clip.clip.audio,
                          clip.clip.sample_rate, scale=UPSCALE)
        media.write_video(generated_folder(out, system) / f"{clip.id}.mp4", frames, pipe.fps)
    for system, frames in made.upsampled.items():
        scale = max(1, UPSCALE * pipe.size[1] // frames.shape[2])  # the same size on screen as the base frames
        media.write_video(out / f"{clip.id}.{system}.upsampled.mp4", frames, pipe.upsampled_fps, clip.clip.audio,
                          clip.clip.sample_rate, scale=scale)


def generated_folder(out: Path, system: str) -> Path:
    folder = out / "eval" / system / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def model_view(clip: SyncClip, fps: float) -> np.ndarray:
    """The clip's frames at the model's frame times, cropped to the central square (where SyncBench draws)."""
    frames = clip.frames
    count = round(len(frames) / clip.fps * fps)
    picks = [min(len(frames) - 1, round(k / fps * clip.fps)) for k in range(count)]
    h, w = frames.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return frames[picks, top:top + side, left:left + side]


def draw_sheet(out: Path, pipe: Any, clip: DemoClip, made: Generated) -> Path:
    from avlink import viz
    from avlink.eval.events import video_event_times

    rows: list[viz.Row] = [viz.FrameRow("true video", model_view(clip.clip, pipe.fps), pipe.fps),
                           viz.WaveRow("true sound", clip.clip.audio, clip.clip.sample_rate)]
    for system, wave in made.waves.items():
        rows.append(viz.WaveRow(row_label(system), wave, pipe.sample_rate,
                                marks=viz.audio_onsets(wave, pipe.sample_rate)))
    for system, frames in made.videos.items():
        marks = video_event_times(frames, pipe.fps)  # the visual cue onsets that the events metric reads
        rows.append(viz.FrameRow(row_label(system), frames, pipe.fps, marks=marks))
        if system in made.upsampled:
            up, fps = made.upsampled[system], pipe.upsampled_fps
            label = f"{SYSTEMS[system][0].upper()} upsampled"
            rows.append(viz.FrameRow(label, up, fps, marks=video_event_times(up, fps)))
    path = out / f"{clip.id}.png"
    duration = len(clip.clip.audio) / clip.clip.sample_rate
    viz.contact_sheet(path, rows, events=clip.events, duration=duration, title=f"{clip.id}: {clip.caption}")
    return path


def row_label(system: str) -> str:
    task, fusion = SYSTEMS[system]
    return f"{task.upper()} {'AV-Link' if fusion else 'no fusion'}"


# --- scoring ------------------------------------------------------------------------------------------------


def eval_settings(task: Task, ckpt: Path, pipe: Any, duration: float, notes: list[str]) -> Any:
    """The evaluation's settings: our metrics, plus class accuracy where the checkpoint has the classifiers."""
    from avlink.eval.classifiers import CLASSIFIERS_FILE
    from avlink.eval.scoring import EvalSettings, classifier_name

    metrics, weights = METRICS[task], {}
    classifiers = ckpt / CLASSIFIERS_FILE
    if classifiers.is_file():
        metrics, weights = (*metrics, "class_acc"), {classifier_name(task): classifiers}
    elif task == "v2a":  # one note for both tasks
        notes.append(f"class_acc: no {CLASSIFIERS_FILE} in {ckpt}; not scored")
    return EvalSettings(task=task, metrics=metrics, weights=weights, fps=pipe.fps, duration=duration,
                        progress=False)


def score(out: Path, clips_dir: Path, ids: set[str], ckpt: Path, pipe: Any, duration: float,
          notes: list[str]) -> dict[str, Any]:
    """Every system's EvalReport, by system; its files go to OUT/eval/<system>/."""
    from avlink.eval import report as rep
    from avlink.eval.scoring import evaluate

    reports: dict[str, Any] = {}
    for task in ("v2a", "a2v"):
        settings = eval_settings(task, ckpt, pipe, duration, notes)
        cache: dict = {}  # reference features: the same for both systems of a task
        for system in (s for s, (t, _) in SYSTEMS.items() if t == task):
            report = evaluate(out / "eval" / system / "generated", clips_dir, settings, cache=cache, only=ids)
            rep.write_report(report, out / "eval" / system)
            reports[system] = report
    return reports


# --- report -------------------------------------------------------------------------------------------------


def cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}"


def task_table(task: Task, reports: dict[str, Any]) -> list[str]:
    """Rows: ceiling, AV-Link, no fusion, floor; columns: the metrics of the AV-Link report."""
    fused, base = reports[task], reports[f"{task}.no-fusion"]
    names = [m.name for m in fused.metrics]
    better = {m.name: "↑" if m.better == "higher" else "↓" for m in fused.metrics}
    rows = [("ground truth (ceiling)", fused.rows["ceiling"]), ("**AV-Link**", fused.rows["model"]),
            ("no fusion", base.rows["model"]), ("shuffled pairs (floor)", fused.rows["floor"])]
    lines = ["| | " + " | ".join(f"{n} {better[n]}" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for title, values in rows:
        lines.append(f"| {title} | " + " | ".join(cell(values.get(n)) for n in names) + " |")
    return lines


def report_markdown(clips: list[DemoClip], reports: dict[str, Any], notes: list[str],
                    args: argparse.Namespace, ckpt: Path, timer: Timer) -> str:
    import torch

    from avlink.pipeline import LINK_SCALE

    first, last = DEMO_SEED, DEMO_SEED + len(clips) - 1
    lines = [
        "# avlink demo", "",
        f"{len(clips)} SyncBench clips that no checkpoint has seen (seeds {first}..{last}, past every "
        "training, validation and test seed), one model window each. For each clip AV-Link made the sound "
        "of its silent video (V2A) and a video for its sound (A2V), with the clip's caption as prompt. "
        "**no fusion** is the frozen generator alone with the same prompt and seed: it hears or sees only "
        "the caption, so the gap between the two rows is what the Fusion Blocks add. The ceiling scores the "
        "clip's own sound or video in place of the generated one; the floor pairs each clip with another "
        "clip's.", "",
        f"Checkpoint `{ckpt}`, {args.steps} Euler steps, guidance on the input {LINK_SCALE['v2a']:g} (V2A) and "
        f"{LINK_SCALE['a2v']:g} (A2V), noise seed {args.seed} + clip index, vocoder `{args.vocoder}`. "
        f"Scores by `avlink eval` ({len(clips)} clips; ↑ higher is better, ↓ lower; "
        "-: undefined on these clips, e.g. no detected event to take a precision of).", "",
    ]
    for task in ("v2a", "a2v"):
        lines += [f"## {TASK_TITLES[task]}", "", *task_table(task, reports), ""]
        lines += [f"- `{m.name}`: {m.description}" for m in reports[task].metrics] + [""]
    all_notes = list(dict.fromkeys(notes + [n for r in reports.values() for n in r.notes]))
    if all_notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in all_notes] + [""]
    lines += ["## Files", "",
              "Contact sheets: frames over waveforms on one time axis; green: true events, orange dashed: "
              "events detected in that row's generated sound or video.", "",
              "| clip | caption | sheet | ground truth | V2A | V2A no fusion | A2V | A2V no fusion |",
              "|---|---|---|---|---|---|---|---|"]
    for clip in clips:
        files = " | ".join(f"[mp4]({clip.id}.{s}.mp4)" for s in SYSTEMS)
        lines.append(f"| {clip.id} | {clip.caption} | [png]({clip.id}.png) | [mp4](clips/{clip.path.name}) | "
                     f"{files} |")
    lines += ["", "Per-clip scores and the evaluation's own tables: " +
              ", ".join(f"[{s}](eval/{s}/metrics.md)" for s in SYSTEMS) + ".", "",
              "## Time", "",
              f"Wall time {timer.total:.1f} s up to this report ({os.cpu_count()} CPUs, torch threads: "
              f"{torch.get_num_threads()}): " +
              ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timer.stages.items()) + "."]
    return "\n".join(lines) + "\n"


# --- command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=6, help="number of demo clips (default 6)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"),
                        help="output folder (default outputs/demo)")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps (default 64)")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="checkpoint folder (default: the shipped checkpoints/tiny)")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed of clip 0; clip i uses seed + i (default 0)")
    parser.add_argument("--vocoder", default="hifigan",
                        help="hifigan (default), griffinlim (fast, rough) or a HiFi-GAN checkpoint path")


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.n <= SPLIT_SIZE:
        raise UserError(f"--n {args.n}: need 1 to {SPLIT_SIZE} clips")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: need at least 1")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out}: exists and is not a folder (--out)")


def run(args: argparse.Namespace) -> int:
    from avlink.pipeline import Pipeline

    timer = Timer()
    check_args(args)
    ckpt = Path(args.ckpt) if args.ckpt is not None else default_checkpoint()
    check_checkpoint(ckpt)
    out: Path = args.out

    since = time.perf_counter()
    pipe = Pipeline.load(ckpt, vocoder=args.vocoder)
    timer.add("loading", since)
    duration = pipe.clip_seconds
    print(f"avlink demo: {args.n} SyncBench clips of {duration:.2f} s, {args.steps} steps, checkpoint {ckpt}",
          flush=True)

    since = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    clips = render_clips(out / "clips", args.n, duration, pipe.model.cfg.name)
    timer.add("rendering clips", since)

    for index, clip in enumerate(clips):
        since = time.perf_counter()
        made = generate(pipe, clip, args.steps, args.seed + index)
        timer.add("generating", since)
        since = time.perf_counter()
        write_outputs(out, pipe, clip, made)
        draw_sheet(out, pipe, clip, made)
        timer.add("writing files and sheets", since)
        print(f"[{index + 1}/{len(clips)}] {clip.id}: V2A and A2V, with and without fusion "
              f"({timer.total:.0f} s so far)", flush=True)

    print("scoring with the evaluation runner ...", flush=True)
    since = time.perf_counter()
    notes: list[str] = []
    reports = score(out, out / "clips", {c.id for c in clips}, ckpt, pipe, duration, notes)
    timer.add("scoring", since)

    path = out / "report.md"
    text = report_markdown(clips, reports, notes, args, ckpt, timer)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for task in ("v2a", "a2v"):
        print(f"\n{TASK_TITLES[task]}\n" + "\n".join(task_table(task, reports)))
    print(f"\nDone in {timer.total:.1f} s. Look at {path} (tables, links), the contact sheets {out}/<id>.png "
          f"and the videos {out}/<id>.v2a.mp4, {out}/<id>.a2v.mp4.")
    return 0
