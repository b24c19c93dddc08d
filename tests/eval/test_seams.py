import argparse

import numpy as np
import pytest
import torch

from avlink import cli
from avlink.checkpoint import load_config
from avlink.config import get_preset
from avlink.data.media import write_audio, write_video
from avlink.eval.report import markdown
from avlink.eval.scoring import EvalSettings, evaluate
from avlink.eval.seams import (
    audio_seams,
    boundary_frames,
    inside_points,
    video_seams,
    window_clips,
    window_distance,
    window_plan,
)
from avlink.pipeline import plan_windows

CLIP = get_preset("tiny").clip


def test_boundaries_are_where_each_window_after_the_first_starts_new_content():
    total = 3 * CLIP.num_frames
    windows = plan_windows(total, CLIP.num_frames, CLIP.audio.num_tokens(total / CLIP.video.fps),
                           CLIP.num_audio_tokens, CLIP.video.fps, CLIP.audio.eta)
    bounds = boundary_frames(total, CLIP)
    assert len(bounds) == len(windows) - 1 >= 3
    assert bounds == sorted(bounds) and bounds[0] > 0 and bounds[-1] < total
    assert all(w.frame < b <= w.frame + CLIP.num_frames for w, b in zip(windows[1:], bounds, strict=True))
    assert boundary_frames(CLIP.num_frames, CLIP) == []  # one window: no seam
    assert inside_points([10], 20, 3) == [5, 15] and inside_points([10], 20, 6) == []


def frames_of(levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, 2, (len(levels), 8, 8, 3))
    return np.clip(levels[:, None, None, None] + noise, 0, 255).astype(np.uint8)


def test_a_scene_that_changes_at_every_boundary_scores_far_above_one():
    rng = np.random.default_rng(0)
    total = 3 * CLIP.num_frames
    bounds = boundary_frames(total, CLIP)
    drift = 100 + 0.5 * np.arange(total)  # the same slow change everywhere
    smooth = video_seams(frames_of(drift, rng), bounds, span=3)
    scene = np.searchsorted(bounds, np.arange(total), side="right")  # 0, 1, 2, ... per window
    jumps = video_seams(frames_of(drift + 20 * (scene % 2), rng), bounds, span=3)
    assert smooth.boundaries == jumps.boundaries == len(bounds) and smooth.inside >= 1
    assert 0.5 < smooth.ratio < 1.5, smooth
    assert jumps.ratio > 4 * smooth.ratio, (jumps, smooth)
    with pytest.raises(ValueError, match="no boundary or no inside point"):
        video_seams(frames_of(drift[:8], rng), [], span=3)


def test_a_sound_that_changes_at_the_boundaries_scores_far_above_one():
    rate, seconds = CLIP.audio.sample_rate, 3 * CLIP.duration
    t = np.arange(round(seconds * rate)) / rate
    bounds = [b / CLIP.video.fps for b in boundary_frames(round(seconds * CLIP.video.fps), CLIP)]
    same = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pitch = np.where(np.searchsorted(bounds, t, side="right") % 2 == 0, 440.0, 1300.0)
    changed = (0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / rate)).astype(np.float32)
    steady, seams = audio_seams(same, CLIP, bounds, 0.3), audio_seams(changed, CLIP, bounds, 0.3)
    assert steady.ratio < 1.5 and seams.ratio > 4, (steady, seams)


def test_window_distance_is_zero_for_one_sound_and_grows_with_change():
    same = np.ones((4, 8))
    assert window_distance(same) == pytest.approx(0.0, abs=1e-12)
    turns = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # orthogonal neighbours: distance 1
    assert window_distance(turns) == pytest.approx(1.0)
    total = 3 * CLIP.num_frames
    windows = window_plan(total, CLIP)
    wave = np.arange(round(total / CLIP.video.fps * 1000), dtype=np.float32)
    clips = window_clips(wave, 1000, windows, CLIP)
    n = round(CLIP.duration * 1000)
    assert clips.shape == (len(windows), n)
    for w, piece in zip(windows, clips, strict=True):
        first = round(w.token / CLIP.audio.eta * 1000)
        assert piece[0] == first and (piece[-1] == first + n - 1 or piece[-1] == 0)


# --- in `avlink eval` -----------------------------------------------------------------------------------------


def levels_video(path, levels: np.ndarray, audio: np.ndarray | None = None) -> None:
    rng = np.random.default_rng(len(levels))
    write_video(path, frames_of(levels, rng).repeat(2, 1).repeat(2, 2), CLIP.video.fps, audio, CLIP.audio.sample_rate)


def pitched(seconds: float, pitch_at) -> np.ndarray:
    rate = CLIP.audio.sample_rate
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * np.cumsum(pitch_at(t)) / rate)).astype(np.float32)


class ToneEmbedder:
    """Stands in for the SyncBench audio classifier: how much of each of two tones a clip holds."""

    name, modalities, sample_rate, fps = "syncbench-audio", ("audio",), CLIP.audio.sample_rate, None

    def embed(self, x, modality):
        spectrum = np.abs(np.fft.rfft(x, axis=-1))
        hz = np.fft.rfftfreq(x.shape[-1], 1 / self.sample_rate)
        return torch.tensor(np.stack([spectrum[:, abs(hz - f) < 20].sum(-1) for f in (440, 1300)], -1))

    def logits(self, x, modality):
        return None


