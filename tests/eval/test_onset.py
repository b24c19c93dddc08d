import librosa
import mir_eval
import numpy as np
import pytest

from avlink.eval import onset
from avlink.eval.onset import SAMPLE_RATE, OnsetScores, OnsetTrack

SR = SAMPLE_RATE


def hits_wave(times: list[float], duration: float = 2.0, seed: int = 0) -> np.ndarray:
    """Decaying noise bursts (hits) at `times` over a faint noise floor."""
    rng = np.random.default_rng(seed)
    wave = 1e-3 * rng.normal(size=int(duration * SR))
    burst = rng.normal(size=int(0.12 * SR)) * np.exp(-np.arange(int(0.12 * SR)) / (0.02 * SR))
    for t in times:
        start = int(t * SR)
        stop = min(len(wave), start + len(burst))
        wave[start:stop] += 0.5 * burst[:stop - start]
    return wave


def track(onsets, peak, confidence) -> OnsetTrack:
    return OnsetTrack(np.array(onsets, dtype=np.int64), np.array(peak, float), np.array(confidence, float))


def test_explicit_peak_picking_values_are_librosa_defaults_with_delta_raised():
    wave = hits_wave([0.3, 0.8, 1.4])
    envelope = librosa.onset.onset_strength(y=wave, sr=SR, pad_mode=onset.STFT_PAD_MODE)
    # librosa fills in its defaults from sr and hop; only delta is the public script's own value.
    theirs = librosa.onset.onset_detect(onset_envelope=envelope, sr=SR, units="samples", delta=0.3)
    np.testing.assert_array_equal(onset.detect_onsets(wave), theirs)


def test_detects_hits_where_they_are():
    truth = [0.3, 0.8, 1.4]
    found = onset.detect_onsets(hits_wave(truth)) / SR
    assert len(found) == 3
    np.testing.assert_allclose(found, truth, atol=0.05)


def test_identical_waves_score_perfectly():
    wave = hits_wave([0.25, 0.9, 1.5], seed=3)
    scores = onset.onset_scores(wave, wave)
    assert scores == OnsetScores(count_match=True, acc=1.0, ap=1.0, hits=3, n_target=3, n_generated=3)


def test_suppression_keeps_the_public_loop_quirk():
    # 10800 is strongest and suppresses 10000; 11600 (also within 0.05 s = 1102 samples of 10800) slid
    # into the removed item's slot, was not examined, and survives; the public script keeps it too.
    onsets = np.array([10000, 10800, 11600])
    assert onset.suppress(onsets, np.array([0.5, 0.9, 0.4])).tolist() == [1, 2]
    assert onset.suppress(onsets[:2], np.array([0.5, 0.9])).tolist() == [1]
    far = np.array([0, 5000, 10000])
    assert onset.suppress(far, np.array([0.1, 0.2, 0.3])).tolist() == [0, 1, 2]


def test_accuracy_and_ap_by_hand():
    target = np.array([1, 2, 3]) * SR
    generated = track([SR + 50, 2 * SR - 100, 80000], peak=[0.9, 0.5, 0.7], confidence=[0.9, 0.6, 0.7])
    s = onset.score_onsets(target, generated)
    # labels [1, 1, 1, 0], scores [0.9, 0.6, 0 (miss), 0.7]; AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/4
    assert (s.hits, s.acc, s.count_match) == (2, pytest.approx(2 / 3), True)
    assert s.ap == pytest.approx(1 / 3 + 2 / 9 + 1 / 4)


def test_the_strongest_candidate_in_the_window_is_taken():
    target = np.array([SR])
    generated = track([SR - 1500, SR + 1500], peak=[0.2, 0.8], confidence=[0.2, 0.8])
    s = onset.score_onsets(target, generated)
    assert s.hits == 1
    # the weak one is left over as a false positive scored by its confidence: labels [1, 0], scores [0.8, 0.2]
    assert s.ap == 1.0


def test_edge_cases_are_defined():
    none = track([], [], [])
    assert np.isnan(onset.score_onsets(np.array([], dtype=np.int64), track([5000], [1.0], [1.0])).ap)
    no_target = onset.score_onsets(np.array([], dtype=np.int64), none)
    assert no_target.acc == 0.0 and no_target.count_match and np.isnan(no_target.ap)
    missed = onset.score_onsets(np.array([SR]), none)
    assert missed.acc == 0.0 and not missed.count_match
    assert onset.onset_track(np.zeros(SR)).onsets.size == 0


def test_confidence_window_is_cut_at_the_clip_start():
    envelope = np.linspace(0.0, 1.0, SR)
    half = onset.CONFIDENCE_HALF_WINDOW
    # the public slice [500 - 1102 : 500 + 1102] would wrap to an empty window; ours is [0, 1602)
    got = onset.confidences(envelope, np.array([500, 5000, SR - 10]))
    np.testing.assert_allclose(got, [envelope[500 + half - 1], envelope[5000 + half - 1], 1.0])


def test_greedy_hits_match_mir_eval_when_windows_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(50):
        target = np.cumsum(rng.uniform(0.3, 0.6, size=5)) * SR  # > 2 windows apart: one candidate at most
        jitter = rng.uniform(-0.15, 0.15, size=5) * SR
        generated = np.round(target + jitter).astype(np.int64)
        target = np.round(target).astype(np.int64)
        s = onset.score_onsets(target, track(generated, np.ones(5), np.ones(5)))
        reference = mir_eval.util.match_events(target / SR, generated / SR, onset.MATCH_DELTA)
        assert s.hits == len(reference)


def test_greedy_hits_never_exceed_the_maximum_matching():
    rng = np.random.default_rng(1)
    for _ in range(100):
        target = np.sort(rng.integers(0, 2 * SR, size=rng.integers(1, 8)))
        generated = np.unique(rng.integers(0, 2 * SR, size=rng.integers(1, 8)))
        g = track(generated, rng.uniform(size=len(generated)), rng.uniform(size=len(generated)))
        best = len(mir_eval.util.match_events(target / SR, generated / SR, onset.MATCH_DELTA))
        assert onset.score_onsets(target, g).hits <= best


def test_summary_means_and_ap_over_defined_clips():
    clips = [OnsetScores(True, 1.0, 0.5, 1, 1, 1), OnsetScores(False, 0.5, float("nan"), 1, 2, 0),
             OnsetScores(True, 0.0, 1.0, 0, 1, 1)]
    s = onset.summarize(clips)
    assert (s.count_acc, s.acc, s.ap, s.clips, s.ap_clips) == (pytest.approx(2 / 3), 0.5, 0.75, 3, 2)
