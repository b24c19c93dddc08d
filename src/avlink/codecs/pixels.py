"""The pixel video codec: RGB pixels are the video generator's space, up to a shift and a scale.

The paper's video model runs on RGB pixels (64x36 at 6 fps); a latent video autoencoder would be another codec
with the same two calls. A video codec takes pixels in [-1, 1], (B, C, T, H, W), as the data sets hold them
(system.py turns uint8 frames into them and back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avlink.seq import VideoGeometry


class PixelCodec:
    kind = "pixels"

    def __init__(self, geometry: VideoGeometry):
        self.geometry = geometry

    def to(self, device: torch.device | str) -> PixelCodec:
        return self

    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] (B, C, T, H, W) -> the flow's video: (pixels - shift) / scale."""
        return (pixels - self.geometry.shift) / self.geometry.scale

    def decode(self, x: Tensor) -> Tensor:
        """The flow's video -> pixels in [-1, 1] (clamped)."""
        return (x * self.geometry.scale + self.geometry.shift).clamp(-1.0, 1.0)
