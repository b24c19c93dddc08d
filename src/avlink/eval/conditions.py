"""SyncBench clips ready to condition generation, and writing generated samples.

`load_conditions` reads clips of one split of a SyncBench folder into `Conditioned`: V2A conditions on the
video in the flow's space, A2V on the audio's scaled VAE latent. `write_output` decodes one generated sample
to <id>.wav (V2A: the VAE decoder, then the vocoder) or <id>.mp4 (A2V, with the clip's own sound). The VAE is
the checkpoint's (`load_checkpoint_vae`); `caption_texts` encodes the clips' captions for prompts.
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

VAE_FILE = "vae.safetensors"


def load_checkpoint_vae(folder: Path, clip: Any) -> torch.nn.Module:
    """The audio VAE of a checkpoint folder.

    The folder holds it as `vae.safetensors`: the AudioVAE state dict, with its architecture in the file's
    safetensors metadata ("hidden": channel width, "depth": residual blocks per level; read from the tensor
    shapes when absent). Its mel and latent geometry is the linked model's (config.json, clip.audio): the one
    the audio generator works in. Loading is strict: weights of another geometry or architecture are refused.
    """
    from avlink.codecs.vae import load_vae

    path = Path(folder) / VAE_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; the sweep needs the checkpoint's audio VAE there "
                        f"(an AudioVAE state dict saved as safetensors with 'hidden' and 'depth' metadata)")
    return load_vae(str(path), clip)


@dataclass
class Conditioned:
    """One SyncBench clip ready to condition the generation."""

    id: str
    x_cond: Tensor  # V2A: video (1, C, T, H, W) in the flow's space (to_model); A2V: scaled latent (1, Ta, Da)
    audio: np.ndarray  # the clip's wave at the model's rate, muxed into A2V outputs


def load_conditions(data: Path, n: int | None, task: Task, clip: Any, vae: Any,
                    split: str | None = "test") -> list[Conditioned]:
    """The first n clips of one split of a SyncBench folder (a folder made by `synth --split` holds train,
    val and test; scoring a model on the clips it trained on would flatter it). split None: every clip."""
    from avlink.codecs.mel import MelSpectrogram, fit_frames
    from avlink.data.datasets import load_item, syncbench_dataset
    from avlink.data.media import MediaError

    dataset = syncbench_dataset(data, split)
    if not dataset.items and split is not None:
        raise UserError(f"{data}: no clips of split {split!r} (use --split all for a folder without splits)")
    mel = MelSpectrogram(clip.audio)
    out = []
    for item in dataset.items[:n]:
        try:
            av = load_item(item, clip)
        except MediaError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        if task == "v2a":
            x_cond = clip.video.to_model(av.video[None])  # (1, C, T, H, W)
        else:
            with torch.no_grad():
                spec = fit_frames(mel(av.audio[None]), clip.num_mel_frames)  # (1, n_mels, F)
                x_cond = vae.scale_latent(vae.encode(spec).mean)  # (1, Ta, Da)
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


@torch.no_grad()
def write_output(task: Task, x: Tensor, cond: Conditioned, folder: Path, clip: Any, vae: Any,
                 vocoder: Any) -> None:
    """Decode one generated sample and write it as <id>.wav (V2A) or <id>.mp4 (A2V)."""
    from avlink.data import media

    if task == "v2a":
        spec = vae.decode(vae.unscale_latent(x))  # (1, n_mels, F)
        wave = vocoder(spec)[0].float().cpu().numpy()  # (F * hop,)
        media.write_audio(folder / f"{cond.id}.wav", np.clip(wave, -1.0, 1.0), clip.audio.sample_rate)
        return
    pixels = ((clip.video.to_pixels(x[0]) + 1) * 127.5).round().to(torch.uint8)  # (C, T, H, W)
    frames = pixels.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, C)
    media.write_video(folder / f"{cond.id}.mp4", frames, clip.video.fps, cond.audio, clip.audio.sample_rate)
