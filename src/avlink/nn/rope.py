"""Rotary position embedding as small pure functions. Positions are inputs: callers compute them.

Angles are built in float64 and applied in float32, so that a token at 5 s and one at 5 s + 1/eta get rotations
that differ by exactly the step, whatever the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(pos: Tensor, dim: int, theta: float = 10000.0) -> Tensor:
    """pos (..., N) real positions -> angles (..., N, dim // 2) float32, one frequency per channel pair."""
    assert dim % 2 == 0, f"RoPE dim must be even, got {dim}"
    omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    return (pos.to(torch.float64)[..., None] * omega).float()


def rope_angles_nd(ids: Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """ids (..., N, n_axes) -> angles (..., N, sum(axes_dim) // 2): each axis rotates its own channel pairs."""
    assert ids.shape[-1] == len(axes_dim), f"ids have {ids.shape[-1]} axes, axes_dim {axes_dim}"
    return torch.cat([rope_angles(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-1)


def time_aligned_positions(times: Tensor, eta_v: float) -> Tensor:
    """The paper's tau(n): a token's time in seconds x eta_v.

    A video token at frame index n sits at n; an audio token with index n sits at n * eta_v / eta_a. Both are
    "seconds x eta_v", which is how the callers compute them from each token's start time.
    """
    return times * eta_v


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """x (B, H, N, Dh), angles (N, Dh/2) or (B, N, Dh/2) -> x with consecutive channel pairs rotated."""
    assert x.shape[-1] == 2 * angles.shape[-1], f"head dim {x.shape[-1]} vs {angles.shape[-1]} angles"
    if angles.ndim == 3:
        angles = angles[:, None]  # (B, 1, N, Dh/2): broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, N, Dh/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)
