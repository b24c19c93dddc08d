"""ImageBind and Synchformer on tiny random-weight instances saved in the published key layouts.

No real weight file is needed: the networks are built narrow and shallow, every tensor is randomised, saved as
the published files are laid out and loaded back through `load(weights=path)`. The full-size layouts are built
on the meta device and their parameter counts held against published figures. Front ends and attention
variants are checked against independent computations: a loop-by-loop numpy Kaldi fbank, librosa's mel
spectrogram, PIL's resize, torch's own MultiheadAttention / TransformerEncoderLayer and the transformers AST.
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction

import librosa
import numpy as np
import pytest
import torch
from torch import nn

from avlink.errors import UserError
from avlink.eval.embed import imagebind as ib
from avlink.eval.embed import synchformer as sf
from avlink.eval.embedders import Embedder, WeightsMissing, load_embedder

IB_TINY = ib.ImageBindConfig(out_dim=16, vision_width=32, vision_depth=2, vision_heads=2, audio_width=32,
                             audio_depth=2, audio_heads=2)
SF_TINY = sf.SynchformerConfig(width=32, video_depth=1, video_heads=2, image_size=32, audio_depth=1,
                               audio_heads=2, sync_width=24, sync_depth=1, sync_heads=2)
SF_HEADS = {"video_heads": 2, "audio_heads": 2, "sync_heads": 2}

# open_clip's published model profile (docs/model_profile.csv), image tower parameters in millions
OPEN_CLIP_VIT_H14_IMAGE_M = 632.08
OPEN_CLIP_VIT_B16_IMAGE_M = 86.19
# ViT-B/16 image tower outside its 12 blocks: conv 3*16*16*768, class 768, 197 positions, ln_pre, ln_post,
# projection 768 x 512
VIT_B16_OUTSIDE_BLOCKS = 3 * 16 * 16 * 768 + 768 + 197 * 768 + 2 * 2 * 768 + 768 * 512


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, so a tensor loaded into the wrong place changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def noise_and_tones(seconds: float, batch: int = 2, seed: int = 0, rate: int = 16_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    clips = [0.3 * np.sin(2 * np.pi * (300 + 400 * i) * t) + 0.05 * rng.standard_normal(t.shape)
             for i in range(batch)]
    return np.stack(clips).astype(np.float32)


def random_video(frames: int, height: int, width: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, frames, height, width, 3), dtype=np.uint8)


def params_under(model: nn.Module, *parts: str) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if any(part in name for part in parts))


# ---------------------------------------------------------------- ImageBind: layout and loading


def test_imagebind_full_size_matches_the_published_vit_h_and_vit_b():
    with torch.device("meta"):
        model = ib.ImageBindAV()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["modality_preprocessors.vision.rgbt_stem.proj.1.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["modality_preprocessors.vision.pos_embedding_helper.pos_embed"] == (1, 257, 1280)
    assert shapes["modality_preprocessors.audio.rgbt_stem.proj.weight"] == (768, 1, 16, 16)
    assert shapes["modality_preprocessors.audio.pos_embedding_helper.pos_embed"] == (1, 229, 768)
    assert shapes["modality_trunks.audio.blocks.11.attn.bias_k"] == (1, 1, 768)
    assert shapes["modality_trunks.vision.blocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["modality_heads.vision.2.weight"] == (1024, 1280)
    assert shapes["modality_heads.audio.2.weight"] == (1024, 768)
    assert shapes["modality_postprocessors.audio.1.log_logit_scale"] == ()
    assert not any(".text." in k or ".imu." in k for k in shapes)
    # The vision branch is OpenCLIP's ViT-H/14 image tower with a 2-frame patch conv (one more 3x14x14 slice).
    vision = params_under(model, ".vision.")
    assert abs((vision - 3 * 14 * 14 * 1280) / 1e6 - OPEN_CLIP_VIT_H14_IMAGE_M) < 0.005, vision
    # The audio trunk is 12 ViT-B blocks plus a learned key and value bias per block.
    blocks = params_under(model, "modality_trunks.audio.blocks.") - 12 * 2 * 768
    assert abs((blocks + VIT_B16_OUTSIDE_BLOCKS) / 1e6 - OPEN_CLIP_VIT_B16_IMAGE_M) < 0.005, blocks
    assert ib.infer_config(model.state_dict(), "meta", None, None) == ib.ImageBindConfig()  # default heads
    out_v = model.vision(torch.empty(3, 3, 2, 224, 224, device="meta"))
    out_a = model.audio(torch.empty(3, 1, 128, 204, device="meta"))
    assert out_v.shape == out_a.shape == (3, 1024)


@pytest.fixture(scope="module")
def imagebind_file(tmp_path_factory):
    """A tiny ImageBind saved as imagebind_huge.pth is laid out, text and IMU tensors included."""
    model = randomize(ib.ImageBindAV(IB_TINY)).eval()
    state = dict(model.state_dict())
    state["modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.zeros(48, 16)
    state["modality_postprocessors.imu.1.log_logit_scale"] = torch.tensor(1.6)
    path = tmp_path_factory.mktemp("imagebind") / ib.WEIGHTS_FILE
    torch.save(state, path)
    return path, model


@pytest.fixture(scope="module")
def imagebind(imagebind_file):
    return load_embedder("imagebind", imagebind_file[0], vision_heads=2, audio_heads=2, fps=5.0)


def test_imagebind_loads_the_published_layout_strictly(imagebind_file, imagebind):
    _, model = imagebind_file
    assert isinstance(imagebind, Embedder)
    assert imagebind.modalities == ("audio", "video") and imagebind.sample_rate == 16_000
    loaded = imagebind.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert imagebind.model.cfg == IB_TINY


def test_imagebind_embeddings_are_unit_deterministic_and_distinct(imagebind):
    audio = noise_and_tones(2.5)
    video = random_video(12, 40, 56)
    for x, modality in ((audio, "audio"), (video, "video")):
        first = imagebind.embed(x, modality)
        assert first.shape == (2, 16) and first.dtype == torch.float32
        torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))
        assert torch.equal(first, imagebind.embed(x, modality))
        assert (first[0] - first[1]).abs().max() > 1e-3
        assert imagebind.logits(x, modality) is None


def test_imagebind_postprocessors_scale_audio_by_20(imagebind):
    mel = torch.randn(2, 1, 128, 204)
    frames = torch.randn(2, 3, 2, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(imagebind.model.audio(mel).norm(dim=-1), torch.full((2,), 20.0))
        torch.testing.assert_close(imagebind.model.vision(frames).norm(dim=-1), torch.ones(2))


def test_imagebind_video_mean_is_the_mean_of_its_fifteen_views(imagebind):
    video = random_video(12, 40, 56, batch=1)
    views = ib.video_views(video[0], fps=5.0)
    assert views.shape == (15, 3, 2, 224, 224)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(imagebind.model.vision(views).mean(0), dim=0)
    torch.testing.assert_close(imagebind.embed(video, "video")[0], expected)


def test_imagebind_image_mode_reads_only_the_middle_frame(imagebind_file, imagebind):
    embedder = ib.load(imagebind_file[0], vision_heads=2, audio_heads=2, video_as="image")
    video = random_video(9, 30, 50, batch=1)
    other = video.copy()
    other[:, [0, 1, 3, 5, 8]] = 255 - other[:, [0, 1, 3, 5, 8]]  # every frame but the middle one (4)
    first = embedder.embed(video, "video")
    torch.testing.assert_close(first, embedder.embed(other, "video"))
    changed = video.copy()
    changed[:, 4] = 255 - changed[:, 4]
    assert (first - embedder.embed(changed, "video")).abs().max() > 1e-3
    # the same image side from a "video" instance, asked per call; its own setting is left as it was
    torch.testing.assert_close(imagebind.embed(video, "video", video_as="image"), first)
    as_video = imagebind.embed(video, "video")
    assert imagebind.video_as == "video" and (as_video - first).abs().max() > 1e-3
    torch.testing.assert_close(embedder.embed(video, "video", video_as="video"), as_video)


def test_imagebind_weights_missing_and_bad_files(tmp_path, imagebind_file):
    with pytest.raises(WeightsMissing, match="imagebind_huge.pth"):
        load_embedder("imagebind")
    with pytest.raises(WeightsMissing, match="not found"):
        ib.load(tmp_path / "nowhere.pth")
    state = torch.load(imagebind_file[0], weights_only=True)
    del state["modality_trunks.vision.blocks.1.mlp.fc2.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match="missing") as err:
        ib.load(bad, vision_heads=2, audio_heads=2)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        ib.load(garbage)


def test_imagebind_refuses_bad_input(imagebind):
    with pytest.raises(ValueError, match="shorter than one 25 ms frame"):
        imagebind.embed(np.zeros((1, 300), np.float32), "audio")
    with pytest.raises(ValueError, match="uint8 frames"):
        imagebind.embed(np.zeros((1, 4, 8, 8, 3), np.float32), "video")
    with pytest.raises(ValueError, match="not text"):
        imagebind.embed(["a dog"], "text")


# ---------------------------------------------------------------- ImageBind: pieces against references


def numpy_kaldi_fbank(x: np.ndarray, window: str, rate: int = 16_000, bins: int = 128,
                      low: float = 20.0) -> np.ndarray:
    """Kaldi compute-fbank-feats written out frame by frame (25 ms / 10 ms, dither 0, snip edges)."""
    size, shift, n_fft = 400, 160, 512
    i = np.arange(size)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * i / (size - 1))
    w = hann if window == "hanning" else hann ** 0.85

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(low), mel(rate / 2)
    delta = (hi - lo) / (bins + 1)
    banks = np.zeros((bins, n_fft // 2 + 1))
    for b in range(bins):
        left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for k in range(n_fft // 2):  # Kaldi gives the Nyquist bin no weight
            m = mel(k * rate / n_fft)
            if left < m <= centre:
                banks[b, k] = (m - left) / (centre - left)
            elif centre < m < right:
                banks[b, k] = (right - m) / (right - centre)
    rows = []
    for start in range(0, len(x) - size + 1, shift):
        frame = x[start:start + size].astype(np.float64)
        frame = frame - frame.mean()
        emphasised = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
        power = np.abs(np.fft.rfft(emphasised * w, n_fft)) ** 2
        rows.append(np.log(np.maximum(banks @ power, np.finfo(np.float32).eps)))
    return np.array(rows)


@pytest.mark.parametrize("window", ["hanning", "povey"])
def test_kaldi_fbank_matches_a_frame_by_frame_numpy_reference(window):
    x = noise_and_tones(0.37, batch=1)[0] + 0.02  # a DC offset, which the per-frame mean removal takes out
    ours = ib.kaldi_fbank(torch.from_numpy(x), window=window).numpy()
    reference = numpy_kaldi_fbank(x, window)
    assert ours.shape == reference.shape == (1 + (len(x) - 400) // 160, 128)
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)


def test_clip_starts_follow_the_constant_clips_sampler():
    assert ib.clip_starts(3.0, 2, 3) == [0, Fraction(1, 3), Fraction(2, 3)]
    assert ib.clip_starts(1.5, 2, 3) == [0, 0, 0]
    assert ib.clip_starts(12.0, 2, 5) == [0, 2, 4, 6, 8]


def reference_audio_clips(wave: np.ndarray, shared: bool) -> np.ndarray:
    """ImageBind's audio path in numpy; `shared`: clips remove their mean in one buffer as published."""
    buffer = wave.astype(np.float32).copy()
    out = []
    for k in range(3):
        start = Fraction(max(len(wave) / 16_000 - 2, 0)) / 3 * k
        a, b = int(start * 16_000), int((start + 2) * 16_000)
        segment = buffer[a:b] if shared else buffer[a:b].copy()
        segment -= segment.mean()
        spec = numpy_kaldi_fbank(segment, "hanning").T
        spec = np.pad(spec, ((0, 0), (0, max(0, 204 - spec.shape[1]))))[:, :204]
        out.append((spec - ib.FBANK_MEAN) / ib.FBANK_STD)
    return np.stack(out)[:, None]


