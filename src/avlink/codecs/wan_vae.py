"""Wan 2.x's causal video VAE (diffusers `AutoencoderKLWan`) as the video codec of a linked Wan generator: frames in
[-1, 1] -> the normalised latents the Wan transformer was trained on, and back.

The VAE encodes the first frame alone and each following 4 frames into one latent frame (a clip holds 1 + 4k
frames), 8x smaller in space, 16 channels; WanPipeline normalises the latents per channel with the VAE config's
latents_mean and latents_std, and so does this codec. Encoding takes the posterior's mean (deterministic).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from avlink.backbones.pretrained import load_part
from avlink.errors import UserError
from avlink.seq import VideoGeometry

DOWNLOAD = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (huggingface.co)"


class WanVideoCodec:
    def __init__(self, geometry: VideoGeometry, vae) -> None:
        config = vae.config
        strides = (config.scale_factor_temporal, config.scale_factor_spatial)
        if tuple(geometry.codec_stride) != strides or geometry.flow_channels != config.z_dim:
            raise UserError(f"the video geometry's codec_stride {tuple(geometry.codec_stride)} and "
                            f"codec_channels {geometry.flow_channels} do not match this Wan VAE's {strides} and "
                            f"{config.z_dim}")
        self.geometry = geometry
        self.vae = vae.eval().requires_grad_(False)
        shape = (1, config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape)

    @classmethod
    def load(cls, folder: str | Path, geometry: VideoGeometry, device: torch.device | str = "cpu",
             dtype: str = "float32") -> WanVideoCodec:
        """The vae/ part of a Wan diffusers folder."""
        from diffusers import AutoencoderKLWan

        return cls(geometry, load_part(AutoencoderKLWan, folder, "vae", DOWNLOAD, dtype)).to(device)

    def to(self, device: torch.device | str) -> WanVideoCodec:
        self.vae.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, z, 1 + k, H / 8, W / 8) normalised latents, float32."""
        frames = pixels.shape[2]
        stride = self.geometry.codec_stride[0]
        assert (frames - 1) % stride == 0, f"a causal video VAE takes 1 + {stride} k frames, got {frames}"
        mean = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean.float()
        return (mean - self.mean) / self.std

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Normalised latents -> (B, 3, 1 + 4k, H, W) pixels in [-1, 1], float32."""
        latents = x.float() * self.std + self.mean
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)
