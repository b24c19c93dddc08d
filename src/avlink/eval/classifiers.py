"""SyncBench classifiers: which event classes are present in a clip, heard in its audio or seen in its video.

The evaluation scores generated audio and video by whether a small network trained on real SyncBench clips
recognises the objects the clip should hold. Two networks, one per modality, both multi-label (an independent
sigmoid per class of `CLASSES`, since a clip holds 1 to 3 objects):
- `AudioClassifier` reads the log-mel the tiny preset trains on (n_mels x F, as `avlink prepare` writes it);
- `VideoClassifier` reads the video the video generator sees, (3, T, H, W) in [-1, 1] (16 x 16 px, 6 fps).
Each also gives its penultimate features (`embed`), for Frechet distances in SyncBench feature space.
`SyncBenchClassifiers` holds both, so one weight file (keys `audio.*`, `video.*`) serves both embedders.

The upsampled-geometry video classifier (`UPSAMPLED_FILE`, beside the upsampler in a checkpoint folder) scores
the second video stage's output (64 x 64 px at 24 fps for tiny) as the base one scores the base frames: the same
`VideoClassifier` behind a stem (`video_scale`) that packs each (st, ss, ss) block of output pixels into one
position of the base grid (upsampler.pack) and maps it linearly to the base network's six input channels. The
body then runs on the base grid, so the classifier costs about what the base one costs (the stem adds one 1x1x1
convolution), and the stem starts as the area mean of the block and the change over one base frame: at
initialisation the body sees about what the base classifier sees. It holds the video network alone
(`audio=False`; the sound has no new geometry) and is trained on true clips at the output geometry, the
upsampler's training pairs (`avlink train classifiers --upsampled`).

Class accuracy, the evaluation's `class_acc`: a clip counts as right when the set of classes whose sigmoid
exceeds 0.5 (logit > 0) equals the clip's true set of classes exactly (exact-match accuracy). Per-label
accuracy, the share of right (clip, class) decisions, is reported beside it when the classifiers are scored.

Training (`avlink train classifiers`): both networks on the same batches of prepared SyncBench shards, with
the labels `shard_labels` reads of each clip's SyncBench metadata, evaluated with the EMA weights the training
loop keeps; the objective and its augmentation are train/objectives.py `ClassifierObjective`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.codecs.mel import normalize
from avlink.data.syncbench import CLASSES
from avlink.errors import UserError
from avlink.upsampler import pack

# --- networks ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of both networks; `from_state` reads them back from a weight file's tensor shapes."""

    num_classes: int = len(CLASSES)
    n_mels: int = 80
    audio_width: int = 128  # channels of the first audio conv; doubled once on the way down
    video_width: int = 16  # channels of the first video conv; doubled twice on the way down
    embed_dim: int = 128  # penultimate features of each network
    audio: bool = True  # False: the video network alone (the upsampled-geometry classifier)
    # (frames, pixels per side) of video input per position of the base grid: (1, 1) the base frames; the
    # upsampler's scale for the classifier of its output (module docstring)
    video_scale: tuple[int, int] = (1, 1)

    @classmethod
    def from_state(cls, state: dict[str, Tensor], video_scale: tuple[int, int] = (1, 1)) -> ClassifierConfig:
        """The sizes a weight file's tensors show; the video scale is in its metadata (`weights_metadata`)."""
        video_in, head = state["video.convs.0.0.weight"], state["video.head.weight"]  # head (C, D)
        audio_in = state.get("audio.convs.0.0.weight")
        if audio_in is None:
            return cls(num_classes=head.shape[0], video_width=video_in.shape[0], embed_dim=head.shape[1],
                       audio=False, video_scale=video_scale)
        return cls(num_classes=head.shape[0], n_mels=audio_in.shape[1], audio_width=audio_in.shape[0],
                   video_width=video_in.shape[0], embed_dim=head.shape[1], video_scale=video_scale)


