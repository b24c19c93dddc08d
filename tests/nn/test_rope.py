import pytest
import torch

from avlink.config import get_preset
from avlink.fusion.block import Alignment
from avlink.nn.attention import attention
from avlink.nn.rope import apply_rope, rope_angles, rope_angles_nd


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
