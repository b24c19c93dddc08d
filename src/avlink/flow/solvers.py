"""ODE solvers from noise (t = 0) to data (t = 1) over any velocity(x, t) callable. A solver never knows which
network it drives."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from avlink.flow.path import Velocity

Step = Callable[[Velocity, Tensor, Tensor, Tensor], Tensor]


def _t(x: Tensor, value: Tensor) -> Tensor:
    return value.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


def euler_step(v: Velocity, x: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    return x + (t1 - t0) * v(x, _t(x, t0))


def midpoint_step(v: Velocity, x: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    h = t1 - t0
    x_mid = x + 0.5 * h * v(x, _t(x, t0))
    return x + h * v(x_mid, _t(x, t0 + 0.5 * h))


def heun_step(v: Velocity, x: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    h = t1 - t0
    d0 = v(x, _t(x, t0))
    d1 = v(x + h * d0, _t(x, t1))
    return x + 0.5 * h * (d0 + d1)


SOLVERS: dict[str, Step] = {"euler": euler_step, "midpoint": midpoint_step, "heun": heun_step}
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}  # velocity evaluations per step


def steps_for_evals(method: str, evals: int) -> int | None:
    """The steps of `method` that cost exactly `evals` velocity evaluations; None when it cannot."""
    if method not in EVALS_PER_STEP:
        raise ValueError(f"unknown solver {method!r}; choose one of {', '.join(EVALS_PER_STEP)}")
    steps, rest = divmod(evals, EVALS_PER_STEP[method])
    return steps if rest == 0 and steps >= 1 else None


def solve(
    velocity: Velocity, x0: Tensor, steps: int = 64, method: str = "euler",
    t_start: float = 0.0, t_end: float = 1.0, progress: bool = False,
) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t_start to t_end in `steps` uniform steps."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = SOLVERS[method]
    ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    x = x0
    for i in tqdm(range(steps), desc=f"{method} sampling", disable=not progress, leave=False):
        x = step(velocity, x, ts[i], ts[i + 1])
    return x
