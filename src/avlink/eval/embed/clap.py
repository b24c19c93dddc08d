"""LAION-CLAP (Wu et al., 2023) as an audio and text embedder: CLAP scores (text-audio cosine) and FD.

The published package (LAION-AI/CLAP, `laion_clap`) pairs an HTS-AT audio encoder (Chen et al., 2022: a Swin
transformer over a log-mel image) with RoBERTa-base, each followed by a two-layer projection into a 512-d
joint space. We write the audio network ourselves with the package's module names, so its checkpoints
load strictly:
- `630k-audioset-best.pt` (HTSAT-tiny: width 96, depths 2-2-6-2), the package's default;
- `music_speech_audioset_epoch_15_esc_89.98.pt` (HTSAT-base: width 128, depths 2-2-12-2), the one MMAudio's
  av-benchmark and GenAU report.
The variant is read from the tensor shapes. Fusion checkpoints (`*-fusion-best.pt`) are refused.

Audio path, as the package's `get_audio_embedding_from_data` on numpy input (model_configs/HTSAT-*.json):
- 48 kHz mono, quantised through int16 (`quantize=False` skips it, as the package does for tensor input);
- fitted to 10 s (480,000 samples): shorter clips are repeated a whole number of times, then zero-padded
  ("repeatpad"); longer ones are cropped to their first 10 s (the package crops at random, which we avoid so
  that scores are repeatable);
- power STFT (n_fft 1024, periodic Hann window of 1024, hop 480, centred, reflect padding; torchlibrosa), 64
  Slaney mel bands from 50 Hz to 14 kHz (the checkpoint's own `logmel_extractor.melW`),
  10 log10(max(x, 1e-10));
- batch norm over the mel bands (`bn0`), the 1001 frames stretched bicubically to 1024 and folded into a
  256 x 256 image (four 256-frame chunks stacked along the frequency axis);
- Swin stages (4 x 4 patches, 8 x 8 windows, shifted every other block), final norm, mean over all tokens;
- `audio_projection` (Linear, ReLU, Linear) to 512-d, then L2 normalisation.
Text path: RoBERTa tokens padded / truncated to 77, `pooler_output` (tanh dense on the <s> token),
`text_projection`, L2 normalisation. The text encoder's weights are the checkpoint's own (`text_branch.*`,
fine-tuned with CLAP); its tokenizer is not in the checkpoint and must come from a local roberta-base folder.

`embed` returns L2-normalised (B, 512) rows, so cosine similarity is a dot product. `logits` returns None: the
HTS-AT classifier head left in the checkpoint was not trained for the CLAP objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.errors import UserError
from avlink.eval.embed.common import Mlp, check_waveforms, load_strict, read_state_dict, resample
from avlink.eval.embedders import Modality, WeightsMissing, require_weights

SAMPLE_RATE = 48_000
CLIP_SAMPLES = 480_000  # 10 s
N_FFT = 1024
HOP = 480
N_MELS = 64
FMIN, FMAX = 50.0, 14_000.0
AMIN = 1e-10  # power floor before the dB conversion (torchlibrosa's default)
SPEC_SIZE = 256  # side of the square HTS-AT input image
PATCH = 4
JOINT_DIM = 512
TEXT_MAX_LENGTH = 77
WEIGHTS_FILE = "630k-audioset-best.pt"
WEIGHTS_HINT = (f"{WEIGHTS_FILE} or music_speech_audioset_epoch_15_esc_89.98.pt "
                "from https://huggingface.co/lukewys/laion_clap")
TOKENIZER_HINT = ("a roberta-base tokenizer folder (vocab.json and merges.txt, or tokenizer.json, from "
                  "https://huggingface.co/FacebookAI/roberta-base)")

# Checkpoint tensors the embeddings never read: the STFT as a fixed DFT convolution (we use torch.stft), the
# HTS-AT classifier, the contrastive-loss MLPs and temperatures, and position ids older transformers saved.
UNUSED_PREFIXES = (
    "audio_branch.spectrogram_extractor.", "audio_branch.tscam_conv.", "audio_branch.head.",
    "audio_transform.", "text_transform.", "logit_scale_a", "logit_scale_t",
    "text_branch.embeddings.position_ids", "text_branch.embeddings.token_type_ids",
)
FUSION_MARKERS = ("audio_branch.patch_embed.mel_conv2d.", "audio_branch.patch_embed.fusion_model.",
                  "audio_branch.mel_conv1d.", "audio_branch.fusion_model.")


@dataclass(frozen=True)
class HTSATConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self):
        assert len(self.depths) == len(self.num_heads), \
            f"one head count per stage: {self.depths} {self.num_heads}"

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def freq_ratio(self) -> int:
        return SPEC_SIZE // N_MELS  # 4 time chunks stacked along frequency

    @property
    def grid(self) -> int:
        return SPEC_SIZE // PATCH


HTSAT_PRESETS: dict[str, HTSATConfig] = {
    "tiny": HTSATConfig(embed_dim=96, depths=(2, 2, 6, 2)),
    "base": HTSATConfig(embed_dim=128, depths=(2, 2, 12, 2)),
}


# ---------------------------------------------------------------- Swin pieces (published key names)


def relative_position_index(window: int) -> Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table for each query/key pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2), from 0
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """(B, nW, w*w, C) -> (B, H, W, C), the inverse of window_partition."""
    b, _, _, c = x.shape
    x = x.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """(nW, N, N) additive mask: after the cyclic shift, tokens of different image regions may not attend."""
    regions = torch.zeros(1, h, w, 1)
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols] = label
            label += 1
    ids = window_partition(regions, window)[0, :, :, 0]  # (nW, N)
    differ = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)  # -100, not -inf, as published


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, nw, n, c = x.shape
        q, k, v = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, nW, heads, N, d)
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm window attention (cyclically shifted when `shift` > 0) and MLP, both residual."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # the stage fits in one window: nothing to shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        r, s = self.resolution, self.shift
        assert n == r * r, f"expected {r}x{r} tokens, got {n}"
        y = self.norm1(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, self.window), self.attn_mask), self.window, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order: even-even, odd-even, even-odd, odd-odd), normed, mapped to 2C."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))  # (B, (r/2)^2, 2C)


class Stage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, (256/4)^2, C)


# ---------------------------------------------------------------- the audio network


class LogMel(nn.Module):
    """Waveform (B, n) at 48 kHz -> log-mel in dB (B, frames, 64); `melW` is the checkpoint's filter bank."""

    def __init__(self):
        super().__init__()
        mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)  # Slaney
        self.register_buffer("melW", torch.from_numpy(mel.T.copy()).float())  # (513, 64)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        spec = torch.stft(wave.float(), N_FFT, hop_length=HOP, win_length=N_FFT, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)  # (B, 513, frames)
        power = spec.real.square() + spec.imag.square()
        mel = power.transpose(1, 2) @ self.melW  # (B, frames, 64)
        return 10.0 * torch.log10(mel.clamp(min=AMIN))


