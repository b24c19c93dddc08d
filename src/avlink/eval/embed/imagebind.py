"""ImageBind (Girdhar et al., 2023) audio and vision branches, for the IB-AI / IB-AV scores of the paper.

IB-AI and IB-AV are cosine similarities in ImageBind's joint space between an audio embedding and an image or
video embedding. We write the two branches of facebookresearch/ImageBind's `imagebind_huge` ourselves, with
the module names of its state dict, so that `imagebind_huge.pth` (a plain state dict) loads strictly:

- vision: ViT-H/14 (width 1280, 32 blocks, 16 heads) over 224 x 224 RGB clips of 2 frames, cut into
  2 x 14 x 14 tubelets by one Conv3d (an image is repeated to 2 frames first); a class token, learned
  positions, a LayerNorm before the blocks; head = LayerNorm, class token, Linear to 1024 (no bias);
  postprocessor = L2 normalisation.
- audio: ViT-B (width 768, 12 blocks, 12 heads) over a 128 x 204 log-mel image cut into 16 x 16 patches at
  stride 10 (12 x 19 patches), LayerNorm after the patch projection; its attention appends learned key / value
  biases (`bias_k`, `bias_v`, as torch's `add_bias_kv`); head as vision; postprocessor = L2 normalisation
  times a fixed logit scale of 20.
Blocks are pre-norm (LayerNorm eps 1e-6) with the attention parameters of torch's MultiheadAttention
(`in_proj_weight`, `in_proj_bias`, `out_proj`). The checkpoint also holds the text, depth, thermal and IMU
branches; their tensors are set aside, and every tensor of the two branches here must match by name and shape.

Input paths, as ImageBind's `data.py` feeds the model:
- audio (`load_and_transform_audio_data`): 16 kHz mono; 3 clips of 2 s at evenly spaced starts
  (k * max(d - 2, 0) / 3 for k = 0, 1, 2, pytorchvideo's ConstantClipsPerVideoSampler); each clip has its mean
  subtracted in place (clips that overlap therefore see the earlier clips' subtraction, as in the published
  code), then a Kaldi fbank (25 ms Hann frames every 10 ms, pre-emphasis 0.97, per-frame DC removal, 512-point
  power spectrum, 128 mel bands from 20 Hz to 8 kHz, log floored at float32 eps), zero-padded or cut to 204
  frames, then (x + 4.268) / 9.138.
- video (`load_and_transform_video_data`): 5 clips of 2 s placed the same way; each clip keeps its first and
  last frame (the frames of [start, start + 2 s) at the decoding rate, uniformly subsampled to 2); frames in
  [0, 1], short side scaled to 224 bilinearly (no antialias), CLIP mean / std, then 3 crops of 224 x 224 along
  the long side (start, centre, end).
- image (`load_and_transform_vision_data`, PIL): short side resized to 224 bicubically with antialias, width
  then height with 8-bit rounding after each pass as PIL does, centre crop 224, CLIP mean / std.

Torchaudio is not used: the Kaldi fbank is written here with torch (framing, per-frame DC removal and
pre-emphasis come before the window, so torch.stft cannot do it in one call), and audio at another rate is
resampled with soxr where the published code uses torchaudio's resampler.

`embed(x, "audio")` and `embed(x, "video")` return (B, 1024) L2-normalised embeddings. ImageBind averages the
per-clip (and per-crop) outputs of its postprocessor; we normalise that mean once more, which leaves every
cosine score unchanged. With `video_as="image"` a video is embedded as its middle frame through the image path
(the image side of IB-AI); the default `"video"` gives the video side of IB-AV. `video_as` is an option of
the instance and of each `embed(x, "video", video_as=...)` call, so one loaded network (632M parameters in
the vision branch) serves both scores. `timed_features(x, "video")` gives one embedding per 2-frame clip of a
video, for the Table 2 feature rows (eval/features.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.errors import UserError
from avlink.eval.embed.common import (
    InProjAttention,
    Mlp,
    as_tensor,
    center_crop,
    check_frames,
    check_waveforms,
    kaldi_mel_banks,
    load_strict,
    read_state_dict,
    resample,
    resize_short_side_bicubic,
)
from avlink.eval.embedders import Modality, require_weights

NETWORK = "ImageBind"
WEIGHTS_FILE = "imagebind_huge.pth"
WEIGHTS_HINT = f"{WEIGHTS_FILE} (https://dl.fbaipublicfiles.com/imagebind/{WEIGHTS_FILE})"
BRANCHES = ("vision", "audio")
PARTS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")

SAMPLE_RATE = 16_000
CLIP_SECONDS = 2
AUDIO_CLIPS = 3
VIDEO_CLIPS = 5
CLIP_FRAMES = 2
SPATIAL_CROPS = 3
FBANK_MEAN, FBANK_STD = -4.268, 9.138
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_LOGIT_SCALE = 20.0
MAX_LOGIT_SCALE = 100.0
LN_EPS = 1e-6

VideoAs = Literal["video", "image"]


@dataclass(frozen=True)
class ImageBindConfig:
    """Sizes of the two branches; the defaults are imagebind_huge."""

    out_dim: int = 1024
    vision_width: int = 1280
    vision_depth: int = 32
    vision_heads: int = 16
    image_size: int = 224
    patch: int = 14
    frames: int = CLIP_FRAMES  # temporal size of a tubelet (and of a clip)
    audio_width: int = 768
    audio_depth: int = 12
    audio_heads: int = 12
    mel_bins: int = 128
    target_len: int = 204  # fbank frames per clip
    audio_patch: int = 16
    audio_stride: int = 10
    mlp_ratio: float = 4.0

    @property
    def vision_tokens(self) -> int:
        return 1 + (self.image_size // self.patch) ** 2

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency, time) patches of one log-mel clip."""
        def count(size: int) -> int:
            return (size - self.audio_patch) // self.audio_stride + 1

        return count(self.mel_bins), count(self.target_len)

    @property
    def audio_tokens(self) -> int:
        f, t = self.audio_grid
        return 1 + f * t


