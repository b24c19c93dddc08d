"""A linked model of two tiny published-architecture generators (Wan 2.x video, Stable Audio Open audio), each in
its own diffusers folder with its codec and text encoder, as a user's downloaded weights would be: random weights,
offline, small enough for CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

from avlink.config import FusionConfig, ModelConfig, PretrainedConfig
from avlink.seq import ClipGeometry
from tiny_stable_audio import tiny_stable_audio_folder, tiny_stable_audio_geometry
from tiny_text import tiny_text_encoder
from tiny_wan import tiny_wan_folder, tiny_wan_geometry

DURATION = 9 / 16  # 9 frames at 16 fps: 3 latent frames of the causal video VAE


def tiny_pretrained_folders(root: Path) -> tuple[Path, Path]:
    """(wan folder, stable audio folder), each with its text encoder, written once under root."""
    wan, sao = root / "wan", root / "stable-audio"
    if not (wan / "model_index.json").is_file():
        tiny_wan_folder(wan)
        width = json.loads((wan / "transformer" / "config.json").read_text())["text_dim"]
        tiny_text_encoder(wan, "umt5", dim=width)
    if not (sao / "model_index.json").is_file():
        tiny_stable_audio_folder(sao)
        width = json.loads((sao / "projection_model" / "config.json").read_text())["text_encoder_dim"]
        tiny_text_encoder(sao, "t5", dim=width)
    return wan, sao


def tiny_pretrained_config(root: Path, **fusion) -> ModelConfig:
    wan, sao = tiny_pretrained_folders(root)
    return ModelConfig(
        name="tiny-pretrained",
        clip=ClipGeometry(duration=DURATION, audio=tiny_stable_audio_geometry(), video=tiny_wan_geometry()),
        audio=PretrainedConfig(kind="stable-audio", folder=str(sao)),
        video=PretrainedConfig(kind="wan", folder=str(wan)),
        fusion=FusionConfig(**{"dim": 32, "heads": 2, "num_blocks": 2, **fusion}),
    )
