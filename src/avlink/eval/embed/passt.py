"""PaSST (Koutini et al., 2022: Patchout faSt Spectrogram Transformer) as the audio embedder of FD-PaSST and
KL-PaSST, the audio metrics of MMAudio's av-benchmark that recent V2A work reports.

We write the network ourselves with the module names of kkoutini/PaSST (`hear21passt`), so the AudioSet
checkpoint `passt-s-f128-p16-s10-ap.476-swa.pt` (arch `passt_s_swa_p16_128_ap476`) loads strictly: a DeiT-B
style ViT (width 768, 12 blocks, 12 heads, LayerNorm eps 1e-6) over a 128-band log-mel image, 16 x 16
patches at stride 10 x 10 (12 frequency x 99 time patches for 10 s), separate learned frequency and time
position embeddings, a class and a distillation token. The embedding is the mean of the two tokens after the
final norm (768-d); the 527 AudioSet logits are `head` (LayerNorm, Linear) of it. Patchout drops patches in
training only; at inference every patch is seen, so there is none here.

Input path, as av-benchmark feeds hear21passt (`get_basic_model(mode="all")` in eval mode):
- 32 kHz mono, cropped to its first 10 s or zero-padded to 10 s (320,000 samples);
- pre-emphasis y[t] = x[t+1] - 0.97 x[t];
- power STFT: n_fft 1024, symmetric Hann window of 800 centred in it, hop 320, centred with reflect padding;
- Kaldi mel filter bank (128 bands, 0 Hz to 15 kHz, triangles linear on the 1127 ln(1 + f/700) scale, no
  Nyquist bin): fmax is 16 kHz - 2000 / 2, the eval value of the published front end;
- log(x + 1e-5), then (x + 4.5) / 5.
`embed` returns the (B, 768) embeddings for FD; `logits` returns the (B, 527) raw logits (KL takes their
softmax, IS their softmax too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.errors import UserError
from avlink.eval.embed.common import (
    Mlp,
    check_waveforms,
    kaldi_mel_banks,
    load_strict,
    read_state_dict,
    resample,
)
from avlink.eval.embedders import Modality, require_weights

SAMPLE_RATE = 32_000
CLIP_SAMPLES = 320_000  # 10 s
N_FFT = 1024
WIN = 800
HOP = 320
N_MELS = 128
FMIN, FMAX = 0.0, 15_000.0
PREEMPHASIS = 0.97
LOG_OFFSET = 1e-5
NUM_CLASSES = 527
WEIGHTS_FILE = "passt-s-f128-p16-s10-ap.476-swa.pt"
WEIGHTS_HINT = (f"{WEIGHTS_FILE} (https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/"
                f"{WEIGHTS_FILE})")


@dataclass(frozen=True)
class PaSSTConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 16
    stride: tuple[int, int] = (10, 10)  # (frequency, time)
    freq_patches: int = 12  # (128 - 16) // 10 + 1
    time_patches: int = 99  # (998 - 16) // 10 + 1: the training clips
    num_classes: int = NUM_CLASSES
    distilled: bool = True

    @property
    def num_tokens(self) -> int:
        return 2 if self.distilled else 1


# ---------------------------------------------------------------- the network (published key names)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B,h,N,d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int, stride: tuple[int, int]):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # (B, C, F', T'), kept 2-D for the separable position embeddings


class PaSST(nn.Module):
    """(B, 1, 128, T) normalised log-mel -> embedding (B, 768) and logits (B, 527)."""

    def __init__(self, cfg: PaSSTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(d, cfg.patch, cfg.stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        self.new_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))  # class / distillation tokens
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, d, cfg.freq_patches, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, d, 1, cfg.time_patches))
        self.blocks = nn.Sequential(*[Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.num_classes))
        self.head_dist = nn.Linear(d, cfg.num_classes) if cfg.distilled else None  # unused at inference

    def tokens(self, mel: Tensor) -> Tensor:
        """(B, 1, 128, T) -> (B, num_tokens + F' * T', C) with position embeddings added."""
        x = self.patch_embed(mel)  # (B, C, F', T')
        b, _, f, t = x.shape
        assert f == self.cfg.freq_patches and t <= self.cfg.time_patches, \
            f"{f} x {t} patches exceed the {self.cfg.freq_patches} x {self.cfg.time_patches} position grid"
        x = x + self.time_new_pos_embed[..., :t] + self.freq_new_pos_embed  # short clips: the first times
        x = x.flatten(2).transpose(1, 2)  # (B, F'T', C), frequency-major
        special = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        special = torch.cat(special, dim=1) + self.new_pos_embed  # (1, num_tokens, C)
        return torch.cat([special.expand(b, -1, -1), x], dim=1)

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(self.blocks(self.tokens(mel)))
        features = x[:, :self.cfg.num_tokens].mean(dim=1)  # (B, C): mean of class and distillation token
        return features, self.head(features)


# ---------------------------------------------------------------- preprocessing


class PaSSTMel(nn.Module):
    """Waveform (B, n) at 32 kHz -> normalised log-mel (B, 1, 128, frames): the eval path of the published
    front end (no frequency jitter, no masking)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN, periodic=False), persistent=False)
        banks = kaldi_mel_banks(N_MELS, N_FFT, SAMPLE_RATE, FMIN, FMAX)  # (128, 513)
        self.register_buffer("mel_basis", banks, persistent=False)

    def power_spectrum(self, wave: Tensor) -> Tensor:
        """(B, n) -> (B, 513, frames) power of the pre-emphasised signal."""
        x = wave[:, 1:] - PREEMPHASIS * wave[:, :-1]  # (B, n - 1)
        spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WIN, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        return spec.real.square() + spec.imag.square()

    def forward(self, wave: Tensor) -> Tensor:
        mel = self.mel_basis @ self.power_spectrum(wave.float())  # (B, 128, frames)
        return ((mel + LOG_OFFSET).log() + 4.5).div(5.0)[:, None]


