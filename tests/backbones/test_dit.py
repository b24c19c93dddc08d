import pytest
import torch

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.dit import drop_text
from avlink.backbones.protocol import Backbone, TextCond
from avlink.backbones.video_dit import VideoDiT

from helpers import randomize_backbone, tiny_config


@pytest.fixture
def cfg():
    return tiny_config()


def text(b, length=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, length, dim, generator=g), torch.ones(b, length, dtype=torch.bool))


def test_both_backbones_follow_the_protocol(cfg):
    audio, video = AudioDiT(cfg.audio, cfg.clip.audio), VideoDiT(cfg.video, cfg.clip.video)
    for bb in (audio, video):
        assert isinstance(bb, Backbone)
    assert audio.eta == cfg.clip.audio.eta and video.eta == cfg.clip.video.eta


@pytest.mark.parametrize("kind", ["audio", "video"])
def test_velocity_shape_and_split_blocks_equal_full_stack(cfg, kind):
    bb = AudioDiT(cfg.audio, cfg.clip.audio) if kind == "audio" else VideoDiT(cfg.video, cfg.clip.video)
    randomize_backbone(bb)
    shape = cfg.clip.latent_shape if kind == "audio" else cfg.clip.video_shape
    x, t, txt = torch.randn(2, *shape), torch.rand(2), text(2)
    v = bb(x, t, txt)
    assert v.shape == x.shape
    state = bb.embed(x, t, txt)
    state = bb.run_blocks(state, 0, 1)
    state = bb.run_blocks(state, 1, bb.num_blocks)
    torch.testing.assert_close(bb.head(state), v)
    assert state.times.shape == (state.x.shape[1],)


def test_video_patchify_round_trip_and_token_times(cfg):
    video = VideoDiT(cfg.video, cfg.clip.video)
    x = torch.randn(1, *cfg.clip.video_shape)
    tokens, grid = video.tokenize(x)
    assert tokens.shape == (1, cfg.clip.num_video_tokens, cfg.clip.video.patch_dim)
    torch.testing.assert_close(video.untokenize(tokens, grid), x)
    # A token's pixels come from the frame its time says.
    times = video.token_times(grid, x.device)
    frame = int(round(times[-1].item() * cfg.clip.video.fps))
    assert frame == cfg.clip.num_frames - 1
    torch.testing.assert_close(tokens[0, -1].reshape(3, 1, 4, 4)[:, 0], x[0, :, frame, -4:, -4:])


def test_any_length(cfg):
    """Backbones take clips of any length; token times follow."""
    audio, video = AudioDiT(cfg.audio, cfg.clip.audio), VideoDiT(cfg.video, cfg.clip.video)
    for n in (3, 17):
        assert audio(torch.randn(1, n, cfg.clip.audio.latent_dim), torch.rand(1)).shape[1] == n
    assert video(torch.randn(1, 3, 9, 16, 16), torch.rand(1)).shape[2] == 9


def test_null_text_is_learned_and_used_when_no_prompt(cfg):
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    randomize_backbone(audio)
    x, t = torch.randn(2, *cfg.clip.latent_shape), torch.rand(2)
    null = audio.null_text_cond(2)
    torch.testing.assert_close(audio(x, t, None), audio(x, t, null))
    assert audio.null_text.requires_grad
    assert not torch.allclose(audio(x, t, None), audio(x, t, text(2)))


def test_drop_text_replaces_rows_with_the_null_token(cfg):
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    randomize_backbone(audio)
    txt = text(3)
    dropped = drop_text(txt, audio.null_text_cond(3), torch.tensor([True, False, True]))
    assert dropped.mask[0].tolist() == [True, False, False, False, False]
    assert torch.equal(dropped.tokens[1], txt.tokens[1])
    x, t = torch.randn(3, *cfg.clip.latent_shape), torch.rand(3)
    v_drop = audio(x, t, dropped)
    torch.testing.assert_close(v_drop[0], audio(x[:1], t[:1], None)[0], atol=1e-5, rtol=1e-5)


def test_text_width_is_checked(cfg):
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    with pytest.raises(AssertionError, match="16-d"):
        audio(torch.randn(1, *cfg.clip.latent_shape), torch.rand(1), text(1, dim=8))
