import pytest
import torch

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.dit import drop_text
from avlink.backbones.protocol import Backbone, PreparedText, TextCond, prepare_text
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


@pytest.mark.parametrize("kind", ["audio", "video"])
def test_a_row_without_a_caption_is_the_null_text(cfg, kind):
    """A clip without a caption carries no text states (codecs/text.py, data/shards.py): the backbone reads its
    row as the learned null text, in training's plain path as in sampling's prepared one; other rows unchanged."""
    bb = AudioDiT(cfg.audio, cfg.clip.audio) if kind == "audio" else VideoDiT(cfg.video, cfg.clip.video)
    randomize_backbone(bb)
    shape = cfg.clip.latent_shape if kind == "audio" else cfg.clip.video_shape
    x, t, txt = torch.randn(2, *shape), torch.rand(2), text(2)
    txt.mask[0] = False  # what collate gives a clip without a caption
    txt.tokens[0] = 0
    with torch.no_grad():
        got = bb(x, t, txt)
        torch.testing.assert_close(got[:1], bb(x[:1], t[:1], None), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[1:], bb(x[1:], t[1:], txt.rows(1, 1)), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bb(x, t, bb.prepare_text(txt, 2)), got, atol=1e-6, rtol=1e-6)


def test_text_width_is_checked(cfg):
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    with pytest.raises(AssertionError, match="16-d"):
        audio(torch.randn(1, *cfg.clip.latent_shape), torch.rand(1), text(1, dim=8))


@pytest.mark.parametrize("kind", ["audio", "video"])
def test_prepared_text_gives_the_plain_velocity(cfg, kind):
    bb = AudioDiT(cfg.audio, cfg.clip.audio) if kind == "audio" else VideoDiT(cfg.video, cfg.clip.video)
    randomize_backbone(bb)
    shape = cfg.clip.latent_shape if kind == "audio" else cfg.clip.video_shape
    x, t, txt = torch.randn(2, *shape), torch.rand(2), text(2)
    with torch.no_grad():
        prepared = bb.prepare_text(txt, 2)
        assert len(prepared.kv) == bb.num_blocks and all(kv is not None for kv in prepared.kv)
        assert prepared.kv[0].k.shape == (2, cfg.audio.heads if kind == "audio" else cfg.video.heads, 5,
                                          bb.hidden_dim // bb.cfg.heads)
        torch.testing.assert_close(bb(x, t, prepared), bb(x, t, txt), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bb(x, t, bb.prepare_text(None, 2)), bb(x, t, None), atol=1e-6, rtol=1e-6)
        # Blocks [0, stop) only: a state that runs no further needs no more.
        part = bb.prepare_text(txt, 2, stop=1)
        assert part.kv[0] is not None and all(kv is None for kv in part.kv[1:])
        state = bb.run_blocks(bb.embed(x, t, part), 0, 1)
        torch.testing.assert_close(state.x, bb.run_blocks(bb.embed(x, t, txt), 0, 1).x, atol=1e-6, rtol=1e-6)


def test_prepared_text_is_read_instead_of_the_text(cfg):
    """The blocks take the prepared keys and values: changing them changes the velocity."""
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    randomize_backbone(audio)
    x, t = torch.randn(1, *cfg.clip.latent_shape), torch.rand(1)
    with torch.no_grad():
        prepared = audio.prepare_text(text(1), 1)
        v = audio(x, t, prepared)
        prepared.kv[-1].v.mul_(2.0)
        assert not torch.allclose(audio(x, t, prepared), v, atol=1e-4)
        state = audio.embed(x, t, prepared)
        assert state.text_kv is prepared.kv
        assert state.with_text(state.text, state.text_mask).text_kv is None  # other text: blocks project it


def test_prepared_texts_of_different_lengths_batch_like_token_states(cfg):
    """Guidance joins a prompt and the one-token null text: padded keys are masked, as padded tokens are."""
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    randomize_backbone(audio)
    x, t = torch.randn(2, *cfg.clip.latent_shape), torch.rand(2)
    long, null = text(1, length=5), audio.null_text_cond(1)
    with torch.no_grad():
        joined = audio.prepare_text(long, 1).cat_batch(audio.prepare_text(null, 1))
        assert joined.tokens.shape[:2] == (2, 5) and joined.mask[1].tolist() == [True] + [False] * 4
        assert joined.kv[0].k.shape[2] == 5
        torch.testing.assert_close(audio(x, t, joined), audio(x, t, long.cat_batch(null)), atol=1e-5, rtol=1e-5)


def test_a_backbone_without_a_text_cache_gets_the_text_as_given(cfg):
    class Plain:  # the protocol's three calls, no prepare_text
        pass

    txt = text(2)
    assert prepare_text(Plain(), txt, 2) is txt
    audio = AudioDiT(cfg.audio, cfg.clip.audio)
    assert isinstance(prepare_text(audio, txt, 2), PreparedText)


def test_prepared_text_is_refused_where_the_text_projection_trains(cfg):
    audio = AudioDiT(cfg.audio, cfg.clip.audio)  # a fresh backbone trains: its text projection needs gradients
    prepared = audio.prepare_text(text(1), 1)
    x, t = torch.randn(1, *cfg.clip.latent_shape), torch.rand(1)
    with pytest.raises(AssertionError, match="train with the TextCond"):
        audio(x, t, prepared)
    with torch.no_grad():
        assert audio(x, t, prepared).shape == x.shape


@pytest.mark.parametrize("frame_positions", [False, True])
def test_only_frame_positions_tell_a_patch_where_it_is(frame_positions):
    """A frame of identical patches: with RoPE alone every patch gets the same velocity (attention mixes equal
    values, whatever the rotation), so a scene cannot be laid out from noise; the learned frame positions make
    the patches differ."""
    cfg = tiny_config(**{"video.frame_positions": frame_positions})
    model = VideoDiT(cfg.video, cfg.clip.video).eval()
    randomize_backbone(model)
    assert hasattr(model, "frame_pos") == frame_positions
    x = torch.full((1, *cfg.clip.video_shape), 0.3)
    with torch.no_grad():
        tokens, _ = model.tokenize(model(x, torch.tensor([0.5])))  # (1, N, patch_dim), time-major
    per_frame = tokens.reshape(cfg.clip.num_frames, -1, tokens.shape[-1])  # (T, H' * W', patch_dim)
    patches_differ = not torch.allclose(per_frame[:, :1], per_frame, atol=1e-5)
    assert patches_differ == frame_positions
    if frame_positions:  # the same place gets the same embedding in every frame (time is left to RoPE)
        grid = cfg.clip.video.grid(cfg.clip.num_frames)
        table = model.position_embedding(grid).reshape(grid[0], -1, cfg.video.dim)
        assert torch.equal(table, table[:1].expand_as(table)) and not torch.equal(table[0, :1], table[0, 1:2])