def test_audio_clips_follow_the_published_path_including_the_shared_mean_removal():
    rate = 16_000
    t = np.arange(int(2.6 * rate)) / rate
    wave = (0.2 * np.sin(2 * np.pi * 440 * t) + 0.3 * (t > 1.3)).astype(np.float32)  # a step in the offset
    ours = ib.audio_clips(wave).numpy()
    assert ours.shape == (3, 1, 128, 204)
    np.testing.assert_allclose(ours, reference_audio_clips(wave, shared=True), atol=2e-4, rtol=0)
    separate = reference_audio_clips(wave, shared=False)
    assert np.abs(ours - separate).max() > 1e-3  # the shared buffer matters, so the check above can fail


def test_video_clips_keep_the_first_and_last_frame_of_each_two_seconds():
    assert ib.clip_frame_indices(50, 5.0, 5) == [[0, 9], [8, 17], [16, 25], [24, 33], [32, 41]]
    assert ib.clip_frame_indices(4, 4.0, 5) == [[0, 3]] * 5  # a 1 s video: every clip is the whole of it


def test_video_views_scale_short_side_and_crop_along_the_long_side():
    frame = np.zeros((1, 60, 80, 3), np.uint8)
    frame[..., 0] = np.arange(80, dtype=np.uint8)[None, None]  # red ramps left to right
    views = ib.video_views(np.repeat(frame, 10, axis=0), fps=5.0)  # 2 s: 5 identical clips
    assert views.shape == (15, 3, 2, 224, 224)
    red = views[:3, 0, 0]  # start, centre and end crop of the first clip
    assert red[0, 0, 0] < red[1, 0, 0] < red[2, 0, 0]
    scaled = ib.short_side_scale(torch.zeros(3, 2, 60, 80), 224)
    assert scaled.shape[-2:] == (224, math.floor(80 / 60 * 224))  # 298: crops at x = 0, 37, 74
    torch.testing.assert_close(views[3:6], views[:3])


