"""Validation during `avlink train`: a few held-out SyncBench clips, generated or reconstructed with the EMA weights
the loop swaps in, scored by the evaluation harness, written to disk and to TensorBoard.

What each part is checked on (K clips of the validation split, the same clips every time):
    fusion    the linked model generates each clip's other modality from its video (V2A) or audio (A2V), with
              the clip's caption as prompt for both streams; scored as `avlink eval` scores it (onset, events,
              AV-Align; class accuracy when SyncBench classifier weights are given). joint: both directions.
    audio     the text-to-audio generator alone from the captions (T2A), scored as V2A against the clip's video;
    video     the text-to-video generator alone from the captions (T2V), scored as A2V against the clip's audio;
    vae       mel L1 of the reconstruction (encoder mean, decoded), and the reconstruction as a wave;
    classifiers  exact-match and per-label accuracy of both SyncBench classifiers.
Generation samples as the scorecard does (train/scorecard.py): Euler, a fixed seed with each clip's own noise
streams (sample.initial_noise), captions as prompts, the vocoder the scorecard uses.

    OUT/samples/step_<N>/<name>/          the clips (<id>.wav or <id>.mp4), metrics.json / .md, per_clip.csv
    OUT/samples/step_<N>/validation.json  the numbers the loop logs as val/<name>/<metric>

Conditions, prompts and reference features are prepared once; each validation only samples and scores. A
validation that fails prints one line and returns no numbers: training goes on.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from avlink.backbones.protocol import TextCond
from avlink.config import ModelConfig, Task
from avlink.errors import UserError
from avlink.eval import report as rep
from avlink.eval.conditions import Conditioned, captions, load_conditions, write_output
from avlink.eval.scoring import EvalSettings, evaluate
from avlink.files import atomic_write
from avlink.sample import sample_backbone
from avlink.system import make_codecs
from avlink.train.scorecard import BATCH, KEY_METRICS, METRICS, generate

SUMMARY_FILE = "validation.json"
CLASSIFIER_EMBEDDERS = ("syncbench-audio", "syncbench-video")  # one weight file holds both networks
STRIP_HEIGHT = 64  # TensorBoard frame strips are scaled up (nearest) to about this many pixels high


# --- what to validate on ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValData:
    """A SyncBench folder and the split whose clips validate (None: every clip)."""

    root: Path
    split: str | None = "val"

    def __str__(self) -> str:
        return f"syncbench:{self.root}:{self.split or 'all'}"


def parse_val_data(spec: str) -> ValData:
    """`DIR`, `syncbench:DIR` or `syncbench:DIR:SPLIT` (SPLIT `all`: every clip); the split defaults to val."""
    from avlink.data.datasets import syncbench_dataset

    root, split = spec, "val"
    if spec.startswith("syncbench:"):
        root, _, given = spec[len("syncbench:"):].partition(":")
        split = given or split
    if not (Path(root) / "metadata.jsonl").is_file():
        raise UserError(f"{root}: not a SyncBench folder (no metadata.jsonl) (--val-data {spec})")
    data = ValData(Path(root), None if split == "all" else split)

    if not syncbench_dataset(data.root, data.split).items:
        raise UserError(f"{root}: no clips of split {data.split!r}; name another as syncbench:DIR:SPLIT, or "
                        f"syncbench:DIR:all for every clip (--val-data {spec})")
    return data


@dataclass(frozen=True)
class ValSettings:
    clips: int = 4  # K clips of the split, the first K in metadata order
    steps: int = 16  # Euler steps of each generation
    seed: int = 0
    vocoder: str = "hifigan-universal"  # the scorecard's
    classifiers: Path | None = None  # SyncBench classifier weights: adds class_acc to the generated clips' scores

    def check(self) -> None:
        if self.clips < 1:
            raise UserError(f"--val-clips {self.clips}: need at least 1 clip")
        if self.steps < 1:
            raise UserError(f"--val-steps {self.steps}: need at least 1 step")
        if self.classifiers is not None and not Path(self.classifiers).is_file():
            raise UserError(f"{self.classifiers}: classifier weights not found (--val-classifiers)")


# --- one check: what a part is scored on -------------------------------------------------------------------


@dataclass
class Sample:
    """One validation clip as TensorBoard shows it."""

    id: str
    audio: np.ndarray | None = None  # (n,) wave in [-1, 1]
    video: Tensor | None = None  # (C, T, H, W) pixels in [-1, 1]


@dataclass
class Outcome:
    metrics: dict[str, float]
    samples: list[Sample] = field(default_factory=list)


class Check(Protocol):
    """One named thing a validation measures; `run` writes into `folder` and returns its numbers."""

    name: str  # the folder under step_<N>/ and the prefix of its scalars

    def run(self, folder: Path) -> Outcome: ...

    def references(self) -> list[Sample]:
        """The ground truth of the clips, shown once beside the samples."""
        ...


def finite(values: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    return {n: float(values[n]) for n in names if values.get(n) is not None and math.isfinite(values[n])}


@dataclass
class Decoders:
    """What turns a generated tensor into a file: the model's clip geometry, the audio VAE, the vocoder, as the
    codecs of system.py (`codecs`); the VAE's own check runs the vocoder on its reconstructed mels."""

    clip: Any
    vae: nn.Module | None
    vocoder: Any

    @cached_property
    def codecs(self) -> dict[str, Any]:  # made once: every sample written at every validation goes through them
        return make_codecs(self.clip, self.vae, self.vocoder)


