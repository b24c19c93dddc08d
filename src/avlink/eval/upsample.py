"""`avlink eval --task upsample`: the checkpoint's video upsampler against the true clip at its output rate and
size, beside plain interpolation.

    avlink eval --task upsample --ckpt DIR --data SYNCBENCH_DIR --out DIR [--split test] [--n N]
                [--upsample-steps S] [--sample-seed K] [--source true|a2v] [--steps 64] [--weights i3d=PATH]

Per clip of the split, the base frames are the clip as the base model sees it (`--source true`: the file read at
the model's fps and size, e.g. 16x16 px at 6 fps), or the checkpoint's A2V of the clip's sound (`--source a2v`,
`--steps` Euler steps, no prompt). Each is raised to the output geometry (64x64 at 24 fps for tiny) three ways:
the upsampler (with the sound's envelope), nearest neighbour (each base frame held, each pixel repeated) and
linear interpolation (bilinear in space, linear between the base frames' times). Scored against the clip read
at the output geometry:
- PSNR (dB, peak 255, over the whole clip) and SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5,
  K1 0.01, K2 0.03, on each RGB channel of each frame, valid positions only, averaged; in float64, where the
  variances of bright flat regions keep their digits): means over clips. With --source a2v they measure how
  far a generated clip lies from the true one, not the upsampler's fidelity.
- Event F1 (eval/events.py): the visual cue's onsets against the true event times, within one frame (1/24 s at
  24 fps; the base frames' row within 1/6 s at 6 fps), counts pooled over clips; AV-Align (av_align.py)
  with the clip's sound, within one frame of each row's rate. The true clip at the output rate is the ceiling.
  AV-Align does not compare across rates (the true clip scores far lower at 24 fps than at 6: one frame is a
  window four times narrower), so its parts are shown too: the share of the sound's onsets with a motion peak
  within one frame (pooled over clips) and the motion peaks per second, which every peak that no onset explains
  costs the score.
- Class accuracy (eval/classifiers.py, exact class set): the rows at the output geometry by the video classifier
  of that geometry, CKPT/classifiers-upsampled.safetensors (`avlink train classifiers --upsampled`), the base
  row by the base video classifier, CKPT/classifiers.safetensors; a row whose file the folder lacks shows '-'.
  With --source a2v the upsampler row is the class accuracy of the upsampled A2V output.
- FVD, with `--weights i3d=PATH` (eval/embed/i3d.py: I3D logits of each clip's first 16 frames at the output
  rate): the Frechet distance (distances.py) between each output-rate row's clips and the true clips at that
  rate, the truth row 0 by construction. With few clips the estimate is biased upward (the sample covariance of
  N clips in 400 dimensions): compare rows of one run, not with FVDs over other numbers of clips.
Writes OUT/metrics.json and OUT/metrics.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from avlink.av_align import audio_peaks, audio_peaks_matched, av_align_score, video_peaks
from avlink.errors import UserError
from avlink.eval.classifiers import (
    CLASSIFIERS_FILE,
    UPSAMPLED_FILE,
    VideoClassifier,
    clip_classes,
    load_classifiers,
    predicted_classes,
)
from avlink.eval.distances import frechet_distance_features
from avlink.eval.embedders import Embedder
from avlink.eval.events import EventCounts, event_counts, pooled, video_event_times
from avlink.files import atomic_write

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
ROWS = ("truth", "base", "nearest", "linear", "upsampler")
OUTPUT_ROWS = ("truth", "nearest", "linear", "upsampler")  # at the output rate and size
CLASSIFIER_FILES = {"base": CLASSIFIERS_FILE, "output": UPSAMPLED_FILE}  # the base row's, the output rows'
FVD_WEIGHTS = "i3d"  # the --weights name of FVD's embedder


def psnr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays of one shape (peak 255) over all their values; inf where they are equal."""
    assert estimate.shape == reference.shape, f"{estimate.shape} against {reference.shape}"
    mse = np.mean((estimate.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM of uint8 frames (T, H, W, C) (module docstring); 1.0 where they are equal."""
    assert estimate.shape == reference.shape, f"{estimate.shape} against {reference.shape}"
    assert min(estimate.shape[1:3]) >= SSIM_WINDOW, f"frames {estimate.shape[1:3]} smaller than the SSIM window"
    x = torch.from_numpy(estimate).double().permute(0, 3, 1, 2).flatten(0, 1)[:, None]  # (T * C, 1, H, W)
    y = torch.from_numpy(reference).double().permute(0, 3, 1, 2).flatten(0, 1)[:, None]
    g = _gaussian(SSIM_WINDOW, SSIM_SIGMA)
    rows, cols = g.reshape(1, 1, -1, 1), g.reshape(1, 1, 1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:  # the 2D Gaussian, separated
        return F.conv2d(F.conv2d(z, rows), cols)

    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


Classifier = tuple[VideoClassifier, tuple[str, ...]]


def row_classifiers(ckpt: Path, scale: tuple[int, int]) -> dict[str, Classifier | None]:
    """The video classifier of the base row and of the output-rate rows, from the checkpoint folder: None where
    its file is not there; a file of another geometry is refused in one line."""
    out: dict[str, Classifier | None] = {}
    for key, name in CLASSIFIER_FILES.items():
        path, want = Path(ckpt) / name, (1, 1) if key == "base" else tuple(scale)
        if not path.is_file():
            out[key] = None
            continue
        model, classes = load_classifiers(path)
        if tuple(model.cfg.video_scale) != want:
            raise UserError(f"{path}: a video classifier of scale {tuple(model.cfg.video_scale)}, but the "
                            f"{'base frames need (1, 1)' if key == 'base' else f'upsampler scales by {want}'}")
        out[key] = (model.video, classes)
    return out


@torch.no_grad()
def clip_right(classifier: Classifier, frames: np.ndarray, truth: set[str]) -> float:
    """1.0 where the classifier's set of classes of the uint8 frames (T, H, W, 3) is exactly `truth`, else 0.0."""
    from avlink.codecs.pixels import frames_to_pixels

    network, classes = classifier
    logits = network(frames_to_pixels(torch.as_tensor(frames)[None]))[0]
    return float(predicted_classes(logits, classes) == truth)


def fvd(embedder: Embedder, clips: dict[str, list[np.ndarray]]) -> dict[str, float | None]:
    """Frechet distance of each output-rate row's clips to the true clips in the embedder's space; None for fewer
    than two clips (no covariance)."""
    if len(clips["truth"]) < 2:
        return {row: None for row in clips}
    features = {row: embedder.embed(np.stack(frames), "video") for row, frames in clips.items()}
    return {row: frechet_distance_features(features[row], features["truth"]) for row in clips}


def evaluate_upsampler(ckpt: Path, data: Path, *, split: str = "test", n: int | None = None,
                       steps: int | None = None, seed: int = 0, source: str = "true", a2v_steps: int = 64,
                       device: str = "cpu", progress: bool = True,
                       fvd_embedder: Embedder | None = None) -> dict[str, Any]:
    """The scores of the module docstring, as {"rows": {row: {metric: value}}, "clips", ...}; FVD where
    `fvd_embedder` (I3D) is given."""
    from avlink.codecs.pixels import frames_to_pixels, pixels_to_frames
    from avlink.data import media
    from avlink.data.datasets import fit_length, load_item, syncbench_dataset
    from avlink.pipeline import Pipeline
    from avlink.upsampler import upsample_linear, upsample_nearest

    pipe = Pipeline.load(ckpt, device=device, vocoder=None)
    up = pipe.upsampler
    if up is None:
        raise UserError(f"{ckpt}: no upsampler.safetensors (train one: `avlink train upsampler`, or "
                        f"`avlink recipe --upsampler-only {ckpt} --out DIR`)")
    dataset = syncbench_dataset(data, None if split == "all" else split)
    items = dataset.items[:n] if n is not None else dataset.items
    if not items:
        raise UserError(f"{data}: no clips of split {split}")
    clip, output = pipe.clip, up.output
    st, ss = up.cfg.scale
    classifiers = row_classifiers(ckpt, (st, ss))
    scores: dict[str, dict[str, list[float]]] = {
        row: {"psnr": [], "ssim": [], "av_align": [], "class_acc": [], "peaks_per_s": []} for row in ROWS}
    onsets = {row: [0, 0] for row in ROWS}  # the sound's onsets with a motion peak within one frame, all onsets
    counts: dict[str, list[EventCounts]] = {row: [] for row in ROWS}
    kept: dict[str, list[np.ndarray]] = {row: [] for row in OUTPUT_ROWS}  # FVD's clips
    for item in tqdm(items, desc="upsample eval", unit="clip", disable=not progress):
        base = load_item(item, clip)
        wave = base.audio.numpy()
        video = media.read_video(item.path, fps=output.fps, size=(output.width, output.height), start=item.start,
                                 duration=clip.duration)
        truth, _ = fit_length(torch.as_tensor(video.frames), torch.as_tensor(video.mask), clip.num_frames * st)
        truth = truth.numpy()
        low = base.frames.numpy()
        if source == "a2v":
            low = pipe.audio_to_video(wave, steps=a2v_steps, seed=seed)
        pixels = frames_to_pixels(torch.as_tensor(low)[None])
        made = {"truth": truth, "base": low,
                "nearest": pixels_to_frames(upsample_nearest(pixels, (st, ss)))[0].numpy(),
                "linear": pixels_to_frames(upsample_linear(pixels, (st, ss)).clamp(-1, 1))[0].numpy(),
                "upsampler": pipe.upsample(low, wave, steps=steps, seed=seed)}
        events = base.events.numpy() if base.events is not None else np.zeros(0)
        sound_peaks = audio_peaks(wave, clip.audio.sample_rate)
        classes = clip_classes(item.meta)
        for row, frames in made.items():
            fps = clip.video.fps if row == "base" else output.fps
            classifier = classifiers["base" if row == "base" else "output"]
            if classifier is not None and classes:
                scores[row]["class_acc"].append(clip_right(classifier, frames, classes))
            if fvd_embedder is not None and row in kept:
                kept[row].append(frames)
            counts[row].append(event_counts(events, video_event_times(frames, fps), 1.0 / fps))
            motion = video_peaks(frames, fps)
            scores[row]["av_align"].append(av_align_score(sound_peaks, motion, fps))
            scores[row]["peaks_per_s"].append(len(motion) * fps / len(frames))
            onsets[row][0] += audio_peaks_matched(sound_peaks, motion, fps)
            onsets[row][1] += len(sound_peaks)
            if row not in ("truth", "base"):
                scores[row]["psnr"].append(psnr(frames, truth))
                scores[row]["ssim"].append(ssim(frames, truth))
    distances = fvd(fvd_embedder, kept) if fvd_embedder is not None else {}
    rows = {}
    for row in ROWS:
        total = pooled(counts[row])
        rows[row] = {"fps": clip.video.fps if row == "base" else output.fps,
                     "psnr": _nanmean(scores[row]["psnr"]), "ssim": _nanmean(scores[row]["ssim"]),
                     "event_f1": None if math.isnan(total.f1) else total.f1,
                     "event_precision": None if math.isnan(total.precision) else total.precision,
                     "event_recall": None if math.isnan(total.recall) else total.recall,
                     "av_align": _nanmean(scores[row]["av_align"]),
                     "onsets_matched": onsets[row][0] / onsets[row][1] if onsets[row][1] else None,
                     "motion_peaks_per_s": _nanmean(scores[row]["peaks_per_s"]),
                     "class_acc": _nanmean(scores[row]["class_acc"]), "fvd": distances.get(row)}
    return {"ckpt": str(ckpt), "data": str(data), "split": split, "clips": len(items), "source": source,
            "steps": steps or up.cfg.steps, "seed": seed, "a2v_steps": a2v_steps if source == "a2v" else None,
            "base": f"{clip.video.width}x{clip.video.height} at {clip.video.fps:g} fps",
            "output": f"{output.width}x{output.height} at {output.fps:g} fps",
            "classifiers": {key: None if classifiers[key] is None else str(Path(ckpt) / name)
                            for key, name in CLASSIFIER_FILES.items()},
            "fvd": None if fvd_embedder is None else {"embedder": fvd_embedder.name, "clips": len(items),
                                                      "frames": getattr(fvd_embedder, "num_frames", None)},
            "rows": rows}


LABELS = {"truth": "true clip (ceiling)", "base": "base frames", "nearest": "nearest neighbour",
          "linear": "linear interpolation", "upsampler": "**upsampler**"}


def markdown(result: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.{digits}f}")

    base = "the true clip" if result["source"] == "true" else f"A2V ({result['a2v_steps']} Euler steps)"
    lines = [f"Upsampler: {result['clips']} clips of {result['data']} ({result['split']}), base frames "
             f"{result['base']} from {base}, output {result['output']}, {result['steps']} Euler steps, seed "
             f"{result['seed']}. Events within one frame of each row's rate.", "",
             "| row | fps | PSNR (dB) | SSIM | event F1 | precision | recall | AV-Align | onsets matched "
             "| motion peaks/s | class acc | FVD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in result["rows"].items():
        lines.append(f"| {LABELS[row]} | {r['fps']:g} | {num(r['psnr'], 2)} | {num(r['ssim'])} | "
                     f"{num(r['event_f1'])} | {num(r['event_precision'])} | {num(r['event_recall'])} | "
                     f"{num(r['av_align'])} | {num(r['onsets_matched'])} | {num(r['motion_peaks_per_s'], 2)} | "
                     f"{num(r['class_acc'])} | {num(r['fvd'], 2)} |")
    used = result["classifiers"]
    lines += ["", "Class accuracy (exact class set): "
              + ("the base row by " + used["base"] if used.get("base") else f"no {CLASSIFIERS_FILE} for the base row")
              + "; " + (f"the {result['output']} rows by " + used["output"] if used.get("output")
                        else f"no {UPSAMPLED_FILE} for the output rows (`avlink train classifiers --upsampled`)")
              + "."]
    if result["fvd"] is not None:
        f = result["fvd"]
        frames = "every frame" if f["frames"] is None else f"the first {f['frames']} frames"
        lines.append(f"FVD ({f['embedder']} over {frames} of each of {f['clips']} clips) against the true clips at "
                     "the output rate: with few clips it is biased upward, so compare the rows of one run only.")
    return "\n".join(lines) + "\n"


def run_upsample_eval(args: argparse.Namespace) -> int:
    if args.ckpt is None or args.data is None:
        raise UserError("--task upsample needs --ckpt (a folder with upsampler.safetensors) and --data "
                        "(a SyncBench folder)")
    for flag, value in (("--n", args.n), ("--upsample-steps", args.upsample_steps), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    from avlink.eval.scoring import parse_weights

    weights = parse_weights(args.weights)
    other = sorted(set(weights) - {FVD_WEIGHTS})
    if other:
        raise UserError(f"--weights {other[0]}=...: --task upsample takes {FVD_WEIGHTS}=PATH (FVD) only")
    embedder = None
    if FVD_WEIGHTS in weights:
        from avlink.eval.embedders import WeightsMissing, load_embedder

        try:
            embedder = load_embedder(FVD_WEIGHTS, weights[FVD_WEIGHTS])
        except WeightsMissing as err:
            raise UserError(str(err)) from None
    result = evaluate_upsampler(args.ckpt, args.data, split=args.split, n=args.n, steps=args.upsample_steps,
                                seed=args.sample_seed, source=args.source, a2v_steps=args.steps,
                                fvd_embedder=embedder)
    text = json.dumps(result, indent=2)
    atomic_write(args.out / "metrics.json", lambda tmp: tmp.write_text(text))
    table = markdown(result)
    atomic_write(args.out / "metrics.md", lambda tmp: tmp.write_text(table))
    print(table)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'metrics.md'}")
    return 0
