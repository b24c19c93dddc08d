"""The video upsampler: the second video stage, a conditional flow-matching model from the base model's frames
(e.g. 16x16 px at 6 fps) to `scale` times the frame rate and size (64x64 at 24 fps).

Architecture (our choices; the paper's upsampler is a latent model finetuned from its video DiT, which the
tiny preset, with no video autoencoder, cannot mirror):
- Pixel space. The flow runs on the output clip's pixels in [-1, 1], t = 1 data (flow/path.py), and starts at
  t = 0 from the interpolated base frames (`flow_start`; plus noise of spread `start_noise`, 0 by default, see
  UpsamplerConfig): with noise alone as the start, 300 steps on 64 SyncBench clips (batch 16, lr 1e-3) left
  samples of noise (PSNR 8.9 dB against the true clip, linear interpolation 24.8 dB, 16 test clips).
- Space-time to depth: each (scale_t, scale_s, scale_s) block of output pixels is one position of the base
  grid with 3 * scale_t * scale_s**2 channels. The network then runs at the base model's resolution, where a
  3x3x3 convolution sees a base frame's neighbours in space and time, and costs no more per clip than a net on
  the base frames: on one CPU core that is what makes training in minutes possible.
- A 3D convolutional residual net rather than a DiT: upsampling is local (each output block depends on its
  neighbourhood of base frames), a convolution has that prior built in and runs on crops in training and on
  whole clips at sampling alike. The flow time and the conditioning noise time enter every block by adaLN-Zero
  (nn/layers.py), as in our DiTs.
- Conditioning, SR3-style: the base frames, interpolated to the output rate and size (linearly, frames at
  their exact times), are concatenated to the noisy clip as input channels.
- Audio (option `audio`): A2V knows the sound, and the sound knows when things happen to within a frame at
  24 fps, where the base frames at 6 fps bound an event only to 1/6 s. A SyncBench cue starts at its event, so
  which of the four output frames between two base frames first shows it is in the audio, not the frames. The
  net gets two channels per output frame: log energy and its rise (an onset strength), `audio_envelope`, each
  over the interval since the output frame before, so that a sound starting between frames k-1 and k rises at
  frame k, the first frame that can show what made it (a window centred on the frame put 82 of the 228 cue
  onsets of 50 training clips one frame early). They enter twice: as input channels, and as a per-position
  shift and scale of every block's features (FiLM, Perez et al. 2018, like adaLN-Zero but per base frame):
  where an output frame shows a cue is a product of what the frames show and when the sound says it happened,
  which a modulation expresses directly.
- Training time: the flow runs from the interpolated frames without noise, so the result is decided at t near 0
  (later steps can read the target off x_t) and training draws t as u ** UpsamplerConfig.time_power.
- Timing from the sound, not from the frames: true base frames also tell when a cue began within their interval
  (by how bright it still is), and the net learned to read that; generated base frames do not carry it. So
  training shows some clips' base frames a few output frames early or late, drops the sound for some, and
  sampling guides on the sound against silence (UpsamplerConfig.phase_shift, audio_dropout, audio_guidance).
- Cycle spinning (Coifman and Donoho 1995, translation-invariant denoising): the packing ties each output
  frame to a place in its block (a base frame always first), and a net trained so draws each place its own way:
  the motion of its output flickers with the period of the blocks (a still clip's frames change most across
  the blocks' edges; in moving clips the optical flow into the frame after a base frame was 0.15 px against
  0.19-0.21 for the others, the true clips 0.24-0.27), which AV-Align counts as motion peaks. So training packs
  each step's clips with the base frames at a random place in the blocks (the clip padded by its end frames,
  the place told to the net as a one-hot), and sampling averages the velocity over UpsamplerConfig.spin places.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.config import UpsamplerConfig
from avlink.flow.path import interpolate
from avlink.nn.layers import AdaLN, TimestepEmbedder
from avlink.seq import VideoGeometry

ENVELOPE_CHANNELS = 2  # log energy, onset strength
ENERGY_FLOOR = 1e-4  # RMS below this is silence (-80 dBFS)
ENVELOPE_VERSION = 2  # what `audio_envelope` computes, kept with prepared pairs: 2 the 1/fps before a frame


def audio_envelope(wave: Tensor, sample_rate: int, fps: float, frames: int) -> Tensor:
    """(B, n) waves -> (B, 2, frames): per output frame k, the RMS energy of the sound from frame k-1's time to
    frame k's (the 1/fps before it; frame 0: its first sample), as log10 mapped to about [-1, 1] (floor -80 dBFS
    -> -1, full scale -> 1), and its rise from the frame before (clipped at 0), the onset strength."""
    wave = wave.float()
    hop = sample_rate / fps
    times = torch.arange(frames, dtype=torch.float64) * hop
    starts = (times - hop).round().long().add(1).clamp(min=0)  # samples (k-1)/fps < s <= k/fps
    ends = times.round().long().add(1)
    power = F.pad(wave.square().cumsum(-1), (1, 0))  # (B, n + 1): sums of squares up to each sample
    n = wave.shape[-1]
    starts, ends = starts.clamp(max=n), ends.clamp(max=n)
    width = (ends - starts).clamp(min=1).to(wave)
    rms = ((power[:, ends] - power[:, starts]).clamp(min=0) / width).sqrt()
    level = rms.clamp(min=ENERGY_FLOOR).log10() / 2 + 1  # (B, frames): -1 at the floor, 1 at full scale
    onset = F.pad(level.diff(dim=-1), (1, 0)).clamp(min=0)
    return torch.stack([level, onset], dim=1)


def silence(batch: int, frames: int, device: torch.device | str | None = None) -> Tensor:
    """The envelope of silent audio: level -1, no onsets."""
    env = torch.zeros(batch, ENVELOPE_CHANNELS, frames, device=device)
    env[:, 0] = -1.0
    return env


def upsample_linear(low: Tensor, scale: tuple[int, int]) -> Tensor:
    """(B, C, T, H, W) -> (B, C, T * st, H * ss, W * ss): bilinear in space (pixels as areas), linear in time
    with output frame i at base time i / st (frames are instants: output frame st * j is base frame j), held
    after the last base frame."""
    st, ss = scale
    b, c, t, h, w = low.shape
    space = F.interpolate(low.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=ss, mode="bilinear",
                          align_corners=False).reshape(b, t, c, h * ss, w * ss).transpose(1, 2)
    pos = torch.arange(t * st, device=low.device, dtype=torch.float32) / st
    j0 = pos.floor().long().clamp(max=t - 1)
    j1 = (j0 + 1).clamp(max=t - 1)
    frac = (pos - j0).to(low.dtype)[None, None, :, None, None]
    return space[:, :, j0] * (1 - frac) + space[:, :, j1] * frac


def upsample_nearest(low: Tensor, scale: tuple[int, int]) -> Tensor:
    """Each base pixel repeated ss x ss and each base frame held for st output frames (what a 6 fps clip shows
    when played at 24 fps)."""
    st, ss = scale
    return low.repeat_interleave(st, 2).repeat_interleave(ss, 3).repeat_interleave(ss, 4)


def pack(x: Tensor, scale: tuple[int, int]) -> Tensor:
    """(B, C, T * st, H * ss, W * ss) -> (B, C * st * ss * ss, T, H, W)."""
    st, ss = scale
    b, c, tt, hh, ww = x.shape
    x = x.reshape(b, c, tt // st, st, hh // ss, ss, ww // ss, ss)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * st * ss * ss, tt // st, hh // ss, ww // ss)


def unpack(x: Tensor, scale: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `pack`."""
    st, ss = scale
    b, _, t, h, w = x.shape
    x = x.reshape(b, channels, st, ss, ss, t, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, channels, t * st, h * ss, w * ss)