@pytest.mark.parametrize("shape", [(90, 130), (480, 360)])
def test_image_view_matches_pil_bicubic_resize_and_center_crop(shape):
    image = pytest.importorskip("PIL.Image")
    frame = random_video(1, *shape, batch=1, seed=3)[0, 0]  # noise: bicubic overshoot is clipped everywhere
    h, w = shape
    size = (int(224 * w / h), 224) if h <= w else (224, int(224 * h / w))
    resized = image.fromarray(frame).resize(size, image.BICUBIC)
    top, left = int(round((resized.height - 224) / 2.0)), int(round((resized.width - 224) / 2.0))
    reference = np.asarray(resized)[top:top + 224, left:left + 224].astype(np.float32)
    std, mean = (torch.tensor(v)[:, None, None] for v in (ib.CLIP_STD, ib.CLIP_MEAN))
    ours = ((ib.image_view(frame) * std + mean) * 255.0).permute(1, 2, 0).numpy()
    diff = np.abs(ours - reference)
    # PIL computes in 22-bit fixed point, we in float: now and then a value rounds the other way
    assert diff.max() < 1.01 and (diff < 0.01).mean() > 0.99, (diff.max(), (diff < 0.01).mean())


# ---------------------------------------------------------------- Synchformer: layout and loading


