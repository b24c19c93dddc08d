"""A tiny Wan 2.x (transformer and causal video VAE) in the published diffusers folder layout, random weights,
built offline from config dicts: what the adapter tests and the linked-model tests load."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from avlink.seq import VideoGeometry

TINY_WAN = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
            "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 3,
            "rope_max_seq_len": 64}
# Wan 2.1's VAE layout (3 levels, time downsampled twice: 4x, space 8x) at the smallest widths; z_dim 4.
TINY_WAN_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                "temperal_downsample": [False, True, True], "latents_mean": [0.1, -0.2, 0.3, 0.0],
                "latents_std": [1.5, 0.5, 2.0, 1.0]}


def tiny_wan_folder(path: Path, seed: int = 0) -> Path:
    """path/transformer and path/vae (safetensors, config.json) and path/model_index.json."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel.from_config(TINY_WAN)
    for p in transformer.parameters():  # give the zero-initialised parts a value too: nothing may pass unseen
        p.data.add_(torch.randn_like(p) * 0.02)
    transformer.save_pretrained(path / "transformer", safe_serialization=True)
    AutoencoderKLWan.from_config(TINY_WAN_VAE).save_pretrained(path / "vae", safe_serialization=True)
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def tiny_wan_geometry() -> VideoGeometry:
    """16x16 px at 16 fps through the tiny VAE: latents (4, 1 + k, 2, 2), one token per latent frame."""
    return VideoGeometry(fps=16.0, height=16, width=16, patch=(1, 16, 16), codec="wan-vae", codec_stride=(4, 8),
                         codec_channels=4)