@dataclass
class Reference:
    """The clips as `avlink prepare` reads them: what the VAE and the classifiers are checked on."""

    ids: list[str]
    waves: list[np.ndarray]  # (n,) each, at the model's rate
    mels: Tensor  # (K, n_mels, F)
    videos: Tensor  # (K, 3, T, H, W) in [-1, 1]
    labels: Tensor  # (K, C) multi-hot SyncBench classes


@dataclass
class GenerationCheck:
    """Generate every clip, write it, score the folder with the evaluation harness."""

    name: str  # "v2a" | "a2v" | "t2a" | "t2v": the folder and the scalars' prefix
    task: Task  # the direction it is written and scored as (T2A: V2A, T2V: A2V)
    sample: Callable[[], list[Tensor]]  # one generated (1, ...) per condition
    conds: list[Conditioned]
    decoders: Decoders
    data: ValData
    settings: EvalSettings
    cache: dict = field(default_factory=dict)  # reference features, the same at every validation

    def run(self, folder: Path) -> Outcome:
        xs = self.sample()
        folder.mkdir(parents=True, exist_ok=True)
        d = self.decoders
        for x, cond in zip(xs, self.conds, strict=True):
            write_output(self.task, x.float(), cond, folder, d.clip, d.codecs)
        report = evaluate(folder, self.data.root, self.settings, cache=self.cache, only={c.id for c in self.conds})
        rep.write_report(report, folder)
        if report.clips == 0:
            problems = "; ".join(f"{p.file}: {p.reason}" for p in report.problems[:1])
            raise RuntimeError(f"no generated clip could be scored ({problems or 'none paired'})")
        return Outcome(finite(report.rows["model"], KEY_METRICS[self.task]),
                       [self.media(x, cond, folder) for x, cond in zip(xs, self.conds, strict=True)])

    def references(self) -> list[Sample]:
        """Each clip's own audio, and its video where the condition is video (all but A2V)."""
        video = self.decoders.codecs["video"]
        return [Sample(c.id, audio=c.audio, video=None if c.x_cond.ndim != 5 else video.decode(c.x_cond[0]).cpu())
                for c in self.conds]

    def media(self, x: Tensor, cond: Conditioned, folder: Path) -> Sample:
        if self.task == "a2v":
            return Sample(cond.id, video=self.decoders.codecs["video"].decode(x[0].float()).cpu())
        import soundfile

        wave, _ = soundfile.read(folder / f"{cond.id}.wav", dtype="float32")  # what was written, 16 bits
        return Sample(cond.id, audio=wave)


@dataclass
class VAECheck:
    """Mel L1 of the VAE's reconstruction (posterior mean, decoded) of each clip's mel, and its wave."""

    vae: nn.Module
    ref: Reference
    decoders: Decoders
    name: str = "vae"

    def references(self) -> list[Sample]:
        return [Sample(i, audio=wave) for i, wave in zip(self.ref.ids, self.ref.waves, strict=True)]

    @torch.no_grad()
    def run(self, folder: Path) -> Outcome:
        from avlink.data import media

        mels = self.ref.mels
        recon = self.vae.decode(self.vae.encode(mels).mode())  # (K, n_mels, F)
        l1 = (recon - mels).abs().mean(dim=(1, 2))  # (K,)
        folder.mkdir(parents=True, exist_ok=True)
        samples = []
        rate = self.decoders.clip.audio.sample_rate
        for i, clip_id in enumerate(self.ref.ids):
            wave = np.clip(self.decoders.vocoder(recon[i:i + 1])[0].float().cpu().numpy(), -1.0, 1.0)  # (n,)
            media.write_audio(folder / f"{clip_id}.wav", wave, rate)
            samples.append(Sample(clip_id, audio=wave))
        per_clip = {clip_id: float(v) for clip_id, v in zip(self.ref.ids, l1.tolist(), strict=True)}
        text = json.dumps({"mel_l1": l1.mean().item(), "per_clip": per_clip}, indent=2)
        atomic_write(folder / "metrics.json", lambda tmp: tmp.write_text(text + "\n"))
        return Outcome({"mel_l1": l1.mean().item()}, samples)


