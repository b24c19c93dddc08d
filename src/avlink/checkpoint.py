"""Model files: safetensors weights with a JSON config, written atomically, loadable without training code.

A checkpoint folder of a linked model holds
    config.json              the ModelConfig (a JSON round trip of `ModelConfig.to_dict()`)
    audio_dit.safetensors    the frozen text-to-audio generator
    video_dit.safetensors    the frozen text-to-video generator
    fusion.safetensors       the fusion parameters of every task (keys "v2a.*", "a2v.*" or "joint.*")
Parts that a folder lacks are left at their initial weights only when the caller says so (`strict=False`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from avlink.config import ModelConfig
from avlink.files import atomic_write

PARTS = {"audio_dit": "audio", "video_dit": "video", "fusion": "fusion"}


def save_weights(path: Path, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_weights(path: Path, module: nn.Module) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    module.load_state_dict(load_file(str(path)))


def save_config(path: Path, cfg: ModelConfig) -> None:
    text = json.dumps(cfg.to_dict(), indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_config(path: Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config not found")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def save_link(folder: Path, model: nn.Module) -> None:
    folder = Path(folder)
    save_config(folder / "config.json", model.cfg)
    for name, attr in PARTS.items():
        save_weights(folder / f"{name}.safetensors", getattr(model, attr))


def load_link(folder: Path, device: torch.device | str = "cpu", strict: bool = True) -> nn.Module:
    """The linked model of a checkpoint folder, frozen backbones in eval mode."""
    from avlink.params import build_model

    folder = Path(folder)
    model = build_model(load_config(folder / "config.json"))
    for name, attr in PARTS.items():
        path = folder / f"{name}.safetensors"
        if path.is_file() or strict:
            load_weights(path, getattr(model, attr))
    return model.to(device).eval()
