"""Inception-v3 of the FID reference, as a video-frame embedder (FID on frames, IS on frames).

FID (Heusel et al., 2017) is defined by one network: the TensorFlow Inception graph of 2015-12-05. The PyTorch
port everyone compares against is pytorch-fid (mseitzer/pytorch-fid), whose weight file is
`pt_inception-2015-12-05-6726825d.pth`. We write the network ourselves with the same module and key names, so
that file loads strictly. The port differs from the ImageNet Inception-v3 in four places, all kept here:
- the average-pool branch of blocks A, C and the first E (Mixed_5b-d, Mixed_6b-e, Mixed_7b) ignores the padded
  zeros (TensorFlow's SAME average pool: count_include_pad=False);
- the pool branch of the last E block (Mixed_7c) is a 3x3 max pool, a quirk of that TF graph;
- the classifier has the graph's 1008 outputs, and there is no auxiliary head;
- input: RGB in [0, 1], resized to 299 x 299 bilinearly (half-pixel centres, no antialias), then 2x - 1.
Features are the 2048-d global average pool after Mixed_7c ("pool3" of the TF graph); logits feed IS.

Video: every frame is an image, as FID on generated video is usually reported. `embed` therefore returns one
row per frame, (B * T', 2048), clip-major (clip 0's frames, then clip 1's, ...), where T' = T or
`frames_per_clip` evenly spaced frames. With `rows="clip"` it returns the mean feature of each clip instead,
(B, 2048); that is not the published FID and is offered for per-clip scores only.
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

IMAGE_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3  # the TF graph's batch norm epsilon
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE

# the Inception blocks in order: 35 x 35 (5b-d), 17 x 17 after 6a (6b-e), 8 x 8 after 7a (7b-c)
MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c")

Rows = Literal["frame", "clip"]
PoolKind = Literal["avg", "max"]


# ---------------------------------------------------------------- blocks (names follow the published keys)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU; state keys `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool_3x3_same(x: Tensor, kind: PoolKind) -> Tensor:
    """Stride-1 3x3 pool keeping the size; the average ignores padding, as TensorFlow's SAME pool does."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, in_channels: int, pool_features: int, c: Scale):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, c(64), 1)
        self.branch5x5_1 = BasicConv2d(in_channels, c(48), 1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, c(pool_features), 1)
        self.out_channels = 2 * c(64) + c(96) + c(pool_features)

    def forward(self, x: Tensor) -> Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(pool_3x3_same(x, "avg")),
        ]
        return torch.cat(branches, 1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

    def __init__(self, in_channels: int, c: Scale):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, c(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + in_channels

    def forward(self, x: Tensor) -> Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class InceptionC(nn.Module):
    """Mixed_6b-e: 1x1 | factorised 7x7 | twice-factorised 7x7 | avg pool -> 1x1 (all 192 wide)."""

    def __init__(self, in_channels: int, channels_7x7: int, c: Scale):
        super().__init__()
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2d(in_channels, c(192), 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, c(192), 1)
        self.out_channels = 4 * c(192)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(pool_3x3_same(x, "avg"))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17 -> 8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2."""

    def __init__(self, in_channels: int, c: Scale):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, c(192), 1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, c(192), 1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + in_channels

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1; `pool`: FID quirk."""

    def __init__(self, in_channels: int, pool: PoolKind, c: Scale):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, c(320), 1)
        self.branch3x3_1 = BasicConv2d(in_channels, c(384), 1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(s), self.branch3x3_2b(s),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pool_3x3_same(x, self.pool)),
        ]
        return torch.cat(branches, 1)


