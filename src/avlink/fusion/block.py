"""Fusion Blocks and the paper's alternative injections (Table 2, "Feature injection").

Every module here maps (x_a, x_v) -> (x̂_a, x̂_v) at one fusion point and writes into a frozen backbone through a
residual that is zero at init, so an untrained link leaves both backbones exactly as they were (the one
exception, `TextConcat`, is said below).

Reads top-down: time helpers, the per-stream half of a block, FusionBlock, then the ablation variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from avlink.config import FusionConfig
from avlink.nn.attention import CrossAttention, SelfAttention
from avlink.nn.layers import MLP, AdaLN, layer_norm, modulated_norm, timestep_embedding
from avlink.nn.rope import rope_angles, time_aligned_positions


@dataclass
class Alignment:
    """Where each token of both streams sits in time; built once per forward by the linked model."""

    times_a: Tensor  # (Na,) seconds
    times_v: Tensor  # (Nv,) seconds
    angles: Tensor  # (Na + Nv, Dh/2) time-aligned RoPE angles of the joint attention, audio tokens first
    angles_a: Tensor  # (Na, Dh/2) a view of the audio rows
    angles_v: Tensor  # (Nv, Dh/2) a view of the video rows
    eta_a: float
    eta_v: float

    @classmethod
    def build(cls, times_a: Tensor, times_v: Tensor, eta_a: float, eta_v: float, cfg: FusionConfig) -> Alignment:
        # tau(n) of Eq. 4: both streams measured in "seconds x eta_v", one 1D rotation over time only. One tensor
        # for both streams, so every Fusion Block of a forward rotates by the same angles object (RoPE caches
        # its rotation per angles tensor).
        positions = time_aligned_positions(torch.cat([times_a, times_v]), eta_v)  # (Na + Nv,)
        angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        angles_a, angles_v = angles.split([times_a.shape[0], times_v.shape[0]])
        return cls(times_a, times_v, angles, angles_a, angles_v, eta_a=eta_a, eta_v=eta_v)


def pool_by_time(x: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, N, d), times (N,) -> (B, T, d) mean over tokens that share a time (a video frame), and (T,) times."""
    unique, inverse = torch.unique(times, sorted=True, return_inverse=True)
    onehot = nn.functional.one_hot(inverse, unique.numel()).to(x.dtype)  # (N, T)
    return torch.einsum("bnd,nt->btd", x, onehot / onehot.sum(0)), unique


def resample_in_time(src_times: Tensor, dst_times: Tensor, dst_eta: float) -> Tensor:
    """(Ndst, Nsrc) averaging weights: each destination token takes the source steps that start inside its own
    time span [tau, tau + 1/eta); where none does (the source is coarser) it repeats the one covering tau."""
    start, end = dst_times[:, None], dst_times[:, None] + 1.0 / dst_eta
    inside = (src_times[None] >= start - 1e-9) & (src_times[None] < end - 1e-9)
    covering = torch.searchsorted(src_times, dst_times + 1e-9, right=False).clamp(min=1) - 1
    repeat = nn.functional.one_hot(covering, src_times.numel()).bool()
    weights = torch.where(inside.any(1, keepdim=True), inside, repeat).double()
    return weights / weights.sum(1, keepdim=True)


