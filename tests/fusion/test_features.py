"""Table 2 feature rows: a pretrained extractor's features in the conditioning generator's place
(fusion/features.py), with a stand-in extractor (the real ones: tests/eval/test_features.py)."""

from __future__ import annotations

import pytest
import torch

from avlink.fusion.features import FeatureStream
from avlink.sample import sample_link
from avlink.system import build_model

from helpers import randomize_backbone, tiny_batch, tiny_config

INJECTIONS = ["fusion", "static", "cross_attention", "direct", "text_concat"]


class PooledPairs:
    """A stand-in extractor: every pair of frames averaged over space and time, through a fixed projection."""

    name = "syncbench-video"  # the config names a real extractor; this one stands in for it
    modality = "video"
    dim = 12

    def __init__(self, fps: float, seed: int = 0):
        self.fps = fps
        self.proj = torch.randn(3, self.dim, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        pooled = x.mean((-2, -1))  # (B, 3, T)
        pairs = pooled.unflatten(2, (-1, 2)).mean(-1).transpose(1, 2)  # (B, T / 2, 3)
        times = torch.arange(pairs.shape[1], dtype=torch.float64) * 2 / self.fps
        return pairs @ self.proj.to(x.device), times


def feature_link(seed: int = 0, **overrides):
    cfg = tiny_config(**{"fusion.features": "syncbench-video", **overrides})
    extractor = PooledPairs(cfg.clip.video.fps, seed)
    torch.manual_seed(seed)
    model = build_model(cfg, tasks=("v2a",), features=extractor)
    randomize_backbone(model.audio, seed)
    randomize_backbone(model.video, seed + 1)
    return model, extractor


def forbid_calls(module: torch.nn.Module) -> None:
    """Any call of the module or of any part of it fails the test."""
    def called(mod, *_):
        raise AssertionError(f"the conditioning generator ran ({type(mod).__name__})")

    for part in module.modules():
        part.register_forward_pre_hook(called)
    for name in ("embed", "run_blocks", "head"):
        setattr(module, name, lambda *_, name=name: called(module))


def train_steps(model, steps: int = 2) -> None:
    audio, video = tiny_batch(model.cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):  # the second step moves the weights behind the zero gates
        opt.zero_grad()
        model.loss("v2a", audio, video).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("injection", INJECTIONS)
def test_a_feature_row_trains_and_samples_without_the_video_generator(injection):
    model, extractor = feature_link(**{"fusion.injection": injection})
    forbid_calls(model.video)
    assert isinstance(model.feature_stream, FeatureStream)
    train_steps(model)
    assert extractor.calls == 2  # once per clip batch, not once per block or step
    audio, video = tiny_batch(model.cfg)
    out = sample_link(model, "v2a", video, steps=3)
    assert out.shape == audio.shape and torch.isfinite(out).all()
    assert extractor.calls == 3  # the whole sample: one extraction for its 3 steps


def test_the_blocks_read_the_extractor_features_of_the_clean_clip():
    model, extractor = feature_link()
    fset = model.fusion_set("v2a")
    assert fset.blocks[0].v.proj_in.in_features == extractor.dim  # the video side reads the features' width
    train_steps(model)
    audio, video = tiny_batch(model.cfg)
    g = torch.Generator().manual_seed(1)
    cond = model.prepare("v2a", video, generator=g)
    features, times = extractor(video)
    assert torch.equal(cond.cond_state.x, features) and torch.equal(cond.cond_state.times, times)
    assert not torch.equal(cond.x_cond, video)  # the generated stream's condition is noised, the features not
    t = torch.rand(2)
    with torch.no_grad():
        ours = model(audio, t, cond)
        plain = model(audio, t, model.prepare("v2a", video, generator=torch.Generator().manual_seed(1), cache=False))
        torch.testing.assert_close(ours, plain)
        # Other features, other velocity: the generated stream is conditioned on them.
        other = PooledPairs(extractor.fps, seed=5)
        model.feature_stream = FeatureStream(other)
        assert not torch.allclose(model(audio, t, model.prepare("v2a", video)), ours, atol=1e-5)


def test_a_feature_row_needs_its_extractor_and_the_video_to_audio_direction():
    cfg = tiny_config(**{"fusion.features": "syncbench-video"})
    extractor = PooledPairs(cfg.clip.video.fps)
    with pytest.raises(ValueError, match="build it with that extractor"):
        build_model(cfg, tasks=("v2a",))
    with pytest.raises(ValueError, match="V2A only, not a2v"):
        build_model(cfg, tasks=("v2a", "a2v"), features=extractor)
    with pytest.raises(ValueError, match="shared by both directions"):
        build_model(cfg.override(**{"fusion.shared": True}), features=extractor)
    with pytest.raises(ValueError, match="reads the generator's activations"):
        build_model(tiny_config(), tasks=("v2a",), features=extractor)
    with pytest.raises(ValueError, match="the extractor given is syncbench-video"):
        build_model(cfg.override(**{"fusion.features": "imagebind"}), tasks=("v2a",), features=extractor)