def noised_condition(low: Tensor, cond_t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The base frames moved along the flow to time cond_t (B,) (1: as they are): the conditioning augmentation
    of UpsamplerConfig."""
    noise = torch.randn(low.shape, generator=generator, device=low.device, dtype=low.dtype)
    return interpolate(noise, low, cond_t)


def flow_start(cond: Tensor, scale: tuple[int, int], noise: Tensor | None, spread: float) -> Tensor:
    """x0 of the upsampler's flow: the (noised) base frames `cond` interpolated to the output geometry, plus
    `noise` (of the output's shape) times `spread` (UpsamplerConfig.start_noise); with spread 0 no noise is
    needed (None)."""
    start = upsample_linear(cond, scale)
    if spread == 0:
        return start
    assert noise is not None, f"a start noise spread of {spread} needs the noise"
    return start + spread * noise


class ResBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int, env_channels: int = 0):
        super().__init__()
        groups = math.gcd(dim, 8)
        self.norm1 = nn.GroupNorm(groups, dim, affine=False)
        self.conv1 = nn.Conv3d(dim, dim, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, dim)
        self.conv2 = nn.Conv3d(dim, dim, 3, padding=1)
        self.ada = AdaLN(cond_dim, (dim, dim, dim))  # shift, scale, gate; zero at init: the block starts as identity
        self.env = None
        if env_channels:
            self.env = nn.Conv3d(env_channels, 2 * dim, 1)  # per base frame: shift, scale from the sound (FiLM)
            nn.init.zeros_(self.env.weight)
            nn.init.zeros_(self.env.bias)

    def forward(self, x: Tensor, c: Tensor, env: Tensor | None = None) -> Tensor:
        shift, scale, gate = (m.reshape(*m.shape[:1], -1, 1, 1, 1) for m in self.ada(c))
        if self.env is not None and env is not None:
            env_shift, env_scale = self.env(env).chunk(2, dim=1)
            shift, scale = shift + env_shift, scale + env_scale
        h = self.conv1(F.silu(self.norm1(x) * (1 + scale) + shift))
        return x + gate * self.conv2(F.silu(self.norm2(h)))


def pad_time(x: Tensor, front: int, back: int) -> Tensor:
    """(..., T, H, W) -> (..., front + T + back, H, W), the first and last frames repeated."""
    if not front and not back:
        return x
    ends = (x[..., :1, :, :].expand(*x.shape[:-3], front, *x.shape[-2:]),
            x[..., -1:, :, :].expand(*x.shape[:-3], back, *x.shape[-2:]))
    return torch.cat([ends[0], x, ends[1]], dim=-3)


def spin_offsets(scale_t: int, spin: int) -> list[int]:
    """The packing offsets (output frames) that sampling averages over: `spin` of the scale_t, evenly spaced."""
    assert 1 <= spin <= scale_t and scale_t % spin == 0, f"spin {spin} must divide the time scale {scale_t}"
    return list(range(0, scale_t, scale_t // spin))


class Upsampler(nn.Module):
    """velocity = Upsampler(x_t, t, low, cond_t, envelope, offset): x_t (B, C, T*st, H*ss, W*ss) the noisy output
    clip, t (B,) its flow time, low (B, C, T, H, W) base frames in [-1, 1] (noised to cond_t (B,) by the
    caller), envelope (B, 2, T*st) or None (`audio_envelope`; None: silence, where the config has audio).
    offset: how many output frames into each packed block the base frames fall (0: at its start; training
    draws one per step); None: the mean over UpsamplerConfig.spin offsets (cycle spinning, module docstring)."""

    def __init__(self, cfg: UpsamplerConfig, video: VideoGeometry):
        super().__init__()
        self.cfg, self.video = cfg, video
        st, ss = cfg.scale
        c = video.channels
        self.block = c * st * ss * ss  # channels of one packed output block
        # x_t and the interpolated frames packed, the envelope per output frame, the offset one-hot
        inputs = 2 * self.block + (ENVELOPE_CHANNELS * st if cfg.audio else 0) + st
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.cond_t_embed = TimestepEmbedder(cfg.dim)
        self.proj_in = nn.Conv3d(inputs, cfg.dim, 1)
        env_channels = ENVELOPE_CHANNELS * st if cfg.audio else 0
        self.blocks = nn.ModuleList(ResBlock(cfg.dim, cfg.dim, env_channels) for _ in range(cfg.depth))
        self.norm_out = nn.GroupNorm(math.gcd(cfg.dim, 8), cfg.dim)
        self.proj_out = nn.Conv3d(cfg.dim, self.block, 1)
        nn.init.zeros_(self.proj_out.weight)  # velocity 0 at init
        nn.init.zeros_(self.proj_out.bias)

    @property
    def output(self) -> VideoGeometry:
        return self.cfg.output(self.video)

    def forward(self, x: Tensor, t: Tensor, low: Tensor, cond_t: Tensor, envelope: Tensor | None = None,
                offset: int | None = None) -> Tensor:
        scale = self.cfg.scale
        b, _, frames, h, w = low.shape
        expected = (b, self.video.channels, frames * scale[0], h * scale[1], w * scale[1])
        assert tuple(x.shape) == expected, f"x_t {tuple(x.shape)} does not fit base frames {tuple(low.shape)}"
        if not self.cfg.audio:
            envelope = None
        elif envelope is None:
            envelope = silence(b, frames * scale[0], x.device)
        cond = upsample_linear(low, scale)
        c = self.t_embed(t) + self.cond_t_embed(cond_t)
        offsets = spin_offsets(scale[0], self.cfg.spin) if offset is None else [offset]
        out = [self.packed(x, cond, envelope, c, o) for o in offsets]
        return out[0] if len(out) == 1 else torch.stack(out).mean(0)

    def packed(self, x: Tensor, cond: Tensor, envelope: Tensor | None, c: Tensor, offset: int) -> Tensor:
        """The velocity with the base frames `offset` output frames into each packed block: the clip is padded
        by its first frame `offset` times in front and by its last frame to whole blocks behind, and cut back."""
        st, ss = self.cfg.scale
        assert 0 <= offset < st, f"offset {offset} outside [0, {st})"
        b, frames = x.shape[0], x.shape[2]
        front, back = offset, (st - offset) % st
        n = (frames + front + back) // st
        parts = [pack(pad_time(x, front, back), (st, ss)), pack(pad_time(cond, front, back), (st, ss))]
        env = None
        if envelope is not None:  # padded: the level held, no onsets
            level, onset = envelope.to(x.dtype).unbind(1)
            level = pad_time(level[..., None, None], front, back)[..., 0, 0]
            onset = F.pad(onset, (front, back))
            env = torch.stack([level, onset], 1).reshape(b, ENVELOPE_CHANNELS, n, st)
            env = env.permute(0, 1, 3, 2).reshape(b, -1, n, 1, 1)
            parts.append(env.expand(-1, -1, -1, *parts[0].shape[-2:]))
        one_hot = F.one_hot(torch.tensor(offset), st).to(x)  # where in each block the base frames fall
        parts.append(one_hot[None, :, None, None, None].expand(b, -1, n, *parts[0].shape[-2:]))
        hidden = self.proj_in(torch.cat(parts, dim=1))
        for block in self.blocks:
            hidden = block(hidden, c, env)
        out = unpack(self.proj_out(F.silu(self.norm_out(hidden))), (st, ss), self.video.channels)
        return out[:, :, front:front + frames]
