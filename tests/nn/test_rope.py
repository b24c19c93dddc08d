import gc

import pytest
import torch

from avlink.config import get_preset
from avlink.fusion.block import Alignment
from avlink.nn.attention import attention
from avlink.nn.rope import RotationCache, apply_rope, rope_angles, rope_angles_nd


def test_rotation_preserves_norm_and_zero_position_is_identity():
    x = torch.randn(2, 3, 5, 16)
    angles = rope_angles(torch.arange(5.0), 16)
    y = apply_rope(x, angles)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


def test_logits_depend_only_on_position_difference():
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def logit(pq, pk):
        qa = apply_rope(q, rope_angles(torch.tensor([pq]), 32))
        ka = apply_rope(k, rope_angles(torch.tensor([pk]), 32))
        return (qa * ka).sum().item()

    assert logit(3.0, 1.0) == pytest.approx(logit(10.5, 8.5), abs=1e-4)
    assert logit(3.0, 1.0) != pytest.approx(logit(3.0, 2.0), abs=1e-3)


def test_nd_angles_split_axes():
    ids = torch.tensor([[1, 2, 3]])
    angles = rope_angles_nd(ids, (4, 2, 2))
    assert angles.shape == (1, 4)
    torch.testing.assert_close(angles[0, :2], rope_angles(torch.tensor([1.0]), 4)[0])
    torch.testing.assert_close(angles[0, 2:3], rope_angles(torch.tensor([2.0]), 2)[0])


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_time_aligned_rope_matches_tokens_at_the_same_second(preset):
    """An audio token and a video token at the same second get the same rotation (paper Eq. 4)."""
    cfg = get_preset(preset)
    clip = cfg.clip
    times_a = clip.audio.token_times(clip.num_audio_tokens)
    times_v = clip.video.token_times(clip.video.grid(clip.num_frames))
    align = Alignment.build(times_a, times_v, clip.audio.eta, clip.video.eta, cfg.fusion)
    matched = 0
    for i, ta in enumerate(times_a):
        same = torch.nonzero((times_v - ta).abs() < 1e-9).flatten()
        for j in same[:1]:
            torch.testing.assert_close(align.angles_a[i], align.angles_v[j], rtol=0, atol=1e-5)
            matched += 1
    # Tiny: eta_a = 21.53 and eta_v = 6 meet only at t = 0; paper: 25 and 6 meet at every whole second.
    assert matched >= (5 if preset == "paper" else 1)
    # Any audio token: its angle equals the angle a video token would have at that exact time.
    video_pos = times_a * clip.video.eta
    expected = rope_angles(video_pos, cfg.fusion.head_dim, cfg.fusion.rope_theta)
    torch.testing.assert_close(align.angles_a, expected)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_fusion_logits_depend_only_on_time_difference(preset):
    """Relative property across modalities: an audio query against a video key scores as a function of their
    time difference alone, at both token rates of the preset."""
    cfg = get_preset(preset)
    clip = cfg.clip
    times_a = clip.audio.token_times(clip.num_audio_tokens)
    times_v = clip.video.token_times(clip.video.grid(clip.num_frames))
    align = Alignment.build(times_a, times_v, clip.audio.eta, clip.video.eta, cfg.fusion)
    dh = cfg.fusion.head_dim
    q, k = torch.randn(dh, dtype=torch.float64), torch.randn(dh, dtype=torch.float64)

    def score(angle_q, angle_k):
        rq = apply_rope(q[None, None, None].float(), angle_q[None])
        rk = apply_rope(k[None, None, None].float(), angle_k[None])
        return (rq * rk).sum().item()

    # Pairs (audio i, video j) one second apart, at different absolute times: same score.
    pairs = []
    for j in range(len(times_v)):
        hits = torch.nonzero((times_a - (times_v[j] + 1.0)).abs() < 1e-9).flatten()
        pairs += [(int(i), j) for i in hits]
    if preset == "paper":  # 25 and 6 tokens per second meet at every whole second
        assert len(pairs) >= 4 * 144
        ref = score(align.angles_a[pairs[0][0]], align.angles_v[pairs[0][1]])
        for i, j in pairs[:: max(1, len(pairs) // 20)]:
            assert score(align.angles_a[i], align.angles_v[j]) == pytest.approx(ref, abs=1e-4)
    # Exact check on arbitrary times: shift both streams by the same delta; logits unchanged.
    delta = 0.77
    shifted = Alignment.build(times_a + delta, times_v + delta, clip.audio.eta, clip.video.eta, cfg.fusion)
    for i, j in [(0, 0), (5, 40), (20, 3)]:
        assert score(align.angles_a[i], align.angles_v[j]) == pytest.approx(
            score(shifted.angles_a[i], shifted.angles_v[j]), abs=1e-4)


def test_attention_matches_reference_with_mask():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    out = attention(q, k, v, key_mask=mask)
    logits = q @ k.transpose(-1, -2) / 8**0.5
    logits = logits.masked_fill(~mask[:, None, None], float("-inf"))
    ref = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- the complex-product form against the plain formula -----------------------------------------------------


def reference_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The textbook rotation of consecutive channel pairs, in float32."""
    if angles.ndim == 3:
        angles = angles[:, None]
    cos, sin = angles.float().cos(), angles.float().sin()
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.empty(x.shape, dtype=torch.float32)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out.to(x.dtype)


def packed_qkv(b: int, n: int, h: int, dh: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v as the strided views a packed projection gives, (B, H, N, Dh) each."""
    qkv = torch.randn(b, n, 3 * h * dh, generator=torch.Generator().manual_seed(seed))
    return tuple(qkv.unflatten(-1, (3, h, dh)).permute(2, 0, 3, 1, 4))


@pytest.mark.parametrize("per_batch", [False, True])
def test_apply_rope_matches_reference(per_batch):
    g = torch.Generator().manual_seed(1)
    q, _, _ = packed_qkv(2, 7, 3, 8)
    assert not q.is_contiguous()
    pos = torch.rand(2, 7, generator=g) * 50 if per_batch else torch.rand(7, generator=g) * 50
    angles = rope_angles(pos, 8)
    out = apply_rope(q, angles)
    torch.testing.assert_close(out, reference_rope(q, angles), atol=2e-6, rtol=1e-5)
    assert out.shape == q.shape


def test_apply_rope_odd_offsets_and_bf16():
    """A view whose pairs cannot be seen as complex numbers in place (odd offset) is copied first; bf16 in
    gives bf16 out, rotated in float32."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1, 2, 5, 9, generator=g)
    x = base[..., 1:]  # storage offset 1, row stride 9
    angles = rope_angles(torch.arange(5.0) * 3, 8)
    torch.testing.assert_close(apply_rope(x, angles), reference_rope(x, angles), atol=2e-6, rtol=1e-5)
    xb = torch.randn(1, 2, 5, 8, generator=g).bfloat16()
    out = apply_rope(xb, angles)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_rope(xb, angles), atol=1e-2, rtol=1e-2)


def test_apply_rope_gradients_match_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 6, 8, generator=g, requires_grad=True)
    angles = rope_angles(torch.rand(6, generator=g) * 20, 8).requires_grad_()
    weight = torch.randn(2, 2, 6, 8, generator=g)
    (apply_rope(x, angles) * weight).sum().backward()
    got = x.grad.clone(), angles.grad.clone()
    x.grad, angles.grad = None, None
    (reference_rope(x, angles) * weight).sum().backward()
    torch.testing.assert_close(got[0], x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], angles.grad, atol=1e-5, rtol=1e-5)


def test_rotation_cache_keys_on_the_tensor_and_its_version():
    cache = RotationCache(capacity=3)
    angles = rope_angles(torch.arange(4.0), 6)
    first = cache.rotation(angles)
    assert cache.rotation(angles) is first  # the same tensor: no new rotation
    torch.testing.assert_close(torch.view_as_real(first)[..., 0], angles.cos())
    twin = angles.clone()  # equal values, another tensor: its own entry
    assert cache.rotation(twin) is not first and len(cache) == 2
    angles.add_(0.5)  # modified in place: the old rotation no longer holds
    again = cache.rotation(angles)
    assert again is not first
    torch.testing.assert_close(torch.view_as_real(again)[..., 1], angles.sin())


def test_rotation_cache_is_bounded_and_forgets_freed_tensors():
    cache = RotationCache(capacity=3)
    alive = [rope_angles(torch.arange(4.0) + i, 6) for i in range(5)]
    for angles in alive:
        cache.rotation(angles)
    del angles
    assert len(cache) == 3  # least recently used went first
    del alive[3:]
    gc.collect()
    assert len(cache) == 1  # entries of freed tensors go at the next look-up
    needs_grad = rope_angles(torch.arange(4.0), 6).requires_grad_()
    assert cache.rotation(needs_grad).requires_grad and len(cache) == 1  # never cached
