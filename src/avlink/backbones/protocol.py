"""The Backbone protocol: all that fusion code may know of a generator.

A backbone turns (x_t, t, text) into a `StreamState`, runs any range of its blocks on it, and turns the final
state into a velocity. The linked model walks the fusion points with these three calls, so another pretrained
generator joins AV-Link by writing one adapter to this protocol.

Optional: `prepare_text(text, batch_size, stop=None) -> PreparedText`. A prompt is the same at every sampling
step, so a backbone that offers this projects it (and each block's cross-attention keys and values) once per
sample and takes the result in `embed` instead of the text; `prepare_text` below falls back to the plain text
for a backbone without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

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

    def rows(self, start: int, size: int) -> TextCond:
        """Samples start .. start + size - 1 of the batch."""
        return TextCond(self.tokens[start:start + size], self.mask[start:start + size])


def _pad_text(text: TextCond, length: int) -> TextCond:
    missing = length - text.tokens.shape[1]
    if missing == 0:
        return text
    return TextCond(torch.nn.functional.pad(text.tokens, (0, 0, 0, missing)),
                    torch.nn.functional.pad(text.mask, (0, missing), value=False))


@dataclass
class TextKV:
    """One block's text cross-attention keys (normalised) and values, each (B, H, L, Dh)."""

    k: Tensor
    v: Tensor


@dataclass
class PreparedText:
    """A prompt prepared once per sample for one backbone (sampling only: no gradient reaches its text path).

    tokens: (B, L, D) text at the backbone's width; mask (B, L) bool;
    kv:     per block, that block's keys and values, or None for a block it was not prepared for.
    """

    tokens: Tensor
    mask: Tensor
    kv: list[TextKV | None]

    def __post_init__(self) -> None:
        assert self.tokens.ndim == 3, f"prepared text must be (B, L, D), got {tuple(self.tokens.shape)}"
        assert self.mask.shape == self.tokens.shape[:2], (
            f"text mask {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape)}"
        )

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def cat_batch(self, other: PreparedText) -> PreparedText:
        """Join two batches along B (classifier-free guidance), padding the shorter prompt with masked keys, as
        `TextCond.cat_batch` pads tokens: a masked key gets no attention weight, so its values never count."""
        length = max(self.tokens.shape[1], other.tokens.shape[1])
        a, b = _pad_prepared(self, length), _pad_prepared(other, length)
        kv = [None if x is None or y is None else TextKV(torch.cat([x.k, y.k]), torch.cat([x.v, y.v]))
              for x, y in zip(a.kv, b.kv, strict=True)]
        return PreparedText(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]), kv)


def _pad_prepared(text: PreparedText, length: int) -> PreparedText:
    missing = length - text.tokens.shape[1]
    if missing == 0:
        return text
    pad = torch.nn.functional.pad
    kv = [None if x is None else TextKV(pad(x.k, (0, 0, 0, missing)), pad(x.v, (0, 0, 0, missing)))
          for x in text.kv]  # (B, H, L, Dh): pad along L
    return PreparedText(pad(text.tokens, (0, 0, 0, missing)), pad(text.mask, (0, missing), value=False), kv)


@dataclass
class StreamState:
    """One stream between blocks.

    x:      (B, N, D) hidden tokens
    t:      (B,) flow time of this stream
    c:      (B, D) adaLN conditioning of this backbone (its timestep embedding)
    times:  (N,) start time of each token in seconds (float64), used to align streams
    angles: the positions of the backbone's own self-attention, one per geometry (our DiTs: RoPE angles
            (N, head_dim / 2); an adapter keeps what its module takes, e.g. cos and sin tables)
    text:   (B, L, D) text tokens projected to the backbone's width; text_mask (B, L)
    grid:   the token layout the head needs to rebuild the output, e.g. (T', H', W') or (Ta,)
    text_kv: per block, its text keys and values prepared once per sample (`PreparedText.kv`); None: each block
            projects `text` itself
    extra:  per-sample tensors (batch first) that only the backbone's own blocks and head read: an adapter's
            per-block timestep modulation, or tokens its blocks carry beside x (a prepended global token). The
            Fusion Blocks read and write x alone.
    """

    x: Tensor
    t: Tensor
    c: Tensor
    times: Tensor = field(metadata={"batch": False})
    angles: Any = field(metadata={"batch": False})
    text: Tensor
    text_mask: Tensor
    grid: tuple[int, ...]
    text_kv: list[TextKV | None] | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def with_x(self, x: Tensor) -> StreamState:
        assert x.shape == self.x.shape, f"stream shape changed: {tuple(self.x.shape)} -> {tuple(x.shape)}"
        return replace(self, x=x)

    def with_text(self, text: Tensor, text_mask: Tensor) -> StreamState:
        """Other text tokens; keys and values prepared for the old ones no longer hold, so blocks project these."""
        return replace(self, text=text, text_mask=text_mask, text_kv=None)


@runtime_checkable
class Backbone(Protocol):
    hidden_dim: int  # width of the hidden tokens a Fusion Block reads and writes
    num_blocks: int  # depth: fusion points are placed by fraction of it
    eta: float  # token positions per second along time (the time-aligned RoPE of the Fusion Blocks)

    def embed(self, x_t: Tensor, t: Tensor, text: TextCond | PreparedText | None) -> StreamState:
        """x_t in the flow's space at flow time t (B,) (0 noise, 1 data) -> the state before block 0. text None,
        or a row of it without a real token (an empty caption): the null text. PreparedText only from the
        backbone's own `prepare_text` (optional, module docstring)."""

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState:
        """Blocks start .. stop - 1 on the state."""

    def head(self, state: StreamState) -> Tensor:
        """The final state -> the velocity (data minus noise), shaped as x_t."""

    def null_text_cond(self, batch_size: int) -> TextCond:
        """The learned text of no prompt (classifier-free guidance's unconditional branch, prompt-free use)."""

    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """(N,) start time in seconds (float64) of each token of a grid, as `StreamState.times` holds them."""


def prepare_text(
    backbone: Backbone, text: TextCond | None, batch_size: int, stop: int | None = None,
) -> TextCond | PreparedText | None:
    """The backbone's once-per-sample form of a prompt (None: its null text) for blocks [0, stop) (None: all),
    where it offers one; otherwise the text as given, which `embed` takes in the plain way."""
    prepare = getattr(backbone, "prepare_text", None)
    return text if prepare is None else prepare(text, batch_size, stop)
