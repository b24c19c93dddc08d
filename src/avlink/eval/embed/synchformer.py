"""Synchformer (Iashin et al., 2024) audio-visual offset classifier, for DeSync as in MMAudio's av-benchmark.

Synchformer predicts the offset of an audio track against its video as one of 21 classes, -2.0 s to +2.0 s
in 0.2 s steps (positive: the audio starts that much earlier than the frames), from a 4.8 s window: 14
segments of 16 frames at 25 fps (0.64 s) taken every 8 frames (0.32 s), with the matching audio segments.
DeSync is the mean absolute predicted offset in seconds; av-benchmark (hkchengrex/av-benchmark) scores an
8 s clip on its first and its last 4.8 s window and averages the two.

We write the network of v-iashin/Synchformer (the AudioSet model `24-01-04T16-39-21`, as av-benchmark rebuilds
it) ourselves, with the module names of its state dict, so that state dict loads strictly:
- `vfeat_extractor`: MotionFormer, a ViT-B/16 over 2 x 16 x 16 tubelets of a 16-frame 224 px segment (8 x 14 x
  14 tokens and a class token), spatial positions plus per-frame temporal positions; each block is divided
  space-time attention (time first: a patch attends to itself at the 8 times, then within its frame; the class
  token attends to every token), then an MLP (LayerNorm eps 1e-6). After the final norm a one-layer
  transformer with its own class token pools each frame's 196 tokens: (segments, 8, 768). The 2-D
  `patch_embed` of the checkpoint is kept for the load but never used (the published network only counts
  patches with it).
- `afeat_extractor`: AST (HF ASTModel names: `ast.embeddings`, `ast.encoder.layer.*`, eps 1e-12) over a
  128 x 66 log-mel segment cut into 16 x 16 patches at stride 10 (12 x 6), class and distillation tokens,
  74 positions; after the final norm a one-layer transformer pools the 12 frequency tokens of each time step:
  (segments, 6, 768).
- `vproj`, `aproj`: Linear 768 -> 768.
- `transformer`: LayerNorm per stream, then [OFF, 14 x 8 video tokens, MOD, 14 x 6 audio tokens] plus 198
  learned positions, 3 pre-norm blocks of 8 heads, a final LayerNorm and `off_head` (21 classes) on OFF.
The pooling layers are torch TransformerEncoderLayers (pre-norm, GELU, eps 1e-6) with a class token.

Input paths, as av-benchmark prepares them:
- video at 25 fps: short side resized to 224 bicubically with antialias and rounded to 8 bits, centre crop,
  [0, 1], then (x - 0.5) / 0.5; segments of 16 frames every 8 frames;
- audio at 16 kHz: segments of 10,240 samples every 5,120; power mel spectrogram (torchaudio's
  MelSpectrogram: n_fft 1024, a periodic Hann window of 400 samples centred in the frame, hop 160, centred
  with reflect padding, 128 HTK mel bands 0 to 8 kHz, no band normalisation): 65 frames, log(x + 1e-6),
  zero-padded to 66, then (x + 4.2677393) / (2 * 4.5689974).
Audio at another rate is resampled with soxr (`input_rate`); video must come decoded at 25 fps (`fps`).
A clip needs at least 4.8 s (14 segments) of each stream; longer clips give more segments and, for DeSync, a
first and a last window of 14 (one window when there are exactly 14).

Embedding: this network has no single-modality embedding for Frechet distances. `embed(x, modality)` returns
the segment features of one stream, flattened to (B, S * t * 768) (t = 8 video, 6 audio): the features
av-benchmark caches per file, so a harness can read each side once and score the pair later with
`desync_from_features`. `logits(x, modality)` is None (offsets need both streams): use `offset_logits(video,
audio)` for the (B, windows, 21) offset logits and `desync(video, audio)` for DeSync. `timed_features(x, "video")`
gives per-time video features of a clip of any length, for the Table 2 feature rows (eval/features.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
    load_strict,
    read_state_dict,
    resample,
    resize_short_side_bicubic,
)
from avlink.eval.embedders import Modality, require_weights
from avlink.weights import RefusedPickle

NETWORK = "Synchformer"
WEIGHTS_FILE = "synchformer_state_dict.pth"
WEIGHTS_HINT = (f"{WEIGHTS_FILE} (the state dict of Synchformer 24-01-04T16-39-21, as distributed with "
                "MMAudio: https://github.com/hkchengrex/MMAudio/releases/download/v0.1/"
                "synchformer_state_dict.pth)")

FPS = 25.0
SAMPLE_RATE = 16_000
SEGMENT_FRAMES, FRAME_STEP = 16, 8  # 0.64 s every 0.32 s
SEGMENT_SAMPLES, SAMPLE_STEP = 10_240, 5_120
N_FFT, WIN, HOP, N_MELS = 1024, 400, 160, 128
LOG_OFFSET = 1e-6
SPEC_MEAN, SPEC_STD = -4.2677393, 4.5689974  # AST's AudioSet statistics; the std is doubled when applied
AST_LN_EPS, VIT_LN_EPS = 1e-12, 1e-6


@dataclass(frozen=True)
class SynchformerConfig:
    """Sizes of the published network (defaults) or of a smaller one with the same layout."""

    width: int = 768  # both feature extractors
    video_depth: int = 12
    video_heads: int = 12
    image_size: int = 224
    patch: int = 16
    tubelet: int = 2  # frames per tubelet
    segment_frames: int = SEGMENT_FRAMES
    audio_depth: int = 12
    audio_heads: int = 12
    mel_bins: int = N_MELS
    spec_frames: int = 66
    audio_patch: int = 16
    audio_stride: int = 10
    sync_width: int = 768
    sync_depth: int = 3
    sync_heads: int = 8
    segments: int = 14  # per offset window
    num_offsets: int = 21
    max_offset: float = 2.0
    mlp_ratio: float = 4.0

    @property
    def video_grid(self) -> tuple[int, int]:
        """(times, patches per frame) of one segment."""
        return self.segment_frames // self.tubelet, (self.image_size // self.patch) ** 2

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency, time) patches of one segment."""
        def count(size: int) -> int:
            return (size - self.audio_patch) // self.audio_stride + 1

        return count(self.mel_bins), count(self.spec_frames)

    @property
    def sync_tokens(self) -> int:
        return 2 + self.segments * (self.video_grid[0] + self.audio_grid[1])

    @property
    def offsets(self) -> Tensor:
        """(num_offsets,) class grid in seconds, as make_class_grid(-2, 2, 21)."""
        return torch.from_numpy(np.linspace(-self.max_offset, self.max_offset, self.num_offsets)).float()


