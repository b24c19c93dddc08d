"""Tiny models shared by the tests."""

from __future__ import annotations

import math

import numpy as np
import torch

from avlink.config import ModelConfig, get_preset
from avlink.fusion.linked import AVLink
from avlink.system import build_model


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
    model = build_model(cfg)
    randomize_backbone(model.audio, seed)
    randomize_backbone(model.video, seed + 1)
    return model


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


def add_fast_set(folder, seed: int = 0):
    """A fast V2A set (no reinjection, random weights) for the checkpoint folder's model, saved beside its fusion
    file as the recipe saves one; returns its tensors."""
    from pathlib import Path

    from avlink.checkpoint import FAST_OVERRIDES, load_config, save_fast_fusion

    cfg = load_config(Path(folder) / "config.json").override(**FAST_OVERRIDES)
    torch.manual_seed(seed)
    static = build_model(cfg, "meta", tasks=("v2a",))
    g = torch.Generator().manual_seed(seed + 7)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in static.fusion.state_dict().items()}
    save_fast_fusion(folder, state, {"part": "fusion", "task": "v2a"})
    return state


def random_upsampler(folder, seed: int = 0, dim: int = 16, depth: int = 1):
    """An upsampler.safetensors of random weights in a checkpoint folder, for the folder's base frames, as
    `avlink train upsampler` exports one (its config in the metadata)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from avlink.checkpoint import load_config
    from avlink.system import UPSAMPLER_FILE, build_upsampler, upsampler_metadata

    folder = Path(folder)
    cfg = load_config(folder / "config.json").override(**{"upsampler.dim": dim, "upsampler.depth": depth})
    torch.manual_seed(seed)
    model = build_upsampler(cfg)
    randomize_backbone(model, seed)
    save_file(model.state_dict(), str(folder / UPSAMPLER_FILE), metadata=upsampler_metadata(cfg))
    return folder


# --- comparing two training runs that differ only in summation order (one process against several) ------------
#
# AdamW moves a weight by lr * m / (sqrt(v) + eps). Where a gradient is about zero, that step changes by up to
# lr / eps per unit of gradient: with eps = 1e-8, a float32 rounding difference of 1e-10 in such a gradient moves
# the weight by 1e-5, so float32 runs that are both correct can end 1e-5 apart, more on some CPUs than on others.
# The distributed workers therefore train in float64, where the bound below is small and meaningful.
GRAD_ROUNDING_F64 = 1e-12  # 2^-52 relative, summed over up to ~1e4 terms of size <= 1: a generous bound
FLOAT32_ULP = 2.0**-23


def adamw_drift(steps: int, lr: float, eps: float = 1e-8, grad_error: float = GRAD_ROUNDING_F64) -> float:
    """The most that one weight of two AdamW runs may differ after `steps` steps when their gradients differ by at
    most grad_error per entry: each step adds at most lr * grad_error / eps."""
    return steps * lr * grad_error / eps


def assert_states_close(a: dict, b: dict, *, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """Every tensor of a within atol + rtol * |b| of b's; a failure names the worst entry: tensor, index, values."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    worst, over = None, []
    for key in a:
        x, y = a[key].double(), b[key].double()
        assert x.shape == y.shape, f"{what} {key}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        excess = (x - y).abs() - (atol + rtol * y.abs())
        if excess.numel() == 0:
            continue
        index = int(excess.argmax())
        if worst is None or excess.flatten()[index] > worst[0]:
            worst = (float(excess.flatten()[index]), key, index)
        if excess.max() > 0:
            over.append(key)
    if over:
        _, key, index = worst
        x, y = a[key].double().flatten()[index].item(), b[key].double().flatten()[index].item()
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), a[key].shape))
        raise AssertionError(
            f"{what}: {len(over)} of {len(a)} tensors differ beyond atol {atol:.3g} + rtol {rtol:.3g}; the largest "
            f"excess is {key}{list(where)}: {x!r} vs {y!r} (difference {abs(x - y):.3g})")


# --- synthetic events (AV-Align, best-of-N) ---------------------------------------------------------------


def clicks(times: list[float], duration: float, sample_rate: int = 22050) -> np.ndarray:
    """Short decaying noise bursts at `times` (seconds) in silence: one audio onset each."""
    rng = np.random.default_rng(0)
    wave = np.zeros(int(duration * sample_rate))  # no noise floor: its start would be an onset of its own
    n = int(0.08 * sample_rate)
    burst = rng.normal(size=n) * np.exp(-np.arange(n) / (0.015 * sample_rate))
    for t in times:
        start = int(t * sample_rate)
        stop = min(len(wave), start + n)
        wave[start:stop] += 0.5 * burst[:stop - start]
    return wave.astype(np.float32)


def jumping_square(num_frames: int, jumps: list[int], size: int = 64) -> np.ndarray:
    """A textured square that stands still and jumps 6 px at each frame in `jumps`: motion peaks there."""
    rng = np.random.default_rng(1)
    texture = rng.integers(60, 255, size=(16, 16, 3), dtype=np.uint8)
    frames = np.full((num_frames, size, size, 3), 20, np.uint8)
    x = 10
    for k in range(num_frames):
        if k in jumps:
            x += 6
        frames[k, 24:40, x:x + 16] = texture
    return frames


def randomize_published(model, seed: int = 0):
    """Random weights for a published network of many layers (test_embed_video: the FID Inception, the FVD I3D).
    Default init shrinks activations to ~1e-8 over 90 layers; give weights and BN stats trained values.
    """
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()
