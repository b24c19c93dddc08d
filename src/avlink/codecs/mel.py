"""Log-magnitude mel spectrogram, the audio representation under the VAE and over the vocoder.

The analysis is the one HiFi-GAN was trained on: reflect-pad the wave by (n_fft - hop) / 2 on each side, take
an STFT without centering, magnitude (not power), Slaney mel filters from librosa, log(clamp(x, 1e-5)).

Frame count: with that padding, a wave of n samples gives exactly F = n // hop_length frames, and frame k
summarises samples around [k * hop, (k + 1) * hop). A vocoder that upsamples by hop_length turns F frames back
into F * hop_length samples, so the two stay aligned sample for sample. `fit_frames` then crops or pads to the
frame count a clip geometry asks for (`AudioGeometry.num_mel_frames`, a whole number of latent tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.seq import AudioGeometry

CLAMP_MIN = 1e-5
LOG_FLOOR = math.log(CLAMP_MIN)  # -11.513: the log-mel of silence
# Fixed affine map to about [-1, 1] for networks that read mels (the VAE): the log floor goes to -1 and
# log-mel 3.0 goes to +1. Measured peaks: a full-scale sine swept over 40-7900 Hz reaches 2.26 (22,050 Hz preset) and
# 2.29 (16 kHz preset) in the narrow low bands; full-scale uniform noise reaches 0.41 / 0.43. So real audio
# stays inside the range with some headroom.
LOG_MEL_HIGH = 3.0
MEL_CENTER = (LOG_FLOOR + LOG_MEL_HIGH) / 2
MEL_HALF_RANGE = (LOG_MEL_HIGH - LOG_FLOOR) / 2


def normalize(mel: Tensor) -> Tensor:
    """Log-mel -> about [-1, 1] (see MEL_CENTER / MEL_HALF_RANGE)."""
    return (mel - MEL_CENTER) / MEL_HALF_RANGE


def denormalize(x: Tensor) -> Tensor:
    """Inverse of `normalize`."""
    return x * MEL_HALF_RANGE + MEL_CENTER


def stft_padding(geometry: AudioGeometry) -> tuple[int, int]:
    """(left, right) reflect padding that makes F = n // hop frames: n_fft - hop split in two halves."""
    total = geometry.n_fft - geometry.hop_length
    assert total >= 0, f"hop {geometry.hop_length} is longer than n_fft {geometry.n_fft}"
    return total // 2, total - total // 2


def stft(wave: Tensor, geometry: AudioGeometry, window: Tensor) -> Tensor:
    """Complex STFT of the HiFi-GAN analysis: wave (B, n) -> (B, n_fft // 2 + 1, n // hop)."""
    assert wave.ndim == 2, f"wave must be (B, n), got {tuple(wave.shape)}"
    n = wave.shape[-1]
    left, right = stft_padding(geometry)
    assert n >= geometry.hop_length, f"wave of {n} samples is shorter than one hop ({geometry.hop_length})"
    # Reflection needs more samples than the padding; a wave shorter than that is padded with silence instead.
    mode = "reflect" if n > right else "constant"
    padded = F.pad(wave.unsqueeze(1), (left, right), mode=mode).squeeze(1)
    spec = torch.stft(padded, geometry.n_fft, geometry.hop_length, geometry.win_length, window=window,
                      center=False, return_complex=True)
    assert spec.shape[-1] == n // geometry.hop_length, f"{spec.shape[-1]} frames for {n} samples"
    return spec


def istft(spec: Tensor, geometry: AudioGeometry, window: Tensor) -> Tensor:
    """Least-squares inverse of `stft`: (B, n_fft // 2 + 1, F) -> (B, F * hop).

    Written out with overlap-add because torch.istft refuses un-centred frames whose window envelope touches
    zero at the edges, which the HiFi-GAN padding produces.
    """
    num_frames = spec.shape[-1]
    frames = torch.fft.irfft(spec, n=geometry.n_fft, dim=1)  # (B, n_fft, F)
    win = _full_window(window, geometry.n_fft)
    length = (num_frames - 1) * geometry.hop_length + geometry.n_fft
    fold = dict(output_size=(1, length), kernel_size=(1, geometry.n_fft), stride=(1, geometry.hop_length))
    wave = F.fold(frames * win[:, None], **fold).flatten(1)  # (B, length)
    env = F.fold((win**2)[None, :, None].expand(1, -1, num_frames), **fold).flatten(1)
    wave = wave / env.clamp(min=1e-8)
    left, _ = stft_padding(geometry)
    return wave[:, left:left + num_frames * geometry.hop_length]


def _full_window(window: Tensor, n_fft: int) -> Tensor:
    """A win_length window zero-padded to n_fft in the middle, as torch.stft applies it."""
    left = (n_fft - window.shape[0]) // 2
    return F.pad(window, (left, n_fft - window.shape[0] - left))


class MelSpectrogram(nn.Module):
    """wave (B, n) at geometry.sample_rate -> log-magnitude mel (B, n_mels, n // hop_length)."""

    def __init__(self, geometry: AudioGeometry, clamp_min: float = CLAMP_MIN) -> None:
        super().__init__()
        self.geometry = geometry
        self.clamp_min = clamp_min
        import librosa  # here, not at the top: code that only (de)normalizes mels needs no librosa

        basis = librosa.filters.mel(sr=geometry.sample_rate, n_fft=geometry.n_fft, n_mels=geometry.n_mels,
                                    fmin=geometry.f_min, fmax=geometry.f_max)
        self.register_buffer("mel_basis", torch.from_numpy(basis).float(), persistent=False)  # (n_mels, bins)
        self.register_buffer("window", torch.hann_window(geometry.win_length), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.geometry.hop_length

    def magnitude_mel(self, wave: Tensor) -> Tensor:
        """Linear (not log) magnitude mel, (B, n_mels, F)."""
        spec = stft(wave.float(), self.geometry, self.window).abs()  # (B, bins, F)
        return torch.matmul(self.mel_basis, spec)

    def forward(self, wave: Tensor) -> Tensor:
        mel = self.magnitude_mel(wave)
        return torch.log(mel.clamp(min=self.clamp_min))  # (B, n_mels, F)


def fit_frames(mel: Tensor, num_frames: int, floor: float = LOG_FLOOR) -> Tensor:
    """Crop or right-pad (with the log floor: silence) a log-mel (..., n_mels, F) to num_frames frames."""
    missing = num_frames - mel.shape[-1]
    if missing <= 0:
        return mel[..., :num_frames]
    return F.pad(mel, (0, missing), value=floor)
