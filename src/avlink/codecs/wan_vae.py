"""Wan 2.x's causal video VAE (diffusers `AutoencoderKLWan`) as the video codec of a linked Wan generator: frames in
[-1, 1] -> the normalised latents the Wan transformer was trained on, and back.

The VAE encodes the first frame alone and each following 4 frames into one latent frame (a clip holds 1 + 4k
frames), 8x smaller in space, 16 channels; WanPipeline normalises the latents per channel with the VAE config's
latents_mean and latents_std, and so does this codec. Encoding takes the posterior's mean (deterministic).
"""

from __future__ import annotations

import torch

from avlink.codecs.causal_vae import CausalVideoCodec
from avlink.seq import VideoGeometry

DOWNLOAD = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (huggingface.co)"


class WanVideoCodec(CausalVideoCodec):
    name, vae_class, download = "Wan", "AutoencoderKLWan", DOWNLOAD

    def __init__(self, geometry: VideoGeometry, vae) -> None:
        config = vae.config
        super().__init__(geometry, vae, (config.scale_factor_temporal, config.scale_factor_spatial), config.z_dim,
                         torch.tensor(config.latents_mean), torch.tensor(config.latents_std))
