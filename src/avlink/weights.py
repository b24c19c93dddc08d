"""Reading weight files: one place, safe, and one line naming the file when one is refused.

Our own weights are safetensors files: `read_tensors` reads one and `check_state` holds it against the module it
is for (names, shapes, dtypes, finite values) before `load_state_dict` sees it.

Published networks (vocoders, metric networks) come as pickled .pt / .pth files. They are read only with
`torch.load(weights_only=True)`; the one kind of class allowed beyond tensors and containers is numpy's array
and scalar reconstruction, which released files carry beside their weights (the VGGish PCA parameters, the
PANNs sampler state) and which runs no stored code. A TorchScript archive is refused before torch.load sees
it (torch would hand it to the TorchScript loader, which runs its code). Every failure is one line naming
the file, with torch's own advice to turn weights_only off (and its terminal colour codes) left out.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from avlink.errors import UserError


class WeightsError(UserError):
    """A weight or config file we cannot use; str(err) is one line "<path>: <reason>"."""


class RefusedPickle(UserError):
    """The file pickles a class other than tensors, containers and numpy arrays, which is not run."""


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _numpy_globals() -> list:
    """What torch.save'd numpy arrays need to unpickle: array and scalar constructors and dtypes, under both
    the numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) module names. None of them runs stored code."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        allowed += [(getattr(core, name), f"numpy.core.multiarray.{name}"),
                    (getattr(core, name), f"numpy._core.multiarray.{name}")]
    kinds = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64]
    allowed += [type(np.dtype(kind)) for kind in kinds]  # numpy >= 1.25 dtype classes, rebuilt by BUILD
    return allowed


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a `<name>/code/` folder; a saved state dict holds only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_failure(err: Exception) -> str:
    """One short reason for a failed torch.load, without torch's advice to turn weights_only off and without
    the terminal colour codes its message carries."""
    text = ANSI.sub("", str(err)).strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds a pickled {found.group(1)}, which is refused rather than run"
    # torch's own reason follows this marker; the lines before it are the advice
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200] if lines else 'no reason given'}"


def read_weights(path: Path, network: str) -> object:
    """Whatever the file holds, read with torch.load(weights_only=True) and numpy arrays allowed; a file that
    cannot be read so is refused in one line naming it (RefusedPickle if it pickles code-carrying classes)."""
    if is_torchscript(path):  # checked first: torch.load would hand such a file to the TorchScript loader
        raise UserError(f"{path}: a TorchScript archive, which cannot be loaded without running its code; "
                        f"give {network} a plain state dict instead")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: one line naming it
        reason = load_failure(err)
        kind = RefusedPickle if reason.startswith("it holds a pickled") else UserError
        raise kind(f"{path}: cannot read as a {network} weight file with weights_only=True "
                   f"({reason})") from None


# ---------------------------------------------------------------- our own safetensors files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one of our safetensors files, or one line naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error types: a pickle under our suffix, a cut-off file
        raise WeightsError(f"{path}: not a readable safetensors file ({load_failure(err)})") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of one of our safetensors files (empty when it has none)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # as read_tensors
        raise WeightsError(f"{path}: not a readable safetensors file ({load_failure(err)})") from None


def check_state(path: Path, state: dict[str, torch.Tensor], module: nn.Module) -> None:
    """Refuse, in one line naming the file, what load_state_dict would refuse with a page of text or would load
    silently: missing or unexpected tensors, another shape (another model size), integer tensors where the
    module holds floats, NaN or infinite values."""
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                 if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
                 if unexpected else ""]
        raise WeightsError(f"{path}: tensors do not match the model: {'; '.join(p for p in parts if p)}")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise WeightsError(f"{path}: tensor {key} has shape {tuple(got.shape)}, the config's model wants "
                                  f"{tuple(want.shape)} (weights of another model size or layout?)")
        if want.is_floating_point() and not got.is_floating_point():
            raise WeightsError(f"{path}: tensor {key} is {got.dtype}, not floating point")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise WeightsError(f"{path}: tensor {key} holds NaN or infinite values")
