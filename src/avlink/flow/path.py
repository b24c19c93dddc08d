"""The rectified-flow path (Eq. 1), its training times and loss (Eq. 2). t = 0 is noise, t = 1 is data."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]  # velocity(x_t, t (B,)) -> dx/dt


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t * x1 + (1 - t) * x0, t (B,)."""
    t = _bcast(t, x1)
    return t * x1 + (1 - t) * x0


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    return x1 - x0


def logit_normal(n: int, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Training times t = sigmoid(N(mean, std)) (the paper's p_t, after SD3)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def uniform(n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    return torch.rand(n, generator=generator, device=device)


def flow_matching_errors(
    velocity: Velocity, x1: Tensor, t: Tensor, x0: Tensor | None = None, mask: Tensor | None = None,
    *, generator: torch.Generator | None = None,
) -> Tensor:
    """(B,) per-sample || v(x_t, t) - (x1 - x0) ||^2, mean over elements; mask (broadcastable) excludes padding."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype) if x0 is None else x0
    diff = velocity(interpolate(x0, x1, t), t) - target_velocity(x0, x1)
    # At least fp32 for the reduction (bf16 is raised to it); fp64 stays fp64.
    err = diff.to(torch.promote_types(diff.dtype, torch.float32)).square().flatten(1)
    if mask is None:
        return err.mean(1)
    mask = mask.to(err.dtype).expand_as(x1).flatten(1)
    return (err * mask).sum(1) / mask.sum(1).clamp(min=1)


def flow_matching_loss(
    velocity: Velocity, x1: Tensor, t: Tensor, x0: Tensor | None = None, mask: Tensor | None = None,
    *, generator: torch.Generator | None = None,
) -> Tensor:
    """The rectified-flow objective (Eq. 2), averaged over the batch."""
    return flow_matching_errors(velocity, x1, t, x0, mask, generator=generator).mean()