def conv_block(dims: int, cin: int, cout: int, stride: int | tuple[int, ...]) -> nn.Sequential:
    """3^dims conv -> GroupNorm -> GELU. GroupNorm, not BatchNorm: the same in training and evaluation, so the
    averaged (EMA) weights need no recomputed statistics."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](cin, cout, 3, stride=stride, padding=1)
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout), cout), nn.GELU())


class AudioClassifier(nn.Module):
    """log-mel (B, n_mels, F) -> features (B, embed_dim) -> logits (B, classes).

    1D convs over time with the mel bands as input channels (every band keeps its own weights: which band a
    sound sits in tells a beep from a hum), time down by 8, then pooled by mean and max (max: one short hit
    anywhere in the clip is enough to say its class is present).
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        w = cfg.audio_width
        self.n_mels = cfg.n_mels
        self.convs = nn.Sequential(conv_block(1, cfg.n_mels, w, 1), conv_block(1, w, w, 2),
                                   conv_block(1, w, 2 * w, 2), conv_block(1, 2 * w, 2 * w, 2))
        self.embed_proj = nn.Linear(2 * 2 * w, cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def embed(self, mel: Tensor) -> Tensor:
        assert mel.ndim == 3 and mel.shape[1] == self.n_mels, \
            f"expected log-mel (B, {self.n_mels}, F), got {tuple(mel.shape)}"
        x = self.convs(normalize(mel))  # (B, 2w, F / 8)
        x = torch.cat([x.mean(-1), x.amax(-1)], dim=1)  # (B, 4w)
        return F.gelu(self.embed_proj(x))  # (B, D)

    def forward(self, mel: Tensor) -> Tensor:
        return self.head(self.embed(mel))  # (B, C)


def area_stem(scale: tuple[int, int]) -> nn.Conv3d:
    """The upsampled-geometry stem: a packed (6 * st * ss * ss)-channel block (frame and change channels, in
    `upsampler.pack`'s order) -> 6 channels, started as the block's mean frame and its change summed over the
    block's st frames (the change over one base frame, as the base network sees it), averaged over space."""
    st, ss = scale
    stem = nn.Conv3d(6 * st * ss * ss, 6, 1)
    with torch.no_grad():
        weight = torch.zeros(6, 6, st * ss * ss)
        for c in range(6):
            weight[c, c] = 1 / (st * ss * ss) if c < 3 else 1 / (ss * ss)
        stem.weight.copy_(weight.reshape(6, 6 * st * ss * ss, 1, 1, 1))
        stem.bias.zero_()
    return stem


class VideoClassifier(nn.Module):
    """video (B, 3, T, H, W) in [-1, 1] -> features (B, embed_dim) -> logits (B, classes).

    A 3D conv stack (space down by 8, time by 2), then mean and max over every remaining position: an object is
    the same class wherever it stands in the frame. With `cfg.video_scale` (st, ss) not (1, 1), the input is
    st times the frames and ss times the size, brought to the base grid by a stem (module docstring).
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        w = cfg.video_width
        self.scale = tuple(cfg.video_scale)
        self.stem = area_stem(self.scale) if self.scale != (1, 1) else None
        self.convs = nn.Sequential(conv_block(3, 6, w, 1), conv_block(3, w, 2 * w, (1, 2, 2)),
                                   conv_block(3, 2 * w, 4 * w, (1, 2, 2)), conv_block(3, 4 * w, 4 * w, (2, 2, 2)))
        self.embed_proj = nn.Linear(2 * 4 * w, cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.time_stride = 2 * self.scale[0]  # input frames per step of the last conv map: step k at frame 2k * st

    def feature_map(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> the last conv map (B, 4w, ceil(T / 2 st), H/8 ss, W/8 ss)."""
        assert video.ndim == 5 and video.shape[1] == 3, f"expected video (B, 3, T, H, W), got {tuple(video.shape)}"
        # What changed since the previous frame, beside the frame: motion and flashes are what tell a bouncing
        # ball from a resting one, a struck drum from a drum.
        change = F.pad(video.diff(dim=2), (0, 0, 0, 0, 1, 0))  # (B, 3, T, H, W), zero at the first frame
        x = torch.cat([video, change], dim=1)
        if self.stem is not None:
            st, ss = self.scale
            assert video.shape[2] % st == 0 and video.shape[3] % ss == 0 and video.shape[4] % ss == 0, \
                f"video {tuple(video.shape)} is not whole blocks of {st} frames and {ss} x {ss} px"
            x = self.stem(pack(x, self.scale))  # (B, 6, T / st, H / ss, W / ss)
        return self.convs(x)

    def embed(self, video: Tensor) -> Tensor:
        x = self.feature_map(video).flatten(2)  # (B, 4w, T/2 * H/8 * W/8)
        x = torch.cat([x.mean(-1), x.amax(-1)], dim=1)  # (B, 8w)
        return F.gelu(self.embed_proj(x))  # (B, D)

    def frame_features(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> (B, ceil(T / 2), D): the penultimate features of each step of the last conv map,
        pooled over space alone (by mean and max, as `embed` pools over space and time)."""
        x = self.feature_map(video).flatten(3)  # (B, 4w, T', H/8 * W/8)
        x = torch.cat([x.mean(-1), x.amax(-1)], dim=1).transpose(1, 2)  # (B, T', 8w)
        return F.gelu(self.embed_proj(x))  # (B, T', D)

    def forward(self, video: Tensor) -> Tensor:
        return self.head(self.embed(video))  # (B, C)


class SyncBenchClassifiers(nn.Module):
    """Both networks in one module: one weight file, trained together on the same batches (the video network
    alone where `cfg.audio` is False: `audio` is then None)."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        self.audio = AudioClassifier(cfg) if cfg.audio else None
        self.video = VideoClassifier(cfg)


# --- labels and accuracy ----------------------------------------------------------------------------------


def multi_hot(names: Iterable[str], classes: Sequence[str] = CLASSES) -> Tensor:
    """Class names -> (C,) float 0/1 in `classes` order; an unknown name is an error, not silently dropped."""
    out = torch.zeros(len(classes))
    for name in names:
        if name not in classes:
            raise ValueError(f"unknown SyncBench class {name!r}; known: {', '.join(classes)}")
        out[classes.index(name)] = 1.0
    return out


def clip_classes(meta: dict[str, Any]) -> set[str]:
    """The true classes of a SyncBench clip from its metadata row (or the `meta` a shard keeps of it)."""
    return {str(obj["class"]) for obj in meta.get("objects", [])}


def predicted_classes(logits: np.ndarray | Tensor, classes: Sequence[str] = CLASSES) -> set[str]:
    """(C,) logits of one clip -> the classes whose sigmoid is above 0.5 (logit > 0)."""
    values = np.asarray(logits.detach().cpu() if isinstance(logits, Tensor) else logits).reshape(-1)
    assert len(values) == len(classes), f"{len(values)} logits for {len(classes)} classes"
    return {classes[i] for i in np.flatnonzero(values > 0)}


@dataclass(frozen=True)
class Accuracy:
    exact: float  # share of clips whose predicted set of classes is exactly the true set
    per_label: float  # share of right (clip, class) decisions
    clips: int


def accuracy(logits: Tensor, labels: Tensor) -> Accuracy:
    """(N, C) logits and (N, C) 0/1 labels -> exact-match and per-label accuracy at sigmoid 0.5."""
    assert logits.shape == labels.shape and logits.ndim == 2, \
        f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be the same (N, C)"
    right = (logits > 0) == labels.bool()  # (N, C)
    return Accuracy(right.all(dim=1).float().mean().item(), right.float().mean().item(), logits.shape[0])


# --- labels of prepared shards ----------------------------------------------------------------------------


def shard_labels(source: str | Path, classes: Sequence[str] = CLASSES) -> dict[str, Tensor]:
    """id -> (C,) multi-hot of every clip in prepared shards, from the SyncBench metadata the shards keep."""
    from avlink.data.shards import list_shards, read_records

    shards, _ = list_shards(source)
    labels: dict[str, Tensor] = {}
    for shard in shards:
        for record in read_records(shard):
            info = record["json"]
            meta = info.get("meta") or {}
            if not meta.get("objects"):
                raise UserError(f"{shard}: clip {info.get('id')} has no SyncBench objects in its metadata; "
                                "the classifiers train on shards prepared from syncbench:DIR")
            labels[str(info["id"])] = multi_hot(clip_classes(meta), classes)
    if not labels:
        raise UserError(f"{source}: no clips in the shards")
    return labels


def syncbench_labels(root: str | Path, ids: Sequence[str], classes: Sequence[str] = CLASSES) -> dict[str, Tensor]:
    """id -> (C,) multi-hot of the clips `ids`, from the metadata.jsonl of the SyncBench folder `root`."""
    from avlink.data.syncbench import load_metadata

    rows = {str(row["id"]): row for row in load_metadata(root)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise UserError(f"{root}: no SyncBench metadata for {len(missing)} of the {len(ids)} clips (e.g. "
                        f"{missing[0]}); give the SyncBench folder the clips came from")
    return {i: multi_hot(clip_classes(rows[i]), classes) for i in ids}


# --- weights ----------------------------------------------------------------------------------------------

CLASSIFIERS_FILE = "classifiers.safetensors"  # both networks at the base geometry, in a checkpoint folder
UPSAMPLED_FILE = "classifiers-upsampled.safetensors"  # the video classifier of the upsampler's output geometry


def weights_metadata(classes: Sequence[str] = CLASSES, video_scale: tuple[int, int] = (1, 1)) -> dict[str, str]:
    """What a classifiers weight file says of itself: the class of each logit, in order, and the video scale
    where it is not (1, 1)."""
    meta = {"part": "classifiers", "classes": ",".join(classes)}
    if tuple(video_scale) != (1, 1):
        meta["video_scale"] = ",".join(map(str, video_scale))
    return meta


def save_classifiers(path: Path | str, model: SyncBenchClassifiers, classes: Sequence[str] = CLASSES) -> None:
    """The weights as `avlink train classifiers` exports them (written atomically)."""
    from avlink.checkpoint import save_weights

    assert len(classes) == model.cfg.num_classes, f"{len(classes)} names for {model.cfg.num_classes} logits"
    save_weights(Path(path), model, weights_metadata(classes, model.cfg.video_scale))


def load_classifiers(path: Path | str) -> tuple[SyncBenchClassifiers, tuple[str, ...]]:
    """Both networks (or the video network alone) and their class names from a weight file; anything else is
    refused in one line."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a file that is not one of its own
        raise UserError(f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from None
    try:
        scale = tuple(int(v) for v in meta["video_scale"].split(",")) if meta.get("video_scale") else (1, 1)
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(f"video_scale {meta['video_scale']!r} is not two positive integers")
        model = SyncBenchClassifiers(ClassifierConfig.from_state(state, scale))
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: does not hold SyncBench classifiers ({reason})") from None
    classes = tuple(meta["classes"].split(",")) if meta.get("classes") else CLASSES
    if len(classes) != model.cfg.num_classes:
        raise UserError(f"{path}: {model.cfg.num_classes} logits but {len(classes)} class names")
    return model.eval().requires_grad_(False), classes


# --- scoring ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_shards(model: SyncBenchClassifiers, source: str | Path, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> dict[str, Accuracy]:
    """Exact-match and per-label accuracy of both networks on every clip of prepared shards."""
    from avlink.data.shards import ShardDataset, collate

    labels = shard_labels(source)
    model = model.to(device).eval()
    outs: dict[str, list[Tensor]] = {"audio": [], "video": [], "labels": []}
    samples = list(ShardDataset(source))
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size])
        outs["audio"].append(model.audio(batch["mel"].to(device)).cpu())
        outs["video"].append(model.video(batch["video"].to(device)).cpu())
        outs["labels"].append(torch.stack([labels[i] for i in batch["id"]]))
    y = torch.cat(outs["labels"])
    return {m: accuracy(torch.cat(outs[m]), y) for m in ("audio", "video")}
