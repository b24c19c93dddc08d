"""1D audio VAE: log-mel (B, n_mels, F) <-> latent tokens (B, Ta, Da), Ta = F / latent_downsample.

A KL-regularised convolutional autoencoder over mel frames, as the paper's audio backbone uses (mel -> 1D VAE
latent -> DiT). The encoder reads the mel through the fixed `normalize` of mel.py, halves time log2(downsample)
times with strided convs, and outputs mean and log-variance per latent channel; the decoder mirrors it with
nearest-neighbour upsampling and returns log-mel. Latents are laid out (B, Ta, Da) because that is what the audio
DiT consumes: one token per latent time step.

Latent scale. `encode` / `decode` work in the VAE's own latent space. The DiT sees `scale_latent(z)` =
(z - latent_shift) * latent_scale, and its samples go back through `unscale_latent` before `decode`. Both are
buffers (saved with the weights) that start at shift 0, scale 1; whoever trains the VAE sets them from data with
`fit_latent_stats` so that the DiT's latents have zero mean and unit variance (the role of Stable Diffusion's
scale factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.codecs.mel import denormalize, normalize
from avlink.seq import AudioGeometry, ClipGeometry

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite early in training


@dataclass
class Posterior:
    """Diagonal Gaussian over latents: mean and logvar (B, Ta, Da)."""

    mean: Tensor
    logvar: Tensor

    def __post_init__(self) -> None:
        assert self.mean.shape == self.logvar.shape, f"{self.mean.shape} != {self.logvar.shape}"
        self.logvar = self.logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per item, summed over latent tokens and channels, (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2))


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ResBlock1D(nn.Module):
    """GroupNorm -> SiLU -> conv3, twice, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, n_mels, F) normalised mel -> (B, 2 * Da, F / downsample): mean and logvar stacked on channels."""

    def __init__(self, n_mels: int, latent_dim: int, levels: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(n_mels, hidden, 3, padding=1)
        layers: list[nn.Module] = []
        for _ in range(levels):
            layers += [ResBlock1D(hidden) for _ in range(depth)]
            layers.append(nn.Conv1d(hidden, hidden, 4, stride=2, padding=1))  # halves time exactly
        layers += [ResBlock1D(hidden) for _ in range(depth)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(hidden), hidden)
        self.conv_out = nn.Conv1d(hidden, 2 * latent_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    """(B, Da, Ta) latent -> (B, n_mels, Ta * downsample) normalised mel."""

    def __init__(self, n_mels: int, latent_dim: int, levels: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(latent_dim, hidden, 3, padding=1)
        layers: list[nn.Module] = [ResBlock1D(hidden) for _ in range(depth)]
        for _ in range(levels):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(hidden, hidden, 3, padding=1)]
            layers += [ResBlock1D(hidden) for _ in range(depth)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(_groups(hidden), hidden)
        self.conv_out = nn.Conv1d(hidden, n_mels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class AudioVAE(nn.Module):
    """mel (B, n_mels, F) -> Posterior over (B, F / downsample, latent_dim) -> mel (B, n_mels, F).

    hidden: channel width of every level; depth: residual blocks per level.
    """

    def __init__(self, geometry: AudioGeometry, hidden: int = 128, depth: int = 2) -> None:
        super().__init__()
        down = geometry.latent_downsample
        assert down >= 1 and down & (down - 1) == 0, f"latent_downsample must be a power of 2, got {down}"
        self.geometry = geometry
        self.n_mels, self.latent_dim, self.downsample = geometry.n_mels, geometry.latent_dim, down
        levels = down.bit_length() - 1
        self.encoder = Encoder(geometry.n_mels, geometry.latent_dim, levels, hidden, depth)
        self.decoder = Decoder(geometry.n_mels, geometry.latent_dim, levels, hidden, depth)
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Each residual block starts as the identity, so depth does not change the scale at init.
        for module in self.modules():
            if isinstance(module, ResBlock1D):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)

    def freeze(self) -> AudioVAE:
        self.requires_grad_(False)
        return self.eval()

    def encode(self, mel: Tensor) -> Posterior:
        assert mel.ndim == 3 and mel.shape[1] == self.n_mels, f"mel must be (B, {self.n_mels}, F), got {mel.shape}"
        assert mel.shape[-1] % self.downsample == 0, (
            f"{mel.shape[-1]} mel frames is not a multiple of the latent stride {self.downsample}; see fit_frames"
        )
        moments = self.encoder(normalize(mel))  # (B, 2 * Da, Ta)
        mean, logvar = moments.transpose(1, 2).chunk(2, dim=-1)  # (B, Ta, Da) each
        return Posterior(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        assert z.ndim == 3 and z.shape[-1] == self.latent_dim, f"z must be (B, Ta, {self.latent_dim}), got {z.shape}"
        return denormalize(self.decoder(z.transpose(1, 2)))  # (B, n_mels, Ta * downsample)

    def forward(self, mel: Tensor, sample: bool | None = None) -> tuple[Tensor, Posterior]:
        """Reconstruction and posterior; samples the latent in training mode, takes the mean in eval mode."""
        posterior = self.encode(mel)
        sample = self.training if sample is None else sample
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior

    # --- the DiT's view of the latents --------------------------------------------------------------------

    def scale_latent(self, z: Tensor) -> Tensor:
        return (z - self.latent_shift) * self.latent_scale

    def unscale_latent(self, z: Tensor) -> Tensor:
        return z / self.latent_scale + self.latent_shift

    @torch.no_grad()
    def fit_latent_stats(self, latents: Tensor) -> None:
        """Set shift and scale so that scale_latent(latents) has mean 0 and standard deviation 1 overall."""
        self.latent_shift.fill_(latents.mean().item())
        self.latent_scale.fill_(1.0 / latents.std().clamp(min=1e-8).item())


@dataclass
class VAELoss:
    total: Tensor
    recon: Tensor  # mean absolute error in log-mel units
    kl: Tensor  # KL per latent element, batch mean


def vae_loss(mel: Tensor, recon: Tensor, posterior: Posterior, kl_weight: float = 1e-4) -> VAELoss:
    """L1 reconstruction in log-mel units plus kl_weight times the mean KL per latent element.

    KL is taken per element (not summed) so that kl_weight does not depend on clip length or latent width.
    """
    assert recon.shape == mel.shape, f"reconstruction {tuple(recon.shape)} != mel {tuple(mel.shape)}"
    rec = (recon - mel).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return VAELoss(total=rec + kl_weight * kl, recon=rec, kl=kl)


def load_vae(path: str, clip: ClipGeometry) -> AudioVAE:
    """A frozen AudioVAE from a .safetensors state dict for the preset's audio geometry.

    The width (`hidden`) and blocks per level (`depth`) come from the file's metadata when it has them, else
    from the tensor shapes; `load_state_dict(strict=True)` then proves the architecture matches.
    """
    from safetensors import safe_open

    from avlink.weights import WeightsError, check_state, read_tensors

    state = read_tensors(Path(path))
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    try:
        hidden = int(meta.get("hidden", state["encoder.conv_in.weight"].shape[0]))
        levels = clip.audio.latent_downsample.bit_length() - 1
        blocks = {k.split(".")[2] for k in state if k.startswith("encoder.blocks.") and k.endswith("conv1.weight")}
        depth = int(meta.get("depth", len(blocks) // (levels + 1)))
        vae = AudioVAE(clip.audio, hidden=hidden, depth=depth)
    except (KeyError, IndexError, ValueError) as err:
        raise WeightsError(f"{path}: does not hold an AudioVAE ({type(err).__name__}: {err})") from None
    check_state(Path(path), state, vae)  # names, shapes (another preset's audio geometry), dtypes, finite
    vae.load_state_dict(state, strict=True)
    return vae.freeze()
