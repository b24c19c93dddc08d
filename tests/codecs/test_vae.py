import dataclasses

import pytest
import torch

from avlink.codecs.mel import MelSpectrogram, fit_frames
from avlink.codecs.vae import AudioVAE, Posterior, vae_loss
from avlink.config import get_preset
from avlink.seq import AudioGeometry

PRESETS = ["tiny", "paper"]


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_follow_the_geometry(preset: str) -> None:
    clip = get_preset(preset).clip
    geo = clip.audio
    vae = AudioVAE(geo, hidden=32, depth=1)
    mel = torch.randn(2, geo.n_mels, clip.num_mel_frames) - 5
    posterior = vae.encode(mel)
    assert posterior.mean.shape == posterior.logvar.shape == (2, *clip.latent_shape)
    z = posterior.sample()
    assert vae.decode(z).shape == mel.shape
    recon, post = vae(mel)
    assert recon.shape == mel.shape and post.kl().shape == (2,)


@pytest.mark.parametrize("downsample", [1, 2, 8])
def test_any_power_of_two_stride(downsample: int) -> None:
    geo = AudioGeometry(n_mels=16, latent_downsample=downsample, latent_dim=3)
    vae = AudioVAE(geo, hidden=16, depth=1)
    posterior = vae.encode(torch.randn(1, 16, 8 * downsample))
    assert posterior.mean.shape == (1, 8, 3)
    assert vae.decode(posterior.mode()).shape == (1, 16, 8 * downsample)


def test_refuses_bad_stride_and_frame_count() -> None:
    with pytest.raises(AssertionError, match="power of 2"):
        AudioVAE(AudioGeometry(latent_downsample=3))
    vae = AudioVAE(AudioGeometry(n_mels=16), hidden=16, depth=1)
    with pytest.raises(AssertionError, match="not a multiple of the latent stride 4"):
        vae.encode(torch.randn(1, 16, 10))


def test_kl_is_nonnegative_and_zero_only_at_the_prior() -> None:
    g = torch.Generator().manual_seed(0)
    post = Posterior(torch.randn(3, 5, 4, generator=g) * 2, torch.randn(3, 5, 4, generator=g) * 3)
    assert torch.all(post.kl() > 0)
    prior = Posterior(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4))
    assert torch.equal(prior.kl(), torch.zeros(2))
    # One item with unit variance and mean 1 in every one of 20 entries: KL = 20 * 0.5.
    assert Posterior(torch.ones(1, 5, 4), torch.zeros(1, 5, 4)).kl().item() == pytest.approx(10.0)


def test_sample_uses_the_generator_and_mode_is_the_mean() -> None:
    post = Posterior(torch.randn(2, 4, 3), torch.full((2, 4, 3), -2.0))
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert torch.equal(post.mode(), post.mean)
    many = Posterior(torch.zeros(1, 4000, 1), torch.full((1, 4000, 1), 2 * torch.log(torch.tensor(0.5))))
    assert many.sample(torch.Generator().manual_seed(0)).std().item() == pytest.approx(0.5, rel=0.05)


def test_latent_scale_round_trip_and_is_saved() -> None:
    vae = AudioVAE(AudioGeometry(n_mels=16), hidden=16, depth=1)
    z = torch.randn(4, 10, 8) * 3 + 1
    assert torch.equal(vae.scale_latent(z), z)  # identity until fitted
    vae.fit_latent_stats(z)
    scaled = vae.scale_latent(z)
    assert scaled.mean().abs() < 1e-5 and scaled.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(vae.unscale_latent(scaled), z)
    state = vae.state_dict()
    assert "latent_scale" in state and "latent_shift" in state
    fresh = AudioVAE(AudioGeometry(n_mels=16), hidden=16, depth=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.scale_latent(z), scaled)


def test_freeze() -> None:
    vae = AudioVAE(AudioGeometry(n_mels=16), hidden=16, depth=1).freeze()
    assert not vae.training and all(not p.requires_grad for p in vae.parameters())


def _mels() -> torch.Tensor:
    """Four 32-frame log-mels of the synthetic test sounds (thud, clang, beep, noise), 80 mels at 22,050 Hz."""
    geo = get_preset("tiny").clip.audio
    g = torch.Generator().manual_seed(0)
    t = torch.arange(8192) / geo.sample_rate
    env = torch.exp(-t / 0.1)
    waves = torch.stack([
        0.8 * env * torch.sin(2 * torch.pi * 80 * t),
        0.2 * env * sum(torch.sin(2 * torch.pi * f * t) for f in (523, 1187, 2011, 3371)),
        0.5 * (t % 0.1 < 0.05) * torch.sin(2 * torch.pi * 880 * t),
        0.3 * torch.randn(8192, generator=g) * env,
    ])
    return fit_frames(MelSpectrogram(geo)(waves), 32)


def test_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    geo = get_preset("tiny").clip.audio
    mel = _mels()
    vae = AudioVAE(geo, hidden=64, depth=1)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    with torch.no_grad():
        before = vae_loss(mel, *vae.eval()(mel))
    vae.train()
    for _ in range(200):
        loss = vae_loss(mel, *vae(mel), kl_weight=1e-4)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    with torch.no_grad():
        after = vae_loss(mel, *vae.eval()(mel))
        # The latent carries the content: decoding another item's latent is far off.
        z = vae.encode(mel).mode()
        swapped = (vae.decode(z.roll(1, dims=0)) - mel).abs().mean()
    assert after.recon < 0.1 * before.recon, f"recon {before.recon:.3f} -> {after.recon:.3f}"
    assert swapped > 5 * after.recon
    assert after.kl >= 0 and torch.isfinite(after.total)


def test_kl_weight_pulls_the_posterior_to_the_prior() -> None:
    geo = dataclasses.replace(get_preset("tiny").clip.audio, latent_dim=4)
    mel = _mels()
    kls = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        vae = AudioVAE(geo, hidden=32, depth=1)
        opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
        for _ in range(60):
            loss = vae_loss(mel, *vae(mel), kl_weight=weight)
            opt.zero_grad()
            loss.total.backward()
            opt.step()
        kls.append(vae_loss(mel, *vae(mel), kl_weight=weight).kl.item())
    assert kls[1] < 0.5 * kls[0], kls