def test_synchformer_full_size_layout_is_the_published_one():
    with torch.device("meta"):
        model = sf.Synchformer()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["transformer.pos_emb_cfg.pos_emb"] == (1, 198, 768)  # 1 + 14*8 + 1 + 14*6
    assert shapes["transformer.off_head.weight"] == (21, 768)
    assert shapes["vfeat_extractor.patch_embed_3d.proj.weight"] == (768, 3, 2, 16, 16)
    assert shapes["vfeat_extractor.patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["vfeat_extractor.pos_embed"] == (1, 197, 768)
    assert shapes["vfeat_extractor.temp_embed"] == (1, 8, 768)
    assert shapes["vfeat_extractor.spatial_attn_agg.self_attn.in_proj_weight"] == (2304, 768)
    assert shapes["afeat_extractor.ast.embeddings.position_embeddings"] == (1, 74, 768)  # 2 + 12 * 6
    assert shapes["afeat_extractor.ast.encoder.layer.11.attention.attention.query.weight"] == (768, 768)
    assert shapes["afeat_extractor.freq_attn_agg.linear1.weight"] == (3072, 768)
    assert shapes["transformer.blocks.2.mlp.2.weight"] == (768, 3072)
    # The AST layers and the space part of the MotionFormer blocks are ViT-B/16 blocks.
    ast_blocks = params_under(model, "ast.encoder.layer.")
    space = params_under(model, "vfeat_extractor.blocks.") - params_under(model, ".timeattn.", ".norm3.")
    for blocks in (ast_blocks, space):
        assert abs((blocks + VIT_B16_OUTSIDE_BLOCKS) / 1e6 - OPEN_CLIP_VIT_B16_IMAGE_M) < 0.005, blocks
    assert sf.infer_config(model.state_dict(), "meta", None, None, None) == sf.SynchformerConfig()
    video = model.video_features(torch.empty(2, 16, 3, 224, 224, device="meta"))
    audio = model.audio_features(torch.empty(2, 1, 128, 66, device="meta"))
    assert video.shape == (2, 8, 768) and audio.shape == (2, 6, 768)
    window_v, window_a = torch.empty(1, 14, 8, 768, device="meta"), torch.empty(1, 14, 6, 768, device="meta")
    logits = model.offset_logits(window_v, window_a)
    assert logits.shape == (1, 21)


@pytest.fixture(scope="module")
def synchformer_file(tmp_path_factory):
    model = randomize(sf.Synchformer(SF_TINY), seed=1).eval()
    path = tmp_path_factory.mktemp("synchformer") / sf.WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def synchformer(synchformer_file):
    return load_embedder("synchformer", synchformer_file[0], **SF_HEADS)


@pytest.fixture(scope="module")
def av_clip():
    """5.2 s of video at 25 fps and audio at 16 kHz: 15 segments, so two different 14-segment windows."""
    return random_video(130, 36, 44, seed=5), noise_and_tones(5.2, seed=5)


def test_synchformer_loads_plain_and_nested_state_dicts(tmp_path, synchformer_file, synchformer):
    path, model = synchformer_file
    assert isinstance(synchformer, Embedder) and synchformer.model.cfg == SF_TINY
    assert synchformer.fps == 25.0 and synchformer.sample_rate == 16_000
    expected = model.state_dict()
    assert all(torch.equal(synchformer.model.state_dict()[k], v) for k, v in expected.items())
    nested = tmp_path / "nested.pt"  # a training checkpoint's layout, saved from a DDP-wrapped model
    torch.save({"model": {f"module.{k}": v for k, v in expected.items()}, "epoch": 3}, nested)
    again = sf.load(nested, **SF_HEADS)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in expected.items())


