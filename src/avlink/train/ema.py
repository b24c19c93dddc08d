"""Exponential moving average of the trainable weights; validation and export use it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Shadow copies of the parameters that require grad (fp32), updated after each optimizer step.

    decay follows a warm-up, min(decay, (1 + n) / (10 + n)) at update n, so that early averages are not dominated
    by the random init.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {name: params[name].detach().float().clone() for name in self.names}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        params = dict(module.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1 - d)
        self.updates += 1

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into the module (for validation or export)."""
        params = dict(module.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.shadow[name])
        try:
            yield module
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(backup[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.shadow = {name: state["shadow"][name].float().clone() for name in self.names}