@dataclass
class ClassifierCheck:
    """Exact-match and per-label accuracy of both SyncBench classifiers on the clips."""

    model: nn.Module  # SyncBenchClassifiers
    ref: Reference
    name: str = "classifiers"

    def references(self) -> list[Sample]:
        return []

    @torch.no_grad()
    def run(self, folder: Path) -> Outcome:
        from avlink.eval.classifiers import accuracy

        metrics = {}
        ref = self.ref
        for modality, net, x in (("audio", self.model.audio, ref.mels), ("video", self.model.video, ref.videos)):
            acc = accuracy(net(x).float().cpu(), ref.labels)
            metrics |= {f"{modality}_acc": acc.exact, f"{modality}_label_acc": acc.per_label}
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(metrics, indent=2)
        atomic_write(folder / "metrics.json", lambda tmp: tmp.write_text(text + "\n"))
        return Outcome(metrics)


# --- the validate(step) callable ---------------------------------------------------------------------------


class Validator:
    """validate(step) -> {"<name>/<metric>": value}, the hook `train.loop.fit` calls with the EMA weights in.

    `last` keeps what the latest validation gave (or why it failed), for the model card."""

    def __init__(self, checks: list[Check], out: Path, data: ValData, settings: ValSettings, clips: int,
                 sample_rate: int) -> None:
        self.checks, self.out, self.data, self.settings = checks, Path(out), data, settings
        self.clips, self.sample_rate = clips, sample_rate
        self.last: dict[str, Any] | None = None
        self._writer: Any = None
        self._shown: set[str] = set()  # checks whose references TensorBoard has already

    def __call__(self, step: int) -> dict[str, float]:
        from avlink.train.state import rng_state, set_rng_state

        # Validation draws its own seeded noise and leaves every RNG of the run where it was: a run's losses do
        # not depend on whether, or how often, it validates.
        saved = rng_state()
        try:
            metrics = self.validate(step)
        except Exception as err:  # a bad clip or a failing metric costs this validation, not the training run
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            print(f"avlink train: validation at step {step} failed ({reason}); training goes on",
                  file=sys.stderr, flush=True)
            self.last = {"step": step, "error": reason}
            return {}
        finally:
            set_rng_state(saved)
        self.last = {"step": step, **self.describe(), "metrics": metrics}
        return metrics

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"data": str(self.data), "clips": self.clips, "sampling_steps": s.steps, "seed": s.seed,
                "vocoder": s.vocoder, "classifiers": None if s.classifiers is None else str(s.classifiers)}

    def validate(self, step: int) -> dict[str, float]:
        folder = self.out / "samples" / f"step_{step:09d}"  # named as the checkpoints are, so they sort
        metrics: dict[str, float] = {}
        for check in self.checks:
            outcome = check.run(folder / check.name)
            metrics |= {f"{check.name}/{k}": v for k, v in outcome.metrics.items()}
            self.show(step, check, outcome.samples)
        text = json.dumps({"step": step, **self.describe(), "metrics": metrics}, indent=2)
        atomic_write(folder / SUMMARY_FILE, lambda tmp: tmp.write_text(text + "\n"))
        if self._writer is not None:
            self._writer.flush()
        return metrics

    # -- TensorBoard ---------------------------------------------------------------------------------------
    def writer(self) -> Any:
        """A writer into the run's tb/ folder, beside the loop's scalars (None without tensorboard)."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return None
            self._writer = SummaryWriter(str(self.out / "tb"))
        return self._writer

    def show(self, step: int, check: Check, samples: list[Sample]) -> None:
        """The samples of this step; at the first validation also the clips' ground truth to hold them against."""
        writer = self.writer() if samples else None
        if writer is None:
            return
        for sample in samples:
            log_sample(writer, f"val_samples/{check.name}/{sample.id}", sample, step, self.sample_rate)
        if check.name not in self._shown:
            for sample in check.references():
                log_sample(writer, f"val_reference/{check.name}/{sample.id}", sample, step, self.sample_rate)
            self._shown.add(check.name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def frame_strip(video: Tensor) -> Tensor:
    """(C, T, H, W) pixels in [-1, 1] -> (C, H', T * W') in [0, 1]: the frames side by side, scaled up (nearest)
    so that a 16-pixel frame can be seen."""
    c, t, h, w = video.shape
    factor = max(1, STRIP_HEIGHT // h)
    strip = video.permute(0, 2, 1, 3).reshape(c, h, t * w)  # (C, H, T * W)
    strip = strip.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return ((strip.float() + 1) / 2).clamp(0, 1)


def log_sample(writer: Any, tag: str, sample: Sample, step: int, sample_rate: int) -> None:
    if sample.audio is not None:
        writer.add_audio(tag, torch.from_numpy(np.asarray(sample.audio, dtype=np.float32))[None], step,
                         sample_rate=sample_rate)
    if sample.video is not None:
        writer.add_image(tag, frame_strip(sample.video), step, dataformats="CHW")


# --- building the checks of a part -------------------------------------------------------------------------


def prompts(encoder: Any, data: ValData, ids: list[str], text_dim: int, device: torch.device) -> TextCond:
    """Every clip's caption through the model's text encoder, once: tokens (K, L, Dt)."""
    if encoder.dim != text_dim:
        raise UserError(f"--val-data: the text encoder gives {encoder.dim}-d states but the model reads "
                        f"{text_dim}-d (validation prompts with the clips' captions)")
    return encoder.encode(captions(data.root, ids)).to(device)


def on_cpu(module: nn.Module) -> nn.Module:
    """The conditions are read and encoded on the CPU (eval.conditions.load_conditions); a frozen module on another
    device is copied there for it."""
    return module if next(module.parameters()).device.type == "cpu" else copy.deepcopy(module).cpu()


def conditions(data: ValData, clips: int, task: Task, clip: Any, vae: nn.Module | None,
               device: torch.device) -> list[Conditioned]:
    codecs = make_codecs(clip, None if vae is None else on_cpu(vae))
    conds = load_conditions(data.root, clips, task, clip, codecs, data.split)
    return [Conditioned(c.id, c.x_cond.to(device), c.audio) for c in conds]


def generate_alone(backbone: nn.Module, shape: tuple[int, ...], count: int, texts: TextCond, steps: int,
                   seed: int) -> list[Tensor]:
    """A generator alone from the prompts, in the scorecard's batches and seeds (its "T2A / T2V alone" rows)."""
    out = []
    for start in range(0, count, BATCH):
        size = min(BATCH, count - start)
        x = sample_backbone(backbone, (size, *shape), text=texts.rows(start, size), steps=steps, seed=seed,
                            clip=start)
        out.extend(x[i:i + 1] for i in range(size))
    return out


def eval_settings(task: Task, clip: Any, settings: ValSettings) -> EvalSettings:
    weights = {} if settings.classifiers is None else {n: Path(settings.classifiers) for n in CLASSIFIER_EMBEDDERS}
    # Without weights given, class_acc would fall back to the repository's shipped classifiers: leave it out.
    metrics = METRICS if weights else tuple(m for m in METRICS if m != "class_acc")
    return EvalSettings(task=task, metrics=metrics, weights=weights, fps=clip.video.fps, duration=clip.duration,
                        seed=settings.seed, progress=False)


def reference_clips(data: ValData, clips: int, clip: Any, device: torch.device) -> Reference:
    from avlink.codecs.mel import MelSpectrogram, fit_frames
    from avlink.data import syncbench
    from avlink.eval.classifiers import clip_classes, multi_hot

    video = make_codecs(clip, None)["video"]
    conds = load_conditions(data.root, clips, "v2a", clip, {"video": video}, data.split)  # video and wave only
    rows = {str(r["id"]): r for r in syncbench.load_metadata(data.root)}
    mel = MelSpectrogram(clip.audio)
    with torch.no_grad():
        mels = torch.cat([fit_frames(mel(torch.from_numpy(c.audio)[None]), clip.num_mel_frames) for c in conds])
    videos = video.decode(torch.cat([c.x_cond for c in conds]))  # the classifiers read pixels
    labels = torch.stack([multi_hot(clip_classes(rows[c.id])) for c in conds])
    return Reference([c.id for c in conds], [c.audio for c in conds], mels.to(device), videos.to(device), labels)


def build_validator(part: str, task: str, objective: Any, cfg: ModelConfig, data: ValData, out: Path,
                    settings: ValSettings, device: torch.device) -> Validator:
    """The validate(step) of one `avlink train` run (module docstring: what each part is checked on)."""
    from avlink.codecs.text import load_text_encoder
    from avlink.codecs.vocoder import load_vocoder

    settings.check()
    clip = cfg.clip
    rate = clip.audio.sample_rate
    if part in ("audio", "fusion") and objective.vae is None:
        raise UserError(f"--val-data: validating the {part} part needs the audio VAE (to decode the generated "
                        f"latents); pass --vae")
    wants_audio = part in ("vae", "audio") or (part == "fusion" and task in ("v2a", "joint"))
    vocoder = load_vocoder(settings.vocoder, clip.audio, device) if wants_audio else None
    if part in ("vae", "classifiers"):
        ref = reference_clips(data, settings.clips, clip, device)
        check = (VAECheck(objective.trainable, ref, Decoders(clip, None, vocoder)) if part == "vae"
                 else ClassifierCheck(objective.trainable, ref))
        return Validator([check], out, data, settings, len(ref.ids), rate)
    encoder = load_text_encoder(cfg.text_encoder)
    if part == "fusion":
        decoders = Decoders(clip, objective.vae, vocoder)
        checks = [link_check(objective.model, t, encoder, data, settings, decoders, device)
                  for t in (("v2a", "a2v") if task == "joint" else (task,))]
    else:
        checks = [alone_check(objective.trainable, part, encoder, data, settings,
                              Decoders(clip, objective.vae, vocoder), device)]
    return Validator(checks, out, data, settings, len(checks[0].conds), rate)


def link_check(model: nn.Module, task: Task, encoder: Any, data: ValData, settings: ValSettings,
               decoders: Decoders, device: torch.device) -> GenerationCheck:
    """AV-Link generating one direction, with the scorecard's sampling (`scorecard.generate`, "avlink")."""
    conds = conditions(data, settings.clips, task, decoders.clip, decoders.vae, device)
    texts = prompts(encoder, data, [c.id for c in conds], model.backbones(task)[0].cfg.text_dim, device)

    def sample() -> list[Tensor]:
        return generate(model, task, "avlink", conds, texts, settings.steps, settings.seed)

    return GenerationCheck(task, task, sample, conds, decoders, data, eval_settings(task, decoders.clip, settings))


def alone_check(backbone: nn.Module, part: str, encoder: Any, data: ValData, settings: ValSettings,
                decoders: Decoders, device: torch.device) -> GenerationCheck:
    """A generator alone from the captions: T2A scored as V2A against each clip's video, T2V as A2V against its
    audio."""
    clip = decoders.clip
    name, task = ("t2a", "v2a") if part == "audio" else ("t2v", "a2v")
    conds = conditions(data, settings.clips, "v2a", clip, None, device)  # ids, video and wave: no VAE needed
    texts = prompts(encoder, data, [c.id for c in conds], backbone.cfg.text_dim, device)
    shape = clip.latent_shape if part == "audio" else clip.video_shape

    def sample() -> list[Tensor]:
        return generate_alone(backbone, shape, len(conds), texts, settings.steps, settings.seed)

    return GenerationCheck(name, task, sample, conds, decoders, data, eval_settings(task, clip, settings))


# --- the last step ------------------------------------------------------------------------------------------


def validate_final(validator: Validator, module: nn.Module, run_dir: Path, step: int) -> dict[str, float]:
    """Validate the weights export writes (the EMA weights of the last checkpoint) when the loop's own validations
    did not fall on the last step; logged as the loop logs its validations."""
    from avlink.train.loop import Logger
    from avlink.train.state import CheckpointManager

    latest = CheckpointManager(run_dir / "checkpoints").latest()
    assert latest is not None and latest.step == step, f"{run_dir}: no checkpoint of step {step} to validate"
    module.load_state_dict(latest.weights(ema=True))
    module.eval()
    with torch.no_grad():
        metrics = validator(step)
    if metrics:  # a failed validation has said so in its one line
        logger = Logger(run_dir)
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()})
        logger.close()
    return metrics
