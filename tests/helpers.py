"""Tiny models shared by the tests."""

from __future__ import annotations

import torch

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.video_dit import VideoDiT
from avlink.config import ModelConfig, get_preset
from avlink.fusion.linked import AVLink


def tiny_config(**overrides) -> ModelConfig:
    """The tiny preset made smaller still: 4-block backbones of width 32, a shorter clip."""
    base = {
        "audio.dim": 32, "audio.depth": 4, "audio.heads": 2, "audio.text_dim": 16,
        "video.dim": 48, "video.depth": 6, "video.heads": 2, "video.text_dim": 16,
        "fusion.dim": 32, "fusion.heads": 2, "fusion.num_blocks": 2,
        "clip.duration": 1.0,
    }
    return get_preset("tiny").override(**{**base, **overrides})


def randomize_backbone(module: torch.nn.Module, seed: int = 0) -> None:
    """Fresh DiTs start as the identity with zero output; trained ones don't. Give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_link(seed: int = 0, **overrides) -> AVLink:
    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    video = VideoDiT(cfg.video, cfg.clip.video)
    randomize_backbone(audio, seed)
    randomize_backbone(video, seed + 1)
    return AVLink(cfg, audio, video)


def tiny_batch(cfg: ModelConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, *cfg.clip.latent_shape, generator=g)
    video = torch.randn(b, *cfg.clip.video_shape, generator=g)
    return audio, video


def random_checkpoint(folder, seed: int = 0, **overrides):
    """A complete checkpoint folder (config, both DiTs, fusion, VAE) of random weights, for the generation
    commands' tests. Text width 384 so that MiniLM prompts fit."""
    from pathlib import Path

    from safetensors.torch import save_file

    from avlink.checkpoint import save_link
    from avlink.codecs.vae import AudioVAE

    folder = Path(folder)
    model = tiny_link(seed, **{"audio.text_dim": 384, "video.text_dim": 384, **overrides})
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    save_link(folder, model)
    torch.manual_seed(seed)
    vae = AudioVAE(model.cfg.clip.audio, hidden=16, depth=1)
    save_file(vae.state_dict(), str(folder / "vae.safetensors"), metadata={"hidden": "16", "depth": "1"})
    return folder
