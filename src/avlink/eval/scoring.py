"""Scoring generated clips against their references, with a ceiling and a floor beside them: `evaluate`, the
one scoring behind `avlink eval` (runner.py) and everything else that scores generated clips.

Files pair by name stem (.wav, .flac or .mp4 on either side, in any subfolder); a SyncBench reference folder
(one with metadata.jsonl) names its clips by id and brings each clip's true event times and caption. V2A
reads the generated audio (a wave, or the audio track of an mp4) and the reference video; A2V reads the
generated video and the reference audio. Every clip is read over the reference's length (or the settings'
duration), video at the settings' fps.

Three rows of values (see report.py): the generated clips; ground truth scored against itself, i.e. the
reference's own generated-side modality in place of the generated one (the ceiling); and ground truth in
shuffled pairs, the reference of another clip in its place, by a fixed-seed derangement (the floor). Set-level
metrics (FD, IS) have no shuffled row; FD has no ceiling (it is 0 by definition); IS's ceiling is the
reference set's own IS.

Metric groups (`METRIC_GROUPS`; default all that can run; a group that cannot run is skipped with a note):
    onset      Onset ACC / AP / count accuracy (V2A), onset.py
    av_align   AV-Align, avlink/av_align.py
    events     event precision / recall / F1 against SyncBench's true times (SyncBench references only),
               events.py
    fd, kl, is Frechet distance, KL, Inception Score over every embedder given weights (--weights) that reads
               the generated modality (but Synchformer, which serves DeSync only), plus the SyncBench
               classifier of that modality (distances.py)
    class_acc  the SyncBench classifier's set of classes present in the generated clip (sigmoid > 0.5)
               equals the clip's true set (eval/classifiers.py)
    clap       CLAP score: caption vs generated audio (V2A, needs captions: SyncBench references)
    imagebind  IB-AV and IB-AI: ImageBind cosine of the generated modality and the reference's other one;
               IB-AV reads the video as video, IB-AI its middle frame through ImageBind's image path. One
               loaded network serves both: the image side is a per-call option of its embedder
               (video_as="image"), so the vision tower is not loaded twice.
    desync     DeSync: Synchformer's mean |predicted audio-video offset| in seconds of the generated modality
               against the reference's other one (first and last 4.8 s window; shorter clips are not scored)
    seams      clips longer than one model window: seam_ratio, the seam score of the generated modality
               (seams.py) at the windows pipeline.plan_windows gives the generating model's clip geometry
               (settings.clip); V2A also window_distance, the SyncBench audio classifier's embedding distance
               between consecutive windows, where its weights load. The ceiling is the reference's own
               generated-side modality cut at the same windows; a score of one file has no floor
Bad, unreadable and unpaired files are listed in the report, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from avlink.av_align import audio_peaks, av_align_score, video_peaks
from avlink.config import Task
from avlink.errors import UserError
from avlink.eval import distances, events, onset, seams
from avlink.eval import report as rep
from avlink.eval.embedders import REGISTRY, Embedder, WeightsMissing, load_embedder
from avlink.seq import ClipGeometry

METRIC_GROUPS = ("onset", "av_align", "events", "fd", "kl", "is", "class_acc", "clap", "imagebind", "desync",
                 "seams")
MEDIA_SUFFIXES = (".wav", ".flac", ".mp4")
METADATA = "metadata.jsonl"  # the mark of a SyncBench folder
ONSET_RATE = onset.SAMPLE_RATE  # the onset protocols and AV-Align read audio at 22,050 Hz
MODALITY = {"v2a": ("audio", "video"), "a2v": ("video", "audio")}  # task -> (generated, conditioning)

Problem = rep.Problem


# --- pairing ----------------------------------------------------------------------------------------------


@dataclass
class Pair:
    stem: str
    generated: Path
    reference: Path
    meta: dict[str, Any] | None = None  # the SyncBench metadata row (events, objects, caption)


@dataclass
class Pairing:
    pairs: list[Pair]
    problems: list[Problem]
    unpaired: list[Problem]
    syncbench: bool


def media_files(root: Path) -> tuple[dict[str, Path], list[Problem]]:
    """Media files under root by stem; a second file of the same stem is listed as a problem."""
    found: dict[str, Path] = {}
    problems = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in MEDIA_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            problems.append(Problem(str(path), f"same name as {found[path.stem]}; only that one is used"))
            continue
        found[path.stem] = path
    return found, problems


def syncbench_files(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, Any]], list[Problem]]:
    from avlink.data.syncbench import load_metadata

    files, metas, problems = {}, {}, []
    for row in load_metadata(root):
        path = root / str(row["file"])
        if not path.is_file():
            problems.append(Problem(str(path), "listed in metadata.jsonl but not found"))
            continue
        files[str(row["id"])], metas[str(row["id"])] = path, row
    return files, metas, problems


def pair_files(generated: Path, reference: Path, only: set[str] | None = None) -> Pairing:
    """Pair generated and reference files by name stem; `only` keeps just those reference stems."""
    syncbench = (reference / METADATA).is_file()
    if syncbench:
        refs, metas, problems = syncbench_files(reference)
    else:
        (refs, problems), metas = media_files(reference), {}
    if only is not None:
        refs = {stem: path for stem, path in refs.items() if stem in only}
    gens, gen_problems = media_files(generated)
    both = sorted(gens.keys() & refs.keys())
    pairs = [Pair(stem, gens[stem], refs[stem], metas.get(stem)) for stem in both]
    unpaired = [Problem(str(gens[s]), "no reference of this name") for s in sorted(gens.keys() - refs.keys())]
    unpaired += [Problem(str(refs[s]), "no generated file of this name")
                 for s in sorted(refs.keys() - gens.keys())]
    return Pairing(pairs, problems + gen_problems, unpaired, syncbench)


def derangement(n: int, seed: int) -> np.ndarray | None:
    """A fixed-seed permutation of range(n) moving every index (Sattolo's random n-cycle); None if n < 2."""
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    assert not np.any(perm == np.arange(n)), "a derangement moves every index"
    return perm


# --- settings and embedders -------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    task: Task
    metrics: tuple[str, ...] = METRIC_GROUPS
    weights: dict[str, Path] = field(default_factory=dict)
    fps: float = 6.0  # every video is read at this rate (the model's 6 fps by default)
    duration: float | None = None  # seconds scored per clip; None: each reference's length
    seed: int = 0  # of the floor's derangement
    progress: bool = True
    clip: ClipGeometry | None = None  # of the model that generated the clips: its windows place the seams

    def wants(self, group: str) -> bool:
        return group in self.metrics

    def to_json(self) -> dict[str, Any]:
        clip = self.clip
        windows = None if clip is None else {"seconds": clip.duration, "frames": clip.num_frames,
                                             "fps": clip.video.fps, "audio_tokens": clip.num_audio_tokens}
        return {"task": self.task, "metrics": list(self.metrics), "fps": self.fps, "duration": self.duration,
                "seed": self.seed, "weights": {k: str(v) for k, v in self.weights.items()}, "windows": windows}


def parse_weights(items: list[str] | None) -> dict[str, Path]:
    """`--weights NAME=PATH` items -> {embedder name: weight file}; a bad item is refused in one line."""
    weights: dict[str, Path] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--weights {item}: expected NAME=PATH")
        if name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise UserError(f"--weights {item}: unknown embedder {name!r}; known: {known}")
        if not Path(path).exists():
            raise UserError(f"{path}: no such file (--weights {name})")
        weights[name] = Path(path)
    return weights


EMBEDDER_GROUPS = ("fd", "kl", "is", "class_acc", "clap", "imagebind", "desync", "seams")
GROUP_EMBEDDERS = {"clap": "clap", "imagebind": "imagebind", "desync": "synchformer"}  # group -> embedder
# Embedders whose features are also taken of the reference's other modality, for the pair score they serve
# (embedder -> group). Synchformer's flattened segment features are not an embedding for Frechet distances:
# it serves DeSync only.
BOTH_SIDES = {"imagebind": "imagebind", "synchformer": "desync"}
NOT_FOR_FD = ("synchformer",)


def classifier_name(task: Task) -> str:
    return f"syncbench-{MODALITY[task][0]}"


def window_embedder(settings: EvalSettings) -> str | None:
    """The network that embeds each window for window_distance: the SyncBench audio classifier, for V2A seams."""
    return classifier_name("v2a") if settings.wants("seams") and settings.task == "v2a" else None


def load_embedders(settings: EvalSettings, notes: list[str],
                   loader: Callable[..., Embedder] = load_embedder) -> dict[str, Embedder]:
    """Every embedder the requested groups need, by name; one that cannot load is skipped with a note, unless its
    weights were given with --weights: then the run stops with one line naming the file."""
    if not any(settings.wants(g) for g in EMBEDDER_GROUPS):
        return {}
    names = list(settings.weights)
    if any(settings.wants(g) for g in ("fd", "kl", "is", "class_acc")) or window_embedder(settings):
        names.append(classifier_name(settings.task))
    for group, name in GROUP_EMBEDDERS.items():
        if settings.wants(group) and name not in names:
            names.append(name)
    loaded: dict[str, Embedder] = {}
    for name in dict.fromkeys(names):
        try:
            loaded[name] = loader(name, settings.weights.get(name))
        except (UserError, OSError, ValueError, RuntimeError) as err:
            if name in settings.weights:  # the user named this file: a bad one stops the run, never a silent skip
                raise UserError(f"--weights {name}={settings.weights[name]}: {' '.join(str(err).split())}") from None
            if isinstance(err, WeightsMissing):
                notes.append(f"{name}: skipped, weights missing ({err})")
            else:
                notes.append(f"{name}: skipped, failed to load ({err})")
        except ImportError:
            notes.append(f"{name}: skipped, not available in this installation")
    return loaded


# --- features of one clip ---------------------------------------------------------------------------------


@dataclass
class Features:
    """What the metrics read of one file, so no wave or frame is kept after its clip is done."""

    onsets: onset.OnsetTrack | None = None
    audio_peaks: np.ndarray | None = None  # AV-Align audio onsets, seconds
    video_peaks: np.ndarray | None = None  # AV-Align motion peaks, seconds
    video_events: np.ndarray | None = None  # SyncBench cue onsets, seconds
    fps: float | None = None
    seam: seams.SeamScore | None = None  # of the generated-side modality; None: one window, or no room for a seam
    window_distance: float | None = None  # V2A: consecutive windows' embedding distance
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # "name:modality" -> (D,)
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # "name:modality" -> (C,)


@dataclass
class Reader:
    """Decodes one file at the rates and sizes the metrics ask for, once per rate."""

    path: Path
    duration: float
    size: tuple[int, int] | None
    _audio: dict[int, np.ndarray] = field(default_factory=dict)
    _video: dict[float, np.ndarray] = field(default_factory=dict)

    def audio(self, sample_rate: int) -> np.ndarray:
        from avlink.data import media

        if sample_rate not in self._audio:
            clip = media.read_audio(self.path, sample_rate, duration=self.duration)
            self._audio[sample_rate] = clip.samples
        return self._audio[sample_rate]

    def video(self, fps: float) -> np.ndarray:
        from avlink.data import media

        if fps not in self._video:
            clip = media.read_video(self.path, fps, self.size, duration=self.duration)
            self._video[fps] = clip.frames
        return self._video[fps]


def _embed(embedder: Embedder, modality: str, reader: Reader) -> tuple[np.ndarray, np.ndarray | None]:
    if modality == "audio":
        x = reader.audio(int(embedder.sample_rate))[None]  # (1, n)
    else:
        x = reader.video(float(embedder.fps))[None]  # (1, T, H, W, 3)
    emb = distances.as_array(embedder.embed(x, modality))[0]
    logits = embedder.logits(x, modality)
    return emb, None if logits is None else distances.as_array(logits)[0]


def _embed_image(embedder: Embedder, reader: Reader) -> np.ndarray:
    """ImageBind's image side (IB-AI): the clip's middle frame through the image path of the same network."""
    x = reader.video(float(embedder.fps))[None]  # (1, T, H, W, 3)
    return distances.as_array(embedder.embed(x, "video", video_as="image"))[0]


def _wanted(name: str, embedder: Embedder, modality: str, generated_side: bool, reader: Reader,
            settings: EvalSettings) -> bool:
    """Whether `embedder` reads this modality of this file: the generated modality feeds FD / KL / IS /
    class_acc; the other side only the pair scores. Synchformer runs only for DeSync, on clips that hold one
    of its windows."""
    if modality not in embedder.modalities:
        return False
    if name == "synchformer" and (not settings.wants("desync")
                                  or reader.duration < embedder.window_seconds - 1e-6):
        return False
    return generated_side or (name in BOTH_SIDES and settings.wants(BOTH_SIDES[name]))


def modality_features(feats: Features, modality: str, reader: Reader, settings: EvalSettings,
                      embedders: dict[str, Embedder]) -> None:
    """Fill `feats` with what the requested metrics read of one modality of one file."""
    task = settings.task
    generated_side = modality == MODALITY[task][0]
    if modality == "audio":
        if (task == "v2a" and (settings.wants("onset") or settings.wants("events"))):
            feats.onsets = onset.onset_track(reader.audio(ONSET_RATE))
        if settings.wants("av_align"):
            feats.audio_peaks = audio_peaks(reader.audio(ONSET_RATE), ONSET_RATE)
    else:
        frames = reader.video(settings.fps)
        feats.fps = settings.fps
        if settings.wants("av_align"):
            if frames.shape[0] < 3:
                raise UserError(f"{reader.path}: {frames.shape[0]} frames at {settings.fps:g} fps; "
                                "AV-Align needs 3")
            feats.video_peaks = video_peaks(frames, settings.fps)
        if task == "a2v" and settings.wants("events"):
            feats.video_events = events.video_event_times(frames, settings.fps)
    for name, embedder in embedders.items():
        if not _wanted(name, embedder, modality, generated_side, reader, settings):
            continue
        key = f"{name}:{modality}"
        emb, clip_logits = _embed(embedder, modality, reader)
        # Synchformer's segment features are large (0.6 MB per 8 s of video in float32) and its network
        # reads float32: they are kept so, not in float64
        feats.embeddings[key] = emb.astype(np.float32) if name == "synchformer" else emb
        if clip_logits is not None:
            feats.logits[key] = clip_logits
        if name == "imagebind" and modality == "video" and settings.wants("imagebind"):
            feats.embeddings["imagebind:image"] = _embed_image(embedder, reader)
    if generated_side and settings.wants("seams") and settings.clip is not None:
        window_net = window_embedder(settings)
        seam_features(feats, modality, reader, settings.clip, embedders.get(window_net) if window_net else None)


def seam_features(feats: Features, modality: str, reader: Reader, clip: ClipGeometry,
                  embedder: Embedder | None) -> None:
    """The seams of one file's generated-side modality at the windows that `clip` gives its length (seams.py);
    nothing for a file of one window, and no seam score where no boundary has a span of room on both sides."""
    fps = clip.video.fps
    total = round(reader.duration * fps)  # frames the generating pipeline windowed
    boundaries, span = seams.boundary_frames(total, clip), seams.seam_span(clip)
    if not boundaries:
        return
    try:
        if modality == "video":
            feats.seam = seams.video_seams(reader.video(fps), boundaries, span)
        else:
            wave = reader.audio(clip.audio.sample_rate)
            feats.seam = seams.audio_seams(wave, clip, [b / fps for b in boundaries], span / fps)
    except ValueError:  # no boundary or no inside point with a span of room on both sides
        feats.seam = None
    if embedder is not None and modality == "audio":
        rate = int(embedder.sample_rate)
        clips = seams.window_clips(reader.audio(rate), rate, seams.window_plan(total, clip), clip)  # (W, n)
        feats.window_distance = seams.window_distance(distances.as_array(embedder.embed(clips, "audio")))


def _caption_features(feats: Features, caption: str, embedders: dict[str, Embedder]) -> None:
    clap = embedders.get("clap")
    if clap is not None and "text" in clap.modalities and caption:
        feats.embeddings["clap:text"] = distances.as_array(clap.embed([caption], "text"))[0]


def clip_duration(pair: Pair, settings: EvalSettings) -> float:
    from avlink.data import media

    if settings.duration is not None:
        return settings.duration
    return media.probe(pair.reference).duration


def _reason(err: Exception, path: Path) -> str:
    text = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


# --- scoring ----------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """Per-clip values of one row, and the row's summary values."""

    values: dict[str, float | None] = field(default_factory=dict)
    per_clip: dict[str, list[float]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)


def _nanmean(values: list[float], pool: Callable[[list[float]], Any] = np.mean) -> tuple[float, int]:
    """pool (default the mean) of the finite values, and how many there were."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (float(pool(finite)) if finite else float("nan")), len(finite)


def _nanmedian(values: list[float]) -> tuple[float, int]:
    return _nanmean(values, np.median)


def _true_events(meta: dict[str, Any] | None, duration: float) -> np.ndarray:
    times = [float(t) for t in (meta or {}).get("events", [])]
    return np.array([t for t in times if 0.0 <= t < duration])


def _true_classes(meta: dict[str, Any] | None) -> set[str]:
    return {str(o.get("class")) for o in (meta or {}).get("objects", [])}


class RowScorer:
    """Scores one row: X[i] (the generated-side features) against reference i."""

    def __init__(self, task: Task, refs: list[Features], pairs: list[Pair], durations: list[float],
                 embedders: dict[str, Embedder]) -> None:
        self.task, self.refs, self.pairs, self.durations = task, refs, pairs, durations
        self.embedders = embedders
        self.gen_modality, self.cond_modality = MODALITY[task]

    def onset(self, xs: list[Features], out: Scored) -> None:
        clips = [onset.score_onsets(r.onsets.onsets, x.onsets) for x, r in zip(xs, self.refs, strict=True)]
        summary = onset.summarize(clips)
        out.values |= {"onset_acc": summary.acc, "onset_ap": summary.ap, "onset_count_acc": summary.count_acc}
        out.used |= {"onset_acc": summary.clips, "onset_ap": summary.ap_clips,
                     "onset_count_acc": summary.clips}
        out.per_clip |= {"onset_acc": [c.acc for c in clips], "onset_ap": [c.ap for c in clips],
                         "onset_count_match": [float(c.count_match) for c in clips]}

    def av_align(self, xs: list[Features], out: Scored) -> None:
        pairs = zip(xs, self.refs, strict=True)
        if self.task == "v2a":  # generated audio against the reference video
            scores = [av_align_score(x.audio_peaks, r.video_peaks, r.fps) for x, r in pairs]
        else:  # the reference audio against the generated video
            scores = [av_align_score(r.audio_peaks, x.video_peaks, x.fps) for x, r in pairs]
        out.values["av_align"], out.used["av_align"] = _nanmean(scores)
        out.per_clip["av_align"] = scores

    def events(self, xs: list[Features], out: Scored) -> None:
        counts = []
        for x, pair, duration in zip(xs, self.pairs, self.durations, strict=True):
            truth = _true_events(pair.meta, duration)
            if self.task == "v2a":
                counts.append(events.event_counts(truth, x.onsets.times, events.AUDIO_TOLERANCE))
            else:
                counts.append(events.event_counts(truth, x.video_events, 1.0 / x.fps))
        total = events.pooled(counts)
        for name in ("precision", "recall", "f1"):
            out.values[f"event_{name}"] = getattr(total, name)
            out.used[f"event_{name}"] = len(counts)
            out.per_clip[f"event_{name}"] = [getattr(c, name) for c in counts]

    def kl(self, xs: list[Features], name: str, out: Scored) -> None:
        key = f"{name}:{self.gen_modality}"
        per = distances.kl_per_pair(np.stack([r.logits[key] for r in self.refs]),
                                    np.stack([x.logits[key] for x in xs]))
        out.values[f"kl_{name}"], out.used[f"kl_{name}"] = float(per.mean()), len(per)
        out.per_clip[f"kl_{name}"] = per.tolist()

    def class_acc(self, xs: list[Features], name: str, out: Scored) -> None:
        from avlink.eval.classifiers import predicted_classes

        key = f"{name}:{self.gen_modality}"
        classes = getattr(self.embedders[name], "classes", None)
        hits = []
        for x, ref, pair in zip(xs, self.refs, self.pairs, strict=True):
            names = classes or [str(i) for i in range(len(x.logits[key]))]
            predicted = predicted_classes(x.logits[key], names)  # sigmoid > 0.5: the classes present
            truth = _true_classes(pair.meta)
            if classes is not None and truth:
                hits.append(float(predicted == truth))
            else:  # no labels to compare with: agreement with the classifier on the reference
                hits.append(float(predicted == predicted_classes(ref.logits[key], names)))
        out.values["class_acc"], out.used["class_acc"] = _nanmean(hits)
        out.per_clip["class_acc"] = hits

    def cosine(self, xs: list[Features], metric: str, x_key: str, ref_key: str, out: Scored) -> None:
        scores = [float(distances.cosine_per_pair(x.embeddings[x_key][None], r.embeddings[ref_key][None])[0])
                  if ref_key in r.embeddings else float("nan") for x, r in zip(xs, self.refs, strict=True)]
        out.values[metric], out.used[metric] = _nanmean(scores)
        out.per_clip[metric] = scores

    def desync(self, xs: list[Features], out: Scored) -> None:
        """Synchformer's |offset| in seconds of each X[i] (generated side) against reference i's other
        modality, from the segment features cached per modality; NaN for a clip shorter than a window."""
        sync = self.embedders["synchformer"]
        scores = []
        for x, r in zip(xs, self.refs, strict=True):
            side = {self.gen_modality: x, self.cond_modality: r}
            flat = [side[m].embeddings.get(f"synchformer:{m}") for m in ("video", "audio")]
            if any(f is None for f in flat):
                scores.append(float("nan"))
                continue
            video, audio = (sync.unflatten(f[None], m) for f, m in zip(flat, ("video", "audio"), strict=True))
            scores.append(float(sync.desync_from_features(video, audio)[0]))
        out.values["desync"], out.used["desync"] = _nanmean(scores)
        out.per_clip["desync"] = scores


@dataclass
class Plan:
    """Which metrics run, decided once the embedders are loaded and their logits seen."""

    groups: list[str]
    fd: list[str]
    classifiers: list[str]  # embedders with logits on the generated modality (KL, IS)
    class_acc: str | None
    clap: bool
    imagebind: bool
    desync: bool = False


def make_plan(settings: EvalSettings, pairing: Pairing, embedders: dict[str, Embedder],
              gens: list[Features], notes: list[str]) -> Plan:
    task, gen_modality = settings.task, MODALITY[settings.task][0]
    groups = [g for g in ("onset", "av_align", "events") if settings.wants(g)]
    if "onset" in groups and task == "a2v":
        groups.remove("onset")
        notes.append("onset: V2A only (it compares generated audio with the reference audio)")
    if "events" in groups and not pairing.syncbench:
        groups.remove("events")
        notes.append(f"events: needs a SyncBench reference folder (with {METADATA}); skipped")
    readers = [n for n, e in embedders.items() if gen_modality in e.modalities and n not in NOT_FOR_FD]
    fd = readers if settings.wants("fd") else []
    with_logits = [n for n in readers if gens and f"{n}:{gen_modality}" in gens[0].logits]
    classifiers = with_logits if (settings.wants("kl") or settings.wants("is")) else []
    name = classifier_name(task)
    class_acc = name if settings.wants("class_acc") and name in with_logits else None
    clap = settings.wants("clap") and "clap" in embedders and task == "v2a"
    if settings.wants("clap") and "clap" in embedders and task != "v2a":
        notes.append("clap: V2A only (caption against generated audio)")
    if clap and not pairing.syncbench:
        clap = False
        notes.append("clap: needs captions, which a SyncBench reference folder provides; skipped")
    imagebind = settings.wants("imagebind") and "imagebind" in embedders
    desync = settings.wants("desync") and "synchformer" in embedders
    short = sum(f"synchformer:{gen_modality}" not in g.embeddings for g in gens) if desync else 0
    if short:
        seconds = embedders["synchformer"].window_seconds
        notes.append(f"desync: {short} of {len(gens)} clips are shorter than one {seconds:g} s Synchformer "
                     "window; not scored")
    wanted = [g for g in ("fd", "kl", "is") if settings.wants(g)]
    if wanted and not (fd or classifiers):
        notes.append(f"{', '.join(wanted)}: no network that reads {gen_modality} is loaded "
                     f"(give one with --weights NAME=PATH); skipped")
    return Plan(groups, fd, classifiers, class_acc, clap, imagebind, desync)


def score_row(scorer: RowScorer, plan: Plan, xs: list[Features], settings: EvalSettings) -> Scored:
    out = Scored()
    for group in plan.groups:
        getattr(scorer, group)(xs, out)
    if settings.wants("kl"):
        for name in plan.classifiers:
            scorer.kl(xs, name, out)
    if plan.class_acc is not None:
        scorer.class_acc(xs, plan.class_acc, out)
    if plan.clap:
        scorer.cosine(xs, "clap_score", "clap:audio", "clap:text", out)
    if plan.imagebind:
        gen_m, cond_m = MODALITY[settings.task]
        image = {"audio": "audio", "video": "image"}  # IB-AI: the video side read as its middle frame
        scorer.cosine(xs, "ib_av", f"imagebind:{gen_m}", f"imagebind:{cond_m}", out)
        scorer.cosine(xs, "ib_ai", f"imagebind:{image[gen_m]}", f"imagebind:{image[cond_m]}", out)
    if plan.desync:
        scorer.desync(xs, out)
    return out


def set_metrics(plan: Plan, gens: list[Features], refs: list[Features], settings: EvalSettings,
                rows: dict[str, dict[str, float | None]], used: dict[str, int], notes: list[str]) -> None:
    """FD (model only) and IS (model, and the reference set as ceiling) over whole sets."""
    gen_m = MODALITY[settings.task][0]
    if len(gens) < 2:
        if plan.fd or plan.classifiers:
            notes.append("fd / is: need at least 2 clips; skipped")
        return
    for name in plan.fd:
        key, metric = f"{name}:{gen_m}", f"fd_{name}"
        fd = distances.frechet_distance_features(np.stack([g.embeddings[key] for g in gens]),
                                                 np.stack([r.embeddings[key] for r in refs]))
        rows["model"][metric], rows["ceiling"][metric], rows["floor"][metric] = fd, None, None
        used[metric] = len(gens)
    if settings.wants("is"):
        for name in plan.classifiers:
            key, metric = f"{name}:{gen_m}", f"is_{name}"
            rows["model"][metric] = distances.inception_score(np.stack([g.logits[key] for g in gens]))[0]
            rows["ceiling"][metric] = distances.inception_score(np.stack([r.logits[key] for r in refs]))[0]
            rows["floor"][metric] = None
            used[metric] = len(gens)


def seam_metrics(gens: list[Features], refs: list[Features], settings: EvalSettings,
                 rows: dict[str, dict[str, float | None]], used: dict[str, int], per_clip: dict[str, list[float]],
                 notes: list[str]) -> None:
    """seam_ratio and window_distance: the generated clips, and as the ceiling the references' own generated-side
    modality at the same windows; no floor (a score of one file: shuffled pairs would be the ceiling again)."""
    if not settings.wants("seams"):
        return
    clip = settings.clip
    if clip is None:
        notes.append("seams: the generating model's clip geometry is unknown (give --ckpt); skipped")
        return
    values = {"seam_ratio": lambda f: math.nan if f.seam is None else f.seam.ratio,
              "window_distance": lambda f: math.nan if f.window_distance is None else f.window_distance}
    scored = {metric: [value(g) for g in gens] for metric, value in values.items()}
    if not any(math.isfinite(v) for vs in scored.values() for v in vs):
        notes.append(f"seams: no clip spans more than one {clip.duration:.2f} s window with a seam to score; "
                     "skipped")
        return
    notes.append(f"seams: windows of {clip.num_frames} frames at {clip.video.fps:g} fps ({clip.duration:.2f} s), "
                 f"means over {seams.seam_span(clip)} frames either side of a point")
    # seam_ratio: the median over clips. A clip that hardly changes inside its windows (a still scene) has a
    # within-window distance near 0 and a ratio without bound (one true clip's was 12015), which a mean passes on.
    pooled = {"seam_ratio": _nanmedian, "window_distance": _nanmean}
    for metric, model in scored.items():
        if not any(math.isfinite(v) for v in model):
            continue
        rows["model"][metric], used[metric] = pooled[metric](model)
        rows["ceiling"][metric] = pooled[metric]([values[metric](r) for r in refs])[0]
        rows["floor"][metric] = None
        per_clip[metric] = model


# --- metric descriptions ----------------------------------------------------------------------------------


def metric_info(name: str, task: Task) -> rep.MetricInfo:
    gen_m, cond_m = MODALITY[task]
    fixed = {
        "onset_acc": ("higher", "CondFoleyGen onset detection accuracy: target onsets hit within 0.1 s"),
        "onset_ap": ("higher", "CondFoleyGen onset detection AP (scikit-learn), clips with target onsets"),
        "onset_count_acc": ("higher", "CondFoleyGen onset count accuracy: as many onsets as the target"),
        "av_align": ("higher", f"TempoTokens AV-Align: IoU of audio onsets and optical-flow peaks within one "
                               f"frame ({gen_m} generated, {cond_m} from the reference)"),
        "event_precision": ("higher", f"SyncBench: detected {gen_m} events that match a true event"),
        "event_recall": ("higher", f"SyncBench: true events matched by a detected {gen_m} event"),
        "event_f1": ("higher", "SyncBench: F1 of event matching, counts pooled over clips"),
        "class_acc": ("higher", f"SyncBench classifier: the classes it finds in the generated {gen_m} "
                                f"(sigmoid > 0.5) are exactly the clip's true classes"),
        "clap_score": ("higher", "CLAP: cosine of caption and generated audio embeddings"),
        "ib_av": ("higher", f"ImageBind IB-AV: cosine of generated {gen_m} and reference {cond_m} embeddings "
                            "(video as 5 two-frame clips x 3 crops)"),
        "ib_ai": ("higher", f"ImageBind IB-AI: cosine of audio and image embeddings, the image being the "
                            f"video's middle frame ({gen_m} generated, {cond_m} from the reference)"),
        "desync": ("lower", f"Synchformer DeSync: mean |predicted audio-video offset| in seconds over the "
                            f"first and last 4.8 s window ({gen_m} generated, {cond_m} from the reference)"),
        "seam_ratio": ("lower", f"window seams of the generated {gen_m}: distance of the mean "
                                f"{'frames' if gen_m == 'video' else 'log-mel spectra'} either side of each window "
                                "boundary over the same at points inside windows (1: a boundary changes no more "
                                "than time does), median over the clips longer than one window"),
        "window_distance": ("lower", "cosine distance of the SyncBench audio classifier's embeddings of "
                                     "consecutive (overlapping) windows of the generated audio"),
    }
    if name in fixed:
        return rep.MetricInfo(name, *fixed[name])
    kind, embedder = name.split("_", 1)
    described = {"fd": ("lower", f"Frechet distance of {embedder} embeddings, generated vs reference"),
                 "kl": ("lower", f"KL(reference || generated) of {embedder} class probabilities, pair mean"),
                 "is": ("higher", f"Inception Score of {embedder} class probabilities (10 splits)")}
    return rep.MetricInfo(name, *described[kind])


# --- the evaluation ---------------------------------------------------------------------------------------


def extract(pairing: Pairing, settings: EvalSettings, embedders: dict[str, Embedder],
            cache: dict[tuple[str, float], Features] | None = None
            ) -> tuple[list[Pair], list[Features], list[Features], list[float], list[Problem]]:
    """Features of every pair's generated and reference file; a pair with a bad file is dropped and listed."""
    gen_m, cond_m = MODALITY[settings.task]
    size = video_size(pairing, settings)
    cache = {} if cache is None else cache
    kept, gens, refs, durations, problems = [], [], [], [], []
    bar = tqdm(pairing.pairs, desc="scoring clips", unit="clip", disable=None if settings.progress else True)
    for pair in bar:
        try:
            duration = clip_duration(pair, settings)
            key = (str(pair.reference), duration)
            if key not in cache:
                ref = Features()
                reader = Reader(pair.reference, duration, size)
                for modality in (gen_m, cond_m):
                    modality_features(ref, modality, reader, settings, embedders)
                _caption_features(ref, str((pair.meta or {}).get("caption", "")), embedders)
                cache[key] = ref
            ref = cache[key]
        except Exception as err:  # any failure on a user's file is listed, never a crash
            problems.append(Problem(str(pair.reference), _reason(err, pair.reference)))
            continue
        try:
            gen = Features()
            modality_features(gen, gen_m, Reader(pair.generated, duration, size), settings, embedders)
        except Exception as err:
            problems.append(Problem(str(pair.generated), _reason(err, pair.generated)))
            continue
        kept.append(pair)
        gens.append(gen)
        refs.append(ref)
        durations.append(duration)
    return kept, gens, refs, durations, problems


def video_size(pairing: Pairing, settings: EvalSettings) -> tuple[int, int] | None:
    """A2V: every video at the generated videos' size, so ground truth and generated clips compare; V2A:
    each at its own size."""
    from avlink.data import media
    from avlink.data.media import MediaError

    if settings.task != "a2v":
        return None
    for pair in pairing.pairs:
        try:
            info = media.probe(pair.generated)
        except MediaError:
            continue
        if info.has_video:
            return info.width, info.height
    return None


def evaluate(generated: Path | str, reference: Path | str, settings: EvalSettings,
             cache: dict[tuple[str, float], Features] | None = None,
             loader: Callable[..., Embedder] = load_embedder, only: set[str] | None = None) -> rep.EvalReport:
    """Score every pair and build the report (nothing is written). `cache` keeps reference features across
    calls with the same settings (a sweep); `only` restricts the reference to those stems."""
    generated, reference = Path(generated), Path(reference)
    for folder, flag in ((generated, "--generated"), (reference, "--reference")):
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder ({flag})")
    notes: list[str] = []
    pairing = pair_files(generated, reference, only)
    embedders = load_embedders(settings, notes, loader)
    pairs, gens, refs, durations, bad = extract(pairing, settings, embedders, cache)
    plan = make_plan(settings, pairing, embedders, gens, notes)
    scorer = RowScorer(settings.task, refs, pairs, durations, embedders)
    perm = derangement(len(pairs), settings.seed)
    if perm is None and pairs:
        notes.append("floor: needs at least 2 clips to shuffle; not computed")
    sources = {"model": gens, "ceiling": refs, "floor": None if perm is None else [refs[j] for j in perm]}
    scored = {row: score_row(scorer, plan, xs, settings) if xs else Scored() for row, xs in sources.items()}
    rows = {row: dict(s.values) for row, s in scored.items()}
    used = dict(scored["model"].used)
    set_metrics(plan, gens, refs, settings, rows, used, notes)
    seam_metrics(gens, refs, settings, rows, used, scored["model"].per_clip, notes)
    names = list(dict.fromkeys([*rows["model"], *rows["ceiling"]]))
    return rep.EvalReport(
        task=settings.task, generated=str(generated), reference=str(reference), clips=len(pairs),
        metrics=[metric_info(n, settings.task) for n in names], rows=rows, used=used,
        per_clip=per_clip_rows(pairs, scored["model"]), notes=notes,
        problems=pairing.problems + bad, unpaired=pairing.unpaired,
        settings={**settings.to_json(), "floor_permutation": None if perm is None else perm.tolist()},
    )


def per_clip_rows(pairs: list[Pair], model: Scored) -> list[dict[str, Any]]:
    rows = []
    for i, pair in enumerate(pairs):
        row: dict[str, Any] = {"clip": pair.stem, "generated": str(pair.generated),
                               "reference": str(pair.reference)}
        row |= {name: values[i] for name, values in model.per_clip.items()}
        rows.append(row)
    return rows
