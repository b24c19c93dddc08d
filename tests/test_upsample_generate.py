"""The second video stage in use: `avlink a2v` and the pipeline with and without a checkpoint's upsampler."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from avlink.cli import main
from avlink.data.media import probe, read_video, write_audio
from avlink.pipeline import Pipeline
from avlink.weights import WeightsError

from helpers import random_checkpoint, random_upsampler

FAST = ["--steps", "2", "--seed", "3", "--upsample-steps", "2", "--upscale", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = random_checkpoint(tmp_path_factory.mktemp("base"))
    up = tmp_path_factory.mktemp("up")
    shutil.copytree(base, up, dirs_exist_ok=True)
    random_upsampler(up)
    return {"base": base, "up": up}


def sound(path: Path, seconds: float = 1.0, rate: int = 22050) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    write_audio(path, (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 0.25 < 0.05)).astype(np.float32), rate)
    return path


def test_a2v_writes_upsampled_frames_by_default(folders, tmp_path):
    source = sound(tmp_path / "beat.wav")
    base = Pipeline.load(folders["base"], vocoder="griffinlim")
    height, width = base.size
    out = tmp_path / "up.mp4"
    assert main(["a2v", str(source), "-o", str(out), "--ckpt", str(folders["up"]), *FAST]) == 0
    info = probe(out)
    assert (info.height, info.width) == (4 * height, 4 * width)
    frames = read_video(out, fps=24.0).frames
    assert len(frames) == 4 * 6  # 6 base frames (1 s at 6 fps), 4 output frames each
    plain = tmp_path / "plain.mp4"
    assert main(["a2v", str(source), "-o", str(plain), "--ckpt", str(folders["up"]), "--no-upsample", *FAST]) == 0
    assert (probe(plain).height, probe(plain).width) == (height, width)
    # a folder without the upsampler: the base frames, as before
    same = tmp_path / "same.mp4"
    assert main(["a2v", str(source), "-o", str(same), "--ckpt", str(folders["base"]), *FAST]) == 0
    assert (probe(same).height, probe(same).width) == (height, width)
    assert np.array_equal(read_video(same, fps=6.0).frames, read_video(plain, fps=6.0).frames)
    # default view size: the base frames x 8, upsampled or not
    assert main(["a2v", str(source), "-o", str(tmp_path / "view.mp4"), "--ckpt", str(folders["up"]), "--steps", "2",
                 "--upsample-steps", "1"]) == 0
    assert probe(tmp_path / "view.mp4").width == 8 * width


def test_pipeline_upsample_is_reproducible_and_sees_the_sound(folders):
    pipe = Pipeline.load(folders["up"], vocoder="griffinlim")
    assert Pipeline.load(folders["base"], vocoder="griffinlim").upsampler is None
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, *pipe.size, 3), dtype=np.uint8)
    wave = np.zeros(round(4 / pipe.fps * pipe.sample_rate), np.float32)
    wave[len(wave) // 2:] = 0.5
    a = pipe.upsample(frames, wave, steps=2, seed=1)
    assert a.shape == (16, 4 * pipe.size[0], 4 * pipe.size[1], 3) and a.dtype == np.uint8
    assert np.array_equal(a, pipe.upsample(frames, wave, steps=2, seed=1))
    assert not np.array_equal(a, pipe.upsample(frames, None, steps=2, seed=1))  # the envelope is an input
    # the flow starts at the interpolated frames and the frames go in clean (UpsamplerConfig.start_noise 0,
    # cond_t 1): the result is the base frames' alone, whatever the seed
    assert np.array_equal(a, pipe.upsample(frames, wave, steps=2, seed=2))


def test_long_clips_are_upsampled_in_chunks_with_context(folders, monkeypatch):
    """A clip of several model windows goes through the upsampler one window of frames at a time, each with the
    net's reach of context on either side (memory follows the chunk); a clip of one window is one pass."""
    import avlink.pipeline as pipeline_module
    from avlink.sample import sample_upsampler

    pipe = Pipeline.load(folders["up"], vocoder="griffinlim")
    chunk, margin = pipe.clip.num_frames, pipeline_module.upsample_margin(pipe.upsampler)
    assert margin == 2 * pipe.upsampler.cfg.depth + 2
    seen: list[int] = []

    def recording(up, low, *args, **kwargs):
        seen.append(low.shape[2])
        return sample_upsampler(up, low, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_upsampler", recording)
    rng = np.random.default_rng(0)
    total = 3 * chunk + 2
    frames = rng.integers(0, 256, (total, *pipe.size, 3), dtype=np.uint8)
    wave = (0.3 * rng.standard_normal(round(total / pipe.fps * pipe.sample_rate))).astype(np.float32)
    out = pipe.upsample(frames, wave, steps=2)
    assert out.shape == (4 * total, 4 * pipe.size[0], 4 * pipe.size[1], 3)
    assert len(seen) == 4 and max(seen) <= chunk + 2 * margin and seen[-1] == 2 + margin
    # the first chunk saw exactly the frames that reach it: the same as upsampling those frames alone
    head = frames[:chunk + margin]
    alone = pipe.upsample(head, wave[:round(len(head) / pipe.fps * pipe.sample_rate)], steps=2)
    assert np.array_equal(out[:4 * chunk], alone[:4 * chunk])
    # one window: one pass of the whole clip
    seen.clear()
    pipe.upsample(frames[:chunk], wave, steps=2)
    assert seen == [chunk]


def test_upsampler_of_another_geometry_is_refused(folders, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(folders["base"], folder)
    from avlink.checkpoint import load_config, save_config

    cfg = load_config(folder / "config.json")
    save_config(folder / "config.json", cfg.override(**{"clip.video.height": 8, "clip.video.width": 8}))
    random_upsampler(folder)  # made for 8x8 base frames
    save_config(folder / "config.json", cfg)
    with pytest.raises(WeightsError, match="upsamples 8x8"):
        Pipeline.load(folder, vocoder="griffinlim")
