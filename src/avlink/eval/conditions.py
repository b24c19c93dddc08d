"""SyncBench clips ready to condition generation, and writing generated samples.

`load_conditions` reads clips of one split of a SyncBench folder into `Conditioned`: V2A conditions on the
video in the flow's space, A2V on the audio's scaled VAE latent, each through its codec (system.py: the
checkpoint's, `load_codecs`). `write_output` decodes one generated sample to <id>.wav (V2A) or <id>.mp4 (A2V,
with the clip's own sound). `caption_texts` encodes the clips' captions for prompts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avlink.backbones.protocol import TextCond
from avlink.config import Task
from avlink.errors import UserError
from avlink.system import decode_media


@dataclass
class Conditioned:
    """One SyncBench clip ready to condition the generation."""

    id: str
    x_cond: Tensor  # V2A: video (1, C, T, H, W) in the flow's space; A2V: scaled latent (1, Ta, Da)
    audio: np.ndarray  # the clip's wave at the model's rate, muxed into A2V outputs


@torch.no_grad()
def load_conditions(data: Path, n: int | None, task: Task, clip: Any, codecs: dict[str, Any],
                    split: str | None = "test") -> list[Conditioned]:
    """The first n clips of one split of a SyncBench folder (a folder made by `synth --split` holds train,
    val and test; scoring a model on the clips it trained on would flatter it). split None: every clip.
    codecs: system.make_codecs / load_codecs (V2A needs only the video codec)."""
    from avlink.data.datasets import load_item, syncbench_dataset
    from avlink.data.media import MediaError

    dataset = syncbench_dataset(data, split)
    if not dataset.items and split is not None:
        raise UserError(f"{data}: no clips of split {split!r} (use --split all for a folder without splits)")
    out = []
    for item in dataset.items[:n]:
        try:
            av = load_item(item, clip)
        except MediaError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        if task == "v2a":  # the data set's pixels in [-1, 1] are the video codec's input
            x_cond = codecs["video"].encode(av.video[None])  # (1, C, T, H, W)
        else:
            x_cond = codecs["audio"].encode(av.audio[None], clip.num_audio_tokens)  # (1, Ta, Da)
        out.append(Conditioned(item.id, x_cond, av.audio.numpy()))
    if not out:
        raise UserError(f"{data}: no usable clips")
    return out


def captions(data: Path, ids: list[str]) -> list[str]:
    """Each clip's SyncBench caption ('' for a clip without one)."""
    from avlink.data import syncbench

    by_id = {str(row["id"]): str(row.get("caption", "")) for row in syncbench.load_metadata(data)}
    return [by_id.get(i, "") for i in ids]


def caption_texts(model: Any, data: Path, conds: list[Conditioned]) -> TextCond:
    """The captions of all clips, encoded once by the checkpoint's text encoder: tokens (N, L, Dt)."""
    from avlink.codecs.text import load_text_encoder

    encoder = load_text_encoder(model.cfg.text_encoder)
    text = encoder.encode(captions(data, [c.id for c in conds]))
    return TextCond(text.tokens, text.mask)


def write_output(task: Task, x: Tensor, cond: Conditioned, folder: Path, clip: Any, codecs: dict[str, Any]) -> None:
    """Decode one generated sample through its codec and write it as <id>.wav (V2A) or <id>.mp4 (A2V)."""
    from avlink.data import media

    if task == "v2a":
        wave = decode_media(codecs["audio"], "audio", x)[0]  # (Ta * samples per token,)
        media.write_audio(folder / f"{cond.id}.wav", wave, clip.audio.sample_rate)
        return
    frames = decode_media(codecs["video"], "video", x)[0]  # (T, H, W, 3) uint8
    media.write_video(folder / f"{cond.id}.mp4", frames, clip.video.fps, cond.audio, clip.audio.sample_rate)
