"""The audio codec: waves <-> the audio generator's latent tokens, through the mel analysis, the audio VAE and a
vocoder (the paper's audio model works so: mel, 1D VAE, HiFi-GAN).

Long sounds run one model window of latent tokens at a time, each with CODEC_MARGIN_TOKENS of context on both
sides that is computed and dropped (`codec_chunks`). Memory then follows the window, not the input (a HiFi-GAN
over 3 minutes of mel held gigabytes of activations), and the VAE sees what it was trained on: its GroupNorms
take statistics over the whole sequence, so a clip-length chunk is its training condition and a 10-minute latent
is not. The margin covers the convolutions' context (HiFi-GAN's, the STFT's, the VAE's), so chunk seams do not
show (tests hold a local codec in chunks to one pass over the whole).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from avlink.codecs.mel import MelSpectrogram, fit_frames
from avlink.codecs.vae import AudioVAE
from avlink.codecs.vocoder import Vocoder
from avlink.seq import ClipGeometry

CODEC_MARGIN_TOKENS = 16


def codec_chunks(tokens: int, size: int, margin: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """(start, stop, lo, hi) per chunk of `size` tokens: [start, stop) is kept, [lo, hi) is computed."""
    margin = CODEC_MARGIN_TOKENS if margin is None else margin
    for start in range(0, tokens, size):
        stop = min(tokens, start + size)
        yield start, stop, max(0, start - margin), min(tokens, stop + margin)


class AudioCodec:
    """Waves (B, N) float in [-1, 1] <-> scaled VAE latents (B, Ta, Da), the space the audio generator's flow
    runs on. `vocoder` may be None where nothing is decoded to a wave (A2V)."""

    kind = "mel-vae"

    def __init__(self, clip: ClipGeometry, vae: AudioVAE, vocoder: Vocoder | None):
        self.clip, self.vae, self.vocoder = clip, vae.eval(), vocoder
        self.mel = MelSpectrogram(clip.audio)

    def to(self, device: torch.device | str) -> AudioCodec:
        self.vae, self.mel = self.vae.to(device), self.mel.to(device)
        if isinstance(self.vocoder, torch.nn.Module):
            self.vocoder = self.vocoder.to(device)
        return self

    @property
    def samples_per_token(self) -> int:
        return self.clip.audio.hop_length * self.clip.audio.latent_downsample

    @property
    def window(self) -> int:
        """Tokens of one model window: the chunk the codec runs at a time."""
        return self.clip.num_audio_tokens

    @torch.no_grad()
    def encode(self, wave: Tensor, tokens: int | None = None) -> Tensor:
        """(B, N) waves, on the codec's device -> (B, tokens, Da) scaled latents (the VAE posterior mean) of
        their first `tokens` tokens' span (default: the tokens N samples fill, at least one), silence past their
        end."""
        audio, per_token = self.clip.audio, self.samples_per_token
        tokens = max(1, -(-wave.shape[1] // per_token)) if tokens is None else tokens
        latent = torch.zeros(wave.shape[0], tokens, audio.latent_dim, device=wave.device)
        for start, stop, lo, hi in codec_chunks(tokens, self.window):
            piece = wave[:, lo * per_token:hi * per_token].float()
            piece = torch.nn.functional.pad(piece, (0, (hi - lo) * per_token - piece.shape[1]))
            mel = fit_frames(self.mel(piece), (hi - lo) * audio.latent_downsample)  # (B, n_mels, F)
            z = self.vae.scale_latent(self.vae.encode(mel).mean)  # (B, hi - lo, Da)
            latent[:, start:stop] = z[:, start - lo:stop - lo]
        return latent

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """(B, Ta, Da) scaled latents -> (B, Ta * samples per token) float32 waves on the CPU (not clipped)."""
        if self.vocoder is None:
            raise ValueError("this audio codec was loaded without a vocoder: it cannot decode to waves")
        per_token = self.samples_per_token
        out = torch.zeros(latent.shape[0], latent.shape[1] * per_token)
        for start, stop, lo, hi in codec_chunks(latent.shape[1], self.window):
            mel = self.vae.decode(self.vae.unscale_latent(latent[:, lo:hi].float()))  # (B, n_mels, F)
            wave = self.vocoder(mel).float().cpu()[:, (start - lo) * per_token:(stop - lo) * per_token]
            out[:, start * per_token:start * per_token + wave.shape[1]] = wave
        return out
