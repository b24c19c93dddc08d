"""Stable Audio Open 1.0's DiT behind the Backbone protocol: diffusers' `StableAudioDiTModel` and its
`StableAudioProjectionModel`, frozen, called through their public submodules (nothing of theirs is copied or
patched), so that the Fusion Blocks can link it as the audio generator.

Reads top-down: the published architectures, the conventions (the one place that converts between our flow and
the model's diffusion), the text conditioning, the backbone.

Data layout. Our audio is (B, Ta, Da) latent tokens of the Oobleck VAE (codecs/oobleck.py), Da = 64; the module
takes (B, 64, Ta) and prepends one global token (duration and timestep embedding) whose position its RoPE counts:
the state keeps the audio tokens alone in `x` (the Fusion Blocks see audio tokens only) and carries the global
token in `extra["prefix"]`, rejoined around the blocks.

Text conditioning as StableAudioPipeline builds it: T5 states (B, L, 768) with padded positions zeroed, padded to
the tokenizer's 128 tokens (PROMPT_TOKENS), through the projection model's text projection, then the
seconds_start and seconds_total embeddings appended as two context tokens; the global state is those two
concatenated (B, 1, 1536). seconds_start = 0 and seconds_total = the window's length, Ta / eta seconds: the
adapter reads the length from the number of tokens, as the pipeline conditions on the length it generates. The
module's cross-attention takes no mask (the pipeline passes none, and the model was trained on zeroed padding that
still takes attention weight), so the number of zero tokens counts: a prompt is padded to the 128 tokens of
training whatever L the caller gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from diffusers import StableAudioDiTModel, StableAudioProjectionModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from avlink.backbones.pretrained import build_module, zero_text
from avlink.backbones.protocol import StreamState, TextCond
from avlink.config import PretrainedConfig
from avlink.seq import AudioGeometry

DEFAULT = "stable-audio-open-1.0"
DOWNLOAD = "stabilityai/stable-audio-open-1.0 (huggingface.co)"

# transformer/config.json of stabilityai/stable-audio-open-1.0, as diffusers' scripts/convert_stable_audio.py
# derives it from the release's model_config.json (stable-audio-tools): io_channels 64, embed_dim 1536, depth 24,
# num_heads 24 (head dim 1536 / 24 = 64), cond_token_dim 768 (kv heads 768 / 64 = 12), global_cond_dim 1536,
# sample_size 2097152 / 2048 = 1024 latent frames; time_proj_dim is diffusers' 256.
ARCHITECTURES = {
    DEFAULT: {
        "sample_size": 1024, "in_channels": 64, "num_layers": 24, "attention_head_dim": 64,
        "num_attention_heads": 24, "num_key_value_attention_heads": 12, "out_channels": 64,
        "cross_attention_dim": 768, "time_proj_dim": 256, "global_states_input_dim": 1536,
        "cross_attention_input_dim": 768,
    },
}
# projection_model/config.json, from the same script: t5-base's d_model 768, cond_dim 768, and the
# seconds_start / seconds_total conditioners' min_val 0 and max_val 512.
PROJECTIONS = {
    DEFAULT: {"text_encoder_dim": 768, "conditioning_dim": 768, "min_value": 0, "max_value": 512},
}
PROMPT_TOKENS = 128  # the T5 tokenizer's max_length in the release (conditioning "prompt": max_length 128)


# -- conventions ----------------------------------------------------------------------------------------------
#
# Ours: t in [0, 1], 0 = noise, 1 = data; x_t = t * x1 + (1 - t) * x0 (x0 the noise); velocity = x1 - x0.
#
# Stable Audio Open: a v-objective on the variance-preserving cosine path with EDM preconditioning, sigma_data = 1
# (diffusers' CosineDPMSolverMultistepScheduler, whose precondition_* are EDMEulerScheduler's):
#   the sampler's state is x_ve = x1 + sigma * noise;
#   precondition_inputs:  the model sees c_in * x_ve, c_in = 1 / sqrt(sigma^2 + 1);
#   precondition_noise:   its timestep is atan(sigma) * 2 / pi;
#   precondition_outputs: x1_hat = c_skip * x_ve + c_out * F, c_skip = 1 / (sigma^2 + 1),
#                         c_out = -sigma / sqrt(sigma^2 + 1) ("v_prediction").
# With sigma = tan(phi): c_in * x_ve = cos(phi) * x1 + sin(phi) * noise =: x_vp, the timestep is phi * 2 / pi, and
# x1_hat = cos^2 * x_ve - sin * F = cos * x_vp - sin * F, which is x1 exactly when F = v = cos * noise - sin * x1.
# Then noise_hat = sin * x_vp + cos * v (= noise for that v: sin cos x1 + sin^2 n + cos^2 n - sin cos x1).
#
# Our point is the same point up to scale: x_t = t * x_ve with sigma = (1 - t) / t; dividing by
# r = sqrt(t^2 + (1 - t)^2) gives x_vp = x_t / r with cos = t / r, sin = (1 - t) / r, and phi = atan2(1 - t, t).
# Our velocity is x1_hat - noise_hat = (cos - sin) * x_vp - (sin + cos) * v: exact, no approximation, and finite on
# all of [0, 1] because r >= 1 / sqrt(2) (t = 0: pure noise, phi = pi / 2, timestep 1; t = 1: data, timestep 0).


@dataclass
class DiffusionPoint:
    """Our (x_t, t) as the module sees it: x (B, Ta, Da) = x_vp; cos, sin (B, 1, 1); timestep (B,) = phi * 2 / pi."""

    x: Tensor
    cos: Tensor
    sin: Tensor
    timestep: Tensor


def diffusion_point(x_t: Tensor, t: Tensor) -> DiffusionPoint:
    """Our flow point -> the module's variance-preserving input and timestep (conventions above), in float64 for
    the angles and x_t's dtype for the sample."""
    t = t.to(torch.float64)
    r = torch.sqrt(t**2 + (1 - t) ** 2)
    cos, sin = (t / r)[:, None, None], ((1 - t) / r)[:, None, None]
    timestep = torch.atan2(1 - t, t) * (2 / math.pi)
    return DiffusionPoint((x_t / r[:, None, None]).to(x_t.dtype), cos, sin, timestep)