# ---------------------------------------------------------------- shared pieces


class PoolingLayer(nn.Module):
    """A class token, then one pre-norm transformer layer (torch TransformerEncoderLayer names); returns the
    class token: (N, L, C) -> (N, C)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.self_attn = InProjAttention(dim, heads)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)  # (N, 1 + L, C)
        x = x + self.self_attn(self.norm1(x))
        x = x + self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return x[:, 0]


class QKV(nn.Module):
    """Separate query / key / value projections (HF ViT and minGPT names); returns the attended values
    (B, N, C) before any output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, h, N, d)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.transpose(1, 2).reshape(b, n, c)


class Dense(nn.Module):
    """One Linear under the name `dense` (the HF layout nests one in each sub-block)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


# ---------------------------------------------------------------- video: MotionFormer


class DividedAttention(nn.Module):
    """Attention within groups of patch tokens, with the class token as an extra key / value of every group;
    the class token's own query attends to all tokens. Groups are the frames ("space") or the patch
    positions across frames ("time"). Tokens are (B, 1 + F * P, C), frame-major."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, frames: int, over: str) -> Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, N, d)
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, h, 1, d)

        def group(t: Tensor) -> Tensor:
            t = t[:, :, 1:].reshape(b, h, frames, -1, d)  # (B, h, F, P, d)
            return t if over == "space" else t.transpose(2, 3)  # (B, h, G, L, d)

        qg, kg, vg = group(q), group(k), group(v)
        groups = qg.shape[2]
        cls_k = k[:, :, None, :1].expand(-1, -1, groups, -1, -1)  # (B, h, G, 1, d)
        cls_v = v[:, :, None, :1].expand(-1, -1, groups, -1, -1)
        out = F.scaled_dot_product_attention(qg, torch.cat([cls_k, kg], 3), torch.cat([cls_v, vg], 3))
        if over != "space":
            out = out.transpose(2, 3)  # back to (B, h, F, P, d)
        out = torch.cat([cls_out, out.reshape(b, h, n - 1, d)], dim=2)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DividedBlock(nn.Module):
    """Time attention, then space attention, then MLP; each pre-norm with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.attn = DividedAttention(dim, heads)
        self.timeattn = DividedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=VIT_LN_EPS)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        x = x + self.timeattn(self.norm3(x), frames, "time")
        x = x + self.attn(self.norm1(x), frames, "space")
        return x + self.mlp(self.norm2(x))


class ConvProj(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


class MotionFormer(nn.Module):
    """(N, 3, 16, S, S) segments in [-1, 1] -> (N, 8, C): one pooled feature per tubelet time."""

    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.cfg = cfg
        c, p = cfg.width, cfg.patch
        times, patches = cfg.video_grid
        self.patch_embed = ConvProj(nn.Conv2d(3, c, p, stride=p))  # unused: kept for the published layout
        tubelet = (cfg.tubelet, p, p)
        self.patch_embed_3d = ConvProj(nn.Conv3d(3, c, tubelet, stride=tubelet))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + patches, c))
        self.temp_embed = nn.Parameter(torch.zeros(1, times, c))
        self.blocks = nn.ModuleList([DividedBlock(c, cfg.video_heads, cfg.mlp_ratio)
                                     for _ in range(cfg.video_depth)])
        self.norm = nn.LayerNorm(c, eps=VIT_LN_EPS)
        self.spatial_attn_agg = PoolingLayer(c, cfg.video_heads, int(cfg.mlp_ratio * c))

    def tokens(self, x: Tensor) -> Tensor:
        """(N, 3, T, S, S) -> (N, 1 + times * patches, C) with the separate space and time positions."""
        x = self.patch_embed_3d.proj(x).flatten(2).transpose(1, 2)  # (N, times * patches, C), time-major
        times, patches = self.cfg.video_grid
        assert x.shape[1] == times * patches, f"{x.shape[1]} tubelets, expected {times} x {patches}"
        pos = self.pos_embed[:, 1:].repeat(1, times, 1) + self.temp_embed.repeat_interleave(patches, dim=1)
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls.expand(len(x), -1, -1), x + pos], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        times, patches = self.cfg.video_grid
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x, times)
        x = self.norm(x[:, 1:])  # (N, times * patches, C): the class token is not used
        pooled = self.spatial_attn_agg(x.reshape(-1, patches, x.shape[-1]))  # (N * times, C)
        return pooled.view(-1, times, pooled.shape[-1])


# ---------------------------------------------------------------- audio: AST


class ASTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = QKV(dim, heads)
        self.output = Dense(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.attention(x))


class ASTLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention = ASTAttention(dim, heads)
        self.intermediate = Dense(dim, hidden)
        self.output = Dense(hidden, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=AST_LN_EPS)
        self.layernorm_after = nn.LayerNorm(dim, eps=AST_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class ASTEncoder(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.layer = nn.ModuleList([ASTLayer(cfg.width, cfg.audio_heads, int(cfg.mlp_ratio * cfg.width))
                                    for _ in range(cfg.audio_depth)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ASTEmbeddings(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        c = cfg.width
        f, t = cfg.audio_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(1, c, cfg.audio_patch, stride=cfg.audio_stride)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 2 + f * t, c))

    def forward(self, spec: Tensor) -> Tensor:
        """(N, 1, mels, frames) -> (N, 2 + f * t, C), patches frequency-major."""
        x = self.patch_embeddings.projection(spec).flatten(2).transpose(1, 2)
        special = torch.cat([self.cls_token, self.distillation_token], dim=1).expand(len(x), -1, -1)
        return torch.cat([special, x], dim=1) + self.position_embeddings


class ASTModel(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.embeddings = ASTEmbeddings(cfg)
        self.encoder = ASTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.width, eps=AST_LN_EPS)

    def forward(self, spec: Tensor) -> Tensor:
        return self.layernorm(self.encoder(self.embeddings(spec)))


class AST(nn.Module):
    """(N, 1, 128, 66) normalised log-mel segments -> (N, 6, C): one pooled feature per time patch."""

    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.cfg = cfg
        self.ast = ASTModel(cfg)
        self.freq_attn_agg = PoolingLayer(cfg.width, cfg.audio_heads, int(cfg.mlp_ratio * cfg.width))

    def forward(self, spec: Tensor) -> Tensor:
        f, t = self.cfg.audio_grid
        x = self.ast(spec)[:, 2:]  # (N, f * t, C) without the class and distillation tokens
        n, _, c = x.shape
        x = x.view(n, f, t, c).transpose(1, 2).reshape(n * t, f, c)  # frequencies of each time step
        return self.freq_attn_agg(x).view(n, t, c)


# ---------------------------------------------------------------- the synchronisation transformer


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, h, N, d)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SyncBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PositionEmbedding(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, dim))


class GlobalTransformer(nn.Module):
    """(B, S * 8, D) video and (B, S * 6, D) audio tokens of one window -> (B, D) the OFF token's state."""

    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        d = cfg.sync_width
        self.vis_in_lnorm = nn.LayerNorm(d)
        self.aud_in_lnorm = nn.LayerNorm(d)
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, d))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_emb_cfg = PositionEmbedding(cfg.sync_tokens, d)  # the checkpoint's name
        self.blocks = nn.Sequential(*[SyncBlock(d, cfg.sync_heads) for _ in range(cfg.sync_depth)])
        self.ln_f = nn.LayerNorm(d)
        self.off_head = nn.Linear(d, cfg.num_offsets)

    def pooled(self, v: Tensor, a: Tensor) -> Tensor:
        b = len(v)
        x = torch.cat([self.OFF_tok.expand(b, -1, -1), self.vis_in_lnorm(v),
                       self.MOD_tok.expand(b, -1, -1), self.aud_in_lnorm(a)], dim=1)  # (B, 2 + Sv + Sa, D)
        assert x.shape[1] == self.pos_emb_cfg.pos_emb.shape[1], \
            f"{x.shape[1]} tokens, the network has {self.pos_emb_cfg.pos_emb.shape[1]} positions"
        return self.ln_f(self.blocks(x + self.pos_emb_cfg.pos_emb))[:, 0]

    def forward(self, v: Tensor, a: Tensor) -> Tensor:
        return self.off_head(self.pooled(v, a))  # (B, num_offsets)


