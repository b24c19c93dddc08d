"""Pretrained extractors' features as the conditioning stream of a link: the Table 2 "Conditioning features type"
rows (the paper's CLIP and CAVP rows against its diffusion features).

`load_features(name, cfg, weights)` gives the `ConditioningFeatures` (fusion/features.py) that
`system.build_model(cfg, features=...)` takes for a config whose `fusion.features` is `name`. It reads the clip
through the evaluation's embedders (embedders.py `TimedEmbedder`), so a feature row sees the conditioning video as
the evaluation sees media: the clean clip in the flow's space is decoded by the model's video codec, rounded to
8-bit frames (system.decode_media), retimed to the extractor's frame rate by showing each new frame the frame on
screen at its time, and handed to the embedder's `timed_features`, which prepares it as its network was trained.

The extractors (video only: Table 2 is V2A, and its feature rows condition the audio on video):
- "syncbench-video": the SyncBench video classifier (eval/classifiers.py), features of each step of its last conv
  map. Offline: its weights are the checkpoint's classifiers.safetensors (`avlink train classifiers`).
- "imagebind": ImageBind's vision branch on each 2-frame clip of the video. That branch is OpenCLIP ViT-H/14,
  which ImageBind's training kept frozen, so this row stands in for the paper's CLIP row (per-frame CLIP
  features, as V2A-Mapper and FoleyCrafter use). Weights: imagebind_huge.pth.
- "synchformer": Synchformer's video encoder (MotionFormer), one feature per 2 frames at 25 fps. It was trained
  contrastively for audio-visual synchrony, as CAVP was trained contrastively on audio-visual pairs with a
  temporal objective, so this row stands in for the paper's CAVP row. Weights: synchformer_state_dict.pth.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avlink.config import PRESETS, ModelConfig
from avlink.errors import UserError
from avlink.eval.embedders import TimedEmbedder, WeightsMissing, load_embedder
from avlink.system import PRETRAINED_CODECS, decode_media, pretrained_codec, video_codec

# name (FusionConfig.features) -> the Table 2 row it stands for
EXTRACTORS: dict[str, str] = {
    "syncbench-video": "SyncBench classifier",
    "imagebind": "CLIP (ImageBind's frozen OpenCLIP ViT-H)",
    "synchformer": "CAVP (Synchformer)",
}


def retime(frames: np.ndarray, fps: float, target: float) -> np.ndarray:
    """(B, T, ...) frames at fps -> the same seconds at target fps (at least one frame): new frame i is the frame
    on screen at i / target, the last that started at or before it."""
    if fps == target:
        return frames
    count = max(1, math.ceil(frames.shape[1] * target / fps - 1e-9))
    picks = np.minimum(np.floor(np.arange(count) * fps / target + 1e-9).astype(int), frames.shape[1] - 1)
    return frames[:, picks]


class EmbedderFeatures:
    """A `TimedEmbedder`'s per-time video features behind fusion's `ConditioningFeatures`."""

    modality = "video"

    def __init__(self, name: str, embedder: TimedEmbedder, codec, fps: float):
        self.name = name
        self.embedder = embedder
        self.codec = codec  # the model's video codec: the flow's space -> pixels
        self.fps = fps  # the model's frame rate
        self.dim = embedder.timed_dim

    def __call__(self, x_clean: Tensor) -> tuple[Tensor, Tensor]:
        frames = retime(decode_media(self.codec, "video", x_clean), self.fps, float(self.embedder.fps))
        features, times = self.embedder.timed_features(frames, "video")
        return features.to(x_clean.device, x_clean.dtype), times.to(x_clean.device)


def load_features(name: str, cfg: ModelConfig, weights: str | Path | None = None,
                  device: torch.device | str = "cpu") -> EmbedderFeatures:
    """The extractor `name` for a link of config cfg, on device. weights None: syncbench-video reads
    checkpoints/<preset>/classifiers.safetensors; the others need their file. A missing or wrong file is one
    line (UserError)."""
    if name not in EXTRACTORS:
        raise UserError(f"fusion.features {name!r}: unknown; known: generator, {', '.join(EXTRACTORS)}")
    options: dict = {"device": device}
    if name == "syncbench-video":  # the classifiers of a preset are trained at its clip geometry
        options["preset"] = cfg.name if cfg.name in PRESETS else "tiny"
    if name == "imagebind":  # takes frames at any rate: the model's own
        options["fps"] = cfg.clip.video.fps
    try:
        embedder = load_embedder(name, weights, **options)
    except WeightsMissing as err:
        raise UserError(f"fusion.features {name}: {err}") from None
    assert isinstance(embedder, TimedEmbedder), f"{name} gives no per-time features"
    geometry = cfg.clip.video
    codec = pretrained_codec(cfg, "video", device) if geometry.codec in PRETRAINED_CODECS else video_codec(geometry)
    return EmbedderFeatures(name, embedder, codec, geometry.fps)
