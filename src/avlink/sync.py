"""The learned sync scorer: how well a sound and a video keep time with each other, one number per pair.

Best-of-N (rank.py) ranks candidates with it where the checkpoint folder holds its weights (SYNC_FILE), and with
AV-Align otherwise. AV-Align counts onsets against motion peaks by fixed rules; this network is trained instead
on what an event looks and sounds like in the clips the generators learned from, and on nothing but timing: it
is shown a true pair against the same pair with one modality moved in time, and against another clip's sound.

The network reads what the generators read: the log-mel of the checkpoint's audio geometry (codecs/mel.py,
normalized as the audio VAE reads it) and the frames at the checkpoint's frame rate and size.
- audio: two 1-D convolutions over the mel frames, max-pooled to SUBSTEPS bins per video frame; the bins of a
  frame are stacked into its channels, so when within the frame interval a sound starts is not pooled away;
- video: per frame, the frame and its difference from the frame before (SyncBench's cue and a moving object
  are changes between frames) through two strided 2-D convolutions, pooled to a 2x2 grid, so where the change
  is stays in the channels;
- both projected to `width` channels per video frame, joined with their product, two temporal convolutions
  (kernel 3: an event and its neighbouring frames), the mean over time, one linear score: a logit, higher is
  more in sync. Fully convolutional in time, so it scores any number of frames.
The design is ours (the paper ranks nothing); it is kept small enough to train in minutes on one CPU core.

The video's events (`SyncConfig.events`): a second head on the video features alone, two temporal convolutions
and SUBSTEPS logits per frame, says in which quarter of which frame interval the clip's sound should have an
onset. It is trained on what the true sound of each training clip does (`onset_bins`: onsets of its log-mel, no
annotation), so it learns what an event looks like from any video with sound. V2A ranks with it (SyncRanker):
the pair logit above rates a candidate sound as a whole, and on the generator's own candidates it could not
tell those that miss one event from those that do not; the events head lets the ranker ask that question
directly, of the onsets each candidate sound has.

Training (`avlink train sync`, train/objectives.py SyncObjective): on prepared SyncBench shards, each batch
cropped to MAX_SHIFT frames less than the clip; the true pair of the crop is scored against the crops whose
audio, or whose video, starts MIN_SHIFT or more frames away, and against the next clip's audio at the same crop,
with a softmax over the pair and its negatives (cross-entropy on the true pair). Crops rather than circular
shifts: a rolled clip has a seam, and a seam the true pairs never have would tell the negatives apart with no
regard to timing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.av_align import audio_peaks, match_count
from avlink.codecs.mel import MelSpectrogram, normalize
from avlink.codecs.pixels import frames_to_pixels
from avlink.config import Task
from avlink.seq import AudioGeometry, ClipGeometry

SYNC_FILE = "sync.safetensors"
SYNC_CARD = "sync.card.json"
SUBSTEPS = 4  # audio bins per video frame
MIN_SHIFT = 2  # video frames: the nearest negative of training is this far off (the eval's tolerance is one frame)
MAX_SHIFT = 4  # video frames: training crops are the clip less this many frames; negatives lie within it
# Training targets of the events head (onset_bins): librosa's onset detection on the true sound's log-mel, at
# AV-Align's peak picking (av_align.PEAK_PICK, delta 0.07): every onset of a clean recording counts.
LABEL_DELTA = 0.07
# Events from the head's probabilities (event_times): an onset's quarter of the frame interval is uncertain, so
# its probability spreads over neighbouring bins and a single bin seldom passes one half. The sum over one frame
# interval of bins (SUBSTEPS) around each bin is the expected number of onsets there; an event is where it passes
# one half (more likely than not) and is a local maximum. With the shipped scorer, on the 64 val clips against
# the onsets of their own sound (event_agreement), this rule scored 0.855 (0.851 / 0.837 at 0.4 / 0.6); a
# threshold on single bins 0.846 / 0.837 / 0.685 / 0.122 at 0.2 / 0.25 / 0.3 / 0.5, so it needs tuning to the
# scorer's confidence and the sum does not.
EVENT_THRESHOLD = 0.5
# A candidate sound's onsets for the V2A ranking: librosa's detection with the peak-picking threshold of the
# CondFoleyGen onset protocol (Du et al. 2023; eval/onset.py), 0.3 of the clip's strongest onset strength. At
# AV-Align's 0.07 a generated sound's faint transients count as onsets and the ranking picked worse than the
# pair logit: on the generator's candidates for 279 train clips (the README's development set), onset accuracy
# of the pick at N = 4 0.845 at 0.07, 0.894 at 0.3, the pair logit alone 0.868.
RANK_DELTA = 0.3
# The pair logit breaks ties of the event agreement (a few events give few distinct values): its rank among the
# window's candidates over N, times this, so that it never outweighs one more or one fewer agreeing event. The
# rank, not the logit itself: a trained scorer's logits of the candidates are often all large, and a squashed
# logit (a sigmoid) would tie again.
TIE_WEIGHT = 1e-3


@dataclass(frozen=True)
class SyncConfig:
    n_mels: int = 80
    width: int = 64  # channels per video frame of each modality and of the joint convolutions
    video_width: int = 16  # channels of the first video convolution, doubled by the second
    events: bool = False  # the video's events head (module docstring); exports of before it have none


class SyncScorer(nn.Module):
    """(log-mel (B, n_mels, F), video (B, 3, T, H, W) in [-1, 1]) -> (B,) sync logits; module docstring."""

    def __init__(self, cfg: SyncConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, wv = cfg.width, cfg.video_width
        self.audio = nn.Sequential(nn.Conv1d(cfg.n_mels, w, 5, padding=2), nn.GELU(),
                                   nn.Conv1d(w, w, 5, padding=2), nn.GELU())
        self.audio_proj = nn.Conv1d(w * SUBSTEPS, w, 1)
        self.video = nn.Sequential(nn.Conv2d(6, wv, 3, stride=2, padding=1), nn.GELU(),
                                   nn.Conv2d(wv, 2 * wv, 3, stride=2, padding=1), nn.GELU())
        self.video_proj = nn.Conv1d(2 * wv * 4, w, 1)
        self.joint = nn.Sequential(nn.Conv1d(3 * w, w, 3, padding=1), nn.GELU(),
                                   nn.Conv1d(w, w, 3, padding=1), nn.GELU())
        self.head = nn.Linear(w, 1)
        if cfg.events:
            self.events = nn.Sequential(nn.Conv1d(w, w, 3, padding=1), nn.GELU(),
                                        nn.Conv1d(w, w, 3, padding=1), nn.GELU(), nn.Conv1d(w, SUBSTEPS, 1))

    def audio_frames(self, mel: Tensor, frames: int) -> Tensor:
        """log-mel (B, n_mels, F) spanning `frames` video frames -> (B, width, frames)."""
        x = self.audio(normalize(mel))  # (B, W, F)
        b, w, _ = x.shape
        x = F.adaptive_max_pool1d(x, frames * SUBSTEPS).view(b, w, frames, SUBSTEPS)
        return self.audio_proj(x.permute(0, 1, 3, 2).reshape(b, w * SUBSTEPS, frames))

    def video_frames(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, width, T); frame 0's difference is zero."""
        b, _, t, h, w = video.shape
        diff = torch.cat([torch.zeros_like(video[:, :, :1]), video.diff(dim=2)], dim=2)
        x = torch.cat([video, diff], dim=1).permute(0, 2, 1, 3, 4).reshape(b * t, 6, h, w)
        x = F.adaptive_avg_pool2d(self.video(x), 2).reshape(b, t, -1).transpose(1, 2)  # (B, 2 Wv * 4, T)
        return self.video_proj(x)

    def event_logits(self, video: Tensor) -> Tensor:
        """video_frames' features (B, width, T) -> (B, T * SUBSTEPS) logits of an onset in each bin (bin
        k * SUBSTEPS + j: the j-th part of the interval that starts at frame k)."""
        b, _, t = video.shape
        return self.events(video).transpose(1, 2).reshape(b, t * SUBSTEPS)

    def pair(self, audio: Tensor, video: Tensor) -> Tensor:
        """Per-frame features of both, (B, width, T) each, -> (B,) logits."""
        h = self.joint(torch.cat([audio, video, audio * video], dim=1))
        return self.head(h.mean(dim=-1))[:, 0]

    def forward(self, mel: Tensor, video: Tensor) -> Tensor:
        return self.pair(self.audio_frames(mel, video.shape[2]), self.video_frames(video))