# ---------------------------------------------------------------- the network


class Synchformer(nn.Module):
    """Segment features of each stream, and offset logits of a window of `segments` segments of both."""

    def __init__(self, cfg: SynchformerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SynchformerConfig()
        self.vfeat_extractor = MotionFormer(cfg)
        self.afeat_extractor = AST(cfg)
        self.vproj = nn.Linear(cfg.width, cfg.sync_width)
        self.aproj = nn.Linear(cfg.width, cfg.sync_width)
        self.transformer = GlobalTransformer(cfg)

    def video_features(self, segments: Tensor) -> Tensor:
        """(N, 16, 3, S, S) frame segments -> (N, 8, C)."""
        s = self.cfg.image_size
        assert segments.ndim == 5 and tuple(segments.shape[1:]) == (self.cfg.segment_frames, 3, s, s), \
            f"expected (N, {self.cfg.segment_frames}, 3, {s}, {s}) segments, got {tuple(segments.shape)}"
        return self.vfeat_extractor(segments.transpose(1, 2))

    def audio_features(self, spec: Tensor) -> Tensor:
        """(N, 1, 128, 66) log-mel segments -> (N, 6, C)."""
        expected = (1, self.cfg.mel_bins, self.cfg.spec_frames)
        assert spec.ndim == 4 and tuple(spec.shape[1:]) == expected, \
            f"expected (N, {expected}) log-mel segments, got {tuple(spec.shape)}"
        return self.afeat_extractor(spec)

    def offset_logits(self, video: Tensor, audio: Tensor) -> Tensor:
        """(B, segments, 8, C) and (B, segments, 6, C) features of one window -> (B, num_offsets)."""
        assert video.shape[:2] == audio.shape[:2] and video.shape[1] == self.cfg.segments, \
            f"a window is {self.cfg.segments} segments of both streams, got {tuple(video.shape[:2])} / " \
            f"{tuple(audio.shape[:2])}"
        v = self.vproj(video).flatten(1, 2)  # (B, segments * 8, D)
        a = self.aproj(audio).flatten(1, 2)  # (B, segments * 6, D)
        return self.transformer(v, a)


# ---------------------------------------------------------------- preprocessing


def htk_mel_banks(mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                  fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """(mels, n_fft // 2 + 1) triangles on the HTK mel scale 2595 log10(1 + f / 700), unnormalised
    (torchaudio's melscale_fbanks with norm=None, mel_scale="htk")."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax or sample_rate / 2), mels + 2))  # (mels + 2,)
    freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)[None]  # (1, bins)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling))).float()


class SyncMel(nn.Module):
    """(N, 10240) waveform segments at 16 kHz -> (N, 1, 128, 66) normalised log-mel segments."""

    def __init__(self, spec_frames: int = 66):
        super().__init__()
        self.spec_frames = spec_frames
        self.register_buffer("window", torch.hann_window(WIN), persistent=False)
        self.register_buffer("banks", htk_mel_banks(), persistent=False)  # (128, 513)

    def forward(self, wave: Tensor) -> Tensor:
        spec = torch.stft(wave.float(), N_FFT, hop_length=HOP, win_length=WIN, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)  # (N, 513, frames)
        mel = (self.banks @ (spec.real.square() + spec.imag.square()) + LOG_OFFSET).log()  # (N, 128, 65)
        frames = mel.shape[-1]
        mel = F.pad(mel, (0, self.spec_frames - frames)) if frames < self.spec_frames \
            else mel[..., :self.spec_frames]
        return ((mel - SPEC_MEAN) / (2 * SPEC_STD))[:, None]


def count_segments(length: int, size: int, step: int) -> int:
    return 0 if length < size else (length - size) // step + 1


def audio_segments(wave: Tensor) -> Tensor:
    """(n,) 16 kHz -> (S, 10240) segments every 5120 samples."""
    s = count_segments(wave.shape[-1], SEGMENT_SAMPLES, SAMPLE_STEP)
    return wave[: (s - 1) * SAMPLE_STEP + SEGMENT_SAMPLES].unfold(0, SEGMENT_SAMPLES, SAMPLE_STEP)


def video_frames(frames: np.ndarray | Tensor, size: int = 224) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) in [-1, 1]: bicubic short side, centre crop."""
    x = resize_short_side_bicubic(as_tensor(frames).permute(0, 3, 1, 2), size)  # (T, 3, h, w) 8-bit values
    return center_crop(x, size) / 127.5 - 1.0  # ((x / 255) - 0.5) / 0.5


def video_segments(frames: Tensor, segment_frames: int = SEGMENT_FRAMES) -> Tensor:
    """(T, 3, S, S) -> (segments, 16, 3, S, S) every 8 frames."""
    s = count_segments(frames.shape[0], segment_frames, FRAME_STEP)
    return torch.stack([frames[i * FRAME_STEP:i * FRAME_STEP + segment_frames] for i in range(s)])


def windows(num_segments: int, size: int) -> list[slice]:
    """The first and the last `size` segments (one window if they coincide), as av-benchmark's DeSync."""
    assert num_segments >= size, f"{num_segments} segments, a window needs {size}"
    first, last = slice(0, size), slice(num_segments - size, num_segments)
    return [first] if num_segments == size else [first, last]


# ---------------------------------------------------------------- weights


def read_state(path: Path) -> dict[str, Tensor]:
    """The state dict (plain, or under 'model'); a file that pickles other classes is refused in one line
    that says what to do if it is a training checkpoint (those pickle their config)."""
    try:
        return read_state_dict(path, NETWORK)
    except RefusedPickle as err:
        raise UserError(f"{err}; a Synchformer training checkpoint pickles its config: save its 'model' "
                        f"entry as a plain state dict once, or use {WEIGHTS_FILE}") from None


def infer_config(state: dict[str, Tensor], path: Path, video_heads: int | None, audio_heads: int | None,
                 sync_heads: int | None) -> SynchformerConfig:
    """Sizes from the tensor shapes; head counts are not in them (published: 64-d heads, 96-d in sync)."""
    needed = ("vfeat_extractor.patch_embed_3d.proj.weight", "vfeat_extractor.pos_embed",
              "vfeat_extractor.temp_embed",
              "afeat_extractor.ast.embeddings.patch_embeddings.projection.weight",
              "afeat_extractor.ast.embeddings.position_embeddings", "transformer.pos_emb_cfg.pos_emb",
              "transformer.off_head.weight", "vfeat_extractor.blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{path}: not a Synchformer state dict (no {', '.join(missing[:2])})")

    def depth(prefix: str) -> int:
        n = 0
        while any(k.startswith(f"{prefix}.{n}.") for k in state):
            n += 1
        return n

    width, _, tubelet, patch, _ = state[needed[0]].shape
    side = int(round((state[needed[1]].shape[1] - 1) ** 0.5))
    sync_width = state[needed[5]].shape[-1]
    cfg = SynchformerConfig(
        width=width, video_depth=depth("vfeat_extractor.blocks"),
        video_heads=video_heads or max(1, width // 64),
        image_size=side * patch, patch=patch, tubelet=tubelet,
        segment_frames=tubelet * state[needed[2]].shape[1],
        audio_depth=depth("afeat_extractor.ast.encoder.layer"),
        audio_heads=audio_heads or max(1, width // 64),
        audio_patch=state[needed[3]].shape[-1], sync_width=sync_width, sync_depth=depth("transformer.blocks"),
        sync_heads=sync_heads or max(1, sync_width // 96), num_offsets=state[needed[6]].shape[0],
        mlp_ratio=state[needed[7]].shape[0] / width)
    f, t = cfg.audio_grid
    found = (state[needed[4]].shape[1], state[needed[5]].shape[1])
    if found != (2 + f * t, cfg.sync_tokens):
        raise UserError(f"{path}: Synchformer positions {found} do not fit {cfg.segments}-segment windows of "
                        f"{cfg.mel_bins} x {cfg.spec_frames} spectrograms "
                        f"(expected {(2 + f * t, cfg.sync_tokens)})")
    return cfg


# ---------------------------------------------------------------- the embedder


class SynchformerEmbedder:
    """DeSync from Synchformer's offset logits; per-stream segment features as the embedding."""

    name = "synchformer"
    modalities: tuple[Modality, ...] = ("audio", "video")

    def __init__(self, model: Synchformer, device: str | torch.device = "cpu", input_rate: int | None = None,
                 batch_size: int = 8):
        assert batch_size > 0, f"batch_size must be positive, got {batch_size}"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.mel = SyncMel(model.cfg.spec_frames).to(self.device)
        self.sample_rate = input_rate or SAMPLE_RATE  # the rate `embed` takes; resampled to 16 kHz inside
        self.fps = FPS  # the network's frame rate: frames are taken as they come
        self.batch_size = batch_size
        self.offsets = model.cfg.offsets

    @property
    def window_seconds(self) -> float:
        """The shortest clip DeSync scores: one window of both streams (4.8 s for the published network)."""
        cfg = self.model.cfg
        video = ((cfg.segments - 1) * FRAME_STEP + cfg.segment_frames) / FPS
        audio = ((cfg.segments - 1) * SAMPLE_STEP + SEGMENT_SAMPLES) / SAMPLE_RATE
        return max(video, audio)

    def _too_short(self, what: str, got: str) -> ValueError:
        seconds = self.window_seconds
        return ValueError(f"{self.name}: {what} is {got}; a Synchformer window needs {seconds:g} s")

    @torch.no_grad()
    def video_features(self, x: np.ndarray) -> Tensor:
        """(B, T, H, W, 3) uint8 at 25 fps -> (B, S, 8, C) segment features."""
        check_frames(x, "video", self.name)
        cfg = self.model.cfg
        if count_segments(x.shape[1], cfg.segment_frames, FRAME_STEP) < cfg.segments:
            raise self._too_short("the video", f"{x.shape[1]} frames at {FPS:g} fps")
        out = []
        for clip in x:
            frames = video_frames(clip, cfg.image_size)  # (T, 3, S, S)
            segments = video_segments(frames, cfg.segment_frames)  # (segments, 16, 3, S, S)
            out.append(torch.cat([self.model.video_features(segments[i:i + self.batch_size].to(self.device))
                                  .float().cpu() for i in range(0, len(segments), self.batch_size)]))
        return torch.stack(out)

    @torch.no_grad()
    def audio_features(self, x: np.ndarray) -> Tensor:
        """(B, n) waveforms at `sample_rate` -> (B, S, 6, C) segment features."""
        wave = resample(check_waveforms(x, "audio", self.name), self.sample_rate, SAMPLE_RATE)
        wave = torch.from_numpy(np.ascontiguousarray(wave))
        if count_segments(wave.shape[1], SEGMENT_SAMPLES, SAMPLE_STEP) < self.model.cfg.segments:
            raise self._too_short("the audio", f"{wave.shape[1] / SAMPLE_RATE:.3f} s")
        out = []
        for clip in wave:
            segments = audio_segments(clip)  # (S, 10240)
            out.append(torch.cat([self.model.audio_features(self.mel(segments[i:i + self.batch_size]
                                                                     .to(self.device))).float().cpu()
                                  for i in range(0, len(segments), self.batch_size)]))
        return torch.stack(out)

    @property
    def timed_dim(self) -> int:
        return self.model.cfg.width

    @torch.no_grad()
    def timed_features(self, x: np.ndarray, modality: Modality) -> tuple[Tensor, Tensor]:
        """Video (B, T, H, W, 3) uint8 at 25 fps -> (B, N, C) per-time features and the (N,) start time of each:
        MotionFormer's output of segments of 16 frames laid end to end (not every 8 frames as for offsets, so
        that each 2-frame step of the clip has one token, at (16 s + 2 j) / 25 s), the last segment filled by
        repeating the last frame and the tokens past the clip's end dropped. No window of 14 segments is needed:
        the offset head is not used. Video only: a feature row conditions on video."""
        if modality != "video":
            raise ValueError(f"{self.name}: per-time features of video only")
        check_frames(x, "video", self.name)
        cfg = self.model.cfg
        size, step = cfg.segment_frames, cfg.tubelet  # 16 frames a segment, 2 a token
        out = []
        for clip in x:
            frames = video_frames(clip, cfg.image_size)  # (T, 3, S, S)
            fill = -len(frames) % size
            frames = torch.cat([frames, frames[-1:].expand(fill, *frames.shape[1:])])
            segments = frames.unflatten(0, (-1, size))  # (segments, 16, 3, S, S)
            feats = torch.cat([self.model.video_features(segments[i:i + self.batch_size].to(self.device))
                               .float().cpu() for i in range(0, len(segments), self.batch_size)])
            out.append(feats.flatten(0, 1)[:math.ceil(len(clip) / step)])  # (N, C)
        features = torch.stack(out)
        return features, torch.arange(features.shape[1], dtype=torch.float64) * step / FPS

    def segment_features(self, x: np.ndarray, modality: Modality) -> Tensor:
        if modality == "video":
            return self.video_features(x)
        if modality == "audio":
            return self.audio_features(x)
        raise ValueError(f"{self.name} reads audio and video, not {modality}")

    def embed(self, x: np.ndarray, modality: Modality) -> Tensor:
        """(B, ...) one stream -> (B, S * t * C) flattened segment features (see the module docstring)."""
        return self.segment_features(x, modality).flatten(1)

    def logits(self, x: np.ndarray, modality: Modality) -> Tensor | None:
        return None  # offsets need both streams: offset_logits(video, audio)

    def unflatten(self, flat: Tensor, modality: Modality) -> Tensor:
        """(B, S * t * C) from `embed` -> (B, S, t, C)."""
        t = self.model.cfg.video_grid[0] if modality == "video" else self.model.cfg.audio_grid[1]
        c = self.model.cfg.width
        assert flat.ndim == 2 and flat.shape[1] % (t * c) == 0, \
            f"{tuple(flat.shape)} are not flattened {modality} segment features of width {c}"
        return torch.as_tensor(flat).view(len(flat), -1, t, c)

    @torch.no_grad()
    def offset_logits_from_features(self, video: Tensor, audio: Tensor) -> Tensor:
        """(B, Sv, 8, C) and (B, Sa, 6, C) segment features -> (B, W, 21) logits of the first and the last
        14-segment window (W = 1 when both are the same window)."""
        assert len(video) == len(audio), f"{len(video)} videos but {len(audio)} audio clips"
        size = self.model.cfg.segments
        s = min(video.shape[1], audio.shape[1])  # the common length of the two streams
        out = [self.model.offset_logits(video[:, w].to(self.device), audio[:, w].to(self.device))
               for w in windows(s, size)]  # (B, 21) each
        return torch.stack(out, dim=1).float().cpu()

    def offset_logits(self, video: np.ndarray, audio: np.ndarray) -> Tensor:
        """(B, T, H, W, 3) uint8 at 25 fps and (B, n) waveforms -> (B, W, 21) offset logits."""
        return self.offset_logits_from_features(self.video_features(video), self.audio_features(audio))

    def desync_from_logits(self, logits: Tensor) -> Tensor:
        """(B, W, 21) -> (B,) mean over windows of |offset of the top class| in seconds."""
        return self.offsets[logits.argmax(dim=-1)].abs().mean(dim=1)

    def desync_from_features(self, video: Tensor, audio: Tensor) -> Tensor:
        return self.desync_from_logits(self.offset_logits_from_features(video, audio))

    def desync(self, video: np.ndarray, audio: np.ndarray) -> Tensor:
        """(B,) DeSync in seconds of each clip (lower is better)."""
        return self.desync_from_logits(self.offset_logits(video, audio))


def load(weights: Path | None = None, *, device: str = "cpu", input_rate: int | None = None,
         batch_size: int = 8, video_heads: int | None = None, audio_heads: int | None = None,
         sync_heads: int | None = None) -> SynchformerEmbedder:
    """Synchformer from its state dict (sizes read from the shapes). Video must come at 25 fps; `input_rate`
    is the rate of the waveforms `embed` will get (default 16 kHz; others are resampled with soxr)."""
    path = require_weights(weights, "synchformer", WEIGHTS_HINT, "the synchformer weights path")
    state = read_state(path)
    model = Synchformer(infer_config(state, path, video_heads, audio_heads, sync_heads))
    load_strict(model, state, path, NETWORK)
    return SynchformerEmbedder(model, device=device, input_rate=input_rate, batch_size=batch_size)
