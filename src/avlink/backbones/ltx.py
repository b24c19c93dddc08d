"""LTX-Video's text-to-video transformer behind the Backbone protocol: diffusers' `LTXVideoTransformer3DModel`,
frozen, called through its own submodules (input projection, RoPE, timestep embedding, caption projection, blocks,
output norm and projection; nothing of it is copied or patched), so that the Fusion Blocks can link it as the video
generator.

Reads top-down: the published architectures, the conventions (the one place that converts between our flow and
LTX's), token packing, the backbone.

Data layout. Our video is LTX's normalised VAE latent (B, 128, 1 + k, H / 32, W / 32) (codecs/ltx_vae.py). The
transformer takes no video tensor but packed tokens (B, N, C * pt * p * p), frame-major, as LTXPipeline's
_pack_latents makes them (p = pt = 1 in the published model: one token per latent pixel); `pack` / `unpack` below
do the same. A latent frame's tokens share its start time: latent frame 0 is pixel frame 0 alone, latent frame
k >= 1 starts at pixel frame 1 + 8 (k - 1), so eta (token positions per second along time, for the time-aligned
RoPE of the Fusion Blocks) is fps / 8 and the first step is shorter. LTX's own RoPE places latent frame k at
k * 8 / fps seconds (the pipeline's rope_interpolation_scale, vae_temporal_compression / frame_rate), which the
adapter passes as LTXPipeline does, from the geometry's fps and codec stride.

Text. T5-XXL states (B, L, 4096); LTXPipeline pads every prompt to 128 tokens (T5's states of the padding) and,
unlike Wan, its cross-attention takes the tokenizer's mask (as an additive bias of -10000 on padding, which no
weight survives), so the adapter passes our mask through and the prompt's length does not matter. No prompt
(`null_text_cond`) is one zero state, unmasked. LTXPipeline's unconditional branch encodes its negative prompt
instead (by default "": one real token, T5's end-of-sequence state, then masked padding), which needs the 9 GB text
encoder: without a prompt the adapter attends to the one zero state, which loads none; the key it makes is the
caption projection's response to zero, not to T5's end-of-sequence state, so guidance against it differs from
the pipeline's (a prompt encoded as "" through the folder's T5 gives the pipeline's exactly).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import LTXVideoTransformer3DModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from avlink.backbones.dit import null_for_empty
from avlink.backbones.pretrained import build_module
from avlink.backbones.protocol import StreamState, TextCond
from avlink.config import PretrainedConfig
from avlink.seq import VideoGeometry

DEFAULT = "LTX-Video-0.9"
DOWNLOAD = "Lightricks/LTX-Video (huggingface.co)"
TEXT_TOKENS = 128  # LTXPipeline's max_sequence_length: every prompt is padded (and masked) to it

# transformer/config.json of Lightricks/LTX-Video (0.9.0 and 0.9.1, "ltx-video-2b"): diffusers'
# scripts/convert_ltx_to_diffusers.py builds `LTXVideoTransformer3DModel()` with its defaults and loads the release
# into it strictly: 28 layers, 32 heads of 64 (width 2048), cross-attention 2048, T5-XXL captions 4096, 128 latent
# channels, patch 1 x 1 x 1, RMS qk-norm across heads, eps 1e-6.
ARCHITECTURES = {
    "LTX-Video-0.9": {
        "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 32,
        "attention_head_dim": 64, "cross_attention_dim": 2048, "num_layers": 28, "activation_fn": "gelu-approximate",
        "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-6,
        "caption_channels": 4096, "attention_bias": True, "attention_out_bias": True,
    },
}


# -- conventions ----------------------------------------------------------------------------------------------
#
# Ours: t in [0, 1], 0 = noise, 1 = data; x_t = t * x1 + (1 - t) * x0 (x0 the noise); velocity = x1 - x0.
# LTX (LTXPipeline with FlowMatchEulerDiscreteScheduler, num_train_timesteps 1000): x = (1 - sigma) * x1 +
# sigma * noise, the transformer takes timestep = 1000 * sigma (the scheduler's timesteps, passed as they are) and
# predicts noise - x1 (the scheduler's step is x + (sigma_next - sigma) * prediction). So sigma = 1 - t, and our
# velocity is minus its output. (LTX's scheduler shifts the sigma grid by the token count, shift_terminal 0.1; that
# is a choice of step times, not of the model, and our solvers take their own grid.)
TIMESTEPS = 1000


def ltx_timestep(t: Tensor) -> Tensor:
    """Our flow time (B,) -> the transformer's timestep, 1000 * sigma."""
    return (1 - t.float()) * TIMESTEPS


def flow_velocity(output: Tensor) -> Tensor:
    """The transformer's prediction (noise - x1) -> our velocity (x1 - noise)."""
    return -output


def text_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) bool -> (B, 1, L) the additive cross-attention bias the module makes of a 2-d mask: -10000 on padding."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


