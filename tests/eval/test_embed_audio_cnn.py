"""VGGish and PANNs CNN14 embedders on tiny random-weight instances saved in the published key layouts.

The real weight files are not needed: the networks are built at a fraction of their width, saved as the
published files are laid out, and loaded back through `load(weights=path)`. Full-size layouts are checked on
the meta device. The front ends are checked against independent computations (librosa STFT / filters).
"""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from avlink.errors import UserError
from avlink.eval.embed import panns, vggish
from avlink.eval.embedders import Embedder, WeightsMissing, load_embedder

VGG_WIDTH = 1 / 16  # convs 4..32 channels, hidden 256
CNN_WIDTH = 1 / 32  # convs 2..64 channels, embedding 64


def tone_and_noise(seconds: float, rate: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    """(batch, n) float32: a different tone per clip over white noise, well inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    clips = [0.3 * np.sin(2 * np.pi * (220 + 330 * i) * t) + 0.05 * rng.standard_normal(t.shape)
             for i in range(batch)]
    return np.stack(clips).astype(np.float32)


def numpy_sampler_state() -> dict:
    """What the released PANNs checkpoints carry beside the model: the training sampler, as numpy arrays."""
    return {"indexes_per_class": [np.arange(5), np.arange(3)], "queue": [np.int64(3), 4],
            "pointers_of_classes": [0, 0]}


# ---------------------------------------------------------------- VGGish


@pytest.fixture(scope="module")
def vggish_file(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    model = vggish.VGGish(width=VGG_WIDTH)
    path = tmp_path_factory.mktemp("vggish") / vggish.WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path, model


def test_vggish_full_size_layout_is_the_published_one():
    with torch.device("meta"):
        model = vggish.VGGish()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    convs = {0: (64, 1), 3: (128, 64), 6: (256, 128), 8: (256, 256), 11: (512, 256), 13: (512, 512)}
    expected = {}
    for i, (c_out, c_in) in convs.items():
        expected |= {f"features.{i}.weight": (c_out, c_in, 3, 3), f"features.{i}.bias": (c_out,)}
    for i, (d_out, d_in) in {0: (4096, 12288), 2: (4096, 4096), 4: (128, 4096)}.items():
        expected |= {f"embeddings.{i}.weight": (d_out, d_in), f"embeddings.{i}.bias": (d_out,)}
    assert shapes == expected
    assert model(torch.empty(3, 1, 96, 64, device="meta")).shape == (3, 128)


def test_vggish_flattens_in_tensorflow_order():
    """The fc weights were trained on a (height = time, width = mel, channel) flattening of the last map."""

    class KnownMap(torch.nn.Module):
        def forward(self, x):  # (N, C, 6, 4) whose value at (c, h, w) is c + 1000 h + 100 w
            c, h, w = torch.meshgrid(torch.arange(8.0), torch.arange(6.0), torch.arange(4.0), indexing="ij")
            return (c + 1000 * h + 100 * w).expand(len(x), -1, -1, -1)

    model = vggish.VGGish(width=VGG_WIDTH)
    model.features, model.embeddings = KnownMap(), torch.nn.Identity()
    flat = model(torch.zeros(1, 1, 96, 64))[0]
    for c, h, w in [(0, 0, 1), (3, 2, 1), (7, 5, 3)]:
        assert flat[(h * 4 + w) * 8 + c] == c + 1000 * h + 100 * w


def test_vggish_log_mel_matches_an_independent_computation():
    """librosa STFT (400-sample periodic Hann, framed so that it sees the same samples) + mel triangles
    evaluated band by band from the published definition."""
    y = tone_and_noise(2.5, vggish.SAMPLE_RATE, batch=1)[0].astype(np.float64)
    ours = vggish.log_mel(torch.from_numpy(y)[None])[0].numpy()  # (F, 64)
    # librosa centres the 400-sample window in the 512-point frame; 56 samples of padding line the frames up
    pad = (512 - 400) // 2
    magnitude = np.abs(librosa.stft(np.pad(y, (pad, pad)), n_fft=512, hop_length=160, win_length=400,
                                    window="hann", center=False))  # (257, F)

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    bins, edges = mel(np.linspace(0, 8000, 257)), np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.zeros((257, 64))
    for k in range(1, 257):  # the DC bin stays 0
        for m in range(64):
            up = (bins[k] - edges[m]) / (edges[m + 1] - edges[m])
            down = (edges[m + 2] - bins[k]) / (edges[m + 2] - edges[m + 1])
            weights[k, m] = max(0.0, min(up, down))
    reference = np.log(magnitude.T @ weights + 0.01)
    assert ours.shape == reference.shape == (1 + (len(y) - 400) // 160, 64)
    np.testing.assert_allclose(ours, reference, atol=1e-9)


def test_vggish_examples_are_non_overlapping_0p96_s_windows():
    wave = torch.from_numpy(tone_and_noise(2.5, 16_000, batch=1).astype(np.float64))
    mel = vggish.log_mel(wave)  # (1, 248, 64)
    examples = vggish.waveform_to_examples(wave)
    assert examples.shape == (1, 2, 96, 64)  # 248 frames: two whole examples, the rest dropped
    torch.testing.assert_close(examples[0, 1], mel[0, 96:192].float())


def test_vggish_loads_and_embeds(vggish_file):
    path, model = vggish_file
    embedder = vggish.load(weights=path, width=VGG_WIDTH)
    assert isinstance(embedder, Embedder) and embedder.sample_rate == 16_000
    waves = tone_and_noise(2.5, 16_000)
    per_example = embedder.embed_examples(waves)
    emb = embedder.embed(waves)
    assert per_example.shape == (2, 2, 128) and emb.shape == (2, 128) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, per_example.mean(dim=1))
    torch.testing.assert_close(embedder.embed(waves), emb, rtol=0, atol=0)  # deterministic
    # the loaded weights are the saved ones: same numbers as the network run by hand
    examples = vggish.waveform_to_examples(torch.from_numpy(waves)).flatten(0, 1)[:, None]
    torch.testing.assert_close(per_example.flatten(0, 1), model.eval()(examples), rtol=1e-5, atol=1e-6)
    assert not torch.equal(emb[0], emb[1])
    assert embedder.logits(waves) is None


def test_vggish_final_relu_and_batching(vggish_file):
    path, _ = vggish_file
    waves = tone_and_noise(2.0, 16_000)
    plain = vggish.load(weights=path, width=VGG_WIDTH).embed_examples(waves)
    relu = vggish.load(weights=path, width=VGG_WIDTH, final_relu=True, batch_size=1).embed_examples(waves)
    assert (plain < 0).any()  # the published 128-d layer has no activation
    torch.testing.assert_close(relu, plain.clamp(min=0))


def test_vggish_short_clip_is_padded_to_one_example(vggish_file):
    path, _ = vggish_file
    embedder = vggish.load(weights=path, width=VGG_WIDTH)
    short = tone_and_noise(0.5, 16_000)
    padded = np.pad(short, ((0, 0), (0, vggish.MIN_SAMPLES - short.shape[1])))
    assert embedder.embed_examples(short).shape == (2, 1, 128)
    torch.testing.assert_close(embedder.embed(short), embedder.embed(padded))


def test_vggish_pca_postprocess(vggish_file, tmp_path):
    path, _ = vggish_file
    rng = np.random.default_rng(1)
    vectors, means = rng.standard_normal((128, 128)) * 0.05, rng.standard_normal(128) * 0.1
    pth = tmp_path / vggish.PCA_FILE
    torch.save({"pca_eigen_vectors": vectors, "pca_means": means}, pth)  # numpy arrays, as the port's file
    npz = tmp_path / "vggish_pca_params.npz"
    np.savez(npz, pca_eigen_vectors=vectors, pca_means=means)
    waves = tone_and_noise(2.0, 16_000)
    raw = vggish.load(weights=path, width=VGG_WIDTH).embed_examples(waves)
    expected = np.clip((raw.double().numpy() - means) @ vectors.T, -2, 2)
    expected = np.round((expected + 2) * 255 / 4)
    for pca in (pth, npz):
        quantised = vggish.load(weights=path, width=VGG_WIDTH, pca=pca).embed_examples(waves)
        assert quantised.min() >= 0 and quantised.max() <= 255
        assert torch.equal(quantised, quantised.round())
        # a value within float32 rounding of a .5 boundary may round the other way
        assert (quantised.double().numpy() != expected).mean() < 0.01


def test_vggish_resamples_other_rates(vggish_file):
    path, _ = vggish_file
    embedder = vggish.load(weights=path, width=VGG_WIDTH)
    t16, t48 = np.arange(32_000) / 16_000, np.arange(96_000) / 48_000
    at16 = (0.5 * np.sin(2 * np.pi * 1000 * t16))[None].astype(np.float32)
    at48 = (0.5 * np.sin(2 * np.pi * 1000 * t48))[None].astype(np.float32)
    torch.testing.assert_close(embedder.embed(at48, rate=48_000), embedder.embed(at16), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(embedder.embed(at16, rate=16_000), embedder.embed(at16), rtol=0, atol=0)


def test_vggish_refuses_bad_input(vggish_file):
    """The contract itself is tested in test_embed_common.py; here, that VGGish checks it."""
    embedder = vggish.load(weights=vggish_file[0], width=VGG_WIDTH)
    with pytest.raises(ValueError, match="audio only"):
        embedder.embed(np.zeros((1, 16_000), np.float32), "video")
    with pytest.raises(ValueError, match="vggish: no audio"):
        embedder.embed(np.zeros((0, 16_000), np.float32))


# ---------------------------------------------------------------- PANNs CNN14


def save_cnn14(path, variant: str = "32k", seed: int = 0) -> panns.Cnn14:
    """A tiny CNN14 with random weights and batch-norm statistics, saved as the released checkpoints are."""
    torch.manual_seed(seed)
    model = panns.Cnn14(panns.VARIANTS[variant], width=CNN_WIDTH)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    torch.save({"iteration": 600_000, "model": model.state_dict(), "sampler": numpy_sampler_state()}, path)
    return model


@pytest.fixture(scope="module")
def cnn14_file(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("panns") / "Cnn14_mAP=0.431.pth"
    return path, save_cnn14(path)


def test_cnn14_full_size_layout_and_shapes():
    with torch.device("meta"):
        model = panns.Cnn14().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["spectrogram_extractor.stft.conv_real.weight"] == (513, 1, 1024)
    assert shapes["spectrogram_extractor.stft.conv_imag.weight"] == (513, 1, 1024)
    assert shapes["logmel_extractor.melW"] == (513, 64)
    assert shapes["bn0.running_var"] == (64,)
    assert shapes["conv_block1.conv1.weight"] == (64, 1, 3, 3)
    assert shapes["conv_block6.conv2.weight"] == (2048, 2048, 3, 3)
    assert shapes["conv_block6.bn2.num_batches_tracked"] == ()
    assert shapes["fc1.weight"] == (2048, 2048) and shapes["fc_audioset.weight"] == (527, 2048)
    # 3 front-end tensors, bn0 (5), six blocks of 2 convs + 2 batch norms (6 * 12), fc1 and fc_audioset (4)
    assert len(shapes) == 3 + 5 + 6 * 12 + 4
    embedding, logits = model(torch.empty(2, 32_000 * 10, device="meta"))
    assert embedding.shape == (2, 2048) and logits.shape == (2, 527)


def test_cnn14_dft_weights_are_the_windowed_dft():
    n_fft = 512
    real, imag = panns.dft_basis(n_fft)
    k, n = np.arange(n_fft // 2 + 1)[:, None], np.arange(n_fft)[None, :]
    reference = np.exp(-2j * np.pi * k * n / n_fft) * librosa.filters.get_window("hann", n_fft, fftbins=True)
    np.testing.assert_allclose(real[:, 0].numpy(), reference.real, atol=1e-6)
    np.testing.assert_allclose(imag[:, 0].numpy(), reference.imag, atol=1e-6)


@pytest.mark.parametrize("variant", ["32k", "16k"])
def test_cnn14_log_mel_matches_librosa(variant):
    frontend = panns.VARIANTS[variant]
    model = panns.Cnn14(frontend, width=CNN_WIDTH)
    y = tone_and_noise(1.0, frontend.sample_rate, batch=1)[0]
    ours = model.log_mel(torch.from_numpy(y)[None])[0, 0].detach().numpy()  # (T, 64)
    power = np.abs(librosa.stft(y, n_fft=frontend.n_fft, hop_length=frontend.hop_length, window="hann",
                                center=True, pad_mode="reflect")) ** 2
    mel = librosa.filters.mel(sr=frontend.sample_rate, n_fft=frontend.n_fft, n_mels=64, fmin=frontend.f_min,
                              fmax=frontend.f_max) @ power
    reference = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
    assert ours.shape == reference.shape == (len(y) // frontend.hop_length + 1, 64)
    np.testing.assert_allclose(ours, reference, atol=1e-3)  # dB; float32 DFT against librosa's


def test_cnn14_loads_checkpoint_with_numpy_sampler_and_embeds(cnn14_file):
    path, model = cnn14_file
    embedder = panns.load(weights=path, width=CNN_WIDTH)
    assert isinstance(embedder, Embedder) and embedder.sample_rate == 32_000
    waves = tone_and_noise(1.0, 32_000)
    emb, logits = embedder.run(waves)
    assert emb.shape == (2, 64) and logits.shape == (2, 527) and emb.dtype == torch.float32
    assert (emb >= 0).all()  # fc1 + ReLU
    torch.testing.assert_close(embedder.embed(waves), emb, rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(embedder.logits(waves), logits, rtol=0, atol=0)
    torch.testing.assert_close(embedder.probabilities(waves), torch.sigmoid(logits))
    ref_emb, ref_logits = model.eval()(torch.from_numpy(waves))  # the saved weights, run by hand
    torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits[0], logits[1])


def test_cnn14_batches_are_independent_and_short_clips_padded(cnn14_file):
    path, _ = cnn14_file
    embedder = panns.load(weights=path, width=CNN_WIDTH, batch_size=1)
    waves = tone_and_noise(1.0, 32_000)
    torch.testing.assert_close(embedder.embed(waves[1:]), embedder.embed(waves)[1:], rtol=1e-5, atol=1e-6)
    short = tone_and_noise(0.1, 32_000)
    padded = np.pad(short, ((0, 0), (0, panns.VARIANTS["32k"].min_samples - short.shape[1])))
    torch.testing.assert_close(embedder.embed(short), embedder.embed(padded))


def test_cnn14_16k_variant_is_read_off_the_checkpoint(tmp_path):
    path = tmp_path / "Cnn14_16k_mAP=0.438.pth"
    save_cnn14(path, "16k")
    embedder = panns.load(weights=path, width=CNN_WIDTH)
    assert embedder.sample_rate == 16_000
    assert embedder.embed(tone_and_noise(1.0, 16_000)).shape == (2, 64)
    with pytest.raises(UserError, match="16k checkpoint, not 32k"):
        panns.load(weights=path, variant="32k", width=CNN_WIDTH)


def test_cnn14_refuses_a_foreign_front_end(tmp_path):
    path = tmp_path / "cnn14.pth"
    model = panns.Cnn14(width=CNN_WIDTH)
    state = model.state_dict()
    state["logmel_extractor.melW"] = state["logmel_extractor.melW"] * 1.5  # other mel filters, same shape
    torch.save({"model": state}, path)
    with pytest.raises(UserError, match="front end differs"):
        panns.load(weights=path, width=CNN_WIDTH)


def test_cnn14_registry_entry(cnn14_file):
    embedder = load_embedder("panns-cnn14", cnn14_file[0], width=CNN_WIDTH)
    assert embedder.name == "panns-cnn14" and embedder.modalities == ("audio",)


# ---------------------------------------------------------------- missing and bad weight files


@pytest.mark.parametrize("name, expected", [("vggish", "vggish-10086976.pth"),
                                            ("panns-cnn14", "Cnn14_mAP=0.431.pth")])
def test_missing_weights_name_the_file(name, expected, tmp_path):
    with pytest.raises(WeightsMissing) as err:
        load_embedder(name)
    assert expected in str(err.value) and "\n" not in str(err.value)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsMissing) as err:
        load_embedder(name, missing)
    assert str(missing) in str(err.value) and expected in str(err.value)


def test_missing_pca_file_is_named(vggish_file, tmp_path):
    with pytest.raises(WeightsMissing, match="vggish_pca_params-970ea276.pth"):
        vggish.load(weights=vggish_file[0], pca=tmp_path / "pca.pth", width=VGG_WIDTH)


@pytest.mark.parametrize("loader", [vggish.load, panns.load])
def test_unreadable_files_are_one_line(loader, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError) as err:
        loader(weights=garbage)
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)


def test_wrong_layouts_are_refused(vggish_file, cnn14_file):
    with pytest.raises(UserError, match="holds no VGGish state dict"):
        vggish.load(weights=cnn14_file[0])  # a whole CNN14 checkpoint handed to VGGish
    with pytest.raises(UserError, match="wrong shape"):
        vggish.load(weights=vggish_file[0], width=1 / 8)
    with pytest.raises(UserError, match="no CNN14 state dict"):
        panns.load(weights=vggish_file[0])


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embedders_on_cuda_match_the_cpu(vggish_file, cnn14_file, tmp_path):
    pca = tmp_path / "pca.npz"
    rng = np.random.default_rng(2)
    np.savez(pca, pca_eigen_vectors=rng.standard_normal((128, 128)) * 0.05, pca_means=np.zeros(128))
    waves = tone_and_noise(2.0, 16_000)
    for kwargs in ({}, {"pca": pca}):
        cpu = vggish.load(weights=vggish_file[0], width=VGG_WIDTH, **kwargs)
        gpu = vggish.load(weights=vggish_file[0], width=VGG_WIDTH, device="cuda", **kwargs)
        on_gpu = gpu.embed_examples(waves)
        assert on_gpu.device.type == "cpu"
        # quantised values may round the other way by one step
        torch.testing.assert_close(on_gpu, cpu.embed_examples(waves), rtol=1e-3, atol=1.0 if kwargs else 1e-3)
    waves = tone_and_noise(1.0, 32_000)
    cpu = panns.load(weights=cnn14_file[0], width=CNN_WIDTH).run(waves)
    gpu = panns.load(weights=cnn14_file[0], width=CNN_WIDTH, device="cuda").run(waves)
    for a, b in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
