"""VGGish (Hershey et al., 2017), the audio embedder of FAD and of FD-VGG in the video-to-audio literature.

Written from the published definition (tensorflow/models research/audioset/vggish: `vggish_slim.py`,
`vggish_input.py`, `mel_features.py`, `vggish_params.py`) so that the PyTorch port's weight file
`vggish-10086976.pth` (harritaylor/torchvggish, release v0.1) loads strictly by its own key names:
`features.{0,3,6,8,11,13}.*` (3x3 convs) and `embeddings.{0,2,4}.*` (fully connected).

Input path (constants from vggish_params.py, algorithm from mel_features.py):
- 16 kHz mono (SAMPLE_RATE); other rates are resampled with soxr (the reference uses resampy);
- frames of 25 ms = 400 samples every 10 ms = 160 samples, no padding, periodic Hann window, |rfft|
  zero-padded to 512 points (the next power of two): a magnitude spectrogram, not power;
- 64 mel bands between 125 and 7500 Hz, triangles linear in HTK mel (1127 ln(1 + f / 700)), unnormalised,
  with the DC bin left out; log(mel + 0.01);
- examples of 96 frames (0.96 s) every 96 frames; a trailing partial example is dropped.
The front end runs in float64 on the CPU, as the reference does in numpy; the network in float32.

Network: conv64-pool-conv128-pool-conv256x2-pool-conv512x2-pool (3x3 convs with ReLU, 2x2 max pools), the
(6, 4, 512) map flattened in TensorFlow's (height, width, channel) order, fc 4096-4096-128.
- Final activation: the TensorFlow definition returns the 128-d layer before any activation
  ("pre-activation values"), and so do audioldm_eval and av-benchmark, whose FD-VGG the V2A papers report.
  The PyTorch port adds a ReLU there; `final_relu=True` reproduces the port.
- Postprocess (optional, `pca=` the port's `vggish_pca_params-970ea276.pth` or Google's
  `vggish_pca_params.npz`): PCA with whitening, clip to [-2, 2], quantise to 0..255, as in the AudioSet
  release. FAD tooling leaves it off, so it is off unless a PCA file is given.

Per clip: `embed` returns the mean of the clip's per-example embeddings, (B, 128); `embed_examples` returns
them all, (B, E, 128), for FD over examples as av-benchmark computes it. A clip shorter than one example
(0.975 s) is right-padded with silence to one example. VGGish has no classifier, so `logits` returns None.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avlink.errors import UserError
from avlink.eval.embed.common import check_waveforms, load_strict, pad_to, resample
from avlink.eval.embedders import Modality, require_weights
from avlink.weights import read_weights

# vggish_params.py
SAMPLE_RATE = 16_000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_WINDOW_SECONDS = 0.96
EXAMPLE_HOP_SECONDS = 0.96
EMBEDDING_SIZE = 128
QUANTIZE_MIN_VAL = -2.0
QUANTIZE_MAX_VAL = 2.0
PCA_EIGEN_VECTORS_NAME = "pca_eigen_vectors"
PCA_MEANS_NAME = "pca_means"

# derived as mel_features.log_mel_spectrogram / vggish_input.waveform_to_examples derive them
WINDOW_LENGTH = round(SAMPLE_RATE * STFT_WINDOW_SECONDS)  # 400 samples
HOP_LENGTH = round(SAMPLE_RATE * STFT_HOP_SECONDS)  # 160 samples
FFT_LENGTH = 2 ** math.ceil(math.log2(WINDOW_LENGTH))  # 512
EXAMPLE_FRAMES = round(EXAMPLE_WINDOW_SECONDS / STFT_HOP_SECONDS)  # 96
EXAMPLE_HOP_FRAMES = round(EXAMPLE_HOP_SECONDS / STFT_HOP_SECONDS)  # 96
MIN_SAMPLES = WINDOW_LENGTH + (EXAMPLE_FRAMES - 1) * HOP_LENGTH  # 15,600: exactly one example

CONV_PLAN: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
HIDDEN = 4096
WEIGHTS_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
WEIGHTS_FILE = "vggish-10086976.pth"
PCA_FILE = "vggish_pca_params-970ea276.pth"


# ---------------------------------------------------------------- front end (mel_features.py)


def hertz_to_mel(hz: Tensor | float) -> Tensor:
    """HTK mel scale."""
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_matrix(num_bins: int = FFT_LENGTH // 2 + 1, sample_rate: int = SAMPLE_RATE,
               num_bands: int = NUM_BANDS, low_hz: float = MEL_MIN_HZ, high_hz: float = MEL_MAX_HZ) -> Tensor:
    """(num_bins, num_bands) float64 weights: spectrogram rows @ matrix -> mel rows.

    Band i rises from edge i to edge i + 1 and falls to edge i + 2, linearly in mel (not in Hz, unlike
    librosa's filters); peaks are 1 (no area normalisation); the DC bin gets no weight, as in HTK.
    """
    bins_mel = hertz_to_mel(torch.linspace(0.0, sample_rate / 2, num_bins, dtype=torch.float64))[:, None]
    edges = torch.linspace(hertz_to_mel(low_hz).item(), hertz_to_mel(high_hz).item(), num_bands + 2,
                           dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]  # (num_bands,) each
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = torch.minimum(rising, falling).clamp(min=0.0)  # (num_bins, num_bands)
    weights[0] = 0.0
    return weights


def log_mel(wave: Tensor) -> Tensor:
    """(B, n) float64 at 16 kHz -> (B, F, 64) log mel, F = 1 + (n - 400) // 160 frames."""
    assert wave.ndim == 2 and wave.shape[-1] >= WINDOW_LENGTH, f"need (B, n >= 400), got {tuple(wave.shape)}"
    frames = wave.unfold(-1, WINDOW_LENGTH, HOP_LENGTH)  # (B, F, 400), no padding
    window = torch.hann_window(WINDOW_LENGTH, periodic=True, dtype=wave.dtype, device=wave.device)
    spectrum = torch.fft.rfft(frames * window, n=FFT_LENGTH).abs()  # (B, F, 257), zero-padded at the end
    mel = spectrum @ mel_matrix().to(spectrum)  # (B, F, 64)
    return torch.log(mel + LOG_OFFSET)


def to_examples(mel: Tensor) -> Tensor:
    """(B, F, 64) -> (B, E, 96, 64) non-overlapping 0.96 s examples, E = 1 + (F - 96) // 96."""
    assert mel.shape[1] >= EXAMPLE_FRAMES, f"{mel.shape[1]} frames, fewer than one example ({EXAMPLE_FRAMES})"
    return mel.unfold(1, EXAMPLE_FRAMES, EXAMPLE_HOP_FRAMES).transpose(-1, -2)  # unfold puts the window last


def waveform_to_examples(wave: Tensor) -> Tensor:
    """(B, n) at 16 kHz -> (B, E, 96, 64) float32 examples; shorter clips are padded to one example."""
    wave = pad_to(wave.detach().to("cpu", torch.float64), MIN_SAMPLES)
    return to_examples(log_mel(wave)).float()


# ---------------------------------------------------------------- the network (vggish_slim.py)


def conv_stack(width: float = 1.0) -> nn.Sequential:
    """The VGG trunk; Sequential indices are the published key names (convs at 0, 3, 6, 8, 11, 13)."""
    layers: list[nn.Module] = []
    in_channels = 1
    for item in CONV_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_channels = max(1, round(int(item) * width))
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = out_channels
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """(N, 1, 96, 64) log-mel examples -> (N, 128) embeddings.

    `width` scales the conv channels and the 4096-wide hidden layers (1 = the published network; small values
    build tiny test instances with the same key names). The embedding stays 128-d.
    """

    def __init__(self, width: float = 1.0, final_relu: bool = False):
        super().__init__()
        self.features = conv_stack(width)
        channels = self.features[-3].out_channels  # the last conv
        hidden = max(1, round(HIDDEN * width))
        # 96 x 64 after four 2x2 pools: 6 x 4
        flat = channels * (EXAMPLE_FRAMES // 16) * (NUM_BANDS // 16)
        head: list[nn.Module] = [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, EMBEDDING_SIZE)]
        self.embeddings = nn.Sequential(*head, *([nn.ReLU()] if final_relu else []))

    def forward(self, x: Tensor) -> Tensor:
        assert x.ndim == 4 and x.shape[1:] == (1, EXAMPLE_FRAMES, NUM_BANDS), \
            f"expected (N, 1, {EXAMPLE_FRAMES}, {NUM_BANDS}) examples, got {tuple(x.shape)}"
        x = self.features(x)  # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).flatten(1)  # (N, 6 * 4 * 512) in TensorFlow's NHWC order, as trained
        return self.embeddings(x)  # (N, 128)


def postprocess(embedding: Tensor, eigen_vectors: Tensor, means: Tensor) -> Tensor:
    """(N, 128) -> (N, 128) in 0..255: PCA (with whitening), clip to [-2, 2], 8-bit quantisation."""
    pca = (embedding - means) @ eigen_vectors.T  # (N, 128)
    clipped = pca.clamp(QUANTIZE_MIN_VAL, QUANTIZE_MAX_VAL)
    return torch.round((clipped - QUANTIZE_MIN_VAL) * (255.0 / (QUANTIZE_MAX_VAL - QUANTIZE_MIN_VAL)))


def read_pca(path: Path) -> tuple[Tensor, Tensor]:
    """(eigen_vectors (128, 128), means (128,)) from the port's .pth or Google's .npz."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as raw:
                params = {k: raw[k] for k in raw.files}
        except Exception as err:  # any unreadable file: one line naming it
            raise UserError(f"{path}: cannot read as VGGish PCA parameters ({type(err).__name__})") from None
    else:
        params = read_weights(path, "VGGish PCA")
    if not isinstance(params, dict) or not {PCA_EIGEN_VECTORS_NAME, PCA_MEANS_NAME} <= set(params):
        raise UserError(f"{path}: holds no VGGish PCA parameters "
                        f"({PCA_EIGEN_VECTORS_NAME}, {PCA_MEANS_NAME})")
    vectors = torch.as_tensor(np.asarray(params[PCA_EIGEN_VECTORS_NAME]), dtype=torch.float32)
    means = torch.as_tensor(np.asarray(params[PCA_MEANS_NAME]), dtype=torch.float32).reshape(-1)
    if vectors.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or means.shape != (EMBEDDING_SIZE,):
        raise UserError(f"{path}: PCA shapes {tuple(vectors.shape)} / {tuple(means.shape)}, "
                        f"expected ({EMBEDDING_SIZE}, {EMBEDDING_SIZE}) / ({EMBEDDING_SIZE},)")
    return vectors, means


# ---------------------------------------------------------------- the embedder


class VGGishEmbedder:
    """FAD / FD-VGG audio embeddings; `rate=` resamples inputs given at another rate."""

    name = "vggish"
    modalities: tuple[Modality, ...] = ("audio",)
    sample_rate = SAMPLE_RATE
    fps = None

    def __init__(self, model: VGGish, pca: tuple[Tensor, Tensor] | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64):
        assert batch_size > 0, f"batch_size must be > 0, got {batch_size}"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.pca = None if pca is None else tuple(t.to(self.device) for t in pca)
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_examples(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None) -> Tensor:
        """(B, n) waveforms -> (B, E, 128) float32, one row per 0.96 s example."""
        waves = resample(check_waveforms(x, modality, self.name), rate, self.sample_rate)
        examples = waveform_to_examples(torch.from_numpy(waves))  # (B, E, 96, 64)
        b, e = examples.shape[:2]
        flat = examples.reshape(b * e, 1, EXAMPLE_FRAMES, NUM_BANDS)
        out = []
        for start in range(0, len(flat), self.batch_size):
            emb = self.model(flat[start:start + self.batch_size].to(self.device))
            out.append((emb if self.pca is None else postprocess(emb, *self.pca)).float().cpu())
        return torch.cat(out).reshape(b, e, EMBEDDING_SIZE)

    def embed(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None) -> Tensor:
        """(B, n) waveforms -> (B, 128): the mean over each clip's examples."""
        return self.embed_examples(x, modality, rate).mean(dim=1)

    def logits(self, x: np.ndarray, modality: Modality = "audio", rate: int | None = None) -> Tensor | None:
        return None  # VGGish is published without its classifier


def load(weights: Path | None = None, *, pca: Path | None = None, final_relu: bool = False,
         device: str | torch.device = "cpu", batch_size: int = 64, width: float = 1.0) -> VGGishEmbedder:
    """VGGish from the port's weight file; with `pca` the published PCA + quantisation postprocess."""
    path = require_weights(weights, "vggish", f"{WEIGHTS_FILE} ({WEIGHTS_URL}{WEIGHTS_FILE})",
                           "the vggish weights path")
    pca_params = None
    if pca is not None:
        expected = f"{PCA_FILE} ({WEIGHTS_URL}{PCA_FILE})"
        pca_path = require_weights(Path(pca), "vggish PCA", expected, "pca=PATH")
        pca_params = read_pca(pca_path)
    state = read_weights(path, "VGGish")
    with torch.device("meta"):  # the file's tensors take the place of these
        model = VGGish(width=width, final_relu=final_relu)
    load_strict(model, state, path, "VGGish")
    return VGGishEmbedder(model, pca=pca_params, device=device, batch_size=batch_size)
