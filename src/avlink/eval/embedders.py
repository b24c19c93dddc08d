"""One interface for every network the metrics look through (embeddings for Frechet distances and cosine
scores, class logits for IS / KL), and a registry that loads them by name.

Inputs are plain media arrays so that the harness decodes a file once and hands it to any embedder:
- audio: float32 waveforms (B, n) at the embedder's `sample_rate`, mono, in [-1, 1];
- video: uint8 frames (B, T, H, W, 3) RGB at the embedder's `fps` (any size: the embedder resizes as its
  published preprocessing says);
- text: a list of strings.
An embedder whose weights live on disk takes the path at construction; a missing file is one clear line naming
what to put where (`WeightsMissing`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

Modality = Literal["audio", "video", "text"]


class WeightsMissing(FileNotFoundError):
    """str(err) is one line: which network, which file it wants, where to put it or how to pass it."""


@runtime_checkable
class Embedder(Protocol):
    name: str
    modalities: tuple[Modality, ...]  # what it can embed; a joint space (CLAP, ImageBind) has several
    sample_rate: int | None  # audio input rate, for audio embedders
    fps: float | None  # video input frame rate, for video embedders

    def embed(self, x: np.ndarray | list[str], modality: Modality) -> Tensor:
        """(B, ...) media -> (B, D) float32 embeddings (for FD and cosine scores)."""
        ...

    def logits(self, x: np.ndarray, modality: Modality) -> Tensor | None:
        """(B, ...) media -> (B, classes) class logits (for IS and KL), or None if the network has no classifier."""
        ...


@runtime_checkable
class TimedEmbedder(Embedder, Protocol):
    """An embedder that also gives features per time step of a clip (syncbench-video, imagebind, synchformer):
    the Table 2 feature rows condition on these (eval/features.py)."""

    timed_dim: int  # width of the per-time features

    def timed_features(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor]:
        """(B, ...) media -> (B, N, timed_dim) float32 features and the (N,) start time of each step in seconds
        (float64) from the clip's start."""
        ...


# name -> (module, factory). A factory takes `weights: Path | None` and keyword options; modules load lazily.
REGISTRY: dict[str, tuple[str, str]] = {
    # offline, trained on SyncBench by a recipe in this repo
    "syncbench-audio": ("avlink.eval.embed.syncbench", "load_audio"),
    "syncbench-video": ("avlink.eval.embed.syncbench", "load_video"),
    # published networks, weights from a local file
    "vggish": ("avlink.eval.embed.vggish", "load"),
    "panns-cnn14": ("avlink.eval.embed.panns", "load"),
    "passt": ("avlink.eval.embed.passt", "load"),
    "clap": ("avlink.eval.embed.clap", "load"),
    "imagebind": ("avlink.eval.embed.imagebind", "load"),
    "synchformer": ("avlink.eval.embed.synchformer", "load"),
    "inception": ("avlink.eval.embed.inception", "load"),
    "i3d": ("avlink.eval.embed.i3d", "load"),
}


def load_embedder(name: str, weights: str | Path | None = None, **options) -> Embedder:
    if name not in REGISTRY:
        raise KeyError(f"unknown embedder {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, factory = REGISTRY[name]
    return getattr(importlib.import_module(module), factory)(weights=None if weights is None else Path(weights),
                                                             **options)


def require_weights(path: Path | None, network: str, expected: str, option: str) -> Path:
    """The weight file, or WeightsMissing saying what to put where."""
    if path is None:
        raise WeightsMissing(f"{network}: no weight file given; download {expected} yourself and pass {option}")
    if not Path(path).is_file():
        raise WeightsMissing(f"{path}: {network} weight file not found (expected {expected}; pass it with {option})")
    return Path(path)
