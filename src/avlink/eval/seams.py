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
both sides; a stretch too short for one gives none. `avlink eval` takes half a hop for the span (`seam_span`):
the most that leaves an inside point in a stretch of one hop.

Beside it, for audio, the distance between consecutive windows as a network hears them: one minus the cosine
of the SyncBench audio classifier's embeddings of each window's sound as the pipeline generated it
(`window_clips`, `window_distance`). Consecutive windows share their overlap, so the distance is below that of
two separate clips; the reference cut at the same windows says what it is for one real scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avlink.eval.distances import as_array, cosine_per_pair
from avlink.pipeline import Window, plan_windows, window_hop
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


def window_plan(total_frames: int, clip: ClipGeometry) -> list[Window]:
    """pipeline.plan_windows' windows of an output of total_frames frames."""
    frames, fps, audio = clip.num_frames, clip.video.fps, clip.audio
    tokens = max(audio.num_tokens(max(total_frames, frames) / fps), clip.num_audio_tokens)
    return plan_windows(max(total_frames, frames), frames, tokens, clip.num_audio_tokens, fps, audio.eta)


def boundary_frames(total_frames: int, clip: ClipGeometry) -> list[int]:
    """The frames where a window's new content begins in an output of total_frames frames (the windows of
    pipeline.plan_windows): each window after the first starts its new content at the previous one's end."""
    return [prev.frame + clip.num_frames for prev in window_plan(total_frames, clip)[:-1]]


def seam_span(clip: ClipGeometry) -> int:
    """Frames either side of a point: half a hop (module docstring)."""
    return max(1, window_hop(clip.num_frames, clip.video.fps, clip.audio.eta) // 2)


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


def window_clips(wave: np.ndarray, sample_rate: int, windows: list[Window], clip: ClipGeometry) -> np.ndarray:
    """(W, n) each window's sound, from its first audio token for one window's length (silence past the end),
    of a wave at sample_rate: what the pipeline generated for that window."""
    n = round(clip.duration * sample_rate)
    starts = [round(w.token / clip.audio.eta * sample_rate) for w in windows]
    return np.stack([np.pad(wave[a:a + n], (0, n - wave[a:a + n].shape[0])) for a in starts]).astype(np.float32)


def window_distance(embeddings: np.ndarray) -> float:
    """Mean cosine distance between consecutive rows of (W, D) window embeddings, W >= 2."""
    e = as_array(embeddings)
    assert e.ndim == 2 and e.shape[0] >= 2, f"embeddings of two windows or more expected, got {e.shape}"
    return float(np.mean(1.0 - cosine_per_pair(e[:-1], e[1:])))
