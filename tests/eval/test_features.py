"""Per-time features of the embedders (`timed_features`) and the extractors of the Table 2 feature rows
(eval/features.py), on small random networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avlink.config import get_preset
from avlink.errors import UserError
from avlink.eval import classifiers as clf
from avlink.eval.embed import imagebind as ib
from avlink.eval.embed import synchformer as sf
from avlink.eval.embed.syncbench import load as load_syncbench
from avlink.eval.embedders import TimedEmbedder
from avlink.eval.features import EXTRACTORS, load_features, retime
from avlink.system import decode_media, video_codec

TINY = get_preset("tiny")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def random_video(frames: int, size: int = 16, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("features") / "classifiers.safetensors"
    torch.manual_seed(0)
    clf.save_classifiers(path, randomize(clf.SyncBenchClassifiers(clf.ClassifierConfig(video_width=8, embed_dim=24))))
    return path


def test_syncbench_features_are_per_two_frames_and_local(classifier_weights: Path) -> None:
    embedder = load_syncbench("video", classifier_weights)
    assert isinstance(embedder, TimedEmbedder) and embedder.timed_dim == 24
    video = random_video(16)
    features, times = embedder.timed_features(video, "video")
    assert features.shape == (2, 8, 24) and times.dtype == torch.float64
    torch.testing.assert_close(times, torch.arange(8, dtype=torch.float64) * 2 / 6)
    assert not torch.allclose(features[:, 1], features[:, 2])
    # Steps are time steps of a convolution: a still video gives the same features wherever the receptive field
    # stays clear of the clip's ends (steps 2 .. 5 of 8); at the ends the zero padding shows.
    still = np.repeat(video[:, :1], 16, axis=1)
    steady, _ = embedder.timed_features(still, "video")
    for k in (3, 4, 5):
        torch.testing.assert_close(steady[:, k], steady[:, 2])
    assert not torch.allclose(steady[:, 0], steady[:, 2])
    with pytest.raises(ValueError, match="video only"):
        load_syncbench("audio", classifier_weights).timed_features(np.zeros((1, 22050), np.float32), "audio")


def test_imagebind_features_embed_each_pair_of_frames_alone() -> None:
    cfg = ib.ImageBindConfig(out_dim=16, vision_width=32, vision_depth=1, vision_heads=2, audio_width=32,
                             audio_depth=1, audio_heads=2)
    embedder = ib.ImageBindEmbedder(randomize(ib.ImageBindAV(cfg)), fps=6.0)
    video = random_video(5, size=20, batch=1)
    features, times = embedder.timed_features(video, "video")
    assert features.shape == (1, 3, 16) and embedder.timed_dim == 16
    torch.testing.assert_close(times, torch.tensor([0.0, 2 / 6, 4 / 6], dtype=torch.float64))
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(1, 3))
    second, _ = embedder.timed_features(video[:, 2:4], "video")
    torch.testing.assert_close(second[:, 0], features[:, 1])
    last, _ = embedder.timed_features(video[:, [4, 4]], "video")  # an odd count repeats its last frame
    torch.testing.assert_close(last[:, 0], features[:, 2])


def test_synchformer_features_lay_segments_end_to_end_without_a_window() -> None:
    cfg = sf.SynchformerConfig(width=32, video_depth=1, video_heads=2, image_size=32, audio_depth=1,
                               audio_heads=2, sync_width=24, sync_depth=1, sync_heads=2)
    embedder = sf.SynchformerEmbedder(randomize(sf.Synchformer(cfg)))
    video = random_video(30, size=32, batch=1)  # 1.2 s: far shorter than an offset window
    features, times = embedder.timed_features(video, "video")
    assert features.shape == (1, 15, 32) and embedder.timed_dim == 32
    torch.testing.assert_close(times, torch.arange(15, dtype=torch.float64) * 2 / 25)
    first = embedder.video_features(np.concatenate([video] * 4, axis=1))[:, 0]  # segment 0: frames 0 .. 15
    torch.testing.assert_close(features[:, :8], first)


def test_retime_shows_the_frame_on_screen() -> None:
    frames = np.arange(16)[None, :, None]  # (1, 16, 1): each frame its index
    at_25 = retime(frames, 6.0, 25.0)[0, :, 0]
    assert len(at_25) == 67 and list(at_25[:6]) == [0, 0, 0, 0, 0, 1] and at_25[-1] == 15
    assert list(retime(frames, 6.0, 3.0)[0, :, 0]) == list(range(0, 16, 2))
    assert retime(frames, 6.0, 6.0) is frames


def test_load_features_reads_the_decoded_clip_through_the_embedder(classifier_weights: Path) -> None:
    extractor = load_features("syncbench-video", TINY, classifier_weights)
    assert extractor.name == "syncbench-video" and extractor.modality == "video" and extractor.dim == 24
    codec = video_codec(TINY.clip.video)
    x = codec.encode(torch.rand(2, 3, 16, 16, 16) * 2 - 1)
    features, times = extractor(x)
    expected, expected_times = load_syncbench("video", classifier_weights).timed_features(
        decode_media(codec, "video", x), "video")
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(times, expected_times)
    assert set(EXTRACTORS) == {"syncbench-video", "imagebind", "synchformer"}
    with pytest.raises(UserError, match="unknown; known: generator, syncbench-video"):
        load_features("clip", TINY)
    with pytest.raises(UserError, match="fusion.features imagebind: imagebind: no weight file given"):
        load_features("imagebind", TINY)
