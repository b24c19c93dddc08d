"""Best-of-N: which of N candidates for one window keeps best in time with the input it was generated for.

The score is AV-Align (av_align.py) between the conditioning input and each candidate, and nothing else: for
V2A the onsets of each candidate sound against the motion peaks of the window's frames, for A2V the onsets of
the window's sound against the motion peaks of each candidate video. It needs no weights, so it runs wherever
generation runs, and it reads the two modalities the paper's Fusion Blocks are meant to align. A ranker is given
the conditioning input and the candidates only: generation has no reference (the input's own other modality,
or ground truth), and a pick made by one would be worth nothing where there is none.

Selecting on AV-Align makes the AV-Align of a best-of-N output optimistic: compare best-of-N by the other
synchrony metrics of `avlink eval` (onset accuracy, DeSync), which the ranking does not read.

NaN (no peak on either side) ranks lowest, and ties go to the lower candidate, so candidate 0, the sample that
generation without best-of-N gives, is kept unless another scores strictly higher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avlink.av_align import audio_peaks, av_align_score, video_peaks
from avlink.config import Task


@dataclass(frozen=True)
class Ranking:
    """One window's candidates: their scores, in candidate order, and the one kept."""

    window: int
    scores: tuple[float, ...]
    kept: int


def sync_scores(task: Task, conditioning: np.ndarray, candidates: Sequence[np.ndarray], fps: float,
                sample_rate: int, audio_start: float = 0.0) -> list[float]:
    """AV-Align of each candidate against the conditioning input.

    V2A: conditioning uint8 frames (T, H, W, 3) at fps, candidates mono waves (n,) at sample_rate; A2V the other
    way round. audio_start: seconds from the first frame to the first audio sample (a window's offset,
    pipeline.plan_windows), added to the audio's onset times so both sides count from the first frame."""
    assert task in ("v2a", "a2v"), f"task must be v2a or a2v, got {task!r}"
    if task == "v2a":
        motion = video_peaks(conditioning, fps)  # the same for every candidate
        return [av_align_score(audio_peaks(wave, sample_rate) + audio_start, motion, fps) for wave in candidates]
    onsets = audio_peaks(conditioning, sample_rate) + audio_start
    return [av_align_score(onsets, video_peaks(frames, fps), fps) for frames in candidates]


def best(scores: Sequence[float]) -> int:
    """The first candidate of the highest score; NaN ranks lowest."""
    assert len(scores) > 0, "no candidates to rank"
    ranked = [-math.inf if math.isnan(score) else score for score in scores]
    return ranked.index(max(ranked))