def test_eval_scores_video_seams_at_the_generating_model_s_windows(tmp_path):
    """A2V: a generated scene that changes at every window boundary scores far above one; the reference, whose
    scene drifts smoothly, scores about one (the ceiling); no floor, and clips of one window are left out."""
    seconds = 3 * CLIP.duration
    total = round(seconds * CLIP.video.fps)
    bounds = boundary_frames(total, CLIP)
    drift = 100 + 0.5 * np.arange(total)
    scene = np.searchsorted(bounds, np.arange(total), side="right")
    (tmp_path / "gen").mkdir(), (tmp_path / "ref").mkdir()
    sound = pitched(seconds, lambda t: np.full_like(t, 440.0))
    for stem, jump in (("a", 30), ("b", 30), ("c", 90)):
        levels_video(tmp_path / "gen" / f"{stem}.mp4", drift + jump * (scene % 2))
        levels_video(tmp_path / "ref" / f"{stem}.mp4", drift, sound)
    levels_video(tmp_path / "gen" / "short.mp4", drift[:CLIP.num_frames])
    levels_video(tmp_path / "ref" / "short.mp4", drift[:CLIP.num_frames], sound[:CLIP.num_samples])
    settings = EvalSettings("a2v", metrics=("seams",), fps=CLIP.video.fps, progress=False, clip=CLIP)
    report = evaluate(tmp_path / "gen", tmp_path / "ref", settings)
    assert report.clips == 4 and report.used["seam_ratio"] == 3
    # pooled by the median over clips: a clip with a far larger ratio (c) does not carry the score
    ratios = sorted(row["seam_ratio"] for row in report.per_clip if row["clip"] != "short")
    assert ratios[2] > 2 * ratios[1] and report.value("seam_ratio") == pytest.approx(ratios[1])
    assert report.value("seam_ratio") > 4 and 0.5 < report.value("seam_ratio", "ceiling") < 1.5, report.rows
    assert report.value("seam_ratio", "floor") is None and "window_distance" not in report.used
    assert "| seam_ratio |" in markdown(report)
    per_clip = {row["clip"]: row["seam_ratio"] for row in report.per_clip}
    assert per_clip["a"] > 4 and np.isnan(per_clip["short"])


def test_eval_scores_audio_seams_and_the_distance_between_windows(tmp_path):
    """V2A: a sound whose pitch changes at the boundaries, against a steady reference; the classifier's window
    embeddings (here a stand-in) tell the windows apart only where the sound changes."""
    seconds = 3 * CLIP.duration
    bounds = [b / CLIP.video.fps for b in boundary_frames(round(seconds * CLIP.video.fps), CLIP)]
    (tmp_path / "gen").mkdir(), (tmp_path / "ref").mkdir()
    changed = pitched(seconds, lambda t: np.where(np.searchsorted(bounds, t, side="right") % 2, 1300.0, 440.0))
    steady = pitched(seconds, lambda t: np.full_like(t, 440.0))
    write_audio(tmp_path / "gen" / "a.wav", changed, CLIP.audio.sample_rate)
    levels_video(tmp_path / "ref" / "a.mp4", 100 + 0.5 * np.arange(round(seconds * CLIP.video.fps)), steady)
    settings = EvalSettings("v2a", metrics=("seams",), fps=CLIP.video.fps, progress=False, clip=CLIP)
    report = evaluate(tmp_path / "gen", tmp_path / "ref", settings, loader=lambda name, weights: ToneEmbedder())
    assert report.value("seam_ratio") > 4 and report.value("seam_ratio", "ceiling") < 1.5, report.rows
    assert report.value("window_distance") > 0.05 > 1e-3 > report.value("window_distance", "ceiling"), report.rows
    assert any(note.startswith("seams: windows of 16 frames at 6 fps") for note in report.notes)
    unknown = evaluate(tmp_path / "gen", tmp_path / "ref", EvalSettings("v2a", metrics=("seams",), progress=False),
                       loader=lambda name, weights: ToneEmbedder())
    assert "seam_ratio" not in unknown.used and any("give --ckpt" in note for note in unknown.notes)


def test_eval_reads_the_windows_of_the_checkpoint_that_made_the_clips(tmp_path, capsys):
    from avlink.checkpoint import save_config
    from avlink.eval import runner
    from avlink.pipeline import DEFAULT_CHECKPOINT

    from helpers import tiny_config

    cfg = tiny_config()
    save_config(tmp_path / "config.json", cfg)
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    common = ["--task", "v2a", "--generated", str(tmp_path), "--reference", str(tmp_path), "--out", str(tmp_path)]
    assert runner.settings_from_args(parser.parse_args([*common, "--ckpt", str(tmp_path)])).clip == cfg.clip
    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        default = runner.settings_from_args(parser.parse_args(common)).clip
        assert default == load_config(DEFAULT_CHECKPOINT / "config.json").clip
    assert runner.settings_from_args(parser.parse_args([*common, "--metrics", "onset"])).clip is None
    assert cli.main(["eval", *common, "--ckpt", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere/config.json: model config not found" in err