def logmel_to_image(logmel: Tensor, freq_ratio: int) -> Tensor:
    """(B, T, M) with T <= 1024 -> (B, 1, 256, 256): stretch time to M * freq_ratio^2 frames (bicubic,
    align_corners, as published), then stack its `freq_ratio` consecutive chunks along the frequency axis."""
    b, t, m = logmel.shape
    target_t = SPEC_SIZE * freq_ratio
    assert t <= target_t and m * freq_ratio == SPEC_SIZE, f"log-mel {tuple(logmel.shape)} does not fit"
    x = logmel[:, None]
    if t < target_t:
        x = F.interpolate(x, size=(target_t, m), mode="bicubic", align_corners=True)  # (B, 1, 1024, M)
    x = x.transpose(2, 3).reshape(b, 1, m, freq_ratio, target_t // freq_ratio)  # (B, 1, M, r, 256)
    return x.permute(0, 1, 3, 2, 4).reshape(b, 1, freq_ratio * m, target_t // freq_ratio)  # (B, 1, 256, 256)


class HTSAT(nn.Module):
    """Waveform (B, 480000) at 48 kHz -> clip embedding (B, num_features): mean of the final Swin tokens."""

    def __init__(self, cfg: HTSATConfig):
        super().__init__()
        self.cfg = cfg
        self.logmel_extractor = LogMel()
        self.bn0 = nn.BatchNorm2d(N_MELS)
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        last = len(cfg.depths) - 1
        self.layers = nn.ModuleList([
            Stage(cfg.embed_dim * 2 ** i, cfg.grid // 2 ** i, depth, heads, cfg.window_size, cfg.mlp_ratio,
                  downsample=i < last)
            for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True))])
        self.norm = nn.LayerNorm(cfg.num_features)

    def forward(self, wave: Tensor) -> Tensor:
        x = self.logmel_extractor(wave)  # (B, 1001, 64) dB
        x = self.bn0(x.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)  # normalised per mel band
        x = self.patch_embed(logmel_to_image(x, self.cfg.freq_ratio))  # (B, 4096, C)
        for layer in self.layers:
            x = layer(x)  # tokens / 4, width x 2 per stage but the last
        return self.norm(x).mean(dim=1)  # (B, num_features)


