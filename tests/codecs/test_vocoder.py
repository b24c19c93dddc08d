import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from avlink.codecs.mel import MelSpectrogram
from avlink.codecs.vocoder import (
    GriffinLim,
    HiFiGAN,
    HiFiGANConfig,
    Vocoder,
    fold_weight_norm,
    load_hifigan,
    load_vocoder,
    mel_roundtrip_error,
    mel_to_magnitude,
)
from avlink.config import HIFIGAN_AUDIO, PAPER_AUDIO
from avlink.errors import UserError

TINY = HiFiGANConfig(upsample_rates=(4, 4), upsample_kernel_sizes=(8, 8), upsample_initial_channel=16,
                     resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3), (1, 3)), num_mels=80,
                     hop_size=16)


def sounds(sr: int, seconds: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Thuds (decaying low sine bursts), a clang (inharmonic partials), beeps, decaying noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(sr * seconds)
    t = torch.arange(n) / sr

    def env(start: float, tau: float) -> torch.Tensor:
        return torch.where(t >= start, torch.exp(-(t - start).clamp(min=0) / tau), torch.zeros(()))

    thud = sum(0.8 * env(s, 0.08) * torch.sin(2 * math.pi * f * (t - s)) for s, f in ((0.1, 70), (0.55, 95)))
    clang = sum(0.25 * env(0.2, 0.3) * torch.sin(2 * math.pi * f * t) for f in (523, 1187, 2011, 3371, 4709))
    gate = ((t > 0.15) & (t < 0.4)) | ((t > 0.6) & (t < 0.85))
    beep = 0.5 * gate * torch.sin(2 * math.pi * 880 * t)
    noise = 0.3 * torch.randn(n, generator=g) * env(0.05, 0.4)
    return {"thud": thud, "clang": clang, "beep": beep, "noise": noise}


def _batch(sr: int) -> torch.Tensor:
    return torch.stack(list(sounds(sr).values()))  # (4, sr)


@pytest.fixture(scope="module")
def universal() -> HiFiGAN:
    return load_hifigan()


def _weight_norm_state(model: HiFiGAN) -> dict[str, torch.Tensor]:
    """The model's weights in the original checkpoint layout: weight -> (weight_g, weight_v) with random g."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".weight"):
            stem = key[: -len(".weight")]
            g = torch.rand(value.shape[0], *([1] * (value.ndim - 1))) + 0.5
            state[f"{stem}.weight_g"], state[f"{stem}.weight_v"] = g, value * 3.0
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 5), nn.ConvTranspose1d(6, 4, 8, 4)])
def test_fold_weight_norm_matches_torch_weight_norm(conv: nn.Module) -> None:
    wn = nn.utils.parametrizations.weight_norm(conv)
    g = wn.parametrizations.weight.original0.detach()
    v = wn.parametrizations.weight.original1.detach()
    g.mul_(torch.linspace(0.5, 2.0, g.numel()).reshape(g.shape))
    folded = fold_weight_norm({"c.weight_g": g, "c.weight_v": v, "c.bias": torch.zeros(1)})
    assert set(folded) == {"c.weight", "c.bias"}
    torch.testing.assert_close(folded["c.weight"], wn.weight.detach())


def test_universal_loads_frozen(universal: HiFiGAN) -> None:
    assert universal.sample_rate == 22050 and universal.hop_length == 256
    assert not universal.training
    assert all(not p.requires_grad for p in universal.parameters())
    assert sum(p.numel() for p in universal.parameters()) == 13_926_017  # HiFi-GAN V1, 13.9M
    assert isinstance(universal, Vocoder)
    wave = universal(torch.full((2, 80, 7), -6.0))
    assert wave.shape == (2, 7 * 256) and wave.abs().max() <= 1.0 and not wave.requires_grad


def test_universal_round_trip(universal: HiFiGAN) -> None:
    """Thresholds sit ~25% above the measured errors (0.65 log-mel, 2.55 dB mean); untrained weights fail."""
    mel_fn = MelSpectrogram(HIFIGAN_AUDIO)
    wave = _batch(22050)
    err = mel_roundtrip_error(universal, mel_fn, wave)
    print("hifigan-universal round trip, log-mel:", err.log_mel.tolist(), "dB:", err.db.tolist())
    assert err.log_mel.mean() < 0.8 and err.db.mean() < 3.2
    untrained = HiFiGAN()
    bad = mel_roundtrip_error(untrained, mel_fn, wave[:1, :5000])
    assert bad.db.mean() > 10.0


@pytest.mark.parametrize("geometry", [HIFIGAN_AUDIO, PAPER_AUDIO], ids=["hifigan", "paper"])
def test_griffin_lim_round_trip(geometry) -> None:
    mel_fn = MelSpectrogram(geometry)
    vocoder = load_vocoder("griffin-lim", geometry)
    assert isinstance(vocoder, GriffinLim) and isinstance(vocoder, Vocoder)
    wave = _batch(geometry.sample_rate)
    out = vocoder(mel_fn(wave))
    assert out.shape == (4, mel_fn.num_frames(wave.shape[1]) * geometry.hop_length)
    torch.testing.assert_close(vocoder(mel_fn(wave)), out)  # deterministic
    err = mel_roundtrip_error(vocoder, mel_fn, wave)
    print(f"griffin-lim {geometry.sample_rate} Hz round trip, log-mel:", err.log_mel.tolist(), "dB:", err.db.tolist())
    assert err.log_mel.mean() < 0.35 and err.db.mean() < 1.5
    # The phase matters: the same magnitudes with the initial random phase are far worse.
    vocoder.n_iter = 0
    assert mel_roundtrip_error(vocoder, mel_fn, wave).db.mean() > err.db.mean() + 1.0


def test_mel_to_magnitude_is_nonnegative_and_fits() -> None:
    mel_fn = MelSpectrogram(HIFIGAN_AUDIO)
    from avlink.codecs.mel import stft

    spec = stft(_batch(22050)[:, :8000], HIFIGAN_AUDIO, mel_fn.window).abs()
    target = mel_fn.mel_basis @ spec
    magnitude = mel_to_magnitude(target, mel_fn.mel_basis)
    assert magnitude.min() >= 0
    rel = (mel_fn.mel_basis @ magnitude - target).norm() / target.norm()
    pinv = (torch.linalg.pinv(mel_fn.mel_basis) @ target).clamp(min=0)
    rel_pinv = (mel_fn.mel_basis @ pinv - target).norm() / target.norm()
    assert rel < 0.05 and rel < rel_pinv


def _save_checkpoint(folder: Path, config: HiFiGANConfig, state: dict[str, torch.Tensor],
                     with_config: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "g_00100000"
    torch.save({"generator": state}, path)
    if with_config:
        raw = {k: getattr(config, k) for k in ("resblock", "upsample_rates", "upsample_kernel_sizes",
                                               "upsample_initial_channel", "resblock_kernel_sizes",
                                               "resblock_dilation_sizes", "num_mels", "sampling_rate", "n_fft",
                                               "hop_size", "win_size", "fmin", "fmax")}
        (folder / "config.json").write_text(json.dumps({**raw, "batch_size": 16}))
    return path


@pytest.mark.parametrize("resblock", ["1", "2"])
def test_user_checkpoint_loads_with_its_config(tmp_path: Path, resblock: str) -> None:
    config = dataclasses.replace(TINY, resblock=resblock)
    source = HiFiGAN(config)
    state = _weight_norm_state(source)
    path = _save_checkpoint(tmp_path, config, state)
    loaded = load_hifigan(path)
    assert loaded.config == config and loaded.hop_length == 16
    mel = torch.randn(1, 80, 9) - 5
    # g is random and v the source weight x3: what loads must be g * v / |v|, i.e. the source weight rescaled
    # to norm g per output channel.
    for key, value in source.state_dict().items():
        if key.endswith(".weight"):
            g = state[key.replace(".weight", ".weight_g")]
            norm = value.flatten(1).norm(dim=1).reshape(g.shape)
            value.mul_(g / norm)
    torch.testing.assert_close(loaded(mel), source(mel))
    assert loaded(mel).shape == (1, 9 * 16)


def test_load_vocoder_refusals(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such vocoder"):
        load_vocoder(tmp_path / "missing.pt", HIFIGAN_AUDIO)
    with pytest.raises(UserError, match=r"hifigan-universal: .*sample_rate 22050 != 16000"):
        load_vocoder("hifigan-universal", PAPER_AUDIO)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt: cannot read"):
        load_vocoder(garbage, HIFIGAN_AUDIO)
    # A file that pickles a class: refused in one line that names the file and the class, with no advice to
    # turn weights_only off.
    malicious = tmp_path / "malicious.pt"
    torch.save({"generator": argparse.Namespace(run="code")}, malicious)
    with pytest.raises(UserError) as err:
        load_vocoder(malicious, HIFIGAN_AUDIO)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{malicious}:") and "argparse.Namespace" in text
    assert "weights_only=False" not in text
    # A tiny checkpoint without config.json is read as V1 and does not fit.
    path = _save_checkpoint(tmp_path / "noconf", TINY, _weight_norm_state(HiFiGAN(TINY)), with_config=False)
    with pytest.raises(UserError, match="not a HiFi-GAN generator matching the V1 config"):
        load_vocoder(path, HIFIGAN_AUDIO)
    # With its config it loads, but its hop does not fit the preset's analysis.
    path = _save_checkpoint(tmp_path / "conf", TINY, _weight_norm_state(HiFiGAN(TINY)))
    with pytest.raises(UserError, match="hop_length 16 != 256"):
        load_vocoder(path, HIFIGAN_AUDIO)


def test_load_vocoder_universal_name(universal: HiFiGAN) -> None:
    vocoder = load_vocoder("hifigan-universal", HIFIGAN_AUDIO)
    assert isinstance(vocoder, HiFiGAN)
    mel = torch.randn(1, 80, 4) - 5
    torch.testing.assert_close(vocoder(mel), universal(mel))


def test_short_names_load_the_same_vocoders():
    from avlink.codecs.vocoder import GriffinLim, load_vocoder
    from avlink.config import get_preset

    audio = get_preset("tiny").clip.audio
    assert isinstance(load_vocoder("griffinlim", audio), GriffinLim)
    assert type(load_vocoder("hifigan", audio)) is type(load_vocoder("hifigan-universal", audio))