def test_synchformer_refuses_a_checkpoint_with_a_pickled_config(tmp_path, synchformer_file):
    path = tmp_path / "24-01-04T16-39-21.pt"
    state = synchformer_file[1].state_dict()
    torch.save({"args": argparse.Namespace(lr=1e-4), "model": state}, path)
    with pytest.raises(UserError, match="weights_only=True.*'model' entry") as err:
        sf.load(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_synchformer_weights_missing_and_wrong_layout(tmp_path, synchformer_file):
    with pytest.raises(WeightsMissing, match="synchformer_state_dict.pth"):
        load_embedder("synchformer")
    with pytest.raises(WeightsMissing, match="not found"):
        sf.load(tmp_path / "absent.pth")
    state = dict(synchformer_file[1].state_dict())
    state["transformer.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "extra.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match="unexpected"):
        sf.load(bad, **SF_HEADS)


def test_synchformer_features_logits_and_desync(synchformer, av_clip):
    video, audio = av_clip
    v, a = synchformer.video_features(video), synchformer.audio_features(audio)
    assert v.shape == (2, 15, 8, 32) and a.shape == (2, 15, 6, 32)
    logits = synchformer.offset_logits(video, audio)
    assert logits.shape == (2, 2, 21)  # the first and the last 14 segments
    assert not torch.equal(logits[:, 0], logits[:, 1])
    desync = synchformer.desync(video, audio)
    assert desync.shape == (2,) and ((desync >= 0) & (desync <= 2)).all()
    grid = torch.linspace(-2, 2, 21)
    per_window = grid[logits.argmax(-1)].abs()
    torch.testing.assert_close(desync, per_window.mean(1))
    assert torch.equal(logits, synchformer.offset_logits(video, audio))  # deterministic
    assert synchformer.logits(video, "video") is None


def test_synchformer_embed_flattens_segment_features_that_score_later(synchformer, av_clip):
    video, audio = av_clip
    flat_v, flat_a = synchformer.embed(video, "video"), synchformer.embed(audio, "audio")
    assert flat_v.shape == (2, 15 * 8 * 32) and flat_a.shape == (2, 15 * 6 * 32)
    v, a = synchformer.unflatten(flat_v, "video"), synchformer.unflatten(flat_a, "audio")
    torch.testing.assert_close(synchformer.desync_from_features(v, a), synchformer.desync(video, audio))
    # one stream at a time and both at once read the same windows
    logits = synchformer.offset_logits_from_features(v, a)
    with torch.no_grad():
        first = synchformer.model.offset_logits(v[:, :14], a[:, :14])
        last = synchformer.model.offset_logits(v[:, 1:], a[:, 1:])
    torch.testing.assert_close(logits, torch.stack([first, last], 1))


def test_desync_reads_the_offset_grid(synchformer_file, av_clip):
    """A head forced to one class gives that class's |offset|: class 15 is +1.0 s, class 10 is 0 s."""
    video, audio = av_clip
    embedder = sf.load(synchformer_file[0], **SF_HEADS)
    head = embedder.model.transformer.off_head
    for cls, seconds in ((15, 1.0), (10, 0.0), (0, 2.0), (3, 1.4)):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 21).float())
        desync = embedder.desync(video[:1, :120], audio[:1, :76_800])  # exactly one 4.8 s window
        torch.testing.assert_close(desync, torch.tensor([seconds]))


