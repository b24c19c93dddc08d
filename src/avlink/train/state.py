"""Training checkpoints: written atomically, rotated, and found again after a kill at any moment.

A run folder holds `step_000001200/` folders, each complete before it gets its final name:
    weights.safetensors    the trainable module's weights (safetensors; loadable without training code)
    ema.safetensors        the EMA weights (what validation and export use)
    state.pt               optimizer, scheduler, step, data position, RNG states (torch.save of tensors and
                           plain containers; read back with weights_only=True)
    config.json            the run's configuration
A folder is written under a temporary name (`.step_000001200.<pid>-<random>`) and renamed into place, so a kill
leaves either the old set of checkpoints or the new one, never a half-written checkpoint under a final name. The
next save removes the temp folders that killed saves left, once stale as `avlink.files` defines it (their process
is gone, or they are older than TEMP_STALE_SECONDS); a save still running in another process keeps its own.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from avlink.errors import UserError
from avlink.files import TEMP_STALE_SECONDS, process_running

STEP_DIR = re.compile(r"^step_(\d{9})$")
TEMP_DIR = re.compile(r"^\.step_\d{9}\.(\d+)-\w+$")  # what save() writes before the rename


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, in types that torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    path: Path
    step: int

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / ("ema.safetensors" if ema else "weights.safetensors")))

    def state(self) -> dict[str, Any]:
        return torch.load(self.path / "state.pt", weights_only=True)

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())


class CheckpointManager:
    def __init__(self, run_dir: Path | str, keep: int = 3):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def list(self) -> list[Checkpoint]:
        if not self.run_dir.is_dir():
            return []
        found = []
        for p in self.run_dir.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "state.pt").is_file():
                found.append(Checkpoint(p, int(m.group(1))))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        found = self.list()
        return found[-1] if found else None

    def latest_intact(self) -> tuple[Checkpoint, dict[str, Any], dict[str, torch.Tensor]] | None:
        """(checkpoint, state, weights) of the newest checkpoint that reads back whole, or None when there is
        none. A damaged one (a disk error, a file changed by hand) is passed over with one line on stderr, so a
        resume goes back one checkpoint instead of stopping; if every one is damaged, one error line."""
        found = self.list()
        for ckpt in reversed(found):
            try:
                state, weights = ckpt.state(), ckpt.weights(ema=False)
                ckpt.weights(ema=True)
            except Exception as err:  # torch.load and safetensors raise many types for a damaged file
                reason = " ".join(str(err).split())[:200] or type(err).__name__
                print(f"{ckpt.path}: damaged ({type(err).__name__}: {reason}); trying the checkpoint before it",
                      file=sys.stderr)
                continue
            return ckpt, state, weights
        if found:
            raise UserError(f"{self.run_dir}: no checkpoint reads back whole ({len(found)} damaged); "
                            f"remove the folder to start over")
        return None

    def save(self, step: int, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
             state: dict[str, Any], config: dict[str, Any]) -> Checkpoint:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / f"step_{step:09d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", dir=self.run_dir))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            torch.save(state, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            if final.exists():  # the same step saved again (resume right after a save): replace it
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._rotate()
        return Checkpoint(final, step)

    def _rotate(self) -> None:
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        for entry in self.run_dir.iterdir():
            if _stale_temp(entry):
                shutil.rmtree(entry, ignore_errors=True)


def _stale_temp(entry: Path) -> bool:
    """Whether `entry` is the temp folder of a save that was killed (see the module docstring)."""
    match = TEMP_DIR.match(entry.name)
    if match is None or not entry.is_dir():
        return False
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:  # removed meanwhile
        return False
    return not process_running(int(match.group(1))) or age > TEMP_STALE_SECONDS
