"""PANNs CNN14 (Kong et al., 2020), the AudioSet tagger behind KL-PANNs, IS-PANNs and FD-PANNs in V2A papers.

Written from the published architecture (qiuqiangkong/audioset_tagging_cnn, `pytorch/models.py` Cnn14, with
its torchlibrosa front end) so that the released checkpoints load strictly by their own key names:
- "32k" `Cnn14_mAP=0.431.pth` (the paper's model): 32 kHz, n_fft 1024, hop 320, 64 mels 50-14000 Hz;
- "16k" `Cnn14_16k_mAP=0.438.pth` (the one av-benchmark uses): 16 kHz, n_fft 512, hop 160, 64 mels 50-8000 Hz.
Both are {"model": state_dict, ...}; the variant is read off the checkpoint's mel filter shape. The files also
hold the training sampler's state as numpy arrays, which `common.read_weights` allows (with weights_only=True
still on).

Front end, as torchlibrosa computes it: reflect-pad n_fft / 2 on both sides, frames every hop, periodic Hann
window over n_fft samples, power spectrum |X|^2 (the DFT is a frozen Conv1d whose weights the checkpoint holds
as `spectrogram_extractor.stft.conv_real/conv_imag.weight`), Slaney mel filters from librosa
(`logmel_extractor.melW`, (bins, 64)), then 10 log10(max(mel, 1e-10)) dB with ref 1.0 and no top_db.
We build these tensors ourselves (so a fresh instance computes the right features) and the checkpoint's copies
load over them; `load` refuses a checkpoint whose front end is not the analysis of its variant.

Network: batch norm over the 64 mel bins (bn0), six conv blocks (two 3x3 conv-BN-ReLU, then 2x2 average pool;
1x1 after the last) with 64..2048 channels, mean over mel, max + mean over time, fc1 + ReLU -> the 2048-d
embedding, fc_audioset -> 527 AudioSet classes. Inference only: dropout and SpecAugment are training-time.

Logits: `logits` returns the 527 values before the sigmoid. The V2A metric code works on these: av-benchmark
(KL-PANNs with softmax and with sigmoid, IS-PANNs with softmax) and audioldm_eval both read the pre-sigmoid
"logits" output of Cnn14; `probabilities` gives the published sigmoid "clipwise_output".

A clip shorter than 32 frames (0.31 s) is right-padded with silence, the least the five 2x2 pools accept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.errors import UserError
from avlink.eval.embed.common import check_waveforms, load_strict, pad_to, resample
from avlink.eval.embedders import Modality, require_weights
from avlink.weights import read_weights

CHANNELS = (64, 128, 256, 512, 1024, 2048)
NUM_CLASSES = 527
AMIN = 1e-10
REF = 1.0
WEIGHTS_URL = "https://zenodo.org/record/3987831"


@dataclass(frozen=True)
class Cnn14Frontend:
    """The log-mel analysis a CNN14 checkpoint was trained on."""

    sample_rate: int
    n_fft: int
    hop_length: int
    f_min: float
    f_max: float
    n_mels: int = 64
    weights_file: str = ""

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def min_samples(self) -> int:
        """The fewest samples giving 32 frames (centred: n // hop + 1 frames), what five 2x2 pools need."""
        return 31 * self.hop_length


VARIANTS: dict[str, Cnn14Frontend] = {
    "32k": Cnn14Frontend(32_000, 1024, 320, 50.0, 14_000.0, weights_file="Cnn14_mAP=0.431.pth"),
    "16k": Cnn14Frontend(16_000, 512, 160, 50.0, 8_000.0, weights_file="Cnn14_16k_mAP=0.438.pth"),
}


# ---------------------------------------------------------------- front end (key names from torchlibrosa)


def dft_basis(n_fft: int) -> tuple[Tensor, Tensor]:
    """Periodic-Hann-windowed real and imaginary DFT rows, each (n_fft // 2 + 1, 1, n_fft) float32."""
    k = torch.arange(n_fft // 2 + 1, dtype=torch.int64)[:, None]
    n = torch.arange(n_fft, dtype=torch.int64)[None, :]
    angle = 2 * torch.pi * ((k * n) % n_fft).double() / n_fft  # reduced mod n_fft: exact phases in float64
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    real, imag = torch.cos(angle) * window, -torch.sin(angle) * window  # e^{-i 2 pi k n / N}
    return real.float()[:, None, :], imag.float()[:, None, :]


class FrozenDFT(nn.Module):
    """Holds the DFT as two strided Conv1d weights, the layout the checkpoint stores."""

    def __init__(self, frontend: Cnn14Frontend):
        super().__init__()
        conv = dict(in_channels=1, out_channels=frontend.num_bins, kernel_size=frontend.n_fft,
                    stride=frontend.hop_length, bias=False)
        self.conv_real = nn.Conv1d(**conv)
        self.conv_imag = nn.Conv1d(**conv)
        real, imag = dft_basis(frontend.n_fft)
        with torch.no_grad():
            self.conv_real.weight.copy_(real)
            self.conv_imag.weight.copy_(imag)


class PowerSpectrogram(nn.Module):
    """(B, n) -> (B, 1, T, bins) power, T = n // hop + 1 (centred frames, reflect padding)."""

    def __init__(self, frontend: Cnn14Frontend):
        super().__init__()
        self.pad = frontend.n_fft // 2
        self.stft = FrozenDFT(frontend)

    def forward(self, wave: Tensor) -> Tensor:
        assert wave.shape[-1] > self.pad, f"reflect padding needs more than {self.pad} samples"
        x = F.pad(wave[:, None, :], (self.pad, self.pad), mode="reflect")  # (B, 1, n + n_fft)
        power = self.stft.conv_real(x) ** 2 + self.stft.conv_imag(x) ** 2  # (B, bins, T)
        return power.transpose(1, 2)[:, None]  # (B, 1, T, bins)


def mel_filters(frontend: Cnn14Frontend) -> Tensor:
    """(bins, n_mels) librosa Slaney filters, the call torchlibrosa makes."""
    basis = librosa.filters.mel(sr=frontend.sample_rate, n_fft=frontend.n_fft, n_mels=frontend.n_mels,
                                fmin=frontend.f_min, fmax=frontend.f_max)
    return torch.from_numpy(basis.T.copy()).float()


class LogMel(nn.Module):
    """(..., bins) power -> (..., n_mels) dB = 10 log10(max(mel, amin)) - 10 log10(max(amin, ref))."""

    def __init__(self, frontend: Cnn14Frontend):
        super().__init__()
        self.melW = nn.Parameter(torch.empty(frontend.num_bins, frontend.n_mels), requires_grad=False)
        with torch.no_grad():
            self.melW.copy_(mel_filters(frontend))

    def forward(self, power: Tensor) -> Tensor:
        mel = power @ self.melW
        return 10.0 * torch.log10(mel.clamp(min=AMIN)) - 10.0 * math.log10(max(AMIN, REF))


# ---------------------------------------------------------------- the network (models.py Cnn14)


class ConvBlock(nn.Module):
    """Two 3x3 conv (no bias) -> BN -> ReLU, then an average pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, pool: int) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool)


class Cnn14(nn.Module):
    """(B, n) waveform -> 2048-d embedding and 527 pre-sigmoid logits.

    `width` scales every channel count and fc1 (1 = the published network; small values build tiny test
    instances with the same key names); the embedding is as wide as the last conv block.
    """

    def __init__(self, frontend: Cnn14Frontend = VARIANTS["32k"], width: float = 1.0,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.frontend = frontend
        self.spectrogram_extractor = PowerSpectrogram(frontend)
        self.logmel_extractor = LogMel(frontend)
        self.bn0 = nn.BatchNorm2d(frontend.n_mels)
        widths = [max(1, round(c * width)) for c in CHANNELS]
        for i, (c_in, c_out) in enumerate(zip([1, *widths[:-1]], widths, strict=True), start=1):
            self.add_module(f"conv_block{i}", ConvBlock(c_in, c_out))
        self.embed_dim = widths[-1]
        self.fc1 = nn.Linear(self.embed_dim, self.embed_dim)
        self.fc_audioset = nn.Linear(self.embed_dim, num_classes)

    def log_mel(self, wave: Tensor) -> Tensor:
        """(B, n) -> (B, 1, T, 64) dB log mel, the network's input features."""
        return self.logmel_extractor(self.spectrogram_extractor(wave))

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        assert wave.ndim == 2, f"expected (B, n) waveforms, got {tuple(wave.shape)}"
        x = self.log_mel(wave)  # (B, 1, T, 64)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise each mel bin
        blocks = [getattr(self, f"conv_block{i}") for i in range(1, len(CHANNELS) + 1)]
        for block in blocks[:-1]:
            x = block(x, pool=2)  # time and mel halve five times: (B, 1024, T / 32, 2)
        x = blocks[-1](x, pool=1)  # (B, 2048, T / 32, 2)
        x = x.mean(dim=3)  # (B, 2048, T / 32)
        x = x.amax(dim=2) + x.mean(dim=2)  # (B, 2048)
        embedding = F.relu(self.fc1(x))  # (B, 2048)
        return embedding, self.fc_audioset(embedding)  # (B, 2048), (B, 527)


# ---------------------------------------------------------------- the embedder


class PANNsEmbedder:
    """FD / KL / IS through CNN14; `rate=` resamples inputs given at another rate."""

    name = "panns-cnn14"
    modalities: tuple[Modality, ...] = ("audio",)
    fps = None

    def __init__(self, model: Cnn14, device: str | torch.device = "cpu", batch_size: int = 16):
        assert batch_size > 0, f"batch_size must be > 0, got {batch_size}"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.sample_rate = model.frontend.sample_rate
        self.batch_size = batch_size

    @torch.no_grad()
    def run(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None
            ) -> tuple[Tensor, Tensor]:
        """(B, n) waveforms -> embeddings (B, 2048) and pre-sigmoid logits (B, 527), float32 on the CPU."""
        waves = resample(check_waveforms(x, modality, self.name), rate, self.sample_rate)
        wave = pad_to(torch.from_numpy(waves), self.model.frontend.min_samples)
        embeddings, logits = [], []
        for start in range(0, len(wave), self.batch_size):
            emb, logit = self.model(wave[start:start + self.batch_size].to(self.device))
            embeddings.append(emb.float().cpu())
            logits.append(logit.float().cpu())
        return torch.cat(embeddings), torch.cat(logits)

    def embed(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None) -> Tensor:
        return self.run(x, modality, rate)[0]

    def logits(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None) -> Tensor:
        return self.run(x, modality, rate)[1]

    def probabilities(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None) -> Tensor:
        """The published "clipwise_output": sigmoid of the logits, (B, 527)."""
        return torch.sigmoid(self.logits(x, modality, rate))


# ---------------------------------------------------------------- weights


FRONTEND_KEYS = ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
                 "logmel_extractor.melW")


def model_state(raw: object, path: Path) -> dict[str, Tensor]:
    """The state dict inside a PANNs checkpoint ({"model": ...}) or a bare one."""
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("logmel_extractor.melW"), Tensor):
        raise UserError(f"{path}: holds no CNN14 state dict (no model / logmel_extractor.melW)")
    return state


