import json

import pytest
import torch

from avlink.config import PRESETS, ModelConfig, get_preset
from avlink.seq import AudioGeometry, VideoGeometry
from avlink.system import video_codec


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_paper_geometry_follows_the_paper():
    clip = get_preset("paper").clip
    assert clip.audio.sample_rate == 16000
    assert (clip.video.width, clip.video.height, clip.video.fps) == (64, 36, 6.0)
    assert clip.num_frames == 31  # 5.16 s at 6 fps
    assert clip.num_video_tokens == 31 * 9 * 16
    assert clip.num_mel_frames == 516 and clip.num_audio_tokens == 129
    assert clip.audio.eta == 25.0 and clip.video.eta == 6.0


def test_tiny_geometry():
    clip = get_preset("tiny").clip
    assert clip.num_frames == 16 and clip.video_shape == (3, 16, 16, 16)
    # 2.667 s at 22,050 Hz, hop 256 -> 230 frames, rounded up to whole latent tokens of 4 frames.
    assert clip.num_mel_frames == 232 and clip.latent_shape == (58, 8)


def test_token_times_are_seconds():
    audio = AudioGeometry(sample_rate=16000, hop_length=160, latent_downsample=4)
    times = audio.token_times(50)
    assert times[25].item() == pytest.approx(1.0)
    video = VideoGeometry(fps=6.0, height=8, width=8, patch=(2, 4, 4))
    vt = video.token_times(video.grid(12))
    assert vt.shape == (6 * 2 * 2,)
    assert vt[4].item() == pytest.approx(2 / 6)  # second temporal patch starts at frame 2


def test_bad_patch_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        VideoGeometry(height=18, width=16, patch=(1, 4, 4))


def test_override_dotted_keys():
    cfg = get_preset("tiny").override(**{"fusion.injection": "static", "audio.depth": 4, "clip.duration": 2.0})
    assert cfg.fusion.injection == "static" and cfg.audio.depth == 4 and cfg.clip.duration == 2.0
    with pytest.raises(KeyError):
        get_preset("tiny").override(**{"fusion.nope": 1})
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("huge")


def test_video_flow_runs_on_unit_variance_pixels():
    assert all((p.clip.video.shift, p.clip.video.scale) == (0.0, 1.0) for p in PRESETS.values())  # plain pixels
    video = VideoGeometry(shift=-0.43, scale=0.26)
    pixels = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    codec = video_codec(video)
    x = codec.encode(pixels)
    assert torch.allclose(x, (pixels + 0.43) / 0.26)
    assert torch.allclose(codec.decode(x), pixels, atol=1e-6)
    assert codec.decode(torch.full((1,), 100.0)).item() == 1.0  # out-of-range samples are clamped
    assert torch.equal(video_codec(VideoGeometry()).encode(pixels), pixels)
    with pytest.raises(ValueError, match="scale must be positive"):
        VideoGeometry(scale=0.0)


def test_a_config_written_before_video_scaling_loads_as_plain_pixels():
    d = get_preset("tiny").to_dict()
    del d["clip"]["video"]["shift"], d["clip"]["video"]["scale"]
    video = ModelConfig.from_dict(d).clip.video
    assert (video.shift, video.scale) == (0.0, 1.0)
