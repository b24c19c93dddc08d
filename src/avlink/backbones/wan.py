"""Wan 2.x's text-to-video transformer behind the Backbone protocol: diffusers' `WanTransformer3DModel`, frozen,
called through its own submodules (patch embedding, RoPE, condition embedder, blocks, output norm and projection;
nothing of it is copied or patched), so that the Fusion Blocks can link it as the video generator.

Reads top-down: the published architectures, the conventions (the one place that converts between our flow and
Wan's), the backbone.

Data layout. Our video is Wan's normalised VAE latent (B, 16, 1 + k, H / 8, W / 8) (codecs/wan_vae.py); the
transformer patchifies it 1 x 2 x 2 into frame-major tokens. A latent frame's tokens share its start time: latent
frame 0 is pixel frame 0 alone, latent frame k >= 1 starts at pixel frame 1 + 4 (k - 1), so eta (token positions
per second along time, for the time-aligned RoPE of the Fusion Blocks) is fps / 4 and the first step is shorter.

Text. UMT5-XXL states (B, L, 4096); WanPipeline pads every prompt with zero states to 512 tokens and its
cross-attention takes no mask, so the zero tokens take attention weight: the adapter pads to 512 likewise, zeroing
masked positions. No prompt (`null_text_cond`) is all-zero states; WanPipeline's unconditional branch encodes its
negative prompt instead (by default "", whose states are UMT5's end-of-sequence state followed by zeros), which
needs the 11 GB text encoder: without a prompt the adapter uses the all-zero context, which loads none.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from avlink.backbones.pretrained import build_module, zero_text
from avlink.backbones.protocol import StreamState, TextCond
from avlink.config import PretrainedConfig
from avlink.seq import VideoGeometry

DEFAULT = "Wan2.1-T2V-1.3B"
DOWNLOAD = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (huggingface.co)"
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length: every prompt is padded to it

# transformer/config.json of the Wan-AI "-Diffusers" releases, as diffusers' scripts/convert_wan_to_diffusers.py
# writes them (Wan-T2V-1.3B and Wan-T2V-14B): the rest are WanTransformer3DModel's defaults (freq_dim 256,
# rope_max_seq_len 1024, cross_attn_norm, qk_norm "rms_norm_across_heads", eps 1e-6, patch 1 x 2 x 2).
_COMMON = {"patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
           "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
           "eps": 1e-6, "added_kv_proj_dim": None}
ARCHITECTURES = {
    "Wan2.1-T2V-1.3B": {**_COMMON, "num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960},
    "Wan2.1-T2V-14B": {**_COMMON, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824},
}


# -- conventions ----------------------------------------------------------------------------------------------
#
# Ours: t in [0, 1], 0 = noise, 1 = data; x_t = t * x1 + (1 - t) * x0 (x0 the noise); velocity = x1 - x0.
# Wan (diffusers' flow-matching schedulers, num_train_timesteps 1000): x = (1 - sigma) * x1 + sigma * noise, the
# transformer takes timestep = 1000 * sigma and predicts noise - x1. So sigma = 1 - t, and our velocity is minus
# its output. (Wan's samplers shift the sigma grid, flow_shift 3 at 480p; that is a choice of step times, not of
# the model, and our solvers take their own grid.)
TIMESTEPS = 1000


def wan_timestep(t: Tensor) -> Tensor:
    """Our flow time (B,) -> the transformer's timestep, 1000 * sigma."""
    return (1 - t.float()) * TIMESTEPS


def flow_velocity(output: Tensor) -> Tensor:
    """The transformer's prediction (noise - x1) -> our velocity (x1 - noise)."""
    return -output