def drop_prefix(state_dict: dict[str, Tensor], prefix: str) -> None:
    """Forget the entries of a state dict under prefix (weights a module no longer builds)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


class FusionStream(nn.Module):
    """One stream's half of a Fusion Block: project to D, adaLN-Zero modulation from (t_a, t_v), an MLP that
    projects back to the backbone's width, and the gate of the residual into the frozen backbone.

    output=False: a stream whose fused output nothing reads (the conditioning stream at the last fusion point,
    or at every point when it is not reinjected) only lends its tokens to the other stream's attention, so it
    has no MLP and only the attention input's modulation. Built anyway, those weights would never get a
    gradient: dead in the parameter count, and under DDP an error at the second step."""

    def __init__(self, dim: int, cfg: FusionConfig, output: bool = True):
        super().__init__()
        d = cfg.dim
        self.has_output = output
        self.proj_in = nn.Linear(dim, d)
        self.norm1 = layer_norm(d)
        if output:
            self.norm2 = layer_norm(d)
            self.mlp = MLP(d, int(d * cfg.mlp_ratio), out_dim=dim)
            # shift/scale/gate of attention, shift/scale of the MLP, and the gate of the output residual.
            self.ada = AdaLN(d, (d, d, d, d, d, dim))
        else:
            self.ada = AdaLN(d, (d, d))  # shift/scale of the attention input
            self.register_load_state_dict_pre_hook(self._drop_unread)

    def _drop_unread(self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_) -> None:
        """Checkpoints written when every stream had an output hold this stream's MLP and all six modulation
        chunks. None of it ever reached a velocity, so it is ignored: the MLP dropped, the modulation cut to its
        first two chunks (the same shift and scale)."""
        drop_prefix(state_dict, prefix + "mlp.")
        rows = sum(self.ada.sizes)
        for name in ("ada.linear.weight", "ada.linear.bias"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape[0] > rows:
                state_dict[key] = state_dict[key][:rows]

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.ada(c)

    def normed(self, h: Tensor, mod: tuple[Tensor, ...]) -> Tensor:
        """The attention's input: h normalised and modulated."""
        return modulated_norm(self.norm1, h, mod[0], mod[1])

    def output(self, x: Tensor, h: Tensor, attn_out: Tensor | None, mod: tuple[Tensor, ...]) -> Tensor:
        """x + gate_out * MLP(h + gate * attn_out); a stream without output gives x back (nothing reads it)."""
        if not self.has_output:
            return x
        assert attn_out is not None, "a stream with an output needs its attention's output"
        _, _, gate, shift2, scale2, gate_out = mod
        h = torch.addcmul(h, gate, attn_out)
        return torch.addcmul(x, gate_out, self.mlp(modulated_norm(self.norm2, h, shift2, scale2)))


class FusionBlock(nn.Module):
    """x̂_a, x̂_v = FusionBlock(x_a, x_v, t_a, t_v) (Eq. 3): joint self-attention over the concatenated streams
    with time-aligned RoPE. One attention for both streams, as the paper's text has it; norms, modulation and
    MLPs per stream. `outputs` names the streams whose fused output is read (see FusionStream)."""

    def __init__(self, dim_a: int, dim_v: int, cfg: FusionConfig, outputs: tuple[str, ...] = ("a", "v")):
        super().__init__()
        self.a = FusionStream(dim_a, cfg, "a" in outputs)
        self.v = FusionStream(dim_v, cfg, "v" in outputs)
        self.attn = SelfAttention(cfg.dim, cfg.heads)

    def forward(self, x_a: Tensor, x_v: Tensor, c: Tensor, align: Alignment) -> tuple[Tensor, Tensor]:
        h_a, h_v = self.a.proj_in(x_a), self.v.proj_in(x_v)  # (B, Na, D), (B, Nv, D)
        mod_a, mod_v = self.a.modulation(c), self.v.modulation(c)
        joint = torch.cat([self.a.normed(h_a, mod_a), self.v.normed(h_v, mod_v)], 1)  # (B, Na + Nv, D)
        assert joint.shape[1] == align.angles.shape[0], (
            f"{joint.shape[1]} tokens in the joint attention, alignment for {align.angles.shape[0]}"
        )
        out_a, out_v = self.attn(joint, align.angles).split([h_a.shape[1], h_v.shape[1]], dim=1)
        return self.a.output(x_a, h_a, out_a, mod_a), self.v.output(x_v, h_v, out_v, mod_v)


