"""Onset ACC and Onset AP: the temporal-alignment metric of CondFoleyGen (Du et al., CVPR 2023) that AV-Link
reports for V2A.

This reproduces the protocol of `predict_onset.py` in the public CondFoleyGen repository (XYPB/CondFoleyGen),
written anew from its description:
- audio mono at 22,050 Hz; onsets by `librosa.onset.onset_detect(units="samples", delta=0.3)`, every other
  value at librosa's default, i.e. hop 512 and peak picking pre_max 1, post_max 1, pre_avg 4, post_avg 5,
  wait 1 frames (30, 0, 100, 100, 30 ms). We pass all of them explicitly, and the STFT padding of the onset
  envelope as "reflect", the default of librosa 0.8.0 that the public environment pins (0.10 changed it to
  zeros). Peak picking itself is the same algorithm in 0.8 and 0.11.
- confidence of a generated onset: the maximum of |wav| (min-max scaled to [0, 1] over the clip) within
  int(0.05 * 22050) = 1102 samples either side;
- non-maximum suppression of generated onsets, strongest first, 0.05 s;
- each target onset, in time order, takes the unused generated onset within 0.1 s (strictly closer) whose
  scaled |wav| at the onset sample is largest; a hit scores its confidence, a miss scores 0 (label 1); once no
  generated onset is left the loop stops; unused generated onsets are negatives with their confidence;
- per clip: detection accuracy = hits / target onsets (0 when there are none), detection AP =
  `sklearn.metrics.average_precision_score` of those labels and scores, and onset-count accuracy =
  (number of target onsets == number of generated onsets before suppression);
- the reported numbers are the means over clips of these three.

Where the public script would fail we say what we do instead:
- a confidence window of an onset in the first 1102 samples starts at a negative index there, which wraps
  around in numpy and gives an empty window (an error); we cut the window at the clip's start;
- AP of a clip with no positive label (no target onset) is undefined (NaN with the pinned scikit-learn 0.24;
  recent releases say 0 with a warning), and with no label at all sklearn raises; we return NaN in both cases
  and leave such clips out of the AP mean (`OnsetSummary.ap_clips` says how many went in);
- silence (a constant |wav|) cannot be min-max scaled; its scaled envelope is 0.

One quirk we keep on purpose because it changes the published numbers: the public suppression removes items
from the list it is walking, so the onset right after a removed one is not examined in that pass and survives.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import librosa
import numpy as np
from sklearn.metrics import average_precision_score

SAMPLE_RATE = 22050
HOP_LENGTH = 512
PEAK_PICK: dict[str, float] = {"pre_max": 1, "post_max": 1, "pre_avg": 4, "post_avg": 5, "wait": 1,
                               "delta": 0.3}
STFT_PAD_MODE = "reflect"
CONFIDENCE_HALF_WINDOW = int(0.05 * SAMPLE_RATE)  # 1102 samples
SUPPRESSION_WINDOW = 0.05  # seconds
MATCH_DELTA = 0.1  # seconds


@dataclass
class OnsetTrack:
    """Onsets of one clip with what the protocol reads of its waveform, so the wave need not be kept.

    onsets: sample indices at SAMPLE_RATE, ascending; peak: scaled |wav| at each onset sample; confidence:
    scaled |wav| maximum within CONFIDENCE_HALF_WINDOW of each onset.
    """

    onsets: np.ndarray  # (N,) int64
    peak: np.ndarray  # (N,) float64
    confidence: np.ndarray  # (N,) float64

    def __post_init__(self) -> None:
        n = len(self.onsets)
        assert len(self.peak) == n and len(self.confidence) == n, "one peak and one confidence per onset"

    @property
    def times(self) -> np.ndarray:
        """Onset times in seconds."""
        return self.onsets / SAMPLE_RATE


@dataclass
class OnsetScores:
    """The protocol's numbers for one clip."""

    count_match: bool  # as many generated onsets (before suppression) as target onsets
    acc: float  # hits / target onsets
    ap: float  # average precision; NaN where undefined
    hits: int
    n_target: int
    n_generated: int


@dataclass
class OnsetSummary:
    count_acc: float  # the public "#onset acc"
    acc: float  # "detection acc"
    ap: float  # "detection ap"
    clips: int
    ap_clips: int  # clips whose AP is defined