class WanBackbone(nn.Module):
    """Wan's transformer as a Backbone: embed / run_blocks / head over normalised VAE latents."""

    text_length = TEXT_TOKENS
    download = DOWNLOAD

    def __init__(self, cfg: PretrainedConfig, geometry: VideoGeometry):
        super().__init__()
        self.cfg, self.geometry = cfg, geometry
        self.module = build_module(WanTransformer3DModel, cfg, "transformer", ARCHITECTURES, DEFAULT, DOWNLOAD)
        channels = self.module.config.in_channels
        assert geometry.flow_channels == channels, (
            f"video geometry has {geometry.flow_channels}-channel latents, the Wan transformer takes {channels}")
        # Recompute each block's activations in backward instead of storing them (memory for compute).
        self.activation_checkpointing = False

    # -- the Backbone protocol -------------------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        return self.module.config.num_attention_heads * self.module.config.attention_head_dim

    @property
    def num_blocks(self) -> int:
        return len(self.module.blocks)

    @property
    def eta(self) -> float:
        """Latent frames per second after the first: fps / the VAE's time stride."""
        return self.geometry.fps / self.geometry.codec_stride[0]

    @property
    def text_dim(self) -> int:
        return self.module.config.text_dim

    def null_text_cond(self, batch_size: int) -> TextCond:
        """No prompt: zero states (padded to the all-zero context, module docstring)."""
        return zero_text(batch_size, self.text_dim, self.module.proj_out.weight.device)

    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        frames, height, width = grid
        stride = self.geometry.codec_stride[0] * self.module.config.patch_size[0]
        k = torch.arange(frames, dtype=torch.float64, device=device)
        first = torch.where(k == 0, 0.0, 1 + stride * (k - 1))  # the pixel frame each latent frame starts at
        return (first / self.geometry.fps).repeat_interleave(height * width)

    def _context(self, text: TextCond, dtype: torch.dtype) -> Tensor:
        """Prompt states as WanPipeline passes them: masked positions zero, padded with zeros to 512 tokens."""
        states = torch.where(text.mask[..., None], text.tokens, 0.0).to(dtype)
        missing = TEXT_TOKENS - states.shape[1]
        assert missing >= 0, f"prompt of {states.shape[1]} tokens; Wan takes at most {TEXT_TOKENS}"
        return nn.functional.pad(states, (0, 0, 0, missing))

    def embed(self, x_t: Tensor, t: Tensor, text: TextCond | None = None) -> StreamState:
        m = self.module
        assert x_t.ndim == 5 and x_t.shape[1] == m.config.in_channels, (
            f"video latent must be (B, {m.config.in_channels}, T, H, W), got {tuple(x_t.shape)}")
        b, _, frames, height, width = x_t.shape
        t = t.expand(b) if t.ndim == 0 or t.shape[0] == 1 else t
        assert t.shape == (b,), f"t must be (B,) = ({b},), got {tuple(t.shape)}"
        text = text if text is not None else self.null_text_cond(b)
        assert text.tokens.shape[-1] == self.text_dim, (
            f"text states are {text.tokens.shape[-1]}-d, Wan expects {self.text_dim}-d UMT5 states")
        x = x_t.to(m.dtype)
        pt, ph, pw = m.config.patch_size
        grid = (frames // pt, height // ph, width // pw)
        tokens = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D), frame-major
        temb, modulation, context, _ = m.condition_embedder(wan_timestep(t).to(x.device), self._context(text, m.dtype))
        return StreamState(
            x=tokens, t=t, c=temb,  # temb (B, D): the head's modulation
            times=self.token_times(grid, x.device),
            angles=m.rope(x),  # (cos, sin), each (1, N, 1, head_dim): per geometry
            text=context,  # (B, 512, D)
            text_mask=torch.ones(context.shape[:2], dtype=torch.bool, device=x.device),  # the module masks nothing
            grid=grid,
            extra={"modulation": modulation.unflatten(1, (6, -1))},  # (B, 6, D): every block's adaLN
        )

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState:
        assert 0 <= start <= stop <= self.num_blocks, f"blocks [{start}, {stop}) out of 0..{self.num_blocks}"
        x = state.x
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.module.blocks[start:stop]:
            args = (x, state.text, state.extra["modulation"], state.angles)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return replace(state, x=x)

    def head(self, state: StreamState) -> Tensor:
        m = self.module
        shift, scale = (m.scale_shift_table + state.c.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
        x = (m.norm_out(state.x.float()) * (1 + scale) + shift).type_as(state.x)
        x = m.proj_out(x)  # (B, N, C * pt * ph * pw)
        b, (frames, height, width) = x.shape[0], state.grid
        pt, ph, pw = m.config.patch_size
        x = x.reshape(b, frames, height, width, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, T, H, W)
        return flow_velocity(x).float()  # the flow's space is float32 (the codec's latents), whatever the weights

    def forward(self, x_t: Tensor, t: Tensor, text: TextCond | None = None) -> Tensor:
        """The generator alone (T2V): velocity of the whole stack."""
        return self.head(self.run_blocks(self.embed(x_t, t, text), 0, self.num_blocks))
