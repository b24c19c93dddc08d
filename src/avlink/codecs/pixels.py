"""The pixel video codec: RGB pixels are the video generator's space, up to a shift and a scale.

The paper's video model runs on RGB pixels (64x36 at 6 fps); a latent video autoencoder would be another codec
with the same two calls. A video codec takes pixels in [-1, 1], (B, C, T, H, W), as the data sets hold them
(`frames_to_pixels` turns uint8 frames into them, `pixels_to_frames` back).
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


def frames_to_pixels(frames: Tensor) -> Tensor:
    """uint8 frames (B, T, H, W, 3) -> pixels in [-1, 1] (B, C, T, H, W), float32."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def pixels_to_frames(pixels: Tensor) -> Tensor:
    """Pixels in [-1, 1] (B, C, T, H, W) -> uint8 frames (B, T, H, W, 3), rounded."""
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
