"""What the evaluation embedders share: the input contracts, resampling, frame conversion, reading a foreign
weight file safely and loading it strictly by its published key names, and a few network pieces.

Weight files (published networks come as pickled .pt / .pth files) are read by `avlink.weights.read_weights`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.errors import UserError
from avlink.eval.embedders import Modality
from avlink.weights import read_weights

# ---------------------------------------------------------------- audio input


def check_waveforms(x: np.ndarray, modality: Modality, network: str, allow_empty: bool = False) -> np.ndarray:
    """The audio input contract: (B, n) finite float waveforms, n > 0, returned as float32. B = 0 is refused
    unless `allow_empty` (an embedder that returns (0, D) for an empty batch)."""
    if modality != "audio":
        raise ValueError(f"{network}: this call reads audio only, not {modality}")
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        shape = getattr(x, "shape", None)
        raise ValueError(f"{network}: expected float waveforms (B, n), got {type(x).__name__} {shape}")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{network}: no audio to embed (shape {x.shape})")
    if not np.isfinite(x).all():
        raise ValueError(f"{network}: waveforms hold NaN or infinite samples")
    return x.astype(np.float32, copy=False)


def resample(x: np.ndarray, rate: int | None, target: int) -> np.ndarray:
    """(B, n) at `rate` -> (B, n') float32 at `target` with soxr (high quality); None or equal rates pass
    through unchanged."""
    if rate is None or rate == target:
        return x
    assert rate > 0 and target > 0, f"sample rates must be positive, got {rate} -> {target}"
    out = soxr.resample(np.ascontiguousarray(x.T), rate, target, quality="HQ")  # soxr wants (n, channels)
    return np.ascontiguousarray(out.reshape(-1, x.shape[0]).T, dtype=np.float32)


def pad_to(wave: Tensor, min_samples: int) -> Tensor:
    """Right-pad (B, n) with silence to at least min_samples."""
    return F.pad(wave, (0, max(0, min_samples - wave.shape[-1])))


# ---------------------------------------------------------------- video input


def check_frames(x: np.ndarray, modality: Modality, network: str) -> None:
    """The video input contract: (B, T, H, W, 3) uint8 RGB with at least one frame."""
    if modality != "video":
        raise ValueError(f"{network} embeds video only, not {modality}")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{network}: expected uint8 frames (B, T, H, W, 3), got {type(x).__name__} {shape}")
    if x.size == 0:
        raise ValueError(f"{network}: no frames to embed (shape {x.shape})")


def as_tensor(frames: np.ndarray | Tensor) -> Tensor:
    """A tensor of the frames; numpy input is copied (decoded frames may be read-only buffers)."""
    return frames if isinstance(frames, Tensor) else torch.from_numpy(np.array(frames))


def resize_short_side_bicubic(images: Tensor, size: int, pil: bool = False) -> Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, h, w) float holding 8-bit values: short side -> size, long side
    truncated, bicubic with antialias (a = -0.5, the filter of PIL and of torchvision's tensor resize).

    `pil`: as PIL, resample the width, then the height, rounding to 8 bits after each pass (bicubic
    overshoot is clipped in between); otherwise as torchvision on a uint8 tensor, one float pass rounded once.
    """
    h, w = images.shape[-2:]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = images.float()
    passes = [(h, new_w), (new_h, new_w)] if pil else [(new_h, new_w)]
    for shape in passes:
        x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    return x


def center_crop(x: Tensor, size: int) -> Tensor:
    """torchvision's CenterCrop offsets (rounded halves) on (..., H, W)."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


# ---------------------------------------------------------------- weight files


def _all_tensors(d: dict) -> bool:
    return all(isinstance(v, Tensor) for v in d.values())


def state_dict_in(raw: object, path: Path, network: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint: a plain state dict, or one nested under `state_dict` / `model` (training
    checkpoints), less a DDP `module.` prefix. Anything else is refused in one line."""
    while isinstance(raw, dict) and not _all_tensors(raw):
        inner = next((raw[k] for k in ("state_dict", "model") if isinstance(raw.get(k), dict)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, dict) or not raw or not _all_tensors(raw):
        raise UserError(f"{path}: holds no {network} state dict (expected a dict of tensors, "
                        "or one under 'state_dict' or 'model')")
    if all(isinstance(k, str) and k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw


def read_state_dict(path: Path, network: str) -> dict[str, Tensor]:
    """read_weights, then state_dict_in: the tensors of a weight file, or one line saying why not."""
    return state_dict_in(read_weights(path, network), path, network)


def load_strict(model: nn.Module, state: object, path: Path, network: str) -> None:
    """Put every tensor in place by its published name, or say in one line what does not match.

    The model may be built on the meta device: the file's tensors are assigned, not copied, so a published
    network need not be initialised at random first. Files saved before PyTorch 0.4 carry no batch-norm
    `num_batches_tracked` counters; they only matter in training, so a missing counter is set to zero (a real
    zero, not one shaped like the model's, which may be a meta tensor). Tensors are cast to the model's
    dtypes (a float64 export runs as float32).
    """
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        raise UserError(f"{path}: holds no {network} state dict (expected a dict of tensors)")
    expected = model.state_dict()
    counters = {k: torch.zeros((), dtype=torch.long) for k in expected
                if k.endswith("num_batches_tracked") and k not in state}
    state = {**state, **counters}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        details = "; ".join(f"{what} {keys[:3]}" for what, keys in found if keys)
        raise UserError(f"{path}: not a {network} state dict in the published layout ({details})")
    typed = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(typed, strict=True, assign=True)


# ---------------------------------------------------------------- network pieces


class Scale:
    """Channel counts of a network `width` times the published one (width 1 = the real network)."""

    def __init__(self, width: float):
        assert width > 0, f"width must be positive, got {width}"
        self.width = width

    def __call__(self, channels: int) -> int:
        return max(1, round(channels * self.width))


class Mlp(nn.Module):
    """The transformer MLP of timm-style ViTs: keys `fc1.*`, `fc2.*`, exact GELU between."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InProjAttention(nn.Module):
    """Batch-first multi-head self-attention with the parameters of torch's nn.MultiheadAttention:
    `in_proj_weight` / `in_proj_bias` (q, k, v stacked), `out_proj`, and with `bias_kv` the learned key and
    value appended to every sequence (`bias_k`, `bias_v`)."""

    def __init__(self, dim: int, heads: int, bias_kv: bool = False):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.bias_k = nn.Parameter(torch.zeros(1, 1, dim)) if bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(1, 1, dim)) if bias_kv else None
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (B, N, C) each
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(b, 1, c)], dim=1)  # (B, N + 1, C)
            v = torch.cat([v, self.bias_v.expand(b, 1, c)], dim=1)

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # (B, h, L, d)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, h, N, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float) -> Tensor:
    """(n_mels, n_fft // 2 + 1) Kaldi filter bank: triangles linear in mel (1127 ln(1 + f / 700)), zero weight
    on the Nyquist bin."""
    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    delta = (mel(fmax) - mel(fmin)) / (n_mels + 1)
    left = mel(fmin) + delta * np.arange(n_mels)[:, None]  # (n_mels, 1)
    centre, right = left + delta, left + 2 * delta
    bins = mel(sample_rate / n_fft * np.arange(n_fft // 2))[None]  # (1, n_fft / 2)
    banks = np.maximum(0.0, np.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)))
    return torch.from_numpy(np.pad(banks, ((0, 0), (0, 1)))).float()