def test_synchformer_windows_and_short_clips(synchformer):
    assert sf.windows(24, 14) == [slice(0, 14), slice(10, 24)]  # 8 s, as av-benchmark scores it
    assert sf.windows(14, 14) == [slice(0, 14)]
    assert sf.count_segments(200, 16, 8) == 24 and sf.count_segments(128_000, 10_240, 5_120) == 24
    assert sf.count_segments(120, 16, 8) == 14 and sf.count_segments(76_800, 10_240, 5_120) == 14
    assert synchformer.window_seconds == pytest.approx(4.8)
    with pytest.raises(ValueError, match="119 frames at 25 fps.*4.8 s"):
        synchformer.video_features(random_video(119, 32, 32, batch=1))
    with pytest.raises(ValueError, match="needs 4.8 s"):
        synchformer.audio_features(noise_and_tones(4.7, batch=1))


# ---------------------------------------------------------------- Synchformer: pieces against references


def test_pooling_layer_matches_torch_transformer_encoder_layer():
    ours = randomize(sf.PoolingLayer(24, heads=3, hidden=40), seed=2)
    reference = nn.TransformerEncoderLayer(24, 3, dim_feedforward=40, dropout=0.0, activation=nn.GELU(),
                                           layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "cls_token"})
    x = torch.randn(4, 6, 24)
    with torch.no_grad():
        expected = reference(torch.cat([ours.cls_token.expand(4, -1, -1), x], 1))[:, 0]
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("over", ["space", "time"])
def test_divided_attention_matches_masked_full_attention(over):
    frames, patches, dim, heads = 4, 6, 16, 2
    attn = randomize(sf.DividedAttention(dim, heads), seed=3)
    x = torch.randn(2, 1 + frames * patches, dim)
    n, d = x.shape[1], dim // heads
    q, k, v = (t.view(2, n, heads, d).transpose(1, 2) for t in attn.qkv(x).chunk(3, -1))
    index = torch.arange(n - 1)
    key = index // patches if over == "space" else index % patches  # frame, or position in the frame
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[1:, 1:] = key[:, None] == key[None, :]  # the class token sees and is seen by every token
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, n, dim))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, frames, over), expected, atol=1e-5, rtol=1e-5)


