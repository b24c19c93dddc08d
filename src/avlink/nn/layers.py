"""Small layers shared by the backbones and the Fusion Blocks: timestep embedding, adaLN, MLP."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """t (B,) flow time in [0, 1] -> (B, dim) sinusoidal features.

    t is scaled by 1000 so that the frequencies cover the range DiT's embedder was designed for.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class MLP(nn.Module):
    # Without autograd, long sequences go through in chunks of rows whose hidden activations take about this
    # many bytes, so that the bias, GELU and second product read them from cache instead of main memory.
    chunk_bytes = 4 << 20

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        rows = self.chunk_rows(x)
        if torch.is_grad_enabled() or rows * 2 > x.shape[:-1].numel():
            return self.fc2(self.act(self.fc1(x)))
        flat = x.reshape(-1, x.shape[-1])  # (R, dim)
        out = [self.fc2(self.act(self.fc1(chunk))) for chunk in flat.split(rows)]
        return torch.cat(out).view(*x.shape[:-1], -1)

    def chunk_rows(self, x: Tensor) -> int:
        """Rows per chunk: chunk_bytes of hidden activations, a multiple of 64 rows, at least 64."""
        per_row = self.fc1.out_features * x.element_size()
        return max(64, self.chunk_bytes // per_row // 64 * 64)


class AdaLN(nn.Module):
    """c (B, C) -> chunks of per-channel modulation, each (B, 1, size). Zero at init (adaLN-Zero)."""

    def __init__(self, cond_dim: int, sizes: tuple[int, ...]):
        super().__init__()
        self.sizes = sizes
        self.linear = nn.Linear(cond_dim, sum(sizes))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(nn.functional.silu(c))[:, None].split(self.sizes, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D), shift/scale (B, 1, D) -> x * (1 + scale) + shift, in one pass over x."""
    return torch.addcmul(shift, x, 1 + scale)


def modulated_norm(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """modulate(norm(x), shift, scale) for an affine-free LayerNorm.

    With one modulation row (batch 1, as in sampling) it is the LayerNorm's own affine step, so the normalised
    tensor is never written out; otherwise the two steps.
    """
    one_row = x.shape[0] == 1 and shift.numel() == scale.numel() == x.shape[-1]
    if norm.weight is None and one_row and x.dtype == shift.dtype == scale.dtype:
        return nn.functional.layer_norm(x, norm.normalized_shape, 1 + scale.reshape(-1), shift.reshape(-1), norm.eps)
    return modulate(norm(x), shift, scale)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The affine-free LayerNorm that adaLN modulates."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

