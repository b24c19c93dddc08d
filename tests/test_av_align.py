import numpy as np
import pytest

from avlink import av_align

from helpers import clicks, jumping_square

FPS = 6.0
SR = 22050


def test_iou_by_the_published_definition():
    # 0.5 lies within one frame (1/6 s) of 0.52; 1.0 and 2.0 match nothing: IoU = 1 / (3 + 2 - 1)
    assert av_align.av_align_score(np.array([0.5, 1.0, 2.0]), np.array([0.52, 1.5]), FPS) == 0.25
    # the window is open: exactly one frame apart does not count
    assert av_align.av_align_score(np.array([0.5]), np.array([0.5 + 1 / 4]), 4.0) == 0.0
    # several audio peaks may count against one video peak (a score above 1 is possible, as published)
    assert av_align.av_align_score(np.array([1.0, 1.05, 1.1]), np.array([1.02]), FPS) == 3.0
    assert np.isnan(av_align.av_align_score(np.array([]), np.array([]), FPS))
    assert av_align.av_align_score(np.array([]), np.array([1.0]), FPS) == 0.0
    # the count alone, which the upsampler's evaluation reports beside the score
    assert av_align.audio_peaks_matched(np.array([0.5, 1.0, 2.0]), np.array([0.52, 1.5]), FPS) == 1
    assert av_align.audio_peaks_matched(np.array([0.5, 1.0, 2.0]), np.array([0.52, 1.5]), 1.0) == 3


def test_local_maxima_are_strict_and_skip_the_ends():
    values = np.array([5, 1, 0, 2, 2, 1, 3, 0, 4])
    np.testing.assert_array_equal(av_align.local_maxima(values, 2.0), [3.0])
    np.testing.assert_array_equal(av_align.local_maxima(np.array([0, 1, 0]), 1.0), [1.0])


def test_flow_peaks_at_the_jumps():
    frames = jumping_square(16, jumps=[4, 9, 13])
    magnitude = av_align.flow_magnitudes(frames)
    assert magnitude.shape == (16,) and magnitude[0] == magnitude[1]
    assert magnitude[[4, 9, 13]].min() > 10 * max(magnitude[[2, 6, 11]].max(), 1e-6)
    np.testing.assert_allclose(av_align.video_peaks(frames, FPS), np.array([4, 9, 13]) / FPS)


def test_audio_peaks_find_the_clicks_at_any_rate():
    truth = [0.4, 1.1, 1.9]
    for rate in (SR, 16000):
        found = av_align.audio_peaks(clicks(truth, 2.5, rate), rate)
        assert len(found) == 3
        np.testing.assert_allclose(found, truth, atol=0.05)


def test_synchronised_clip_scores_above_a_shifted_one():
    frames = jumping_square(16, jumps=[4, 9, 13])
    in_sync = clicks([4 / FPS, 9 / FPS, 13 / FPS], 16 / FPS)
    late = clicks([4 / FPS + 0.4, 9 / FPS + 0.4, 13 / FPS - 0.45], 16 / FPS)
    assert av_align.av_align(in_sync, SR, frames, FPS) == pytest.approx(1.0)
    assert av_align.av_align(late, SR, frames, FPS) == 0.0