def onset_bins(mel: Tensor, frames: int, audio: AudioGeometry, delta: float = LABEL_DELTA) -> Tensor:
    """Log-mel (B, n_mels, F) spanning `frames` video frames -> (B, frames * SUBSTEPS) float 0/1: the bins
    holding an onset of the sound (the events head's targets). librosa's onset strength of the log-mel in dB,
    peak picking at librosa's default windows (30 / 100 ms) and `delta`."""
    hop = audio.hop_length / audio.sample_rate  # seconds per mel frame

    def span(seconds: float) -> int:
        return max(1, round(seconds / hop))

    out = torch.zeros(mel.shape[0], frames * SUBSTEPS)
    decibels = mel.detach().float().cpu().numpy() * (20 / np.log(10))  # natural log of magnitude -> dB
    for row, spectrum in enumerate(decibels):
        envelope = librosa.onset.onset_strength(S=spectrum, sr=audio.sample_rate, hop_length=audio.hop_length)
        found = librosa.onset.onset_detect(onset_envelope=envelope, sr=audio.sample_rate,
                                           hop_length=audio.hop_length, units="frames", pre_max=span(0.03),
                                           post_max=1, pre_avg=span(0.1), post_avg=span(0.1) + 1,
                                           wait=span(0.03), delta=delta)
        bins = (np.asarray(found) * frames * SUBSTEPS) // spectrum.shape[-1]
        out[row, bins[bins < frames * SUBSTEPS]] = 1.0
    return out


