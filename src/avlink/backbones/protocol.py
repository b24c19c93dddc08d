"""The Backbone protocol: all that fusion code may know of a generator.

A backbone turns (x_t, t, text) into a `StreamState`, runs any range of its blocks on it, and turns the final
state into a velocity. The linked model walks the fusion points with these three calls, so another pretrained
generator joins AV-Link by writing one adapter to this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class TextCond:
    """Token states of a text encoder: tokens (B, L, Dt), mask (B, L) bool (True = real token)."""

    tokens: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        assert self.tokens.ndim == 3, f"text tokens must be (B, L, Dt), got {tuple(self.tokens.shape)}"
        assert self.mask.shape == self.tokens.shape[:2], (
            f"text mask {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape)}"
        )

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def cat_batch(self, other: TextCond) -> TextCond:
        """Join two batches along B, padding the shorter one's tokens with masked zeros."""
        length = max(self.tokens.shape[1], other.tokens.shape[1])
        parts = [_pad_text(x, length) for x in (self, other)]
        return TextCond(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))

    def to(self, device: torch.device | str) -> TextCond:
        return TextCond(self.tokens.to(device), self.mask.to(device))


def _pad_text(text: TextCond, length: int) -> TextCond:
    missing = length - text.tokens.shape[1]
    if missing == 0:
        return text
    return TextCond(torch.nn.functional.pad(text.tokens, (0, 0, 0, missing)),
                    torch.nn.functional.pad(text.mask, (0, missing), value=False))


@dataclass
class StreamState:
    """One stream between blocks.

    x:      (B, N, D) hidden tokens
    t:      (B,) flow time of this stream
    c:      (B, D) adaLN conditioning of this backbone (its timestep embedding)
    times:  (N,) start time of each token in seconds (float64), used to align streams
    angles: RoPE angles of the backbone's own self-attention, (N, head_dim / 2)
    text:   (B, L, D) text tokens projected to the backbone's width; text_mask (B, L)
    grid:   the token layout the head needs to rebuild the output, e.g. (T', H', W') or (Ta,)
    """

    x: Tensor
    t: Tensor
    c: Tensor
    times: Tensor = field(metadata={"batch": False})
    angles: Tensor = field(metadata={"batch": False})
    text: Tensor
    text_mask: Tensor
    grid: tuple[int, ...]

    def with_x(self, x: Tensor) -> StreamState:
        assert x.shape == self.x.shape, f"stream shape changed: {tuple(self.x.shape)} -> {tuple(x.shape)}"
        return replace(self, x=x)

    def with_text(self, text: Tensor, text_mask: Tensor) -> StreamState:
        return replace(self, text=text, text_mask=text_mask)


@runtime_checkable
class Backbone(Protocol):
    hidden_dim: int
    num_blocks: int
    eta: float  # token positions per second along time

    def embed(self, x_t: Tensor, t: Tensor, text: TextCond | None) -> StreamState: ...

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState: ...

    def head(self, state: StreamState) -> Tensor: ...