# ---------------------------------------------------------------- the network


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) in [-1, 1] -> pool3 features (N, 2048) and, with a classifier, logits (N, 1008).

    `width` scales every channel count (1 = the published network; small values build tiny test instances with
    the same key names). `num_classes=None` builds no classifier (a checkpoint without `fc.*`).
    """

    def __init__(self, width: float = 1.0, num_classes: int | None = NUM_CLASSES):
        super().__init__()
        c = Scale(width)
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3)
        self.Mixed_5b = InceptionA(c(192), 32, c)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, "avg", c)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, "max", c)
        self.pool_dim = self.Mixed_7c.out_channels
        self.fc = None if num_classes is None else nn.Linear(self.pool_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (N, 3, H, W) images, got {tuple(x.shape)}"
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for name in MIXED:
            x = getattr(self, name)(x)  # (N, 2048, 8, 8) after Mixed_7c
        return x.mean(dim=(2, 3))  # (N, 2048)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        pool = self.features(x)
        return pool, None if self.fc is None else self.fc(pool)


# ---------------------------------------------------------------- preprocessing


def preprocess(frames: np.ndarray | Tensor) -> Tensor:
    """(N, H, W, 3) uint8 images -> (N, 3, 299, 299) float32 in [-1, 1], the pytorch-fid input path."""
    x = as_tensor(frames).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


def pick_frames(num_frames: int, frames_per_clip: int | None) -> np.ndarray:
    """Indices of the frames each clip contributes: all of them, or `frames_per_clip` evenly spaced."""
    if frames_per_clip is None or frames_per_clip >= num_frames:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, frames_per_clip)).astype(int))


# ---------------------------------------------------------------- the embedder


class InceptionEmbedder:
    """FID / IS on video frames through the FID Inception-v3 (see the module docstring for rows)."""

    name = "inception"
    modalities: tuple[Modality, ...] = ("video",)
    sample_rate = None
    fps = None  # frame-wise: any rate

    def __init__(self, model: FIDInceptionV3, device: str | torch.device = "cpu", rows: Rows = "frame",
                 frames_per_clip: int | None = None, batch_size: int = 64):
        assert rows in ("frame", "clip"), f"rows must be 'frame' or 'clip', got {rows!r}"
        assert frames_per_clip is None or frames_per_clip > 0, f"frames_per_clip <= 0: {frames_per_clip}"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.rows, self.frames_per_clip, self.batch_size = rows, frames_per_clip, batch_size
        self.dim = model.pool_dim

    @torch.no_grad()
    def _run(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor | None]:
        """(B, T, H, W, 3) uint8 -> per-frame features (B, T', D) and logits (B, T', K) or None."""
        check_frames(x, modality, self.name)
        b = x.shape[0]
        frames = x[:, pick_frames(x.shape[1], self.frames_per_clip)]  # (B, T', H, W, 3)
        flat = frames.reshape(-1, *frames.shape[2:])  # (B * T', H, W, 3), clip-major
        pools, logits = [], []
        for start in range(0, len(flat), self.batch_size):
            pool, logit = self.model(preprocess(flat[start:start + self.batch_size]).to(self.device))
            pools.append(pool.float().cpu())
            logits.append(None if logit is None else logit.float().cpu())
        pool = torch.cat(pools).reshape(b, -1, self.dim)
        logit = None if logits[0] is None else torch.cat(logits).reshape(b, pool.shape[1], -1)
        return pool, logit

    def _rows(self, per_frame: Tensor) -> Tensor:
        """(B, T', D) -> rows: (B * T', D) one per frame, or (B, D) clip means."""
        return per_frame.flatten(0, 1) if self.rows == "frame" else per_frame.mean(dim=1)

    def embed(self, x: np.ndarray, modality: Modality = "video") -> Tensor:
        return self._rows(self._run(x, modality)[0])

    def logits(self, x: np.ndarray, modality: Modality = "video") -> Tensor | None:
        if self.model.fc is None:
            return None
        return self._rows(self._run(x, modality)[1])


def load(weights: Path | None = None, *, device: str = "cpu", rows: Rows = "frame",
         frames_per_clip: int | None = None, batch_size: int = 64, width: float = 1.0) -> InceptionEmbedder:
    """The FID Inception from pytorch-fid's weight file (logits only if the file holds `fc.*`)."""
    path = require_weights(weights, "inception", f"{WEIGHTS_FILE} ({WEIGHTS_URL})",
                           "the inception weights path")
    state = read_state_dict(path, "FID Inception-v3")
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    model = FIDInceptionV3(width=width, num_classes=classes)
    load_strict(model, state, path, "FID Inception-v3")
    return InceptionEmbedder(model, device=device, rows=rows, frames_per_clip=frames_per_clip,
                             batch_size=batch_size)