def variant_of(state: dict[str, Tensor], path: Path) -> str:
    """Which published front end a checkpoint's mel filters (bins, 64) belong to."""
    bins = tuple(state["logmel_extractor.melW"].shape)[0]
    for name, frontend in VARIANTS.items():
        if bins == frontend.num_bins:
            return name
    known = ", ".join(f"{n}: {f.num_bins}" for n, f in VARIANTS.items())
    raise UserError(f"{path}: mel filters for {bins} FFT bins match no CNN14 variant ({known})")


def check_frontend(model: Cnn14, path: Path, tolerance: float = 1e-4) -> None:
    """Refuse a checkpoint whose loaded front end is not the analysis its variant computes."""
    real, imag = dft_basis(model.frontend.n_fft)
    expected = dict(zip(FRONTEND_KEYS, (real, imag, mel_filters(model.frontend)), strict=True))
    loaded = model.state_dict()
    worst = max((loaded[k] - expected[k]).abs().max().item() for k in FRONTEND_KEYS)
    if worst > tolerance:
        f = model.frontend
        raise UserError(f"{path}: front end differs from the CNN14 analysis at {f.sample_rate} Hz, "
                        f"n_fft {f.n_fft}, {f.f_min:g}-{f.f_max:g} Hz (max difference {worst:.3g})")


def load(weights: Path | None = None, *, variant: str | None = None, device: str | torch.device = "cpu",
         batch_size: int = 16, width: float = 1.0) -> PANNsEmbedder:
    """CNN14 from a released checkpoint; the variant (32k / 16k) is read off the file unless given."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown CNN14 variant {variant!r}; known: {', '.join(VARIANTS)}")
    names = " or ".join(f.weights_file for f in VARIANTS.values())
    path = require_weights(weights, "panns-cnn14", f"{names} ({WEIGHTS_URL})", "the panns-cnn14 weights path")
    state = model_state(read_weights(path, "CNN14"), path)
    found = variant_of(state, path)
    if variant is not None and variant != found:
        raise UserError(f"{path}: a CNN14 {found} checkpoint, not {variant}")
    with torch.device("meta"):  # the file's tensors take the place of these
        model = Cnn14(VARIANTS[found], width=width)
    load_strict(model, state, path, "CNN14")
    check_frontend(model, path)
    return PANNsEmbedder(model, device=device, batch_size=batch_size)
