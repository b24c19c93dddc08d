"""What the published causal video VAEs share as video codecs (codecs/wan_vae.py, codecs/ltx_vae.py): the first
frame encoded alone and each following `stride` frames into one latent frame, the posterior's mean as the
encoding (deterministic), and the pipelines' per-channel normalisation (z - mean) * scale / std of the latents.
A subclass names its VAE: its strides and channels, its statistics and how its decoder is called."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from avlink.backbones.pretrained import load_part
from avlink.errors import UserError
from avlink.seq import VideoGeometry


class CausalVideoCodec:
    name = ""  # the VAE's name in messages
    vae_class = ""  # its diffusers class
    download = ""  # where its folder comes from

    def __init__(self, geometry: VideoGeometry, vae, strides: tuple[int, int], channels: int, mean: Tensor,
                 std: Tensor, scale: float = 1.0) -> None:
        if tuple(geometry.codec_stride) != strides or geometry.flow_channels != channels:
            raise UserError(f"the video geometry's codec_stride {tuple(geometry.codec_stride)} and "
                            f"codec_channels {geometry.flow_channels} do not match this {self.name} VAE's "
                            f"{strides} and {channels}")
        self.geometry = geometry
        self.vae = vae.eval().requires_grad_(False)
        shape = (1, channels, 1, 1, 1)
        self.mean = mean.detach().float().reshape(shape).clone()
        self.std = std.detach().float().reshape(shape).clone()
        self.scale = float(scale)

    @classmethod
    def load(cls, folder: str | Path, geometry: VideoGeometry, device: torch.device | str = "cpu",
             dtype: str = "float32") -> CausalVideoCodec:
        """The vae/ part of the generator's diffusers folder."""
        import diffusers

        return cls(geometry, load_part(getattr(diffusers, cls.vae_class), folder, "vae", cls.download,
                                       dtype)).to(device)

    def to(self, device: torch.device | str) -> CausalVideoCodec:
        self.vae.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, 1 + stride k, H, W) in [-1, 1] -> (B, C, 1 + k, H / s, W / s) normalised latents, float32."""
        frames = pixels.shape[2]
        stride = self.geometry.codec_stride[0]
        assert (frames - 1) % stride == 0, f"a causal video VAE takes 1 + {stride} k frames, got {frames}"
        mean = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean.float()
        return (mean - self.mean) * self.scale / self.std

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Normalised latents -> (B, 3, 1 + stride k, H, W) pixels in [-1, 1], float32."""
        latents = (x.float() * self.std / self.scale + self.mean).to(self.vae.dtype)
        return self.decode_latents(latents).float().clamp(-1, 1)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """The VAE's decoder on raw latents, as its pipeline calls it."""
        return self.vae.decode(latents).sample
