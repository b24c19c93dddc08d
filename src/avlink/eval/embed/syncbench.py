"""The SyncBench classifiers as evaluation embedders: "syncbench-audio" and "syncbench-video".

They take media as every embedder does (see embedders.py) and prepare it exactly as `avlink prepare` prepares
the training clips, so a clip scores the same here as in training:
- audio: float32 waveforms (B, n) at the preset's rate (22,050 Hz for tiny) -> the preset's log-mel
  (codecs.mel.MelSpectrogram) -> cut or padded with silence (`fit_frames`) to the frame count the preset
  gives a clip of n samples (a whole number of VAE latent tokens);
- video: uint8 frames (B, T, H, W, 3) at the preset's fps (6) -> float (B, 3, T, H, W) in [-1, 1]. Frames of
  another size are scaled to cover the preset's frame (16 x 16) with their aspect kept and centre-cropped, the
  geometry of the media reader; the scaling here is antialiased bilinear, the reader's is FFmpeg's, so such
  frames come close to the training view without being identical to it. Reading at 16 x 16 (as the
  evaluation does for generated video) gives exactly that view.
`embed` gives the penultimate features (B, 128), `logits` the per-class logits (B, C) in `classes` order
(sigmoid: the probability that the class is present), `predict` the set of classes present (logit > 0);
`timed_features` (video) the features of each time step, for the Table 2 feature rows (eval/features.py).

Weights: one file holds both networks (`avlink train classifiers` writes it to RUN/export/classifiers.safetensors).
By default it is read from checkpoints/<preset>/classifiers.safetensors in the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.config import get_preset
from avlink.errors import UserError
from avlink.eval.classifiers import load_classifiers, predicted_classes
from avlink.eval.embed.common import check_frames, check_waveforms
from avlink.eval.embedders import Modality, WeightsMissing
from avlink.seq import ClipGeometry

WEIGHTS_FILE = "classifiers.safetensors"
REPO_ROOT = Path(__file__).resolve().parents[4]  # src/avlink/eval/embed/ -> the repository


def default_weights(preset: str) -> Path:
    return REPO_ROOT / "checkpoints" / preset / WEIGHTS_FILE


def cover_resize(frames: Tensor, width: int, height: int) -> Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, height, width, 3): scaled to cover with the aspect kept, centre-cropped
    (the media reader's geometry), antialiased bilinear."""
    n, h, w, _ = frames.shape
    scale = max(width / w, height / h)
    scaled_w, scaled_h = max(width, round(w * scale)), max(height, round(h * scale))
    x = frames.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    x = F.interpolate(x, size=(scaled_h, scaled_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # as decoded frames are: 8 bits


class SyncBenchEmbedder:
    """One of the two SyncBench classifiers behind the Embedder interface."""

    def __init__(self, network: nn.Module, modality: Modality, clip: ClipGeometry, classes: tuple[str, ...],
                 device: str | torch.device = "cpu", batch_size: int = 64):
        from avlink.codecs.mel import MelSpectrogram

        assert modality in ("audio", "video"), f"a SyncBench classifier reads audio or video, not {modality}"
        assert batch_size > 0, f"batch_size must be > 0, got {batch_size}"
        self.name = f"syncbench-{modality}"
        self.modalities: tuple[Modality, ...] = (modality,)
        self.sample_rate = clip.audio.sample_rate if modality == "audio" else None
        self.fps = clip.video.fps if modality == "video" else None
        self.classes = classes
        self.clip = clip
        self.device = torch.device(device)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.mel = MelSpectrogram(clip.audio).to(self.device) if modality == "audio" else None
        self.batch_size = batch_size

    def inputs(self, x: np.ndarray, modality: Modality) -> Tensor:
        """Media -> what the network reads: log-mel (B, n_mels, F) or video (B, 3, T, H, W) in [-1, 1]."""
        if modality not in self.modalities:
            raise ValueError(f"{self.name} embeds {self.modalities[0]} only, not {modality}")
        if modality == "audio":
            return self._mels(check_waveforms(x, modality, self.name))
        check_frames(x, modality, self.name)
        return self._video(torch.from_numpy(np.ascontiguousarray(x)))

    def _mels(self, waves: np.ndarray) -> Tensor:
        from avlink.codecs.mel import fit_frames

        geometry = self.clip.audio
        if waves.shape[1] < geometry.hop_length:
            raise ValueError(f"{self.name}: {waves.shape[1]} samples, fewer than one mel frame ({geometry.hop_length})")
        frames = geometry.num_mel_frames(waves.shape[1] / geometry.sample_rate)
        mel = self.mel(torch.from_numpy(waves).to(self.device))  # (B, n_mels, n // hop)
        return fit_frames(mel, frames)  # (B, n_mels, F), as `avlink prepare` writes it

    def _video(self, frames: Tensor) -> Tensor:
        from avlink.data.datasets import frames_to_video

        b, t, h, w, _ = frames.shape
        v = self.clip.video
        if (h, w) != (v.height, v.width):
            frames = cover_resize(frames.flatten(0, 1), v.width, v.height).unflatten(0, (b, t))
        return torch.stack([frames_to_video(clip) for clip in frames]).to(self.device)  # (B, 3, T, H, W)

    @torch.no_grad()
    def _run(self, x: np.ndarray, modality: Modality, logits: bool) -> Tensor:
        out = []
        for start in range(0, len(x), self.batch_size):
            inputs = self.inputs(x[start:start + self.batch_size], modality)
            out.append((self.network(inputs) if logits else self.network.embed(inputs)).float().cpu())
        return torch.cat(out)

    def embed(self, x: np.ndarray, modality: Modality) -> Tensor:
        """(B, ...) media -> (B, D) penultimate features."""
        return self._run(x, modality, logits=False)

    def logits(self, x: np.ndarray, modality: Modality) -> Tensor:
        """(B, ...) media -> (B, C) per-class logits, in `classes` order."""
        return self._run(x, modality, logits=True)

    @property
    def timed_dim(self) -> int:
        return self.network.embed_proj.out_features

    @torch.no_grad()
    def timed_features(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor]:
        """Video (B, T, H, W, 3) -> (B, ceil(T / 2), D) penultimate features per step of the video classifier's
        last conv map (`VideoClassifier.frame_features`) and the (T',) time of each step, 2k / fps (the frame
        it is centred on). Video only: the audio classifier serves no feature row."""
        if modality != "video" or modality not in self.modalities:
            raise ValueError(f"{self.name}: per-time features of video only, from syncbench-video")
        out = [self.network.frame_features(self.inputs(x[start:start + self.batch_size], modality)).float().cpu()
               for start in range(0, len(x), self.batch_size)]
        features = torch.cat(out)
        steps = torch.arange(features.shape[1], dtype=torch.float64)
        return features, steps * self.network.time_stride / self.fps

    def predict(self, x: np.ndarray, modality: Modality) -> list[set[str]]:
        """The classes present in each clip (sigmoid > 0.5)."""
        return [predicted_classes(row, self.classes) for row in self.logits(x, modality)]


def load(modality: Modality, weights: Path | None = None, *, preset: str = "tiny",
         device: str | torch.device = "cpu", batch_size: int = 64) -> SyncBenchEmbedder:
    name = f"syncbench-{modality}"
    path = Path(weights) if weights is not None else default_weights(preset)
    if not path.is_file():
        raise WeightsMissing(f"{path}: {name} weight file not found; make it with `avlink train classifiers "
                             f"--preset {preset} --data syncbench:DIR --out RUN` and copy "
                             f"RUN/export/{WEIGHTS_FILE} there, or pass --weights {name}=PATH")
    model, classes = load_classifiers(path)
    if model.cfg.video_scale != (1, 1) or model.audio is None:
        raise UserError(f"{path}: the video classifier of the upsampler's output geometry; {name} reads the base "
                        f"frames with {WEIGHTS_FILE}")
    clip = get_preset(preset).clip
    if model.cfg.n_mels != clip.audio.n_mels:
        raise UserError(f"{path}: classifiers of {model.cfg.n_mels} mel bands, but preset {preset} has "
                        f"{clip.audio.n_mels}")
    network = model.audio if modality == "audio" else model.video
    return SyncBenchEmbedder(network, modality, clip, classes, device, batch_size)


def load_audio(weights: Path | None = None, **options) -> SyncBenchEmbedder:
    return load("audio", weights, **options)


def load_video(weights: Path | None = None, **options) -> SyncBenchEmbedder:
    return load("video", weights, **options)