def projection(in_dim: int) -> nn.Sequential:
    """The published joint-space head: keys `0.*` and `2.*`."""
    return nn.Sequential(nn.Linear(in_dim, JOINT_DIM), nn.ReLU(), nn.Linear(JOINT_DIM, JOINT_DIM))


class CLAP(nn.Module):
    """Audio and text towers into one L2-normalised 512-d space; `text_branch` is a RobertaModel."""

    def __init__(self, audio: HTSATConfig, text_branch: nn.Module | None = None):
        super().__init__()
        self.audio_branch = HTSAT(audio)
        self.audio_projection = projection(audio.num_features)
        self.text_branch = text_branch
        self.text_projection = None if text_branch is None else projection(text_branch.config.hidden_size)

    def embed_audio(self, wave: Tensor) -> Tensor:
        assert wave.ndim == 2 and wave.shape[1] == CLIP_SAMPLES, f"expected (B, {CLIP_SAMPLES}): {wave.shape}"
        return F.normalize(self.audio_projection(self.audio_branch(wave)), dim=-1)  # (B, 512)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        assert self.text_branch is not None and self.text_projection is not None, "no text tower"
        pooled = self.text_branch(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, H)
        return F.normalize(self.text_projection(pooled), dim=-1)  # (B, 512)


def build_roberta(config_values: dict) -> nn.Module:
    """A RobertaModel from config values only (no download)."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           **config_values)
    return RobertaModel(config, add_pooling_layer=True)


# ---------------------------------------------------------------- audio input


def quantize_int16(x: np.ndarray) -> np.ndarray:
    """The package's int16 round trip: clip to [-1, 1], scale by 32767, truncate toward zero, scale back."""
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0


