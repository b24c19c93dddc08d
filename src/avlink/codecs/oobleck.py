"""The Oobleck codec: waves <-> Stable Audio Open's latent tokens, through diffusers' `AutoencoderOobleck` (a
convolutional VAE on the raw wave; no mel, no vocoder). The latent is used unscaled, as StableAudioPipeline
decodes its latents.

The VAE is stereo; our waves are mono. Encoding copies the mono wave to every channel; decoding averages them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderOobleck
from torch import Tensor

from avlink.backbones.pretrained import load_part
from avlink.errors import UserError
from avlink.seq import ClipGeometry

DOWNLOAD = "stabilityai/stable-audio-open-1.0 (huggingface.co)"


class OobleckCodec:
    """Waves (B, N) float in [-1, 1] <-> VAE latents (B, Ta, Da), the space Stable Audio's flow runs on."""

    kind = "oobleck"

    def __init__(self, clip: ClipGeometry, vae: AutoencoderOobleck):
        self.clip, self.vae = clip, vae.eval()
        audio, config = clip.audio, vae.config
        if (audio.sample_rate, audio.hop_length * audio.latent_downsample, audio.latent_dim) != (
                config.sampling_rate, self.samples_per_token, config.decoder_input_channels):
            raise UserError(
                f"audio geometry (rate {audio.sample_rate}, {audio.hop_length * audio.latent_downsample} samples "
                f"per token, {audio.latent_dim}-d) does not match the Oobleck VAE (rate {config.sampling_rate}, "
                f"{self.samples_per_token} samples per token, {config.decoder_input_channels}-d)")

    @classmethod
    def load(cls, folder: str | Path, clip: ClipGeometry, device: torch.device | str = "cpu",
             dtype: str = "float32") -> OobleckCodec:
        """The vae/ part of a local diffusers folder of Stable Audio Open (safetensors only)."""
        return cls(clip, load_part(AutoencoderOobleck, folder, "vae", DOWNLOAD, dtype)).to(device)

    def to(self, device: torch.device | str) -> OobleckCodec:
        self.vae = self.vae.to(device)
        return self

    @property
    def samples_per_token(self) -> int:
        """Wave samples per latent token: the product of the encoder's strides (2048 for the released VAE)."""
        return math.prod(self.vae.config.downsampling_ratios)

    @torch.no_grad()
    def encode(self, wave: Tensor, tokens: int | None = None) -> Tensor:
        """(B, N) mono waves -> (B, tokens, Da) latents: the posterior mean (deterministic). The wave is cut or
        padded with silence to `tokens` tokens (default: the tokens N samples fill, at least one)."""
        assert wave.ndim == 2, f"waves must be (B, N) mono, got {tuple(wave.shape)}"
        per_token = self.samples_per_token
        tokens = max(1, -(-wave.shape[1] // per_token)) if tokens is None else tokens
        wave = wave[:, :tokens * per_token]
        wave = torch.nn.functional.pad(wave, (0, tokens * per_token - wave.shape[1]))
        dtype = next(self.vae.parameters()).dtype
        channels = wave[:, None].expand(-1, self.vae.config.audio_channels, -1)  # (B, channels, N)
        latent = self.vae.encode(channels.to(dtype)).latent_dist.mean  # (B, Da, tokens)
        return latent.transpose(1, 2).float()

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """(B, Ta, Da) latents -> (B, Ta * samples per token) float32 mono waves (not clipped)."""
        dtype = next(self.vae.parameters()).dtype
        wave = self.vae.decode(latent.transpose(1, 2).to(dtype)).sample  # (B, channels, N)
        return wave.float().mean(dim=1)