def flow_velocity(point: DiffusionPoint, v: Tensor) -> Tensor:
    """The module's v-prediction at a point -> our velocity x1_hat - noise_hat, in float64."""
    x, v = point.x.to(torch.float64), v.to(torch.float64)
    x1 = point.cos * x - point.sin * v
    noise = point.sin * x + point.cos * v
    return x1 - noise


# -- text conditioning ---------------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """The module's conditions for one batch: context (B, PROMPT_TOKENS + 2, C) for cross-attention (before its
    cross_attention_proj), global_states (B, 1, 2C) for the prepended global token."""

    context: Tensor
    global_states: Tensor


def _padded(text: TextCond, length: int) -> TextCond:
    """Padded with masked zeros to `length` tokens, as the pipeline's tokenizer pads every prompt."""
    missing = length - text.tokens.shape[1]
    assert missing >= 0, f"prompt of {text.tokens.shape[1]} tokens; the model was trained on at most {length}"
    pad = nn.functional.pad
    return TextCond(pad(text.tokens, (0, 0, 0, missing)), pad(text.mask, (0, missing), value=False))


def conditioning(projection: StableAudioProjectionModel, text: TextCond, seconds: float) -> Conditioning:
    """StableAudioPipeline's encode_prompt and encode_duration for a prompt and a clip of `seconds` seconds.

    A row with no prompt (all its states zero: `null_text_cond`, or a row that drop_text dropped) gets the
    pipeline's unconditional context: zeros, duration tokens included (its guidance without a negative prompt is
    zeros_like of the whole context, while the global token keeps the durations). The pipeline pads that with
    128 zero tokens and the null text has one; either way the keys and values are all zero (the context projection
    and the attention projections have no bias), so the attention output is zero for any number of them."""
    dtype = next(projection.parameters()).dtype
    text = _padded(text, PROMPT_TOKENS)
    mask = text.mask[..., None]
    states = torch.where(mask, text.tokens.to(dtype), 0.0)  # padding -> 0, as encode_prompt does
    no_prompt = ~(states != 0).flatten(1).any(1)  # (B,)
    states = projection(text_hidden_states=states).text_hidden_states * mask.to(dtype)  # (B, L, C)
    b = states.shape[0]
    start = torch.zeros(b, device=states.device)
    total = torch.full((b,), float(seconds), device=states.device)
    durations = projection(start_seconds=start, end_seconds=total)
    first, last = durations.seconds_start_hidden_states, durations.seconds_end_hidden_states  # (B, 1, C) each
    context = torch.cat([states, first, last], dim=1)  # (B, L + 2, C)
    context = torch.where(no_prompt[:, None, None], torch.zeros_like(context), context)
    return Conditioning(context, torch.cat([first, last], dim=2))  # global: (B, 1, 2C)