class CrossAttentionFusion(nn.Module):
    """Ablation "Symm. cross attention": two cross-attention blocks, audio attending to video and video to
    audio, each with its own weights, time-aligned RoPE on queries and keys; both outputs reinjected. A stream
    whose output nothing reads (not in `outputs`) has no cross-attention of its own."""

    def __init__(self, dim_a: int, dim_v: int, cfg: FusionConfig, outputs: tuple[str, ...] = ("a", "v")):
        super().__init__()
        self.a = FusionStream(dim_a, cfg, "a" in outputs)
        self.v = FusionStream(dim_v, cfg, "v" in outputs)
        self.a_from_v = CrossAttention(cfg.dim, cfg.heads) if "a" in outputs else None
        self.v_from_a = CrossAttention(cfg.dim, cfg.heads) if "v" in outputs else None
        self.register_load_state_dict_pre_hook(self._drop_unread)

    def _drop_unread(self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_) -> None:
        """Older checkpoints hold both cross-attentions; one that fed an unread output never mattered."""
        for name in ("a_from_v", "v_from_a"):
            if getattr(self, name) is None:
                drop_prefix(state_dict, f"{prefix}{name}.")

    def forward(self, x_a: Tensor, x_v: Tensor, c: Tensor, align: Alignment) -> tuple[Tensor, Tensor]:
        h_a, h_v = self.a.proj_in(x_a), self.v.proj_in(x_v)
        mod_a, mod_v = self.a.modulation(c), self.v.modulation(c)
        n_a, n_v = self.a.normed(h_a, mod_a), self.v.normed(h_v, mod_v)
        out_a = out_v = None
        if self.a_from_v is not None:
            out_a = self.a_from_v(n_a, n_v, None, align.angles_a, align.angles_v)
        if self.v_from_a is not None:
            out_v = self.v_from_a(n_v, n_a, None, align.angles_v, align.angles_a)
        return self.a.output(x_a, h_a, out_a, mod_a), self.v.output(x_v, h_v, out_v, mod_v)


class DirectAlignment(nn.Module):
    """Ablation "Direct alignment" (as Movie Gen): the conditioning features, averaged per time step, repeated to
    the generated stream's token times and added through a zero-initialised projection. One-way: nothing goes
    back into the conditioning stream. `directions` holds "a" (video -> audio) and/or "v" (audio -> video)."""

    def __init__(self, dim_a: int, dim_v: int, cfg: FusionConfig, directions: tuple[str, ...] = ("a", "v")):
        super().__init__()
        self.to_a = self._zero_proj(dim_v, dim_a) if "a" in directions else None
        self.to_v = self._zero_proj(dim_a, dim_v) if "v" in directions else None

    @staticmethod
    def _zero_proj(dim_in: int, dim_out: int) -> nn.Sequential:
        proj = nn.Sequential(nn.LayerNorm(dim_in, eps=1e-6), nn.Linear(dim_in, dim_out))
        nn.init.zeros_(proj[1].weight)
        nn.init.zeros_(proj[1].bias)
        return proj

    @staticmethod
    def _transfer(src: Tensor, src_times: Tensor, dst_times: Tensor, dst_eta: float, proj: nn.Module) -> Tensor:
        pooled, steps = pool_by_time(src, src_times)  # (B, T, d_src)
        weights = resample_in_time(steps, dst_times, dst_eta).to(src.dtype)  # (N_dst, T)
        return proj(torch.einsum("nt,btd->bnd", weights, pooled))

    def forward(self, x_a: Tensor, x_v: Tensor, c: Tensor | None, align: Alignment, gen: str) -> tuple[Tensor, Tensor]:
        if gen == "a":
            assert self.to_a is not None, "this DirectAlignment was built without the video -> audio direction"
            return x_a + self._transfer(x_v, align.times_v, align.times_a, align.eta_a, self.to_a), x_v
        assert self.to_v is not None, "this DirectAlignment was built without the audio -> video direction"
        return x_a, x_v + self._transfer(x_a, align.times_a, align.times_v, align.eta_v, self.to_v)


class TextConcat(nn.Module):
    """Ablation "Concat. to text" (as Diff-Foley): conditioning features, averaged per time step, projected into
    the generated backbone's (already projected) text space and appended to its text tokens, with a sinusoidal
    code of each step's time so order survives. The frozen backbone's cross-attention then sees extra keys, so
    unlike the other variants this one is NOT the identity at init; the paper pairs it with backbone fine-tuning."""

    time_features = 64

    def __init__(self, dim_cond: int, dim_gen: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim_cond, eps=1e-6), nn.Linear(dim_cond, dim_gen))
        self.time = nn.Linear(self.time_features, dim_gen)

    def forward(self, cond_x: Tensor, cond_times: Tensor) -> Tensor:
        pooled, steps = pool_by_time(cond_x, cond_times)  # (B, T, d_cond)
        # timestep_embedding scales by 1000 for t in [0, 1]; seconds / 10 keeps clips up to ~10 s in that range.
        code = timestep_embedding((steps / 10.0).float(), self.time_features).to(pooled.dtype)  # (T, F)
        return self.proj(pooled) + self.time(code)[None]  # (B, T, dim_gen)