def test_ast_encoder_matches_the_transformers_ast():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, max_length=66, num_mel_bins=128)
    reference = transformers.ASTModel(cfg).eval()
    ours = randomize(sf.ASTModel(sf.SynchformerConfig(width=32, audio_depth=2, audio_heads=2)), seed=4)
    renamed = {  # the published (HF AST of 2023) names -> those of the installed transformers
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
        ".intermediate.dense.": ".mlp.fc1.", ".output.dense.": ".mlp.fc2.", "encoder.layer.": "layers."}
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in renamed.items():
            key = key.replace(old, new)
        state[key] = value
    reference.load_state_dict(state)
    spec = torch.randn(3, 1, 128, 66)
    with torch.no_grad():
        # the transformers AST takes (N, time, mel) and transposes it to (N, 1, mel, time) itself
        expected = reference(input_values=spec[:, 0].transpose(1, 2)).last_hidden_state
        torch.testing.assert_close(ours(spec), expected, atol=1e-4, rtol=1e-4)


def test_sync_mel_matches_librosa():
    banks = sf.htk_mel_banks().numpy()
    reference_banks = librosa.filters.mel(sr=16_000, n_fft=1024, n_mels=128, fmin=0, fmax=8000, htk=True,
                                          norm=None)
    np.testing.assert_allclose(banks, reference_banks, atol=1e-6)
    wave = noise_and_tones(0.64, batch=2, seed=6)
    ours = sf.SyncMel()(torch.from_numpy(wave))
    assert ours.shape == (2, 1, 128, 66)
    power = librosa.feature.melspectrogram(y=wave, sr=16_000, n_fft=1024, hop_length=160, win_length=400,
                                           window="hann", center=True, pad_mode="reflect", power=2.0,
                                           n_mels=128, fmin=0, fmax=8000, htk=True, norm=None)
    log = np.pad(np.log(power + 1e-6), ((0, 0), (0, 0), (0, 1)))  # 65 frames, zero-padded to 66
    expected = (log + 4.2677393) / (2 * 4.5689974)
    np.testing.assert_allclose(ours[:, 0].numpy(), expected, atol=2e-4, rtol=0)


def test_sync_video_frames_are_centre_cropped_and_scaled_to_minus_one_one():
    frames = np.zeros((16, 40, 60, 3), np.uint8)
    frames[..., 1] = 255
    frames[:, :, :4, 2] = 200  # a band at the left edge that the centre crop removes
    x = sf.video_frames(frames, size=32)
    assert x.shape == (16, 3, 32, 32)
    torch.testing.assert_close(x[:, 0], torch.full((16, 32, 32), -1.0))
    torch.testing.assert_close(x[:, 1], torch.full((16, 32, 32), 1.0))
    assert x[:, 2].max() == -1.0  # 60 * 32 / 40 = 48 wide, crop from 8: the band (and its blur) is gone
    assert sf.video_frames(frames[:, :, :40], size=32)[:, 2, :, 0].min() > -0.9  # uncropped, it is there
    segments = sf.video_segments(torch.arange(40.0).view(40, 1, 1, 1).expand(40, 3, 2, 2))
    assert segments.shape == (4, 16, 3, 2, 2) and segments[:, 0, 0, 0, 0].tolist() == [0, 8, 16, 24]