def detect_onsets(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Onset sample indices (N,) of a mono wave at 22,050 Hz, as the public protocol detects them."""
    assert sample_rate == SAMPLE_RATE, f"the protocol runs at {SAMPLE_RATE} Hz, got {sample_rate}"
    y = np.asarray(wav, dtype=np.float64)
    assert y.ndim == 1, f"mono wave (n,) expected, got {y.shape}"
    envelope = librosa.onset.onset_strength(y=y, sr=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                            pad_mode=STFT_PAD_MODE)
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                        units="samples", **PEAK_PICK)
    return np.asarray(onsets, dtype=np.int64)


def scaled_envelope(wav: np.ndarray) -> np.ndarray:
    """|wav| min-max scaled to [0, 1] over the clip (all zeros for a constant wave)."""
    magnitude = np.abs(np.asarray(wav, dtype=np.float64))
    low, high = magnitude.min(initial=0.0), magnitude.max(initial=0.0)
    if high <= low:
        return np.zeros_like(magnitude)
    return (magnitude - low) / (high - low)


def confidences(envelope: np.ndarray, onsets: np.ndarray) -> np.ndarray:
    """Maximum of the scaled envelope within CONFIDENCE_HALF_WINDOW samples of each onset, cut at the clip."""
    half = CONFIDENCE_HALF_WINDOW
    return np.array([envelope[max(0, o - half):o + half].max(initial=0.0) for o in onsets], dtype=np.float64)


def onset_track(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> OnsetTrack:
    """Detect the onsets of `wav` and read their peaks and confidences."""
    onsets = detect_onsets(wav, sample_rate)
    envelope = scaled_envelope(wav)
    at = np.clip(onsets, 0, len(envelope) - 1)  # an onset on the very last frame may sit one past the end
    peak = envelope[at] if len(envelope) else np.zeros(len(onsets))
    return OnsetTrack(onsets, np.asarray(peak, dtype=np.float64), confidences(envelope, onsets))


def suppress(onsets: np.ndarray, confidence: np.ndarray, window: float = SUPPRESSION_WINDOW) -> np.ndarray:
    """Indices into `onsets` that survive the public non-maximum suppression, in time order."""
    remaining = list(range(len(onsets)))
    kept: list[int] = []
    for index in np.argsort(np.asarray(confidence).tolist())[::-1]:  # same sort call as the public script
        if index not in remaining:
            continue
        kept.append(int(index))
        remaining.remove(index)
        position = 0
        while position < len(remaining):
            if abs(int(onsets[remaining[position]]) - int(onsets[index])) < window * SAMPLE_RATE:
                del remaining[position]
            # Both branches step on: after a removal the next item has slid into this slot and is skipped,
            # exactly as the public loop over a list it shortens.
            position += 1
    return np.array(sorted(kept, key=lambda i: onsets[i]), dtype=np.int64)


def average_precision(labels: list[int], scores: list[float]) -> float:
    """sklearn's AP, NaN where it is undefined (no label, or no positive label)."""
    if not labels or not any(labels):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(labels, scores))


def score_onsets(target: np.ndarray, generated: OnsetTrack, delta: float = MATCH_DELTA) -> OnsetScores:
    """One clip: target onset samples (M,) against the generated clip's OnsetTrack."""
    kept = suppress(generated.onsets, generated.confidence)
    unused = [int(i) for i in kept]  # indices into generated.*, in time order
    labels: list[int] = []
    scores: list[float] = []
    hits = 0
    for onset in np.asarray(target, dtype=np.int64):
        near = [j for j, g in enumerate(unused)
                if abs(int(generated.onsets[g]) - int(onset)) < delta * SAMPLE_RATE]
        labels.append(1)
        if not near:
            scores.append(0.0)
            continue
        strongest = near[int(np.argsort([generated.peak[unused[j]] for j in near])[-1])]
        hits += 1
        scores.append(float(generated.confidence[unused[strongest]]))
        del unused[strongest]
        if not unused:
            break
    for g in unused:
        labels.append(0)
        scores.append(float(generated.confidence[g]))
    n_target = len(target)
    return OnsetScores(count_match=n_target == len(generated.onsets),
                       acc=hits / n_target if n_target else 0.0, ap=average_precision(labels, scores),
                       hits=hits, n_target=n_target, n_generated=len(generated.onsets))


def onset_scores(target_wav: np.ndarray, generated_wav: np.ndarray,
                 sample_rate: int = SAMPLE_RATE) -> OnsetScores:
    """One clip from its two waves (mono, 22,050 Hz, the same length)."""
    assert len(target_wav) == len(generated_wav), f"lengths differ: {len(target_wav)} != {len(generated_wav)}"
    return score_onsets(detect_onsets(target_wav, sample_rate), onset_track(generated_wav, sample_rate))


def summarize(clips: list[OnsetScores]) -> OnsetSummary:
    """Means over clips, as the public script prints them (AP over the clips where it is defined)."""
    if not clips:
        nan = float("nan")
        return OnsetSummary(nan, nan, nan, 0, 0)
    aps = np.array([c.ap for c in clips])
    defined = aps[~np.isnan(aps)]
    return OnsetSummary(
        count_acc=float(np.mean([c.count_match for c in clips])),
        acc=float(np.mean([c.acc for c in clips])),
        ap=float(defined.mean()) if len(defined) else float("nan"),
        clips=len(clips), ap_clips=len(defined),
    )
