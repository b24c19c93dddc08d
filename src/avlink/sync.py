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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.codecs.mel import MelSpectrogram, normalize
from avlink.codecs.pixels import frames_to_pixels
from avlink.config import Task
from avlink.seq import ClipGeometry

SYNC_FILE = "sync.safetensors"
SYNC_CARD = "sync.card.json"
SUBSTEPS = 4  # audio bins per video frame
MIN_SHIFT = 2  # video frames: the nearest negative of training is this far off (the eval's tolerance is one frame)
MAX_SHIFT = 4  # video frames: training crops are the clip less this many frames; negatives lie within it


@dataclass(frozen=True)
class SyncConfig:
    n_mels: int = 80
    width: int = 64  # channels per video frame of each modality and of the joint convolutions
    video_width: int = 16  # channels of the first video convolution, doubled by the second


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

    def pair(self, audio: Tensor, video: Tensor) -> Tensor:
        """Per-frame features of both, (B, width, T) each, -> (B,) logits."""
        h = self.joint(torch.cat([audio, video, audio * video], dim=1))
        return self.head(h.mean(dim=-1))[:, 0]

    def forward(self, mel: Tensor, video: Tensor) -> Tensor:
        return self.pair(self.audio_frames(mel, video.shape[2]), self.video_frames(video))


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

    def _mel(self, waves: Sequence[np.ndarray]) -> Tensor:
        n = min(len(w) for w in waves)  # decoded candidates of one window may differ by a few samples
        wave = torch.from_numpy(np.stack([np.asarray(w, dtype=np.float32)[:n] for w in waves])).to(self.device)
        return self.mel(wave)

    def _video(self, frames: Sequence[np.ndarray]) -> Tensor:
        return frames_to_pixels(torch.from_numpy(np.stack([np.asarray(f) for f in frames])).to(self.device))

    @torch.no_grad()
    def scores(self, task: Task, conditioning: np.ndarray, candidates: Sequence[np.ndarray]) -> list[float]:
        """V2A: conditioning uint8 frames (T, H, W, 3), candidates mono waves at the geometry's rate; A2V the other
        way round. One logit per candidate, higher is more in sync."""
        assert task in ("v2a", "a2v"), f"task must be v2a or a2v, got {task!r}"
        n = len(candidates)
        if task == "v2a":
            mel, video = self._mel(candidates), self._video([conditioning]).expand(n, -1, -1, -1, -1)
        else:
            mel, video = self._mel([conditioning]).expand(n, -1, -1), self._video(candidates)
        return [float(s) for s in self.scorer(mel, video).cpu()]


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