def event_times(probabilities: np.ndarray, fps: float, threshold: float = EVENT_THRESHOLD) -> np.ndarray:
    """The events head's probabilities (T * SUBSTEPS,) -> event times in seconds from the first frame: where the
    sum of probabilities over one frame interval of bins around a bin passes `threshold` and is a local maximum
    (the first bin of a flat top), at that bin's middle; of two closer than one frame interval the larger stays
    (one onset's spread probability can leave two small maxima)."""
    mass = np.convolve(np.asarray(probabilities, dtype=np.float64), np.ones(SUBSTEPS), mode="same")
    before, after = np.r_[-np.inf, mass[:-1]], np.r_[mass[1:], -np.inf]
    peaks = np.flatnonzero((mass > threshold) & (mass > before) & (mass >= after))
    kept: list[int] = []
    for b in peaks[np.argsort(-mass[peaks], kind="stable")]:
        if all(abs(int(b) - k) >= SUBSTEPS for k in kept):
            kept.append(int(b))
    return (np.sort(np.array(kept, dtype=np.int64)) + 0.5) / (fps * SUBSTEPS)


def event_agreement(onsets: np.ndarray, events: np.ndarray, fps: float) -> float:
    """F1 of one-to-one matches within one frame between a sound's onsets and a video's events (seconds); 1 where
    neither has any. One-to-one, unlike AV-Align's IoU, where two onsets near one event both count as hits and
    a sound with many onsets could score above 1."""
    if len(onsets) + len(events) == 0:
        return 1.0
    return 2 * match_count(events, onsets, 1 / fps) / (len(onsets) + len(events))


def sync_metadata(cfg: SyncConfig, clip: ClipGeometry) -> dict[str, str]:
    """What a sync scorer's weight file says of itself: its sizes and the geometry of what it reads."""
    audio, video = clip.audio, clip.video
    return {"part": "sync", "sync": json.dumps(asdict(cfg)),
            "geometry": json.dumps({"fps": video.fps, "sample_rate": audio.sample_rate, "n_mels": audio.n_mels,
                                    "hop_length": audio.hop_length})}


