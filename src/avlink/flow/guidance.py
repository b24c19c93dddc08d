"""Classifier-free guidance as a wrapper over a velocity callable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor

from avlink.flow.path import Velocity


def cat_batch(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch: tensors, dataclasses, dicts and lists of them.

    Dataclass fields whose metadata says {"batch": False} (token times, RoPE angles: one per geometry, not per
    sample) are taken from `a`; so are non-tensor values (strings, numbers, None).
    """
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if hasattr(a, "cat_batch"):  # types that know how to join themselves (text of different lengths)
        return a.cat_batch(b)
    if is_dataclass(a) and not isinstance(a, type):
        return replace(a, **{
            f.name: cat_batch(getattr(a, f.name), getattr(b, f.name)) if f.metadata.get("batch", True)
            else getattr(a, f.name)
            for f in fields(a) if f.init
        })
    if isinstance(a, dict):
        return {k: cat_batch(a[k], b[k]) for k in a}
    if isinstance(a, list):
        return [cat_batch(x, y) for x, y in zip(a, b, strict=True)]
    return a


def classifier_free_guidance(
    velocity: Callable[..., Tensor], scale: float, cond: dict[str, Any], uncond: dict[str, Any],
    batched: bool = True,
) -> Velocity:
    """v = v_uncond + scale * (v_cond - v_uncond), with velocity(x, t, **cond).

    batched: one forward over [cond; uncond] (twice the batch) instead of two forwards.
    For batching, every tensor in the conditions has the batch size of x, except dataclass fields marked
    {"batch": False} (see `cat_batch`).
    """
    if scale == 1.0:
        return lambda x, t: velocity(x, t, **cond)
    if batched:
        both = cat_batch(cond, uncond)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            v_c, v_u = velocity(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
            return v_u + scale * (v_c - v_u)
    else:

        def guided(x: Tensor, t: Tensor) -> Tensor:
            v_c, v_u = velocity(x, t, **cond), velocity(x, t, **uncond)
            return v_u + scale * (v_c - v_u)

    return guided