# -- token packing (LTXPipeline's layout) ----------------------------------------------------------------------
def pack(x: Tensor, p: int, pt: int) -> Tensor:
    """(B, C, T, H, W) -> (B, T/pt * H/p * W/p, C * pt * p * p) tokens, frame-major, features channel-major."""
    b, c, frames, height, width = x.shape
    x = x.reshape(b, c, frames // pt, pt, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (frames // pt) * (height // p) * (width // p), -1)


def unpack(tokens: Tensor, grid: tuple[int, int, int], p: int, pt: int) -> Tensor:
    """pack's inverse: (B, N, C * pt * p * p) tokens of a (T', H', W') grid -> (B, C, T' pt, H' p, W' p)."""
    (b, _, _), (frames, height, width) = tokens.shape, grid
    x = tokens.reshape(b, frames, height, width, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, x.shape[1], frames * pt, height * p, width * p)


class LTXBackbone(nn.Module):
    """LTX-Video's transformer as a Backbone: embed / run_blocks / head over normalised VAE latents."""

    text_length = TEXT_TOKENS
    download = DOWNLOAD

    def __init__(self, cfg: PretrainedConfig, geometry: VideoGeometry):
        super().__init__()
        self.cfg, self.geometry = cfg, geometry
        self.module = build_module(LTXVideoTransformer3DModel, cfg, "transformer", ARCHITECTURES, DEFAULT, DOWNLOAD)
        channels = self.module.config.in_channels
        assert geometry.flow_channels == channels, (
            f"video geometry has {geometry.flow_channels}-channel latents, the LTX transformer takes {channels}")
        # Recompute each block's activations in backward instead of storing them (memory for compute).
        self.activation_checkpointing = False

    # -- the Backbone protocol -------------------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        return self.module.config.num_attention_heads * self.module.config.attention_head_dim

    @property
    def num_blocks(self) -> int:
        return len(self.module.transformer_blocks)

    @property
    def eta(self) -> float:
        """Token frames per second after the first: fps / (the VAE's time stride * the temporal patch)."""
        return self.geometry.fps / (self.geometry.codec_stride[0] * self.module.config.patch_size_t)

    @property
    def text_dim(self) -> int:
        return self.module.config.caption_channels

    @property
    def rope_interpolation_scale(self) -> tuple[float, float, float]:
        """LTXPipeline's (vae_temporal_compression / frame_rate, spatial compression, spatial compression)."""
        stride_t, stride_s = self.geometry.codec_stride
        return stride_t / self.geometry.fps, stride_s, stride_s

    def null_text_cond(self, batch_size: int) -> TextCond:
        """No prompt: one zero state, unmasked (module docstring: how it differs from LTXPipeline's "")."""
        device = self.module.proj_out.weight.device
        return TextCond(torch.zeros(batch_size, 1, self.text_dim, device=device),
                        torch.ones(batch_size, 1, dtype=torch.bool, device=device))

    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        frames, height, width = grid
        stride, pt = self.geometry.codec_stride[0], self.module.config.patch_size_t
        k = torch.arange(frames, dtype=torch.float64, device=device) * pt  # each token frame's first latent frame
        first = torch.where(k == 0, 0.0, 1 + stride * (k - 1))  # the pixel frame it starts at
        return (first / self.geometry.fps).repeat_interleave(height * width)

    def embed(self, x_t: Tensor, t: Tensor, text: TextCond | None = None) -> StreamState:
        m = self.module
        assert x_t.ndim == 5 and x_t.shape[1] == m.config.in_channels, (
            f"video latent must be (B, {m.config.in_channels}, T, H, W), got {tuple(x_t.shape)}")
        b, _, frames, height, width = x_t.shape
        t = t.expand(b) if t.ndim == 0 or t.shape[0] == 1 else t
        assert t.shape == (b,), f"t must be (B,) = ({b},), got {tuple(t.shape)}"
        text = null_for_empty(text, self.null_text_cond(b)) if text is not None else self.null_text_cond(b)
        assert text.tokens.shape[-1] == self.text_dim, (
            f"text states are {text.tokens.shape[-1]}-d, LTX expects {self.text_dim}-d T5 states")
        assert text.tokens.shape[1] <= TEXT_TOKENS, f"prompt of {text.tokens.shape[1]} tokens; LTX takes {TEXT_TOKENS}"
        p, pt = m.config.patch_size, m.config.patch_size_t
        grid = (frames // pt, height // p, width // p)
        tokens = m.proj_in(pack(x_t.to(m.dtype), p, pt))  # (B, N, D)
        temb, embedded = m.time_embed(ltx_timestep(t).to(x_t.device), batch_size=b, hidden_dtype=tokens.dtype)
        context = m.caption_projection(text.tokens.to(m.dtype))  # (B, L, D)
        return StreamState(
            x=tokens, t=t, c=embedded,  # embedded timestep (B, D): the head's modulation
            times=self.token_times(grid, x_t.device),
            angles=m.rope(tokens[:1], *grid, self.rope_interpolation_scale),  # (cos, sin), each (1, N, D)
            text=context, text_mask=text.mask.to(x_t.device),  # the blocks take the mask as the module's bias
            grid=grid,
            extra={"modulation": temb.view(b, 1, -1)},  # (B, 1, 6 D): every block's adaLN
        )

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState:
        assert 0 <= start <= stop <= self.num_blocks, f"blocks [{start}, {stop}) out of 0..{self.num_blocks}"
        x = state.x
        bias = text_bias(state.text_mask, x.dtype)  # (B, 1, L)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.module.transformer_blocks[start:stop]:
            args = (x, state.text, state.extra["modulation"], state.angles, bias)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return replace(state, x=x)

    def head(self, state: StreamState) -> Tensor:
        m = self.module
        shift, scale = (m.scale_shift_table + state.c[:, None, None]).unbind(2)  # (B, 1, D) each
        x = m.proj_out(m.norm_out(state.x) * (1 + scale) + shift)  # (B, N, C * pt * p * p)
        x = unpack(x, state.grid, m.config.patch_size, m.config.patch_size_t)  # (B, C, T, H, W)
        return flow_velocity(x).float()  # the flow's space is float32 (the codec's latents), whatever the weights

    def forward(self, x_t: Tensor, t: Tensor, text: TextCond | None = None) -> Tensor:
        """The generator alone (T2V): velocity of the whole stack."""
        return self.head(self.run_blocks(self.embed(x_t, t, text), 0, self.num_blocks))
