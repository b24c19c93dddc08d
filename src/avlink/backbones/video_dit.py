"""The text-to-video generator: a DiT over RGB pixels patchified in time and space, with 3D RoPE."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from avlink.backbones.dit import DiT
from avlink.config import DiTConfig
from avlink.nn.rope import rope_angles_nd
from avlink.seq import VideoGeometry, grid_ids


class VideoDiT(DiT):
    def __init__(self, cfg: DiTConfig, geometry: VideoGeometry):
        self.geometry = geometry
        super().__init__(cfg, token_dim=geometry.patch_dim)
        if cfg.frame_positions:  # config.py DiTConfig.frame_positions: where in the frame, learned
            h, w = geometry.grid_hw
            self.frame_pos = nn.Parameter(torch.randn(h * w, cfg.dim) * 0.02)  # (H' * W', D), row-major

    def position_embedding(self, grid: tuple[int, ...]) -> Tensor | None:
        if not self.cfg.frame_positions:
            return None
        assert tuple(grid[1:]) == self.geometry.grid_hw, f"frame grid {grid[1:]} is not {self.geometry.grid_hw}"
        return self.frame_pos.repeat(grid[0], 1)  # (T' * H' * W', D): the same place in every frame

    @property
    def eta(self) -> float:
        return self.geometry.eta

    def tokenize(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        g = self.geometry
        pt, ph, pw = g.patch
        assert x.ndim == 5 and x.shape[1] == g.channels, (
            f"video must be (B, {g.channels}, T, H, W), got {tuple(x.shape)}"
        )
        b, c, t, h, w = x.shape
        assert t % pt == 0 and h % ph == 0 and w % pw == 0, f"video {t}x{h}x{w} not divisible by patch {g.patch}"
        grid = (t // pt, h // ph, w // pw)
        x = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw): time-major tokens
        return x.reshape(b, grid[0] * grid[1] * grid[2], -1), grid

    def untokenize(self, tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
        pt, ph, pw = self.geometry.patch
        b = tokens.shape[0]
        x = tokens.reshape(b, *grid, self.geometry.channels, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', ph, W', pw)
        return x.reshape(b, self.geometry.channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        return self.geometry.token_times(grid, device)

    def rope(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        return rope_angles_nd(grid_ids(grid, device), self.cfg.rope_axes, self.cfg.rope_theta)
