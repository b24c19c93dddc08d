"""Rotary position embedding as small pure functions. Positions are inputs: callers compute them.

Angles are built in float64 and applied in float32, so that a token at 5 s and one at 5 s + 1/eta get rotations
that differ by exactly the step, whatever the compute dtype.

A rotation is applied as one complex product per channel pair: every block of a stream rotates its queries and
keys by the same angles, so the unit complex numbers e^{i angle} are made once per angles tensor and kept in a
small cache (`RotationCache`) instead of taking cos and sin again in every block.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

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


def rope_rotation(angles: Tensor) -> Tensor:
    """angles (..., N, Dh/2) -> (..., N, Dh/2) complex64 unit rotations e^{i angle}, taken in float32."""
    angles = angles.float()
    return torch.polar(torch.ones_like(angles), angles)


class RotationCache:
    """`rope_rotation` per angles tensor, found again by identity.

    An entry is valid while its angles tensor is alive and unmodified (same object, same version counter). At
    most `capacity` entries are kept (least recently used goes first), and the entry of a freed tensor is dropped
    at the next look-up, so the cache holds a few rotations of tensors the callers still hold themselves, never
    more. Angles that need a gradient are never cached: their rotation must stay on the autograd graph.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[weakref.ref, int, Tensor]] = OrderedDict()
        # Filled by weakref callbacks, which may run inside any allocation (garbage collection): they only
        # append here, and look-ups do the removal.
        self._freed: list[tuple[int, weakref.ref]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._drop_freed()
            return len(self._entries)

    def rotation(self, angles: Tensor) -> Tensor:
        if angles.requires_grad:
            return rope_rotation(angles)
        key = id(angles)
        with self._lock:
            self._drop_freed()
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is angles and entry[1] == angles._version:
                self._entries.move_to_end(key)
                return entry[2]
        rot = rope_rotation(angles)
        ref = weakref.ref(angles, lambda dead, key=key: self._freed.append((key, dead)))
        with self._lock:
            self._entries[key] = (ref, angles._version, rot)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return rot

    def _drop_freed(self) -> None:
        while self._freed:
            key, dead = self._freed.pop()
            entry = self._entries.get(key)
            if entry is not None and entry[0] is dead:  # not a newer tensor that took the same id since
                del self._entries[key]


ROTATIONS = RotationCache()


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """x (B, H, N, Dh), angles (N, Dh/2) or (B, N, Dh/2) -> x with consecutive channel pairs rotated.

    The pair (x0, x1) is the complex number x0 + i x1, rotated by e^{i angle}: (x0 cos - x1 sin, x0 sin + x1 cos).
    """
    assert x.shape[-1] == 2 * angles.shape[-1], f"head dim {x.shape[-1]} vs {angles.shape[-1]} angles"
    rot = ROTATIONS.rotation(angles)  # (N, Dh/2) or (B, N, Dh/2) complex64
    if rot.ndim == 3:
        rot = rot[:, None]  # (B, 1, N, Dh/2): broadcast over heads
    xf = x.float()
    if not _pairs_are_complex(xf):
        xf = xf.clone(memory_format=torch.contiguous_format)
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (B, H, N, Dh/2) complex, a view of xf
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


def _pairs_are_complex(x: Tensor) -> bool:
    """Whether consecutive channel pairs of x can be viewed as complex numbers without a copy."""
    return x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1])
