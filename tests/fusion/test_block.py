"""Fusion Blocks (avlink.fusion.block) against their equations written out here, with random weights.

The attention modules serve as given (tests/nn/test_attention.py checks them); what is checked here is the
block around them: norms, adaLN modulation, the joint token order and its RoPE angles, the gates, the MLPs.
"""

import pytest
import torch
import torch.nn.functional as F

from avlink.config import FusionConfig
from avlink.fusion.block import Alignment, CrossAttentionFusion, FusionBlock
from avlink.nn.rope import rope_angles
from avlink.seq import VideoGeometry

from helpers import randomize_backbone

CFG = FusionConfig(dim=32, heads=2)
DIM_A, DIM_V = 24, 40
ETA_A, VIDEO = 21.5, VideoGeometry(fps=6.0, height=8, width=12, patch=(1, 4, 4))


def alignment() -> Alignment:
    times_a = torch.arange(23, dtype=torch.float64) / ETA_A
    times_v = VIDEO.token_times(VIDEO.grid(6))  # 6 frames x 2 x 3 patches
    return Alignment.build(times_a, times_v, ETA_A, VIDEO.eta, CFG)


def inputs(batch: int, align: Alignment, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x_a = torch.randn(batch, align.times_a.shape[0], DIM_A, generator=g)
    x_v = torch.randn(batch, align.times_v.shape[0], DIM_V, generator=g)
    return x_a, x_v, torch.randn(batch, CFG.dim, generator=g)


def modulated_norm(h, shift, scale, eps=1e-6):
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * (1 + scale) + shift


def mlp(m, x):
    return F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias), approximate="tanh"), m.fc2.weight, m.fc2.bias)


def stream_in(s, x, c):
    """(h, the six modulation chunks) of one stream."""
    mod = F.linear(F.silu(c), s.ada.linear.weight, s.ada.linear.bias)[:, None]  # (B, 1, sum(sizes))
    return F.linear(x, s.proj_in.weight, s.proj_in.bias), mod.split(s.ada.sizes, dim=-1)


def stream_out(s, x, h, mod):
    _, _, _, shift2, scale2, gate_out = mod
    return x + gate_out * mlp(s.mlp, modulated_norm(h, shift2, scale2))


def reference_fusion_block(block, x_a, x_v, c, align):
    """Eq. 3: joint attention over [audio; video] tokens with the time-aligned angles of both, gated residuals."""
    (h_a, mod_a), (h_v, mod_v) = stream_in(block.a, x_a, c), stream_in(block.v, x_v, c)
    joint = torch.cat([modulated_norm(h_a, *mod_a[:2]), modulated_norm(h_v, *mod_v[:2])], dim=1)
    angles = torch.cat([rope_angles(align.times_a * align.eta_v, CFG.head_dim),
                        rope_angles(align.times_v * align.eta_v, CFG.head_dim)])
    out = block.attn(joint, angles)
    n_a = x_a.shape[1]
    h_a = h_a + mod_a[2] * out[:, :n_a]
    h_v = h_v + mod_v[2] * out[:, n_a:]
    return stream_out(block.a, x_a, h_a, mod_a), stream_out(block.v, x_v, h_v, mod_v)


def reference_cross_fusion(block, x_a, x_v, c, align):
    (h_a, mod_a), (h_v, mod_v) = stream_in(block.a, x_a, c), stream_in(block.v, x_v, c)
    n_a, n_v = modulated_norm(h_a, *mod_a[:2]), modulated_norm(h_v, *mod_v[:2])
    h_a = h_a + mod_a[2] * block.a_from_v(n_a, n_v, None, align.angles_a, align.angles_v)
    h_v = h_v + mod_v[2] * block.v_from_a(n_v, n_a, None, align.angles_v, align.angles_a)
    return stream_out(block.a, x_a, h_a, mod_a), stream_out(block.v, x_v, h_v, mod_v)


def test_alignment_joint_angles_are_both_streams_in_order():
    align = alignment()
    torch.testing.assert_close(align.angles, torch.cat([align.angles_a, align.angles_v]))
    torch.testing.assert_close(align.angles_v, rope_angles(align.times_v * VIDEO.eta, CFG.head_dim))
    assert align.angles.shape == (23 + 36, CFG.head_dim // 2)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", [FusionBlock, CrossAttentionFusion])
def test_fusion_blocks_match_reference(kind, batch):
    """Batch 1 is the sampling case (one modulation row, the fused norm path); 2 the training case."""
    torch.manual_seed(0)
    block = kind(DIM_A, DIM_V, CFG)
    randomize_backbone(block, seed=batch)  # adaLN-Zero would make both outputs the inputs
    align = alignment()
    x_a, x_v, c = inputs(batch, align, seed=batch)
    reference = reference_fusion_block if kind is FusionBlock else reference_cross_fusion
    with torch.no_grad():
        out_a, out_v = block(x_a, x_v, c, align)
        ref_a, ref_v = reference(block, x_a, x_v, c, align)
    assert (out_a - x_a).abs().max() > 1e-2 and (out_v - x_v).abs().max() > 1e-2  # not the identity
    torch.testing.assert_close(out_a, ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_v, ref_v, atol=1e-5, rtol=1e-5)


def test_fusion_block_gradients_match_reference():
    torch.manual_seed(0)
    block = FusionBlock(DIM_A, DIM_V, CFG)
    randomize_backbone(block, seed=3)
    align = alignment()
    x_a, x_v, c = inputs(1, align, seed=3)
    grads = []
    for forward in (block, lambda *a: reference_fusion_block(block, *a)):
        block.zero_grad(set_to_none=True)
        out_a, out_v = forward(x_a, x_v, c, align)
        (out_a.square().mean() + out_v.abs().mean()).backward()
        grads.append({name: p.grad.clone() for name, p in block.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", [FusionBlock, CrossAttentionFusion])
def test_a_block_without_the_video_output_gives_the_same_audio(kind, batch):
    """The conditioning stream at the last fusion point: its output is never read, so it is not built. Loaded
    from a block that has it (an older checkpoint), the audio output is unchanged and video comes back as given."""
    torch.manual_seed(0)
    full = kind(DIM_A, DIM_V, CFG)
    randomize_backbone(full, seed=batch)
    audio_only = kind(DIM_A, DIM_V, CFG, outputs=("a",))
    audio_only.load_state_dict(full.state_dict())  # strict: the unread weights are dropped on the way in
    assert not hasattr(audio_only.v, "mlp") and audio_only.v.ada.sizes == (CFG.dim, CFG.dim)
    assert getattr(audio_only, "v_from_a", None) is None
    assert sum(p.numel() for p in audio_only.parameters()) < sum(p.numel() for p in full.parameters())
    align = alignment()
    x_a, x_v, c = inputs(batch, align, seed=batch)
    with torch.no_grad():
        out_a, out_v = audio_only(x_a, x_v, c, align)
        ref_a, _ = full(x_a, x_v, c, align)
    torch.testing.assert_close(out_a, ref_a, atol=1e-6, rtol=1e-6)
    assert out_v is x_v