def repeat_pad(x: np.ndarray, length: int) -> np.ndarray:
    """(B, n) -> (B, length): first `length` samples if longer; else whole repeats, then trailing zeros."""
    n = x.shape[1]
    if n >= length:
        return x[:, :length]
    tiled = np.tile(x, (1, length // n))
    return np.pad(tiled, ((0, 0), (0, length - tiled.shape[1])))


# ---------------------------------------------------------------- weights


def infer_htsat(state: dict[str, Tensor]) -> HTSATConfig:
    """Width, depths, heads and window of an HTS-AT from its tensor shapes (tiny and base differ there)."""
    depths, heads = [], []
    while f"audio_branch.layers.{len(depths)}.blocks.0.norm1.weight" in state:
        i = len(depths)
        depths.append(sum(1 for k in state if k.startswith(f"audio_branch.layers.{i}.blocks.")
                          and k.endswith(".norm1.weight")))
        heads.append(state[f"audio_branch.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
    first = state["audio_branch.layers.0.blocks.0.attn.relative_position_index"].shape[0]
    hidden = state["audio_branch.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    width = state["audio_branch.patch_embed.proj.weight"].shape[0]
    return HTSATConfig(embed_dim=width, depths=tuple(depths), num_heads=tuple(heads),
                       window_size=round(first ** 0.5), mlp_ratio=hidden / width)


def infer_roberta(state: dict[str, Tensor], heads: int | None) -> dict:
    """RobertaConfig values from the `text_branch.*` tensor shapes; the head count is not in them (64-d heads,
    as roberta-base, unless given)."""
    words = state["text_branch.embeddings.word_embeddings.weight"]
    layers = 0
    while f"text_branch.encoder.layer.{layers}.attention.self.query.weight" in state:
        layers += 1
    return {
        "vocab_size": words.shape[0], "hidden_size": words.shape[1], "num_hidden_layers": layers,
        "num_attention_heads": heads or max(1, words.shape[1] // 64),
        "intermediate_size": state["text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": state["text_branch.embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state["text_branch.embeddings.token_type_embeddings.weight"].shape[0],
    }


def published_keys(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The checkpoint less the tensors the embeddings never read; fusion checkpoints refused in one line."""
    if any(k.startswith(FUSION_MARKERS) for k in state):
        raise UserError(f"{path}: a feature-fusion CLAP checkpoint, which this embedder does not run; "
                        f"use a non-fusion one such as {WEIGHTS_FILE}")
    if "audio_branch.patch_embed.proj.weight" not in state:
        raise UserError(f"{path}: not a LAION-CLAP HTS-AT checkpoint "
                        "(no audio_branch.patch_embed.proj.weight)")
    return {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}


def build_clap(state: dict[str, Tensor], text_heads: int | None = None) -> CLAP:
    """A CLAP shaped like the checkpoint (text tower only if it has `text_branch.*`), not yet loaded."""
    has_text = "text_branch.embeddings.word_embeddings.weight" in state
    text = build_roberta(infer_roberta(state, text_heads)) if has_text else None
    return CLAP(infer_htsat(state), text)


def load_tokenizer(folder: Path | str):
    """A RoBERTa tokenizer from a local folder; WeightsMissing if it is not there."""
    folder = Path(folder)
    files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if not ({"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files):
        raise WeightsMissing(f"{folder}: no RoBERTa tokenizer here; CLAP text needs {TOKENIZER_HINT}")
    from transformers import RobertaTokenizer

    return RobertaTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------- the embedder


class CLAPEmbedder:
    """CLAP scores and FD-CLAP: L2-normalised 512-d audio and text embeddings (see the module docstring)."""

    name = "clap"
    modalities: tuple[Modality, ...] = ("audio", "text")
    fps = None

    def __init__(self, model: CLAP, tokenizer=None, device: str | torch.device = "cpu",
                 input_rate: int | None = None, quantize: bool = True, batch_size: int = 16):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.sample_rate = input_rate or SAMPLE_RATE  # the rate `embed` takes; resampled to 48 kHz inside
        self.quantize, self.batch_size = quantize, batch_size
        self.dim = JOINT_DIM
        if model.text_branch is None:
            self.modalities = ("audio",)

    def prepare_audio(self, x: np.ndarray) -> np.ndarray:
        """(B, n) at `sample_rate` -> (B, 480000) at 48 kHz, as the network reads it."""
        x = check_waveforms(x, "audio", self.name, allow_empty=True)  # an empty batch gives (0, 512)
        x = resample(x, self.sample_rate, SAMPLE_RATE)
        if self.quantize:
            x = quantize_int16(x)
        return repeat_pad(x, CLIP_SAMPLES)

    @torch.no_grad()
    def embed(self, x: np.ndarray | list[str], modality: Modality = "audio") -> Tensor:
        if modality == "text":
            return self._embed_text(x)
        wave = self.prepare_audio(x)
        rows = []
        for i in range(0, len(wave), self.batch_size):
            batch = torch.from_numpy(wave[i:i + self.batch_size]).to(self.device)  # (b, 480000)
            rows.append(self.model.embed_audio(batch).float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.dim)  # (B, 512)

    def _embed_text(self, texts: list[str]) -> Tensor:
        if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{self.name}: text must be a list of strings, got {type(texts).__name__}")
        if self.model.text_branch is None:
            raise ValueError(f"{self.name}: this checkpoint has no text tower (text_branch.*)")
        if self.tokenizer is None:
            raise WeightsMissing(f"{self.name}: no tokenizer given; text needs {TOKENIZER_HINT}, "
                                 "passed as tokenizer=FOLDER")
        rows = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                    max_length=TEXT_MAX_LENGTH, return_tensors="pt")
            rows.append(self.model.embed_text(tokens["input_ids"].to(self.device),
                                              tokens["attention_mask"].to(self.device)).float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.dim)  # (B, 512)

    def logits(self, x: np.ndarray, modality: Modality = "audio") -> Tensor | None:
        return None


def load(weights: Path | None = None, *, tokenizer: Path | str | None = None, device: str = "cpu",
         input_rate: int | None = None, quantize: bool = True, batch_size: int = 16,
         text_heads: int | None = None) -> CLAPEmbedder:
    """LAION-CLAP from a local non-fusion checkpoint (HTSAT-tiny or -base, read from its shapes).

    `tokenizer`: a local roberta-base tokenizer folder, needed for text only. `input_rate`: the rate of the
    waveforms `embed` will get (default 48 kHz); others are resampled with soxr.
    """
    path = require_weights(weights, "clap", WEIGHTS_HINT, "the clap weights path")
    state = published_keys(read_state_dict(path, "LAION-CLAP"), path)
    model = build_clap(state, text_heads)
    load_strict(model, state, path, "LAION-CLAP")
    tok = None if tokenizer is None else load_tokenizer(tokenizer)
    return CLAPEmbedder(model, tok, device=device, input_rate=input_rate, quantize=quantize,
                        batch_size=batch_size)
