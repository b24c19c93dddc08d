"""Best-of-N: which of N candidates for one window keeps best in time with the input it was generated for.

Two scores, each between the conditioning input and each candidate, and nothing else:
- "sync", where the checkpoint folder holds the learned sync scorer (sync.py SYNC_FILE, `avlink train sync`):
  its logit for the (sound, frames) pair, and for V2A, where the scorer has an events head, first the agreement
  of each candidate's onsets with the events it sees in the window's frames (SyncRanker.scores);
- "av_align" otherwise: AV-Align (av_align.py), for V2A the onsets of each candidate sound against the motion
  peaks of the window's frames, for A2V the onsets of the window's sound against the motion peaks of each
  candidate video. It needs no weights, so it runs wherever generation runs.
A ranker is given the conditioning input and the candidates only (and the scorer's weights, which hold no clip):
generation has no reference (the input's own other modality, or ground truth), and a pick made by one would be
worth nothing where there is none.

Selecting on a score makes that score of a best-of-N output optimistic: compare best-of-N by the synchrony
metrics of `avlink eval` that the ranking does not read (onset accuracy, event F1, DeSync).

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
from avlink.sync import SyncRanker


@dataclass(frozen=True)
class Ranking:
    """One window's candidates: their scores, in candidate order, and the one kept."""

    window: int
    scores: tuple[float, ...]
    kept: int
    score: str = "av_align"  # which score ranked them: "av_align" or "sync"


def score_name(scorer: SyncRanker | None) -> str:
    """What `sync_scores` ranks by with this scorer: "sync" (the learned scorer) or "av_align"."""
    return "av_align" if scorer is None else scorer.name


def sync_scores(task: Task, conditioning: np.ndarray, candidates: Sequence[np.ndarray], fps: float,
                sample_rate: int, audio_start: float = 0.0, scorer: SyncRanker | None = None) -> list[float]:
    """The learned scorer's logit of each candidate with the conditioning input where `scorer` is given, AV-Align
    otherwise.

    V2A: conditioning uint8 frames (T, H, W, 3) at fps, candidates mono waves (n,) at sample_rate; A2V the other
    way round. audio_start: seconds from the first frame to the first audio sample (a window's offset,
    pipeline.plan_windows), added to the audio's onset times so both sides count from the first frame. The
    learned scorer reads the window's sound and frames as they are: the offset is under one audio token (46 ms
    for tiny, about a quarter of a video frame), and it met none in training."""
    assert task in ("v2a", "a2v"), f"task must be v2a or a2v, got {task!r}"
    if scorer is not None:
        return scorer.scores(task, conditioning, candidates)
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