# -- the backbone --------------------------------------------------------------------------------------------
class StableAudioBackbone(nn.Module):
    """Stable Audio Open's DiT as a Backbone: embed / run_blocks / head over audio latents (B, Ta, 64)."""

    text_length = PROMPT_TOKENS  # what its text encoder pads a prompt to (codecs.text.PretrainedTextEncoder)
    download = DOWNLOAD

    def __init__(self, cfg: PretrainedConfig, geometry: AudioGeometry):
        super().__init__()
        self.cfg, self.geometry = cfg, geometry
        self.transformer = build_module(StableAudioDiTModel, cfg, "transformer", ARCHITECTURES, DEFAULT, DOWNLOAD)
        self.projection = build_module(StableAudioProjectionModel, cfg, "projection_model", PROJECTIONS, DEFAULT,
                                       DOWNLOAD)
        channels = self.transformer.config.in_channels
        assert geometry.latent_dim == channels, (
            f"audio geometry has {geometry.latent_dim}-d latents, the Stable Audio DiT takes {channels}")
        # Recompute each block's activations in backward instead of storing them (memory for compute).
        self.activation_checkpointing = False

    # -- the Backbone protocol -------------------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        return self.transformer.inner_dim

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def eta(self) -> float:
        """Latent frames per second (44100 / 2048 for the released VAE)."""
        return self.geometry.eta

    @property
    def text_dim(self) -> int:
        """Width of the T5 states the prompt comes as (768: t5-base)."""
        return self.projection.config.text_encoder_dim

    def null_text_cond(self, batch_size: int) -> TextCond:
        """No prompt: one zero state, which `conditioning` turns into the pipeline's all-zero context."""
        return zero_text(batch_size, self.text_dim, self.transformer.proj_in.weight.device)

    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        return self.geometry.token_times(grid[0], device)

    def rope(self, num_tokens: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (N + 1, head_dim / 2): the module's partial RoPE over the global token and N audio
        tokens, as StableAudioPipeline computes it."""
        dim = self.transformer.config.attention_head_dim // 2
        positions = torch.arange(num_tokens + 1, device=device)
        return get_1d_rotary_pos_embed(dim, positions, use_real=True, repeat_interleave_real=False)

    def embed(self, x_t: Tensor, t: Tensor, text: TextCond | None = None) -> StreamState:
        dit = self.transformer
        b, n, channels = x_t.shape
        assert channels == dit.config.in_channels, f"audio latent must be (B, Ta, {dit.config.in_channels}), got " \
                                                   f"{tuple(x_t.shape)}"
        t = t.expand(b) if t.ndim == 0 or t.shape[0] == 1 else t
        assert t.shape == (b,), f"t must be (B,) = ({b},), got {tuple(t.shape)}"
        text = text if text is not None else self.null_text_cond(b)
        assert text.tokens.shape[-1] == self.text_dim, (
            f"text states are {text.tokens.shape[-1]}-d, Stable Audio expects {self.text_dim}-d T5 states")
        cond = conditioning(self.projection, text, n / self.eta)
        point = diffusion_point(x_t, t)
        dtype = dit.dtype
        time = dit.timestep_proj(dit.time_proj(point.timestep.to(dtype)))  # (B, D)
        prefix = dit.global_proj(cond.global_states.to(dtype)) + time[:, None]  # (B, 1, D)
        x = point.x.to(dtype).transpose(1, 2)  # (B, C, Ta): the module's layout
        x = dit.proj_in((dit.preprocess_conv(x) + x).transpose(1, 2))  # (B, Ta, D)
        context = dit.cross_attention_proj(cond.context.to(dtype))  # (B, L + 2, Dc)
        return StreamState(
            x=x, t=t, c=time,
            times=self.token_times((n,), x.device),
            angles=self.rope(n, x.device),
            text=context,
            text_mask=torch.ones(context.shape[:2], dtype=torch.bool, device=x.device),  # the module masks nothing
            grid=(n,),
            extra={"prefix": prefix, "x_t": x_t},
        )

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState:
        assert 0 <= start <= stop <= self.num_blocks, f"blocks [{start}, {stop}) out of 0..{self.num_blocks}"
        x = torch.cat([state.extra["prefix"], state.x], dim=1)  # (B, 1 + Ta, D): the global token first
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.transformer.transformer_blocks[start:stop]:
            args = (x, None, state.text, None, state.angles)  # no masks, as the pipeline calls it
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return replace(state.with_x(x[:, 1:]), extra={**state.extra, "prefix": x[:, :1]})

    def head(self, state: StreamState) -> Tensor:
        dit = self.transformer
        # proj_out is per token, so the global token the module drops after it can be dropped before.
        v = dit.proj_out(state.x).transpose(1, 2)  # (B, C, Ta)
        v = (dit.postprocess_conv(v) + v).transpose(1, 2)  # (B, Ta, C)
        x_t = state.extra["x_t"]
        return flow_velocity(diffusion_point(x_t, state.t), v).to(x_t.dtype)

    def forward(self, x_t: Tensor, t: Tensor, text: TextCond | None = None) -> Tensor:
        """The generator alone (T2A): velocity of the whole stack."""
        return self.head(self.run_blocks(self.embed(x_t, t, text), 0, self.num_blocks))
