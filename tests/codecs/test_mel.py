import librosa
import numpy as np
import pytest
import torch

from avlink.codecs.mel import (
    LOG_FLOOR,
    MelSpectrogram,
    denormalize,
    fit_frames,
    istft,
    normalize,
    stft,
    stft_padding,
)
from avlink.config import HIFIGAN_AUDIO, PAPER_AUDIO
from avlink.seq import AudioGeometry

GEOMETRIES = {"hifigan": HIFIGAN_AUDIO, "paper": PAPER_AUDIO}


def _wave(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    tone = torch.sin(2 * torch.pi * 440 * t) * torch.linspace(0, 1, n)
    return 0.3 * torch.randn(batch, n, generator=g) + tone


@pytest.mark.parametrize("name", GEOMETRIES)
def test_matches_librosa_melspectrogram(name: str) -> None:
    geo = GEOMETRIES[name]
    wave = _wave(2, 6000)
    ours = MelSpectrogram(geo).magnitude_mel(wave)
    left, right = stft_padding(geo)
    padded = np.pad(wave.numpy().astype(np.float64), ((0, 0), (left, right)), mode="reflect")
    ref = librosa.feature.melspectrogram(
        y=padded, sr=geo.sample_rate, n_fft=geo.n_fft, hop_length=geo.hop_length, win_length=geo.win_length,
        window="hann", center=False, power=1.0, n_mels=geo.n_mels, fmin=geo.f_min, fmax=geo.f_max,
    )
    ref = torch.from_numpy(ref).float()
    assert ours.shape == ref.shape == (2, geo.n_mels, 6000 // geo.hop_length)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_log_is_clamped_magnitude_and_silence_is_the_floor() -> None:
    mel_fn = MelSpectrogram(HIFIGAN_AUDIO)
    wave = _wave(1, 4000)
    torch.testing.assert_close(mel_fn(wave), mel_fn.magnitude_mel(wave).clamp(min=1e-5).log())
    silent = mel_fn(torch.zeros(1, 4000))
    assert torch.all(silent == LOG_FLOOR)


@pytest.mark.parametrize("hop", [256, 255, 160])
@pytest.mark.parametrize("n", [256, 1000, 22050])
def test_frame_count_is_samples_over_hop(hop: int, n: int) -> None:
    geo = AudioGeometry(hop_length=hop)
    mel_fn = MelSpectrogram(geo)
    if n < hop:
        pytest.skip("shorter than one hop")
    assert mel_fn(torch.randn(1, n)).shape[-1] == mel_fn.num_frames(n) == n // hop


def test_frame_k_covers_samples_of_hop_k() -> None:
    """A click in the middle of hop k is loudest in frame k (the alignment the vocoders rely on)."""
    geo = HIFIGAN_AUDIO
    mel_fn = MelSpectrogram(geo)
    for k in (3, 10, 17):
        wave = torch.zeros(1, 20 * geo.hop_length)
        wave[0, k * geo.hop_length + geo.hop_length // 2] = 1.0
        energy = mel_fn.magnitude_mel(wave).sum(dim=1)[0]
        assert energy.argmax().item() == k, f"click in hop {k} peaks in frame {energy.argmax().item()}"


def test_short_wave_is_refused() -> None:
    with pytest.raises(AssertionError, match="shorter than one hop"):
        MelSpectrogram(HIFIGAN_AUDIO)(torch.zeros(1, 100))


def test_fit_frames_crops_and_pads_with_the_floor() -> None:
    mel = torch.randn(2, 80, 10)
    assert torch.equal(fit_frames(mel, 6), mel[..., :6])
    padded = fit_frames(mel, 13)
    assert padded.shape == (2, 80, 13)
    assert torch.equal(padded[..., :10], mel)
    assert torch.all(padded[..., 10:] == LOG_FLOOR)
    assert torch.equal(fit_frames(mel, 10), mel)


def test_normalize_maps_floor_to_minus_one_and_inverts() -> None:
    assert normalize(torch.tensor(LOG_FLOOR)).item() == pytest.approx(-1.0)
    mel = MelSpectrogram(HIFIGAN_AUDIO)(_wave(1, 4000))
    x = normalize(mel)
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0
    torch.testing.assert_close(denormalize(x), mel)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_istft_inverts_stft(name: str) -> None:
    geo = GEOMETRIES[name]
    window = torch.hann_window(geo.win_length)
    wave = _wave(2, 30 * geo.hop_length)
    back = istft(stft(wave, geo, window), geo, window)
    assert back.shape == wave.shape
    torch.testing.assert_close(back, wave, atol=1e-5, rtol=0)


def test_frozen() -> None:
    mel_fn = MelSpectrogram(PAPER_AUDIO)
    assert not mel_fn.training
    assert all(not b.requires_grad for b in mel_fn.buffers())
