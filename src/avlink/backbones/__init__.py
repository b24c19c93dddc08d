"""Frozen generators behind the Backbone protocol (protocol.py), one file per kind, built by `build_backbone`.

A new kind (an adapter to another pretrained generator) is its own file, its settings dataclass in config.py
(`BACKBONE_CONFIGS`), and one line in `BACKBONES` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

from torch import nn

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.video_dit import VideoDiT
from avlink.config import BackboneConfig
from avlink.seq import AudioGeometry, VideoGeometry

Modality = Literal["audio", "video"]


def imported(path: str) -> Callable[..., nn.Module]:
    """"module:Class", imported on first use: an adapter brings diffusers (seconds to import), which our own
    generators never need."""
    module, name = path.split(":")

    def build(*args, **kwargs) -> nn.Module:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    build.target = path  # type: ignore[attr-defined]
    return build


# kind -> {modality: the class (or its lazy import) built from (its config, the clip geometry of that modality)}
BACKBONES: dict[str, dict[Modality, Callable[..., nn.Module]]] = {
    "dit": {"audio": AudioDiT, "video": VideoDiT},
    "wan": {"video": imported("avlink.backbones.wan:WanBackbone")},  # Wan 2.x text-to-video
    "ltx": {"video": imported("avlink.backbones.ltx:LTXBackbone")},  # LTX-Video text-to-video
    "stable-audio": {"audio": imported("avlink.backbones.stable_audio:StableAudioBackbone")},  # Stable Audio Open
}


def build_backbone(modality: Modality, cfg: BackboneConfig, geometry: AudioGeometry | VideoGeometry) -> nn.Module:
    """The generator of one modality, of the kind its config names (`cfg.kind`), at its initial weights."""
    kinds = BACKBONES.get(cfg.kind, {})
    if modality not in kinds:
        known = ", ".join(kind for kind, by in BACKBONES.items() if modality in by)
        raise ValueError(f"no {modality} backbone of kind {cfg.kind!r}; known: {known}")
    return kinds[modality](cfg, geometry)
