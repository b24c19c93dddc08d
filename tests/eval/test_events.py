import math

import mir_eval
import numpy as np

from avlink.data.syncbench import CUE_TAU, SPLIT_SEEDS, render_clip
from avlink.eval import events
from avlink.eval.events import EventCounts


def test_matching_equals_mir_eval_maximum_matching():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ref = np.sort(rng.uniform(0, 3, size=rng.integers(1, 9)))
        est = np.sort(rng.uniform(0, 3, size=rng.integers(1, 9)))
        tol = float(rng.choice([0.05, 0.1, 1 / 6, 0.4]))
        assert events.match_count(ref, est, tol) == len(mir_eval.util.match_events(ref, est, tol))


def test_precision_recall_f1_equal_mir_eval_onset_f_measure():
    rng = np.random.default_rng(1)
    for _ in range(100):
        ref = np.sort(rng.uniform(0, 3, size=rng.integers(1, 8)))
        est = np.sort(rng.uniform(0, 3, size=rng.integers(1, 8)))
        ours = events.event_counts(ref, est, events.AUDIO_TOLERANCE)
        f, p, r = mir_eval.onset.f_measure(ref, est, window=events.AUDIO_TOLERANCE)
        assert math.isclose(ours.f1, f) and math.isclose(ours.precision, p) and math.isclose(ours.recall, r)


def test_pooled_counts_and_undefined_values():
    a, b = EventCounts(2, 3, 4), EventCounts(0, 0, 1)  # b: a clip without events that fired once
    total = events.pooled([a, b])
    assert total == EventCounts(2, 3, 5)
    assert (total.precision, total.recall, total.f1) == (2 / 5, 2 / 3, 4 / 8)
    assert math.isnan(b.recall) and b.precision == 0.0 and b.f1 == 0.0
    assert math.isnan(EventCounts(0, 0, 0).f1)


def cue_video(event_times: list[float], fps: float = 6.0, frames: int = 16) -> np.ndarray:
    """16x16 px: a cue that flashes in the top-left quadrant at each event and fades as SyncBench's does, and
    a bright box sliding back and forth in the bottom-right quadrant (motion, no event)."""
    t = np.arange(frames) / fps
    video = np.full((frames, 16, 16, 3), 30.0)
    lag = t[:, None] - np.asarray(event_times)[None, :]
    cue = np.where(lag >= 0, np.exp(-np.maximum(lag, 0) / CUE_TAU), 0).max(axis=1, initial=0.0)
    video[:, 2:5, 2:5] += cue[:, None, None, None] * 200
    for k in range(frames):
        x = 9 + (k % 4)
        video[k, 10:14, x:x + 3] = 230
    return video.astype(np.uint8)


def test_cue_onsets_are_found_and_motion_is_not():
    truth = [0.3, 1.1, 1.8]
    found = events.video_event_times(cue_video(truth), 6.0)
    # each at the middle of the frame interval that holds the event
    np.testing.assert_allclose(found, [1.5 / 6, 6.5 / 6, 10.5 / 6])
    assert events.match_count(np.array(truth), found, 1 / 6) == 3
    assert events.video_event_times(cue_video([]), 6.0).size == 0


def test_detector_on_rendered_syncbench_clips():
    """Full-size 256x144 SyncBench frames taken at 6 fps (every 4th of 24): the cue detector's own ceiling.
    Several events within one frame interval can only be found once; every interval with an event is found
    and nothing else fires."""
    counts, intervals = [], 0
    for seed in range(6):
        clip = render_clip(SPLIT_SEEDS["val"] + 500 + seed, 16 / 6)
        truth = np.array(clip.meta["events"])
        intervals += len(set(np.ceil(truth * 6 - 1e-9).astype(int)))
        counts.append(events.event_counts(truth, events.video_event_times(clip.frames[::4], 6.0), 1 / 6))
    total = events.pooled(counts)
    assert total.precision == 1.0 and total.matched == intervals
