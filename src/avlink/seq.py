"""Clip geometry: from duration, frame rate, sample rate and hops to token counts and token times.

Every place that needs "how many tokens" or "when is this token" asks this module, so that the audio and the
video stream agree on time in seconds (the unit the time-aligned RoPE of the Fusion Blocks works in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AudioGeometry:
    """Waveform -> mel frames -> 1D VAE latent tokens."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = 8000.0
    latent_downsample: int = 4  # mel frames per latent token (1D VAE time stride)
    latent_dim: int = 8  # Da: channels of one latent token
    codec: str = "mel-vae"  # what turns waves into tokens and back (system.py CODECS): mel, audio VAE, vocoder

    @property
    def mel_rate(self) -> float:
        """Mel frames per second."""
        return self.sample_rate / self.hop_length

    @property
    def eta(self) -> float:
        """eta_a: latent tokens per second."""
        return self.mel_rate / self.latent_downsample

    def num_samples(self, duration: float) -> int:
        return round(duration * self.sample_rate)

    def num_mel_frames(self, duration: float) -> int:
        """Mel frames for a clip, rounded up to a whole number of latent tokens.

        The analysis (codecs/mel.py) gives n // hop frames for n samples; the rest is padded with silence.
        """
        frames = self.num_samples(duration) // self.hop_length
        return math.ceil(frames / self.latent_downsample) * self.latent_downsample

    def num_tokens(self, duration: float) -> int:
        return self.num_mel_frames(duration) // self.latent_downsample

    def token_times(self, num_tokens: int, device: torch.device | None = None) -> torch.Tensor:
        """Start time in seconds of each latent token, (Ta,)."""
        return torch.arange(num_tokens, dtype=torch.float64, device=device) / self.eta


@dataclass(frozen=True)
class VideoGeometry:
    """RGB frames -> (pt, ph, pw) patches -> tokens.

    The flow runs on (pixels - shift) / scale, pixels in [-1, 1] (codecs/pixels.py), as the audio flow runs on
    the VAE's scaled latents: against unit noise, dark low-contrast frames (SyncBench: mean -0.43, std 0.26)
    spend most of the path at a low signal-to-noise ratio. Every preset keeps plain pixels (shift 0, scale 1, the
    paper's RGB model): on SyncBench a tiny T2V trained 600 steps on scaled pixels (shift -0.43, scale 0.26) drew
    no better samples (test class accuracy 0.03, with or without frame positions, against 0.14 on plain pixels
    with them).
    """

    fps: float = 6.0
    height: int = 16
    width: int = 16
    channels: int = 3
    patch: tuple[int, int, int] = (1, 4, 4)  # (time, height, width)
    shift: float = 0.0  # pixel value the flow sees as 0
    scale: float = 1.0  # pixel spread the flow sees as 1
    codec: str = "pixels"  # what turns frames into the flow's video and back (system.py CODECS)
    # The codec's compression: (frames per latent frame after the first, pixels per latent pixel). A causal video
    # VAE (Wan, LTX-Video) encodes the first frame alone and each following `stride` frames into one latent
    # frame, so a clip holds 1 + k * stride frames; plain pixels are (1, 1).
    codec_stride: tuple[int, int] = (1, 1)
    codec_channels: int = 0  # channels of the codec's latent; 0: the frames' own (`channels`)

    def __post_init__(self) -> None:
        pt, ph, pw = self.patch
        if self.height % ph or self.width % pw:
            raise ValueError(f"frame {self.width}x{self.height} is not divisible by patch {ph}x{pw}")
        if not self.scale > 0:
            raise ValueError(f"video scale must be positive, got {self.scale}")
        st, ss = self.codec_stride
        if st < 1 or ss < 1 or self.height % ss or self.width % ss:
            raise ValueError(f"frame {self.width}x{self.height} and codec stride {self.codec_stride} do not fit")

    @property
    def eta(self) -> float:
        """eta_v: temporal token positions per second."""
        return self.fps / self.patch[0]

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch
        return self.channels * pt * ph * pw

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.height // self.patch[1], self.width // self.patch[2]

    def num_frames(self, duration: float) -> int:
        """Frames for a clip, rounded up to a whole number of temporal patches (of latent frames, through a
        causal codec: 1 + k * stride frames)."""
        frames = round(duration * self.fps)
        stride = self.codec_stride[0] * self.patch[0]
        if self.codec_stride[0] == 1:
            return math.ceil(frames / stride) * stride
        return 1 + math.ceil(max(frames - 1, 0) / stride) * stride

    @property
    def flow_channels(self) -> int:
        """Channels of the video the flow runs on (the codec's latent)."""
        return self.codec_channels or self.channels

    def flow_frames(self, num_frames: int) -> int:
        """Frames along the flow's time axis for num_frames frames (latent frames through a causal codec)."""
        stride = self.codec_stride[0]
        if stride == 1:
            return num_frames
        assert (num_frames - 1) % stride == 0, f"{num_frames} frames is not 1 + k * {stride}"
        return 1 + (num_frames - 1) // stride

    def frames_of(self, flow_frames: int) -> int:
        """Frames that flow_frames frames of the flow's video decode to (flow_frames' inverse)."""
        stride = self.codec_stride[0]
        return flow_frames if stride == 1 else 1 + (flow_frames - 1) * stride

    def flow_shape(self, num_frames: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the flow's video for num_frames frames: the frames themselves for plain pixels."""
        space = self.codec_stride[1]
        return self.flow_channels, self.flow_frames(num_frames), self.height // space, self.width // space

    def grid(self, num_frames: int) -> tuple[int, int, int]:
        """(T', H', W') token grid of a clip with num_frames frames."""
        assert num_frames % self.patch[0] == 0, f"{num_frames} frames is not a multiple of {self.patch[0]}"
        return (num_frames // self.patch[0], *self.grid_hw)

    def num_tokens(self, duration: float) -> int:
        t, h, w = self.grid(self.num_frames(duration))
        return t * h * w

    def token_times(self, grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
        """Start time in seconds of each video token of a (T', H', W') grid, (T'*H'*W',), time-major."""
        return grid_ids(grid, device)[:, 0].double() / self.eta


def grid_ids(grid: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """(prod(grid), len(grid)) integer index of each token along each axis, first axis slowest."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


@dataclass(frozen=True)
class ClipGeometry:
    """One training clip: how long, and how each modality samples it."""

    duration: float = 16 / 6
    audio: AudioGeometry = AudioGeometry()
    video: VideoGeometry = VideoGeometry()

    @property
    def num_samples(self) -> int:
        return self.audio.num_samples(self.duration)

    @property
    def num_mel_frames(self) -> int:
        return self.audio.num_mel_frames(self.duration)

    @property
    def num_audio_tokens(self) -> int:
        return self.audio.num_tokens(self.duration)

    @property
    def num_frames(self) -> int:
        return self.video.num_frames(self.duration)

    @property
    def num_video_tokens(self) -> int:
        return self.video.num_tokens(self.duration)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(Ta, Da) of one audio latent."""
        return self.num_audio_tokens, self.audio.latent_dim

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video clip as the flow sees it (the codec's latent; plain pixels: the frames)."""
        return self.video.flow_shape(self.num_frames)


def matching_audio_tokens(audio: AudioGeometry, video: VideoGeometry, num_frames: int) -> int:
    """Latent tokens of the audio that covers num_frames frames of video."""
    return audio.num_tokens(num_frames / video.fps)


def matching_frames(audio: AudioGeometry, video: VideoGeometry, num_tokens: int) -> int:
    """Video frames that cover num_tokens audio latent tokens."""
    return video.num_frames(num_tokens / audio.eta)
