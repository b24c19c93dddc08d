"""Model files: safetensors weights with a JSON config, written atomically, loadable without training code.

A checkpoint folder of a linked model holds
    config.json              the ModelConfig (a JSON round trip of `ModelConfig.to_dict()`)
    audio_dit.safetensors    the frozen text-to-audio generator
    video_dit.safetensors    the frozen text-to-video generator
                             (neither of a published generator: the config names its own folder)
    fusion.safetensors       the fusion parameters of every task (keys "v2a.*", "a2v.*" or "joint.*")
and, for `avlink v2a --fast`, optionally
    fusion-fast.safetensors  a second V2A fusion set, of the model config.json describes changed by the config
                             overrides in its metadata ("model_overrides", JSON; FAST_OVERRIDES where absent, as
                             in the export of `avlink train fusion --set model.fusion.injection=static` copied in)
    fusion-fast.card.json    its training card, with those overrides
Parts that a folder lacks are left at their initial weights only when the caller says so (`strict=False`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from avlink.config import ModelConfig, Task
from avlink.files import atomic_write
from avlink.fusion.linked import TASKS
from avlink.weights import WeightsError, check_state, read_metadata, read_tensors

PARTS = {"audio_dit": "audio", "video_dit": "video", "fusion": "fusion"}
FAST_FUSION = "fusion-fast.safetensors"
FAST_CARD = "fusion-fast.card.json"
# The fast set: Fusion Blocks without symmetric reinjection (the paper's Table 2 "w/o symm. reinjection"), whose
# conditioning stream runs once per clip instead of at every step. The tiny V2A ablation (README, Table 2) scored
# it within noise of the full blocks (onset accuracy 0.848 against their 0.837), so --fast loses nothing measured.
FAST_OVERRIDES: dict[str, Any] = {"fusion.injection": "static"}


def stored_parts(cfg: ModelConfig) -> dict[str, str]:
    """The parts of PARTS a checkpoint folder of this config holds: the Fusion Blocks, and each generator that is
    our own (kind "dit"); a published generator's weights stay in its own folder, which the config names."""
    return {name: attr for name, attr in PARTS.items() if attr == "fusion" or getattr(cfg, attr).kind == "dit"}


def save_weights(path: Path, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_weights(path: Path, module: nn.Module) -> None:
    state = read_tensors(path)
    check_state(path, state, module)
    module.load_state_dict(state)


def save_config(path: Path, cfg: ModelConfig) -> None:
    text = json.dumps(cfg.to_dict(), indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_config(path: Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: model config not found")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: not a readable JSON file ({' '.join(str(err).split())})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise WeightsError(f"{path}: not an avlink model config ({' '.join(str(err).split())})") from None


def save_link(folder: Path, model: nn.Module) -> None:
    folder = Path(folder)
    save_config(folder / "config.json", model.cfg)
    for name, attr in stored_parts(model.cfg).items():
        save_weights(folder / f"{name}.safetensors", getattr(model, attr))


def fusion_tasks(keys: Iterable[str], cfg: ModelConfig) -> tuple[Task, ...]:
    """The directions whose Fusion Blocks a fusion file's tensors hold: both for the shipped set, one for what
    `avlink train fusion --task v2a|a2v` exports (its keys all start with that task)."""
    held = {key.split(".", 1)[0] for key in keys}
    return TASKS if cfg.fusion.shared else tuple(task for task in TASKS if task in held) or TASKS


def read_fusion_tasks(folder: Path, cfg: ModelConfig) -> tuple[Task, ...]:
    """fusion_tasks of a folder's fusion.safetensors (both directions where it has none)."""
    fusion = Path(folder) / "fusion.safetensors"
    return fusion_tasks(read_tensors(fusion).keys(), cfg) if fusion.is_file() else TASKS


def load_parts(folder: Path, model: nn.Module, strict: bool = True) -> None:
    """Fill a linked model (system.build_model) with a folder's generators and Fusion Blocks. strict False: a
    part the folder lacks keeps its initial weights. Every damaged file is refused in one line naming it
    (WeightsError). A published generator came with its weights when it was built (backbones/pretrained.py)."""
    for name, attr in stored_parts(model.cfg).items():
        path = Path(folder) / f"{name}.safetensors"
        if path.is_file() or strict:
            load_weights(path, getattr(model, attr))


def fast_overrides(path: Path) -> dict[str, Any]:
    """The config overrides a fast fusion file was trained with: its metadata's "model_overrides", or
    FAST_OVERRIDES for a file without them. Only fusion settings: the set links the folder's own generators."""
    text = read_metadata(path).get("model_overrides")
    if text is None:
        return dict(FAST_OVERRIDES)
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        overrides = None
    if not isinstance(overrides, dict) or not all(str(k).startswith("fusion.") for k in overrides):
        raise WeightsError(f"{path}: its model_overrides metadata is not a JSON object of fusion.* settings: {text}")
    return overrides


def save_fast_fusion(folder: Path, state: dict[str, Tensor], card: dict[str, Any],
                     overrides: dict[str, Any] | None = None) -> None:
    """Write a fast fusion set (a fusion file's tensors) and its card into a checkpoint folder, the overrides in
    both (`fast_overrides` reads them back)."""
    overrides = dict(FAST_OVERRIDES if overrides is None else overrides)
    meta = {"part": "fusion", "model_overrides": json.dumps(overrides)}
    state = {k: v.contiguous() for k, v in state.items()}
    atomic_write(Path(folder) / FAST_FUSION, lambda tmp: save_file(state, str(tmp), metadata=meta))
    text = json.dumps({**card, "model_overrides": overrides}, indent=2)
    atomic_write(Path(folder) / FAST_CARD, lambda tmp: tmp.write_text(text))
