"""AV-Align: the weight-free audio-video synchrony score of TempoTokens (Yariv et al., "Diverse and Aligned
Audio-to-Video Generation via Text-to-Video Model Adaptation", AAAI 2024), used for A2V; it reads any pair of
an audio track and a video, so it serves V2A too. Below the pipeline in the layers, because generation ranks
best-of-N candidates by it (rank.py) and `avlink eval` reports it (eval/scoring.py): one definition for both.

Reproduces `av_align.py` of the public TempoTokens repository (guyyariv/TempoTokens), written anew:
- audio peaks: librosa onsets of the wave at 22,050 Hz (`librosa.load`'s default rate, soxr resampling as in
  librosa >= 0.10), `onset_strength` and `onset_detect` at their defaults (hop 512, delta 0.07, pre_max 1,
  post_max 1, pre_avg 4, post_avg 5, wait 1 frames at this rate; passed explicitly here), in seconds;
- video peaks: per frame the mean magnitude of Farneback optical flow (OpenCV, pyr_scale 0.5, levels 3,
  winsize 15, iterations 3, poly_n 5, poly_sigma 1.2, flags 0) from the previous grey frame (the first frame
  repeats the second one's value); a peak is a frame whose value is strictly above both neighbours, at time
  index / fps;
- score: an audio peak counts once if some video peak lies strictly within one frame (1 / fps) of it;
  IoU = count / (audio peaks + video peaks - count).
Both peak lists empty makes the public score divide by zero; we return NaN (left out of means). Several audio
peaks may count against one video peak, so a clip can score above 1, as in the public definition.
Grey frames use the BT.601 weights of OpenCV's colour conversion, as the public script's BGR2GRAY on
OpenCV-decoded frames does; we convert from RGB, so the weights land on the same channels.
"""

from __future__ import annotations

import cv2
import librosa
import numpy as np
import soxr

SAMPLE_RATE = 22050
HOP_LENGTH = 512
# librosa's onset_detect defaults at 22,050 Hz / hop 512 (30, 0, 100, 100, 30 ms in frames; delta 0.07).
PEAK_PICK: dict[str, float] = {"pre_max": 1, "post_max": 1, "pre_avg": 4, "post_avg": 5, "wait": 1,
                               "delta": 0.07}
FARNEBACK: dict[str, float] = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
                               "poly_sigma": 1.2, "flags": 0}


def audio_peaks(wav: np.ndarray, sample_rate: int, delta: float = PEAK_PICK["delta"]) -> np.ndarray:
    """Onset times in seconds (N,) of a mono wave; delta: the peak-picking threshold (AV-Align's by default)."""
    y = np.asarray(wav, dtype=np.float32)
    assert y.ndim == 1, f"mono wave (n,) expected, got {y.shape}"
    if sample_rate != SAMPLE_RATE:
        y = soxr.resample(y, sample_rate, SAMPLE_RATE, quality="HQ")
    envelope = librosa.onset.onset_strength(y=y, sr=SAMPLE_RATE, hop_length=HOP_LENGTH)
    frames = librosa.onset.onset_detect(onset_envelope=envelope, sr=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                        **{**PEAK_PICK, "delta": delta})
    return librosa.frames_to_time(frames, sr=SAMPLE_RATE, hop_length=HOP_LENGTH)


def flow_magnitudes(frames: np.ndarray) -> np.ndarray:
    """(T,) mean optical-flow magnitude into each frame of uint8 RGB frames (T, H, W, 3), T >= 2."""
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, (
        f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}"
    )
    assert frames.shape[0] >= 2, f"optical flow needs at least 2 frames, got {frames.shape[0]}"
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    values = []
    for previous, current in zip(grey[:-1], grey[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(previous, current, None, **FARNEBACK)  # (H, W, 2)
        values.append(float(cv2.magnitude(flow[..., 0], flow[..., 1]).mean()))
    return np.array([values[0], *values], dtype=np.float64)


def local_maxima(values: np.ndarray, fps: float) -> np.ndarray:
    """Times (index / fps) of entries strictly above both neighbours; the ends are never peaks."""
    v = np.asarray(values, dtype=np.float64)
    inner = np.flatnonzero((v[1:-1] > v[:-2]) & (v[1:-1] > v[2:])) + 1
    return inner / fps


def video_peaks(frames: np.ndarray, fps: float) -> np.ndarray:
    """Motion peak times in seconds of uint8 RGB frames (T, H, W, 3) at `fps`."""
    return local_maxima(flow_magnitudes(frames), fps)


def match_count(reference: np.ndarray, estimated: np.ndarray, tolerance: float) -> int:
    """Largest number of one-to-one pairs with |estimated - reference| <= tolerance (mir_eval.onset's rule;
    eval/events.py scores with it, the V2A ranking of sync.py too)."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    est = np.sort(np.asarray(estimated, dtype=np.float64))
    j = matched = 0
    for r in ref:
        # an estimate too early for this reference is too early for every later one
        while j < len(est) and est[j] < r and abs(r - est[j]) > tolerance:
            j += 1
        if j < len(est) and abs(est[j] - r) <= tolerance:
            matched += 1
            j += 1
    return matched


def audio_peaks_matched(audio: np.ndarray, video: np.ndarray, fps: float) -> int:
    """How many audio peak times (seconds) have a video peak strictly within one frame: AV-Align's count."""
    audio, video = np.asarray(audio, dtype=np.float64), np.asarray(video, dtype=np.float64)
    frame = 1.0 / fps
    return sum(bool(np.any((video - frame < a) & (a < video + frame))) for a in audio)


def av_align_score(audio: np.ndarray, video: np.ndarray, fps: float) -> float:
    """IoU of audio peak times and video peak times (seconds) within one frame; NaN when both are empty."""
    if len(audio) + len(video) == 0:
        return float("nan")
    hits = audio_peaks_matched(audio, video, fps)
    return hits / (len(audio) + len(video) - hits)


def av_align(wav: np.ndarray, sample_rate: int, frames: np.ndarray, fps: float) -> float:
    """AV-Align of one clip from its wave and its frames."""
    return av_align_score(audio_peaks(wav, sample_rate), video_peaks(frames, fps), fps)
