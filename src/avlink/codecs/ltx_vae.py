"""LTX-Video's causal video VAE (diffusers `AutoencoderKLLTXVideo`) as the video codec of a linked LTX generator:
frames in [-1, 1] -> the normalised latents the LTX transformer was trained on, and back.

The VAE encodes the first frame alone and each following 8 frames into one latent frame (a clip holds 1 + 8k
frames), 32x smaller in space, 128 channels. LTXPipeline normalises the latents per channel with the VAE's
latents_mean and latents_std buffers (stored with its weights, not in its config) and its config's scaling_factor,
(z - mean) * scaling_factor / std, and so does this codec. Encoding takes the posterior's mean (deterministic).

Decoding. A VAE with timestep_conditioning (0.9.1 and later) denoises while it decodes: LTXPipeline passes it a
decode timestep (default 0.0) after mixing the latents with noise by decode_noise_scale (default: the decode
timestep, so none); this codec passes timestep 0 and mixes in nothing, the pipeline's default. A VAE without it
(0.9.0) takes no timestep. (0.9.1's decoder also injects unseeded noise inside its blocks, as it does in the
pipeline: its decode is not bit-reproducible either way.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from avlink.backbones.pretrained import load_part
from avlink.errors import UserError
from avlink.seq import VideoGeometry

DOWNLOAD = "Lightricks/LTX-Video (huggingface.co)"


class LTXVideoCodec:
    def __init__(self, geometry: VideoGeometry, vae) -> None:
        config = vae.config
        strides = (vae.temporal_compression_ratio, vae.spatial_compression_ratio)
        if tuple(geometry.codec_stride) != strides or geometry.flow_channels != config.latent_channels:
            raise UserError(f"the video geometry's codec_stride {tuple(geometry.codec_stride)} and "
                            f"codec_channels {geometry.flow_channels} do not match this LTX VAE's {strides} and "
                            f"{config.latent_channels}")
        self.geometry = geometry
        self.vae = vae.eval().requires_grad_(False)
        shape = (1, config.latent_channels, 1, 1, 1)
        self.mean = vae.latents_mean.detach().float().view(shape).clone()
        self.std = vae.latents_std.detach().float().view(shape).clone()
        self.scaling_factor = float(config.scaling_factor)

    @classmethod
    def load(cls, folder: str | Path, geometry: VideoGeometry, device: torch.device | str = "cpu",
             dtype: str = "float32") -> LTXVideoCodec:
        """The vae/ part of an LTX-Video diffusers folder."""
        from diffusers import AutoencoderKLLTXVideo

        return cls(geometry, load_part(AutoencoderKLLTXVideo, folder, "vae", DOWNLOAD, dtype)).to(device)

    def to(self, device: torch.device | str) -> LTXVideoCodec:
        self.vae.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, 1 + 8k, H, W) in [-1, 1] -> (B, 128, 1 + k, H / 32, W / 32) normalised latents, float32."""
        frames = pixels.shape[2]
        stride = self.geometry.codec_stride[0]
        assert (frames - 1) % stride == 0, f"a causal video VAE takes 1 + {stride} k frames, got {frames}"
        mean = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean.float()
        return (mean - self.mean) * self.scaling_factor / self.std

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Normalised latents -> (B, 3, 1 + 8k, H, W) pixels in [-1, 1], float32."""
        latents = (x.float() * self.std / self.scaling_factor + self.mean).to(self.vae.dtype)
        timestep = None
        if self.vae.config.timestep_conditioning:  # LTXPipeline's default decode_timestep 0.0, no noise mixed in
            timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        return self.vae.decode(latents, timestep).sample.float().clamp(-1, 1)