# ---------------------------------------------------------------- blocks (names follow the published keys)


class Block(nn.Module):
    """Pre-norm transformer block (ImageBind's BlockWithMasking without mask, drop path or layer scale)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, bias_kv: bool):
        super().__init__()
        self.attn = InProjAttention(dim, heads, bias_kv)
        self.norm_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """Optional LayerNorm, then the blocks; tokens stay batch-first (B, L, C) throughout."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, pre_norm: bool, bias_kv: bool):
        super().__init__()
        norm = nn.LayerNorm(dim, eps=LN_EPS) if pre_norm else nn.Identity()
        self.pre_transformer_layer = nn.Sequential(norm)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, bias_kv) for _ in range(depth)])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.blocks(self.pre_transformer_layer(tokens))


class RepeatToFrames(nn.Module):
    """A single image becomes a clip of `frames` copies (ImageBind's PadIm2Video, repeat mode)."""

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (N, C, 1, H, W)
        return x.expand(-1, -1, self.frames, -1, -1) if x.shape[2] == 1 else x


class PatchStem(nn.Module):
    """Patch projection then, optionally, a LayerNorm over the tokens; (N, C, ...) -> (N, L, D)."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D), time-major for video
        return x if self.norm_layer is None else self.norm_layer(x)


class PositionEmbedding(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * dim ** -0.5)


class Preprocessor(nn.Module):
    """Stem, class token and learned positions of one modality (ImageBind's RGBDTPreprocessor)."""

    def __init__(self, stem: PatchStem, tokens: int, dim: int):
        super().__init__()
        self.rgbt_stem = stem
        self.pos_embedding_helper = PositionEmbedding(tokens, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.rgbt_stem(x)  # (N, L, D)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        pos = self.pos_embedding_helper.pos_embed
        assert tokens.shape[1] == pos.shape[1], \
            f"{tokens.shape[1]} tokens but {pos.shape[1]} positions: input size differs from the network's"
        return tokens + pos


class SelectClassToken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """A fixed scale kept as a buffer `log_logit_scale`, as the audio postprocessor of the checkpoint."""

    def __init__(self, init: float):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.tensor(math.log(init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * x


def head(width: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width, eps=LN_EPS), SelectClassToken(),
                         nn.Linear(width, out_dim, bias=False))


# ---------------------------------------------------------------- the network


class ImageBindAV(nn.Module):
    """The vision and audio branches of ImageBind.

    vision: (N, 3, T, S, S) normalised clips (T = 2) or (N, 3, S, S) images -> (N, out_dim) unit vectors;
    audio: (N, 1, 128, 204) normalised log-mel clips -> (N, out_dim) vectors of norm 20.
    """

    def __init__(self, cfg: ImageBindConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ImageBindConfig()
        vw, aw = cfg.vision_width, cfg.audio_width
        tubelet = (cfg.frames, cfg.patch, cfg.patch)
        vision_stem = PatchStem(nn.Sequential(RepeatToFrames(cfg.frames),
                                              nn.Conv3d(3, vw, tubelet, stride=tubelet, bias=False)))
        audio_stem = PatchStem(nn.Conv2d(1, aw, cfg.audio_patch, stride=cfg.audio_stride, bias=False),
                               nn.LayerNorm(aw))
        self.modality_preprocessors = nn.ModuleDict({
            "vision": Preprocessor(vision_stem, cfg.vision_tokens, vw),
            "audio": Preprocessor(audio_stem, cfg.audio_tokens, aw),
        })
        self.modality_trunks = nn.ModuleDict({
            "vision": Trunk(vw, cfg.vision_depth, cfg.vision_heads, cfg.mlp_ratio, pre_norm=True,
                            bias_kv=False),
            "audio": Trunk(aw, cfg.audio_depth, cfg.audio_heads, cfg.mlp_ratio, pre_norm=False, bias_kv=True),
        })
        self.modality_heads = nn.ModuleDict({"vision": head(vw, cfg.out_dim), "audio": head(aw, cfg.out_dim)})
        self.modality_postprocessors = nn.ModuleDict({
            "vision": Normalize(),
            "audio": nn.Sequential(Normalize(), LogitScale(AUDIO_LOGIT_SCALE)),
        })

    def branch(self, x: Tensor, name: str) -> Tensor:
        tokens = self.modality_preprocessors[name](x)  # (N, L, C)
        pooled = self.modality_heads[name](self.modality_trunks[name](tokens))  # (N, out_dim)
        return self.modality_postprocessors[name](pooled)

    def vision(self, clips: Tensor) -> Tensor:
        s = self.cfg.image_size
        assert clips.ndim in (4, 5) and clips.shape[1] == 3 and clips.shape[-2:] == (s, s), \
            f"expected (N, 3, [T,] {s}, {s}) clips, got {tuple(clips.shape)}"
        return self.branch(clips, "vision")

    def audio(self, mel: Tensor) -> Tensor:
        expected = (1, self.cfg.mel_bins, self.cfg.target_len)
        assert mel.ndim == 4 and tuple(mel.shape[1:]) == expected, \
            f"expected (N, {expected}) log-mel clips, got {tuple(mel.shape)}"
        return self.branch(mel, "audio")


# ---------------------------------------------------------------- audio preprocessing (Kaldi fbank)


def kaldi_window(kind: str, size: int) -> Tensor:
    """Kaldi's frame windows; Hann and Povey are symmetric (Povey = Hann ** 0.85, zero at both ends)."""
    if kind == "hanning":
        return torch.hann_window(size, periodic=False, dtype=torch.float64).float()
    if kind == "povey":
        return torch.hann_window(size, periodic=False, dtype=torch.float64).pow(0.85).float()
    if kind == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float64).float()
    if kind == "rectangular":
        return torch.ones(size)
    raise ValueError(f"unknown Kaldi window {kind!r}")


@functools.lru_cache(maxsize=8)
def mel_banks(mels: int, n_fft: int, sample_rate: int, low: float, high: float) -> Tensor:
    """Kaldi's triangular mel banks (mels, n_fft / 2 + 1), zero on the Nyquist bin; computed once per size."""
    return kaldi_mel_banks(mels, n_fft, sample_rate, low, high)


def kaldi_fbank(wave: Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, window: str = "hanning",
                preemphasis: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0) -> Tensor:
    """(..., n) waveform -> (..., frames, num_mel_bins) log mel energies: Kaldi compute-fbank-feats with
    dither 0, snip_edges, DC removal per frame, power spectrum, no energy column (high_freq <= 0: offset
    from Nyquist)."""
    size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    assert wave.shape[-1] >= size, f"{wave.shape[-1]} samples are fewer than one {size}-sample frame"
    n_fft = 1 << (size - 1).bit_length()  # the next power of two
    frames = wave.float().unfold(-1, size, shift)  # (..., m, size)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # the first sample is its own previous
    frames = (frames - preemphasis * previous) * kaldi_window(window, size).to(frames.device)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # (..., m, n_fft / 2 + 1), zero-padded frames
    top = high_freq if high_freq > 0 else sample_rate / 2 + high_freq
    banks = mel_banks(num_mel_bins, n_fft, sample_rate, low_freq, top).to(power.device)  # (mels, bins)
    return (power @ banks.T).clamp_min(torch.finfo(torch.float32).eps).log()


def clip_starts(duration: float, clip_seconds: int, clips: int) -> list[Fraction]:
    """pytorchvideo's ConstantClipsPerVideoSampler: start k * max(d - clip, 0) / clips, k < clips."""
    step = Fraction(max(duration - clip_seconds, 0)) / clips
    return [step * k for k in range(clips)]


def fit_frames(fbank: Tensor, length: int) -> Tensor:
    """(m, mels) -> (mels, length): transposed, zero-padded at the end or cut."""
    spec = fbank.T
    return F.pad(spec, (0, length - spec.shape[1])) if spec.shape[1] < length else spec[:, :length]


def audio_clips(wave: np.ndarray | Tensor, mel_bins: int = 128, target_len: int = 204,
                clips: int = AUDIO_CLIPS) -> Tensor:
    """(n,) 16 kHz waveform -> (clips, 1, mel_bins, target_len) normalised log-mel clips."""
    buffer = torch.tensor(np.asarray(wave, dtype=np.float32))  # a copy: mean removal writes into it
    n = buffer.shape[0]
    out = []
    for start in clip_starts(n / SAMPLE_RATE, CLIP_SECONDS, clips):
        segment = buffer[int(start * SAMPLE_RATE):int((start + CLIP_SECONDS) * SAMPLE_RATE)]  # a view
        segment -= segment.mean()  # in place, as the published code: overlapping clips share the change
        spec = fit_frames(kaldi_fbank(segment, num_mel_bins=mel_bins), target_len)  # (mels, T)
        out.append((spec - FBANK_MEAN) / FBANK_STD)
    return torch.stack(out)[:, None]


# ---------------------------------------------------------------- vision preprocessing


def normalize_rgb(x: Tensor) -> Tensor:
    """(N, 3, ...) in [0, 1] -> CLIP-normalised."""
    shape = (1, 3) + (1,) * (x.ndim - 2)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(shape)
    std = torch.tensor(CLIP_STD, device=x.device).view(shape)
    return (x - mean) / std


def short_side_scale(x: Tensor, size: int) -> Tensor:
    """pytorchvideo's ShortSideScale: (C, T, H, W) float, short side -> size (long side floored), bilinear,
    no antialias."""
    h, w = x.shape[-2:]
    new = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
    return F.interpolate(x, size=new, mode="bilinear", align_corners=False)


def uniform_crops(x: Tensor, size: int, crops: int = SPATIAL_CROPS) -> list[Tensor]:
    """(..., H, W) -> `crops` size x size crops along the long side: start, centre, end (3) or centre (1)."""
    h, w = x.shape[-2:]
    centre_y, centre_x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    out = []
    for index in (0, 1, 2) if crops == 3 else (1,):
        y, x0 = centre_y, centre_x
        if h > w:
            y = {0: 0, 1: centre_y, 2: h - size}[index]
        else:
            x0 = {0: 0, 1: centre_x, 2: w - size}[index]
        out.append(x[..., y:y + size, x0:x0 + size])
    return out


def clip_frame_indices(num_frames: int, fps: float, clips: int) -> list[list[int]]:
    """For each of `clips` 2 s clips, the indices of its first and last decoded frame (decord's frames of
    [start, end) at `fps`, then pytorchvideo's UniformTemporalSubsample to 2)."""
    out = []
    for start in clip_starts(num_frames / fps, CLIP_SECONDS, clips):
        first = math.ceil(fps * float(start))
        stop = min(math.ceil(fps * float(start + CLIP_SECONDS)), num_frames)
        count = stop - first
        if count <= 0:
            raise ValueError(f"imagebind: no frame in the 2 s clip at {float(start):.3f} s "
                             f"({num_frames} frames at {fps:g} fps)")
        picks = torch.linspace(0, count - 1, CLIP_FRAMES).long()
        out.append([first + int(i) for i in picks])
    return out


def video_views(frames: np.ndarray | Tensor, fps: float, size: int = 224, clips: int = VIDEO_CLIPS,
                crops: int = SPATIAL_CROPS) -> Tensor:
    """(T, H, W, 3) uint8 -> (clips * crops, 3, 2, size, size) normalised views, clip-major."""
    frames = as_tensor(frames)
    views = []
    for picks in clip_frame_indices(frames.shape[0], fps, clips):
        clip = frames[picks].permute(3, 0, 1, 2).float() / 255.0  # (3, 2, H, W)
        clip = normalize_rgb(short_side_scale(clip, size)[None])[0]
        views.extend(uniform_crops(clip, size, crops))
    return torch.stack(views)


def image_view(frame: np.ndarray | Tensor, size: int = 224) -> Tensor:
    """(H, W, 3) uint8 -> (3, size, size) normalised image, ImageBind's image transform."""
    x = resize_short_side_bicubic(as_tensor(frame).permute(2, 0, 1)[None], size, pil=True)  # (1, 3, h, w)
    return normalize_rgb(center_crop(x, size) / 255.0)[0]


# ---------------------------------------------------------------- weights


def branch_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of the vision and audio branches (text, depth, thermal and IMU are set aside)."""
    prefixes = tuple(f"{part}.{branch}." for part in PARTS for branch in BRANCHES)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def count_blocks(state: dict[str, Tensor], branch: str) -> int:
    depth = 0
    while f"modality_trunks.{branch}.blocks.{depth}.norm_1.weight" in state:
        depth += 1
    return depth


def infer_config(state: dict[str, Tensor], path: Path, vision_heads: int | None,
                 audio_heads: int | None) -> ImageBindConfig:
    """Sizes from the tensor shapes; head counts are not in them (published: 80-d vision, 64-d audio
    heads)."""
    needed = ("modality_preprocessors.vision.rgbt_stem.proj.1.weight",
              "modality_preprocessors.vision.pos_embedding_helper.pos_embed",
              "modality_preprocessors.audio.rgbt_stem.proj.weight",
              "modality_preprocessors.audio.pos_embedding_helper.pos_embed",
              "modality_heads.vision.2.weight", "modality_trunks.audio.blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{path}: not an ImageBind state dict (no {', '.join(missing[:2])})")
    conv3d = state[needed[0]]
    vw, _, frames, patch, _ = conv3d.shape
    side = math.isqrt(state[needed[1]].shape[1] - 1)
    aw, _, audio_patch, _ = state[needed[2]].shape
    default = ImageBindConfig()
    cfg = ImageBindConfig(
        out_dim=state[needed[4]].shape[0], vision_width=vw, vision_depth=count_blocks(state, "vision"),
        vision_heads=vision_heads or max(1, vw // 80), image_size=side * patch, patch=patch, frames=frames,
        audio_width=aw, audio_depth=count_blocks(state, "audio"), audio_heads=audio_heads or max(1, aw // 64),
        audio_patch=audio_patch, mlp_ratio=state[needed[5]].shape[0] / aw)
    if state[needed[3]].shape[1] != cfg.audio_tokens:
        raise UserError(f"{path}: ImageBind audio positions {state[needed[3]].shape[1]} do not fit "
                        f"{default.mel_bins} x {default.target_len} fbank clips ({cfg.audio_tokens} tokens)")
    return cfg


# ---------------------------------------------------------------- the embedder


class ImageBindEmbedder:
    """IB scores: L2-normalised ImageBind embeddings of audio and of video (or a video's middle frame)."""

    name = "imagebind"
    modalities: tuple[Modality, ...] = ("audio", "video")

    def __init__(self, model: ImageBindAV, device: str | torch.device = "cpu", fps: float = 25.0,
                 input_rate: int | None = None, video_as: VideoAs = "video", batch_size: int = 16):
        assert video_as in ("video", "image"), f"video_as must be 'video' or 'image', got {video_as!r}"
        assert fps > 0 and batch_size > 0, f"fps {fps} and batch_size {batch_size} must be positive"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.sample_rate = input_rate or SAMPLE_RATE  # the rate `embed` takes; resampled to 16 kHz inside
        self.fps = float(fps)  # the rate `embed` takes video at (ImageBind decodes at the native rate)
        self.video_as, self.batch_size = video_as, batch_size
        self.dim = model.cfg.out_dim

    def _batched(self, views: Tensor, branch: str) -> Tensor:
        """(V, ...) model inputs -> (V, D) outputs, `batch_size` at a time."""
        run = self.model.vision if branch == "vision" else self.model.audio
        outs = [run(views[i:i + self.batch_size].to(self.device)).float().cpu()
                for i in range(0, len(views), self.batch_size)]
        return torch.cat(outs)

    def _pooled(self, per_item: list[Tensor], branch: str) -> Tensor:
        """Views of each item -> one unit vector per item: the published mean over views, normalised."""
        counts = [len(v) for v in per_item]
        outs = self._batched(torch.cat(per_item), branch).split(counts)
        return F.normalize(torch.stack([o.mean(dim=0) for o in outs]), dim=-1)  # (B, D)

    @torch.no_grad()
    def embed_audio(self, x: np.ndarray) -> Tensor:
        """(B, n) waveforms at `sample_rate` -> (B, D) unit vectors (3 clips of 2 s each, averaged)."""
        wave = resample(check_waveforms(x, "audio", self.name), self.sample_rate, SAMPLE_RATE)
        if wave.shape[1] < SAMPLE_RATE * 0.025:
            raise ValueError(f"{self.name}: {wave.shape[1]} samples at 16 kHz are shorter than one 25 ms "
                             "frame")
        cfg = self.model.cfg
        return self._pooled([audio_clips(w, cfg.mel_bins, cfg.target_len) for w in wave], "audio")

    @torch.no_grad()
    def embed_video(self, x: np.ndarray, video_as: VideoAs | None = None) -> Tensor:
        """(B, T, H, W, 3) uint8 at `fps` -> (B, D) unit vectors: 15 views ("video"), or the middle frame
        through the image path ("image"); `video_as` None takes the instance's setting."""
        video_as = video_as or self.video_as
        assert video_as in ("video", "image"), f"video_as must be 'video' or 'image', got {video_as!r}"
        check_frames(x, "video", self.name)
        size = self.model.cfg.image_size
        if video_as == "image":
            views = [image_view(clip[len(clip) // 2], size)[None] for clip in x]  # (1, 3, S, S) each
        else:
            views = [video_views(clip, self.fps, size) for clip in x]  # (15, 3, 2, S, S) each
        return self._pooled(views, "vision")

    @property
    def timed_dim(self) -> int:
        return self.dim

    @torch.no_grad()
    def timed_features(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor]:
        """Video (B, T, H, W, 3) uint8 at `fps` -> (B, ceil(T / 2), D) unit vectors, one per pair of frames
        (2k, 2k + 1), and the (T',) start time of each pair, 2k / fps: ImageBind's vision branch on every
        2-frame clip of the video as it comes (one tubelet deep: the finest step the branch sees), each clip
        prepared as `video_views` prepares one (short side to 224, CLIP normalisation), centre crop only. The
        last pair of an odd count repeats its frame. Video only: a feature row conditions on video."""
        if modality != "video":
            raise ValueError(f"{self.name}: per-time features of video only")
        check_frames(x, "video", self.name)
        size, step = self.model.cfg.image_size, self.model.cfg.frames
        out = []
        for clip in x:
            frames = as_tensor(clip)  # (T, H, W, 3)
            starts = range(0, len(frames), step)
            views = []
            for start in starts:
                picks = [min(start + i, len(frames) - 1) for i in range(step)]
                pair = frames[picks].permute(3, 0, 1, 2).float() / 255.0  # (3, 2, H, W)
                views.extend(uniform_crops(normalize_rgb(short_side_scale(pair, size)[None])[0], size, crops=1))
            out.append(self._batched(torch.stack(views), "vision"))  # (T', D)
        features = torch.stack(out)
        return features, torch.arange(features.shape[1], dtype=torch.float64) * step / self.fps

    def embed(self, x: np.ndarray, modality: Modality, video_as: VideoAs | None = None) -> Tensor:
        """`video_as` (video only) overrides the instance's setting for this call, so one loaded network
        gives both sides of IB-AI and IB-AV."""
        if modality == "audio":
            return self.embed_audio(x)
        if modality == "video":
            return self.embed_video(x, video_as)
        raise ValueError(f"{self.name} embeds audio and video, not {modality}")

    def logits(self, x: np.ndarray, modality: Modality) -> Tensor | None:
        return None  # a joint embedding space, no classifier


def load(weights: Path | None = None, *, device: str = "cpu", fps: float = 25.0,
         input_rate: int | None = None, video_as: VideoAs = "video", batch_size: int = 16,
         vision_heads: int | None = None, audio_heads: int | None = None) -> ImageBindEmbedder:
    """ImageBind's audio and vision branches from `imagebind_huge.pth` (sizes read from its shapes).

    `fps`: the frame rate of the videos `embed` will get; `input_rate`: the rate of its waveforms (default
    16 kHz; others are resampled with soxr); `video_as`: "video" (IB-AV) or "image" (IB-AI, middle frame).
    """
    path = require_weights(weights, "imagebind", WEIGHTS_HINT, "the imagebind weights path")
    state = branch_keys(read_state_dict(path, NETWORK))
    model = ImageBindAV(infer_config(state, path, vision_heads, audio_heads))
    load_strict(model, state, path, NETWORK)
    return ImageBindEmbedder(model, device=device, fps=fps, input_rate=input_rate, video_as=video_as,
                             batch_size=batch_size)