class SyncRanker:
    """A loaded scorer with the mel of its geometry: scores a window's conditioning input against candidates."""

    name = "sync"

    def __init__(self, scorer: SyncScorer, clip: ClipGeometry, device: torch.device | str = "cpu") -> None:
        self.scorer = scorer.to(device).eval().requires_grad_(False)
        self.mel = MelSpectrogram(clip.audio).to(device)
        self.device = torch.device(device)
        self.fps, self.sample_rate = clip.video.fps, clip.audio.sample_rate

    def _mel(self, waves: Sequence[np.ndarray]) -> Tensor:
        n = min(len(w) for w in waves)  # decoded candidates of one window may differ by a few samples
        wave = torch.from_numpy(np.stack([np.asarray(w, dtype=np.float32)[:n] for w in waves])).to(self.device)
        return self.mel(wave)

    def _video(self, frames: Sequence[np.ndarray]) -> Tensor:
        return frames_to_pixels(torch.from_numpy(np.stack([np.asarray(f) for f in frames])).to(self.device))

    @torch.no_grad()
    def events(self, frames: np.ndarray) -> np.ndarray:
        """Event times in seconds that the events head sees in uint8 frames (T, H, W, 3)."""
        return self._events(self.scorer.video_frames(self._video([frames])))

    def _events(self, features: Tensor) -> np.ndarray:
        """video_frames' features of one clip (1, width, T) -> its event times in seconds."""
        return event_times(torch.sigmoid(self.scorer.event_logits(features))[0].cpu().numpy(), self.fps)

    @torch.no_grad()
    def scores(self, task: Task, conditioning: np.ndarray, candidates: Sequence[np.ndarray]) -> list[float]:
        """V2A: conditioning uint8 frames (T, H, W, 3), candidates mono waves at the geometry's rate; A2V the other
        way round. One score per candidate, higher is more in sync: the pair logit, and for V2A with an events
        head first how well the candidate's onsets agree with the frames' events (event_agreement + TIE_WEIGHT *
        the logit's rank / N).
        A2V keeps the pair logit alone: the events of each candidate video against the sound's onsets (peak
        picking at 0.07 / 0.3) picked event F1 0.821 / 0.825 at N = 4 on the test split's 100 clips, the pair
        logit 0.832."""
        assert task in ("v2a", "a2v"), f"task must be v2a or a2v, got {task!r}"
        n = len(candidates)
        if task == "a2v":
            return [float(s) for s in self.scorer(self._mel([conditioning]).expand(n, -1, -1),
                                                  self._video(candidates)).cpu()]
        seen = self.scorer.video_frames(self._video([conditioning]))  # (1, width, T): once for all candidates
        sound = self.scorer.audio_frames(self._mel(candidates), seen.shape[-1])
        logits = [float(s) for s in self.scorer.pair(sound, seen.expand(n, -1, -1)).cpu()]
        if not self.scorer.cfg.events:
            return logits
        events = self._events(seen)
        agreement = [event_agreement(audio_peaks(wave, self.sample_rate, delta=RANK_DELTA), events, self.fps)
                     for wave in candidates]
        below = [sum(other < logit for other in logits) for logit in logits]  # equal logits, equal rank
        return [a + TIE_WEIGHT * rank / n for a, rank in zip(agreement, below, strict=True)]


def load_sync(path: str | Path, clip: ClipGeometry, device: torch.device | str = "cpu") -> SyncRanker:
    """The scorer of a weight file (`avlink train sync`'s export), checked against the checkpoint's geometry;
    damage or a mismatch is refused in one line naming the file."""
    from avlink.weights import WeightsError, check_state, read_metadata, read_tensors

    path = Path(path)
    state, meta = read_tensors(path), read_metadata(path)
    try:
        cfg = SyncConfig(**json.loads(meta["sync"]))
        geometry = json.loads(meta["geometry"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: not a sync scorer export (metadata: {type(err).__name__} {err})") from None
    want = json.loads(sync_metadata(cfg, clip)["geometry"])
    if geometry != want:
        raise WeightsError(f"{path}: trained on {geometry}, but the checkpoint's clips are {want}")
    scorer = SyncScorer(cfg)
    check_state(path, state, scorer)
    scorer.load_state_dict(state)
    return SyncRanker(scorer, clip, device)
