"""Seams of windowed outputs: does a long output stay one scene (video) and one sound (audio) across the places
where one model window hands over to the next?

A long input is generated window by window (pipeline.plan_windows); each window after the first generates new
content from the end of the window before it. The seam score compares what changes across such a boundary with
what changes at a point inside a window, both measured the same way: the distance between the mean of the
`span` frames (or seconds) before the point and the mean of the `span` after it. For video that is the mean
absolute difference of the two mean frames in grey levels (0-255); for audio, of the two mean log-mel spectra
(natural log of the magnitude, the codec's analysis). A ratio near 1 means the boundaries change the output no
more than time does inside a window; a scene that changes at every window gives a ratio of several.

Inside points are the middles of the stretches of new content between boundaries, where a whole span fits on
both sides; a stretch too short for one gives none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avlink.pipeline import plan_windows
from avlink.seq import ClipGeometry


@dataclass(frozen=True)
class SeamScore:
    seam: float  # mean distance across the boundaries
    within: float  # mean distance at the inside points
    boundaries: int
    inside: int

    @property
    def ratio(self) -> float:
        return self.seam / self.within if self.within > 0 else float("inf")


def boundary_frames(total_frames: int, clip: ClipGeometry) -> list[int]:
    """The frames where a window's new content begins in an output of total_frames frames (the windows of
    pipeline.plan_windows): each window after the first starts its new content at the previous one's end."""
    frames, fps, audio = clip.num_frames, clip.video.fps, clip.audio
    tokens = max(audio.num_tokens(max(total_frames, frames) / fps), clip.num_audio_tokens)
    windows = plan_windows(max(total_frames, frames), frames, tokens, clip.num_audio_tokens, fps, audio.eta)
    return [prev.frame + frames for prev in windows[:-1]]


def inside_points(boundaries: list[int], total: int, span: int) -> list[int]:
    """The middle of each stretch of new content where `span` fits on both sides."""
    edges = [0, *boundaries, total]
    points = [(a + b) // 2 for a, b in zip(edges, edges[1:], strict=False)]
    return [p for p, a, b in zip(points, edges, edges[1:], strict=False) if p - span >= a and p + span <= b]


def _score(series: np.ndarray, boundaries: list[int], span: int) -> SeamScore:
    """series (T, ...) float: the distance of the means of span steps either side of each point."""
    def distance(point: int) -> float:
        before, after = series[point - span:point].mean(0), series[point:point + span].mean(0)
        return float(np.abs(before - after).mean())

    seams = [distance(b) for b in boundaries if b - span >= 0 and b + span <= len(series)]
    inside = [distance(p) for p in inside_points(boundaries, len(series), span)]
    if not seams or not inside:
        raise ValueError(f"no boundary or no inside point with {span} steps on both sides in {len(series)} steps")
    return SeamScore(float(np.mean(seams)), float(np.mean(inside)), len(seams), len(inside))


def video_seams(frames: np.ndarray, boundaries: list[int], span: int) -> SeamScore:
    """frames (T, H, W, 3) uint8; boundaries and span in frames."""
    return _score(frames.astype(np.float32), boundaries, span)


def audio_seams(wave: np.ndarray, clip: ClipGeometry, boundaries_s: list[float], span_s: float) -> SeamScore:
    """wave (N,) at clip.audio.sample_rate; boundaries and span in seconds, scored on log-mel frames."""
    from avlink.codecs.mel import MelSpectrogram

    with torch.no_grad():
        mel = MelSpectrogram(clip.audio)(torch.from_numpy(np.ascontiguousarray(wave, np.float32))[None])[0]
    rate = clip.audio.mel_rate
    return _score(mel.T.numpy(), [round(b * rate) for b in boundaries_s], max(1, round(span_s * rate)))
