import numpy as np
import pytest

from avlink.config import get_preset
from avlink.eval.seams import audio_seams, boundary_frames, inside_points, video_seams
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
