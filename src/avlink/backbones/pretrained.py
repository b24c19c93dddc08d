"""What every adapter to a published generator shares: its diffusers module built from a local folder (weights
read by `from_pretrained`, safetensors only, never a pickle) or from a published architecture with random weights,
and the one-line errors for a folder that is missing or incomplete.

The folder layout is the one the publishers' "-Diffusers" repositories use: model_index.json at the top and one
subfolder per part (transformer/, vae/, text_encoder/, tokenizer/), each with its config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from avlink.backbones.protocol import TextCond
from avlink.config import PretrainedConfig
from avlink.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def zero_text(batch_size: int, dim: int, device: torch.device) -> TextCond:
    """One zero state per row, mask True: the no-prompt text of an adapter whose pipeline's unconditional branch
    is an all-zero context (each adapter says how its module reads it)."""
    return TextCond(torch.zeros(batch_size, 1, dim, device=device),
                    torch.ones(batch_size, 1, dtype=torch.bool, device=device))


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def part_folder(folder: str | Path, part: str, download: str) -> Path:
    """folder/part, checked: a missing folder, part or config is one line saying what to download and where."""
    root = Path(folder).expanduser()
    where = root / part
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; download {download} there (it holds {part}/ and the other parts)")
    if not (where / "config.json").is_file():
        raise UserError(f"{where}: no config.json; {root} must be the whole diffusers folder of {download}")
    if not any(where.glob("*.safetensors")):
        raise UserError(f"{where}: no .safetensors weights (pickled .bin files are never loaded); "
                        f"download the safetensors files of {download}")
    return where


def load_part(cls: Any, folder: str | Path, part: str, download: str, dtype: str = "float32") -> Any:
    """A diffusers model class's part of a local folder, by its own from_pretrained, safetensors only."""
    where = part_folder(folder, part, download)
    try:
        return cls.from_pretrained(where, use_safetensors=True, local_files_only=True,
                                   torch_dtype=torch_dtype(dtype))
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{where}: cannot load {cls.__name__} ({first})") from None


def build_module(cls: Any, cfg: PretrainedConfig, part: str, architectures: dict[str, dict[str, Any]],
                 default: str, download: str) -> Any:
    """The backbone's module: loaded from cfg.folder when one is named and the default device is a real one;
    otherwise (no folder, or built on the meta device to count parameters) from its config with random
    weights: the folder's own config, or the published architecture cfg.architecture names."""
    meta = torch.empty(0).device.type == "meta"
    if cfg.folder and not meta:
        return load_part(cls, cfg.folder, part, download, cfg.dtype)
    if cfg.folder:
        config = cls.load_config(part_folder(cfg.folder, part, download))
    else:
        name = cfg.architecture or default
        if name not in architectures:
            raise UserError(f"unknown {cfg.kind} architecture {name!r}; known: {', '.join(architectures)}")
        config = architectures[name]
    module = cls.from_config(config)
    return module if cfg.dtype == "float32" else module.to(torch_dtype(cfg.dtype))
