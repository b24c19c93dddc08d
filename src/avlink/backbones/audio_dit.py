"""The text-to-audio generator: a DiT over 1D VAE latent tokens (Ta x Da) with 1D RoPE."""

from __future__ import annotations

import torch
from torch import Tensor

from avlink.backbones.dit import DiT
from avlink.config import DiTConfig
from avlink.nn.rope import rope_angles
from avlink.seq import AudioGeometry


class AudioDiT(DiT):
    def __init__(self, cfg: DiTConfig, geometry: AudioGeometry):
        self.geometry = geometry
        super().__init__(cfg, token_dim=geometry.latent_dim)

    @property
    def eta(self) -> float:
        return self.geometry.eta

    def tokenize(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        assert x.ndim == 3 and x.shape[-1] == self.geometry.latent_dim, (
            f"audio latent must be (B, Ta, {self.geometry.latent_dim}), got {tuple(x.shape)}"
        )
        return x, (x.shape[1],)

    def untokenize(self, tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
        return tokens

    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        return self.geometry.token_times(grid[0], device)

    def rope(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        return rope_angles(torch.arange(grid[0], device=device), self.cfg.head_dim, self.cfg.rope_theta)