def fit_clip(x: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """(B, n) -> (B, length): the first `length` samples, or zero-padded at the end (as av-benchmark)."""
    return x[:, :length] if x.shape[1] >= length else np.pad(x, ((0, 0), (0, length - x.shape[1])))


# ---------------------------------------------------------------- weights


def infer_config(state: dict[str, Tensor], num_heads: int | None, stride: tuple[int, int]) -> PaSSTConfig:
    """Sizes from the tensor shapes; heads and stride are not in them (published: 64-d heads, stride 10)."""
    width = state["cls_token"].shape[-1]
    depth = 0
    while f"blocks.{depth}.norm1.weight" in state:
        depth += 1
    return PaSSTConfig(
        embed_dim=width, depth=depth, num_heads=num_heads or max(1, width // 64),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        patch=state["patch_embed.proj.weight"].shape[-1], stride=stride,
        freq_patches=state["freq_new_pos_embed"].shape[2], time_patches=state["time_new_pos_embed"].shape[3],
        num_classes=state["head.1.weight"].shape[0], distilled="dist_token" in state)


def build_passt(state: dict[str, Tensor], path: Path, num_heads: int | None,
                stride: tuple[int, int]) -> PaSST:
    needed = ("cls_token", "patch_embed.proj.weight", "freq_new_pos_embed", "time_new_pos_embed",
              "head.1.weight", "blocks.0.norm1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{path}: not a PaSST state dict (no {', '.join(missing[:3])})")
    if state["patch_embed.proj.weight"].shape[1] != 1:
        raise UserError(f"{path}: PaSST patch embedding takes {state['patch_embed.proj.weight'].shape[1]} "
                        "input channels; the mel front end gives 1")
    return PaSST(infer_config(state, num_heads, stride))


# ---------------------------------------------------------------- the embedder


class PaSSTEmbedder:
    """FD-PaSST (768-d embeddings) and KL / IS on PaSST's 527 AudioSet logits."""

    name = "passt"
    modalities: tuple[Modality, ...] = ("audio",)
    fps = None

    def __init__(self, model: PaSST, device: str | torch.device = "cpu", input_rate: int | None = None,
                 batch_size: int = 16):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.mel = PaSSTMel().to(self.device)
        self.sample_rate = input_rate or SAMPLE_RATE  # the rate `embed` takes; resampled to 32 kHz inside
        self.batch_size = batch_size
        self.dim = model.cfg.embed_dim

    def prepare_audio(self, x: np.ndarray) -> np.ndarray:
        """(B, n) at `sample_rate` -> (B, 320000) at 32 kHz."""
        x = check_waveforms(x, "audio", self.name, allow_empty=True)  # an empty batch gives (0, 768)
        return fit_clip(resample(x, self.sample_rate, SAMPLE_RATE))

    @torch.no_grad()
    def _run(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor]:
        if modality != "audio":
            raise ValueError(f"{self.name} embeds audio only, not {modality}")
        wave = self.prepare_audio(x)
        features, logits = [], []
        for i in range(0, len(wave), self.batch_size):
            mel = self.mel(torch.from_numpy(wave[i:i + self.batch_size]).to(self.device))  # (b, 1, 128, 1000)
            f, lg = self.model(mel)
            features.append(f.float().cpu())
            logits.append(lg.float().cpu())
        if not features:  # an empty batch
            return torch.zeros(0, self.dim), torch.zeros(0, self.model.cfg.num_classes)
        return torch.cat(features), torch.cat(logits)

    def embed(self, x: np.ndarray, modality: Modality = "audio") -> Tensor:
        return self._run(x, modality)[0]  # (B, 768)

    def logits(self, x: np.ndarray, modality: Modality = "audio") -> Tensor | None:
        return self._run(x, modality)[1]  # (B, 527)


def load(weights: Path | None = None, *, device: str = "cpu", input_rate: int | None = None,
         batch_size: int = 16, num_heads: int | None = None,
         stride: tuple[int, int] = (10, 10)) -> PaSSTEmbedder:
    """PaSST from a local AudioSet checkpoint (sizes read from its shapes). `input_rate`: the rate of the
    waveforms `embed` will get (default 32 kHz); others are resampled with soxr."""
    path = require_weights(weights, "passt", WEIGHTS_HINT, "the passt weights path")
    state = read_state_dict(path, "PaSST")
    model = build_passt(state, path, num_heads, stride)
    load_strict(model, state, path, "PaSST")
    return PaSSTEmbedder(model, device=device, input_rate=input_rate, batch_size=batch_size)
