"""A tiny Stable Audio Open folder (transformer, projection model, Oobleck VAE) of random weights, laid out as the
published diffusers folder, for the adapter's tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderOobleck, StableAudioDiTModel, StableAudioProjectionModel

from avlink.seq import AudioGeometry

TINY_SA_PROJECTION = {"text_encoder_dim": 12, "conditioning_dim": 8, "min_value": 0, "max_value": 512}
TINY_SA = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "num_layers": 3, "attention_head_dim": 8,
    "num_attention_heads": 2, "num_key_value_attention_heads": 1, "cross_attention_dim": 8, "time_proj_dim": 16,
    "global_states_input_dim": 2 * TINY_SA_PROJECTION["conditioning_dim"],
    "cross_attention_input_dim": TINY_SA_PROJECTION["conditioning_dim"],
}
# The encoder gives the posterior mean and scale: encoder_hidden_size = 2 * decoder_input_channels (128, 64 released).
TINY_OOBLECK = {
    "encoder_hidden_size": 8, "downsampling_ratios": [2, 4], "channel_multiples": [1, 2], "decoder_channels": 4,
    "decoder_input_channels": 4, "audio_channels": 2, "sampling_rate": 8000,
}
PARTS = {"transformer": (StableAudioDiTModel, TINY_SA), "projection_model": (StableAudioProjectionModel,
                                                                           TINY_SA_PROJECTION),
         "vae": (AutoencoderOobleck, TINY_OOBLECK)}


def tiny_stable_audio_parts(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The three modules at reproducible random weights, by part name."""
    torch.manual_seed(seed)
    return {part: cls.from_config(config) for part, (cls, config) in PARTS.items()}


def tiny_stable_audio_folder(path: str | Path, seed: int = 0) -> Path:
    """path/{transformer, projection_model, vae}/ (config.json + safetensors) and model_index.json."""
    path = Path(path)
    index = {"_class_name": "StableAudioPipeline"}
    for part, module in tiny_stable_audio_parts(seed).items():
        module.save_pretrained(path / part, safe_serialization=True)
        index[part] = ["diffusers", type(module).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def tiny_stable_audio_geometry() -> AudioGeometry:
    """8000 Hz, 8 samples per latent token (the tiny VAE's strides 2 * 4), 4-d latents: 1000 tokens per second."""
    return AudioGeometry(sample_rate=8000, hop_length=8, latent_downsample=1, latent_dim=4, codec="oobleck",
                         n_fft=16, win_length=16, n_mels=4, f_max=None)
