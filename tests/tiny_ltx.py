"""A tiny LTX-Video (transformer and causal video VAE) in the published diffusers folder layout, random weights,
built offline from config dicts: what the LTX adapter tests load."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from avlink.seq import VideoGeometry

LATENT = 8  # latent channels (the release's: 128)
TINY_LTX = {"in_channels": LATENT, "out_channels": LATENT, "patch_size": 1, "patch_size_t": 1,
            "num_attention_heads": 2, "attention_head_dim": 12, "cross_attention_dim": 24, "num_layers": 3,
            "caption_channels": 16}
# LTX-Video 0.9.0's VAE layout at the smallest widths and one layer per block: patch 4 and three spatio-temporal
# downsamplings, so the release's compression, 8x in time and 32x in space; 8 latent channels.
TINY_LTX_VAE = {"latent_channels": LATENT, "block_out_channels": [8, 8, 8, 8],
                "decoder_block_out_channels": [8, 8, 8, 8], "layers_per_block": [1, 1, 1, 1, 1],
                "decoder_layers_per_block": [1, 1, 1, 1, 1], "scaling_factor": 0.5}
# 0.9.1's timestep-conditioned decoder (residual 2x upsamplers that halve the width, so it doubles per level),
# without its noise injection, which is unseeded: the decode the codec passes timestep 0 to.
TINY_LTX_VAE_091 = {**TINY_LTX_VAE, "decoder_block_out_channels": [8, 16, 32], "decoder_layers_per_block": [1, 1, 1, 1],
                    "decoder_spatio_temporal_scaling": [True, True, True], "upsample_residual": [True, True, True],
                    "upsample_factor": [2, 2, 2], "decoder_inject_noise": [False, False, False, False],
                    "timestep_conditioning": True}


def tiny_ltx_folder(path: Path, seed: int = 0, timestep_conditioning: bool = False) -> Path:
    """path/transformer and path/vae (safetensors, config.json) and path/model_index.json."""
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel.from_config(TINY_LTX)
    for p in transformer.parameters():  # give every part a value of its own: nothing may pass unseen
        p.data.add_(torch.randn_like(p) * 0.02)
    transformer.save_pretrained(path / "transformer", safe_serialization=True)
    vae = AutoencoderKLLTXVideo.from_config(TINY_LTX_VAE_091 if timestep_conditioning else TINY_LTX_VAE)
    vae.latents_mean.copy_(torch.linspace(-0.3, 0.4, LATENT))  # the release's per-channel statistics, made up
    vae.latents_std.copy_(torch.linspace(0.5, 2.0, LATENT))
    vae.save_pretrained(path / "vae", safe_serialization=True)
    index = {"_class_name": "LTXPipeline", "transformer": ["diffusers", "LTXVideoTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLLTXVideo"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def tiny_ltx_geometry() -> VideoGeometry:
    """64x64 px at 25 fps through the tiny VAE: latents (8, 1 + k, 2, 2), four tokens per latent frame."""
    return VideoGeometry(fps=25.0, height=64, width=64, patch=(1, 32, 32), codec="ltx-vae", codec_stride=(8, 32),
                         codec_channels=LATENT)
