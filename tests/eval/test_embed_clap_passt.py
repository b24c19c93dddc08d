"""LAION-CLAP and PaSST embedders on tiny random-weight instances saved in the published key layout."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest
import soxr
import torch

from avlink.errors import UserError
from avlink.eval.embed import clap, common, passt
from avlink.eval.embedders import Embedder, WeightsMissing, load_embedder

TINY_HTSAT = clap.HTSATConfig(embed_dim=8, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4))
TINY_PASST = passt.PaSSTConfig(embed_dim=16, depth=2, num_heads=2)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Fresh layers are too regular to catch wiring mistakes (zero biases, zero position tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def byte_level_chars() -> list[str]:
    """The 256 symbols a byte-level BPE vocabulary uses for raw bytes (printable bytes map to themselves)."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A RoBERTa tokenizer folder with a bytes-only vocabulary (no merges): 261 ids, <pad> = 1."""
    folder = tmp_path_factory.mktemp("roberta_tokenizer")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *byte_level_chars(), "<mask>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@pytest.fixture(scope="module")
def clap_checkpoint(tmp_path_factory):
    """(path, model): a tiny CLAP saved as the training script saves it: under `state_dict`, DDP prefix,
    with the tensors the embedder does not read (DFT kernels, classifier, loss MLPs, temperatures, ids)."""
    torch.manual_seed(0)
    text = clap.build_roberta({"vocab_size": 261, "hidden_size": 16, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "intermediate_size": 32,
                               "max_position_embeddings": 80, "type_vocab_size": 1})
    model = clap.CLAP(TINY_HTSAT, text)
    randomize(model, seed=1)
    bn = model.audio_branch.bn0
    bn.running_mean.copy_(torch.linspace(-60.0, -20.0, 64))
    bn.running_var.copy_(torch.linspace(50.0, 200.0, 64))
    model.eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state.update({
        "module.audio_branch.spectrogram_extractor.stft.conv_real.weight": torch.randn(513, 1, 1024),
        "module.audio_branch.spectrogram_extractor.stft.conv_imag.weight": torch.randn(513, 1, 1024),
        "module.audio_branch.tscam_conv.weight": torch.randn(527, 64, 2, 3),
        "module.audio_branch.head.weight": torch.randn(527, 527),
        "module.audio_transform.sequential.0.weight": torch.randn(512, 512),
        "module.logit_scale_a": torch.tensor(2.6), "module.logit_scale_t": torch.tensor(2.6),
        "module.text_branch.embeddings.position_ids": torch.arange(80)[None],
    })
    path = tmp_path_factory.mktemp("clap") / "clap-tiny.pt"
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state}, path)
    return path, model


@pytest.fixture(scope="module")
def clap_embedder(clap_checkpoint, tokenizer_dir):
    return clap.load(weights=clap_checkpoint[0], tokenizer=tokenizer_dir, text_heads=2)


@pytest.fixture(scope="module")
def passt_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = passt.PaSST(TINY_PASST)
    randomize(model, seed=2)
    model.eval()
    path = tmp_path_factory.mktemp("passt") / "passt-tiny.pt"
    torch.save(model.state_dict(), path)  # the release file is a plain state dict
    return path, model


def noise(b: int, seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """(b, n) clips that sound different: a tone, white noise and a chirp in turn, each with a little hiss."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    kinds = [0.3 * np.sin(2 * np.pi * 440.0 * t), 0.3 * rng.standard_normal(t.size),
             0.3 * np.sin(2 * np.pi * (100.0 + 1000.0 * t) * t)]
    rows = [kinds[i % 3] + 0.01 * rng.standard_normal(t.size) for i in range(b)]
    return np.stack(rows).astype(np.float32)


# ---------------------------------------------------------------- CLAP: layout and loading


def test_clap_keys_follow_the_published_layout(clap_checkpoint):
    state = clap_checkpoint[1].state_dict()
    for key in ["audio_branch.logmel_extractor.melW", "audio_branch.bn0.running_var",
                "audio_branch.patch_embed.proj.weight", "audio_branch.patch_embed.norm.weight",
                "audio_branch.layers.0.blocks.0.attn.relative_position_bias_table",
                "audio_branch.layers.0.blocks.0.attn.relative_position_index",
                "audio_branch.layers.1.blocks.1.attn_mask", "audio_branch.layers.1.blocks.0.mlp.fc2.weight",
                "audio_branch.layers.0.downsample.reduction.weight",
                "audio_branch.layers.2.downsample.norm.bias",
                "audio_branch.norm.weight", "audio_projection.0.weight", "audio_projection.2.bias",
                "text_branch.encoder.layer.0.attention.self.query.weight", "text_branch.pooler.dense.weight",
                "text_projection.2.weight"]:
        assert key in state, key
    assert "audio_branch.layers.3.downsample.reduction.weight" not in state  # the last stage keeps its size
    assert "audio_branch.layers.3.blocks.0.attn_mask" not in state  # 8 x 8 tokens: one window, no shift
    assert state["audio_branch.logmel_extractor.melW"].shape == (513, 64)
    assert state["audio_branch.layers.1.blocks.1.attn_mask"].shape == (16, 64, 64)  # 32 x 32: 16 windows
    assert "audio_branch.layers.1.blocks.0.attn_mask" not in state  # unshifted blocks have none
    assert clap.infer_htsat({f"{k}": v for k, v in state.items()}) == TINY_HTSAT


def test_clap_loads_and_embeds_audio(clap_checkpoint, clap_embedder):
    assert isinstance(clap_embedder, Embedder)
    assert clap_embedder.sample_rate == 48_000 and clap_embedder.modalities == ("audio", "text")
    x = noise(3, 1.5, 48_000)
    e = clap_embedder.embed(x, "audio")
    assert e.shape == (3, 512) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(clap_embedder.embed(x, "audio"), e, atol=0, rtol=0)  # deterministic
    torch.testing.assert_close(clap_embedder.embed(x[1:2], "audio"), e[1:2], atol=1e-5, rtol=0)  # per row
    with torch.no_grad():  # the loaded weights are the saved ones
        want = clap_checkpoint[1].embed_audio(torch.from_numpy(clap_embedder.prepare_audio(x)))
    torch.testing.assert_close(e, want, atol=1e-5, rtol=0)
    assert torch.cdist(e, e).masked_fill(torch.eye(3, dtype=torch.bool), 1.0).min() > 1e-2  # sounds differ
    assert clap_embedder.logits(x) is None
    assert clap_embedder.embed(x[:0]).shape == (0, 512) and clap_embedder.embed([], "text").shape == (0, 512)


def test_clap_embeds_text_in_the_same_space(clap_embedder):
    t = clap_embedder.embed(["a dog barks twice", "rain on a tin roof"], "text")
    assert t.shape == (2, 512)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(clap_embedder.embed(["rain on a tin roof"], "text"), t[1:], atol=1e-5, rtol=0)
    assert (t[0] - t[1]).norm() > 1e-2  # far above float error: the text reaches the output
    a = clap_embedder.embed(noise(1, 0.5, 48_000), "audio")
    cosine = a @ t.T  # unit rows: the dot product is the CLAP score
    assert cosine.shape == (1, 2) and cosine.abs().max() <= 1.0 + 1e-5


def test_clap_text_needs_a_tokenizer_folder(clap_checkpoint, tmp_path):
    audio_only = clap.load(weights=clap_checkpoint[0], text_heads=2)
    assert audio_only.embed(noise(1, 0.2, 48_000)).shape == (1, 512)  # audio works without one
    with pytest.raises(WeightsMissing, match="vocab.json") as err:
        audio_only.embed(["a bell"], "text")
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsMissing, match="no RoBERTa tokenizer here"):
        clap.load(weights=clap_checkpoint[0], tokenizer=tmp_path)


def test_clap_resamples_from_the_given_rate(clap_checkpoint):
    at_16k = clap.load(weights=clap_checkpoint[0], input_rate=16_000, text_heads=2)
    at_48k = clap.load(weights=clap_checkpoint[0], text_heads=2)
    assert at_16k.sample_rate == 16_000
    x = noise(2, 1.0, 16_000)
    upsampled = soxr.resample(x.T, 16_000, 48_000).T.astype(np.float32)
    want = at_48k.embed(np.ascontiguousarray(upsampled))
    torch.testing.assert_close(at_16k.embed(x), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- both networks vs the published code
# Values measured by running the published implementations (LAION-AI/CLAP `clap_module/htsat.py` with
# torchlibrosa; kkoutini/passt_hear21 `models/passt.py`) with these exact weights (`randomize`, seeds 1 and 2)
# on `two_tones`. They pin the wiring (window shifts, patch merging order, token layout) that the
# round-trip tests above cannot see. Changing `randomize` or the tiny configs invalidates them.


def two_tones(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (100 + 1000 * t) * t)
    return x.astype(np.float32)


def test_htsat_matches_the_published_implementation():
    model = clap.CLAP(TINY_HTSAT)
    randomize(model, seed=1)
    with torch.no_grad():
        got = model.eval().audio_branch(torch.from_numpy(two_tones(48_000, 10.0))[None])[0]  # (64,)
    want = [0.5427960, 1.1677012, 1.1368009, 2.7776229, 1.4610952, 0.4177047, -0.7194020, 0.1282708]
    torch.testing.assert_close(got[:8], torch.tensor(want), atol=2e-4, rtol=0)
    assert abs(got.norm().item() - 8.2533407) < 1e-3


def test_passt_matches_the_published_implementation():
    model = passt.PaSST(TINY_PASST)
    randomize(model, seed=2)
    with torch.no_grad():
        mel = passt.PaSSTMel()(torch.from_numpy(passt.fit_clip(two_tones(32_000, 3.0)[None])))
        features, logits = model.eval()(mel)
    want = [1.1240329, 1.7195446, -0.5483820, 1.1171955, 0.3871420, -1.8159072, -1.2774907, -0.3020305,
            0.0624683, 0.6980059, 0.4289892, 1.1959264, 0.1320183, -0.0742798, -2.1979668, -0.3248896]
    torch.testing.assert_close(features[0], torch.tensor(want), atol=1e-4, rtol=0)
    want_logits = [-0.6300238, 0.1908608, 0.3472952, 0.1344271, 0.5179183, -0.2644238]
    torch.testing.assert_close(logits[0, :6], torch.tensor(want_logits), atol=1e-4, rtol=0)
    assert abs(logits.norm().item() - 7.5687556) < 1e-3


# ---------------------------------------------------------------- CLAP: preprocessing vs independent code


def test_clap_logmel_matches_librosa():
    x = noise(1, 10.0, 48_000)[0]
    ours = clap.LogMel()(torch.from_numpy(x)[None])[0].numpy()  # (frames, 64)
    power = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=48_000, n_fft=1024, hop_length=480,
                                           win_length=1024, window="hann", center=True, pad_mode="reflect",
                                           power=2.0, n_mels=64, fmin=50, fmax=14_000)
    want = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None).T
    assert ours.shape == want.shape == (1001, 64)
    np.testing.assert_allclose(ours, want, atol=2e-3)


def test_logmel_to_image_stacks_four_time_chunks_along_frequency():
    t, m = np.meshgrid(np.arange(1024), np.arange(64), indexing="ij")
    x = torch.from_numpy((t * 100 + m).astype(np.float32))[None]  # (1, 1024, 64): value encodes (time, mel)
    image = clap.logmel_to_image(x, freq_ratio=4)[0, 0].numpy()
    assert image.shape == (256, 256)
    for chunk in range(4):
        rows = image[chunk * 64:(chunk + 1) * 64]  # (mel, time in chunk)
        want = (np.arange(256)[None] + 256 * chunk) * 100 + np.arange(64)[:, None]
        np.testing.assert_array_equal(rows, want)
    short = torch.randn(1, 1001, 64)  # 10 s at hop 480: stretched to 1024 frames, end points kept
    image = clap.logmel_to_image(short, freq_ratio=4)[0, 0]
    torch.testing.assert_close(image[:64, 0], short[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(image[192:, 255], short[0, -1], atol=1e-5, rtol=0)


def test_shifted_window_mask_separates_wrapped_regions():
    h, window, shift = 16, 8, 4
    region = np.where(np.arange(h) < h - window, 0, np.where(np.arange(h) < h - shift, 1, 2))  # per row / col
    labels = region[:, None] * 3 + region[None, :]  # (16, 16)
    mask = clap.shifted_window_mask(h, h, window, shift).numpy()
    assert mask.shape == (4, 64, 64)
    for wi in range(2):
        for wj in range(2):
            ids = labels[wi * 8:(wi + 1) * 8, wj * 8:(wj + 1) * 8].reshape(-1)
            want = np.where(ids[:, None] == ids[None, :], 0.0, -100.0)
            np.testing.assert_array_equal(mask[wi * 2 + wj], want)


def test_clap_fits_clips_to_ten_seconds():
    x = np.array([[0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(clap.repeat_pad(x, 8), [[0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.0, 0.0]])
    np.testing.assert_array_equal(clap.repeat_pad(np.arange(10.0)[None], 4), [[0, 1, 2, 3]])
    q = clap.quantize_int16(np.array([[0.5, -0.5, 2.0, 1e-6]], dtype=np.float32))
    np.testing.assert_allclose(q, [[16383 / 32767, -16383 / 32767, 1.0, 0.0]], rtol=0, atol=1e-7)


# ---------------------------------------------------------------- CLAP: refusals


def test_clap_weights_missing_is_one_line(tmp_path):
    with pytest.raises(WeightsMissing, match="630k-audioset-best.pt") as err:
        clap.load(weights=None)
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsMissing, match="nope.pt"):
        load_embedder("clap", tmp_path / "nope.pt")


def test_clap_refuses_unreadable_and_fusion_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: cannot read"):
        clap.load(weights=junk)
    fusion = tmp_path / "fusion.pt"
    state = {"module.audio_branch.patch_embed.proj.weight": torch.zeros(96, 1, 4, 4),
             "module.audio_branch.patch_embed.mel_conv2d.weight": torch.zeros(96, 1, 4, 12)}
    torch.save({"state_dict": state}, fusion)
    with pytest.raises(UserError, match="feature-fusion"):
        clap.load(weights=fusion)


def test_clap_refuses_bad_input(clap_embedder):
    """The waveform contract itself is tested in test_embed_common.py; here, that CLAP checks it."""
    with pytest.raises(ValueError, match="clap: expected float waveforms"):
        clap_embedder.embed(np.zeros((2, 10), dtype=np.int16), "audio")
    with pytest.raises(ValueError, match="list of strings"):
        clap_embedder.embed("one string", "text")


# ---------------------------------------------------------------- PaSST


def test_passt_keys_follow_the_published_layout(passt_checkpoint):
    state = passt_checkpoint[1].state_dict()
    d = TINY_PASST.embed_dim
    shapes = {"cls_token": (1, 1, d), "dist_token": (1, 1, d), "new_pos_embed": (1, 2, d),
              "freq_new_pos_embed": (1, d, 12, 1), "time_new_pos_embed": (1, d, 1, 99),
              "patch_embed.proj.weight": (d, 1, 16, 16), "blocks.1.attn.qkv.bias": (3 * d,),
              "blocks.0.mlp.fc1.weight": (4 * d, d), "norm.weight": (d,), "head.0.weight": (d,),
              "head.1.weight": (527, d), "head_dist.weight": (527, d)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert passt.infer_config(state, num_heads=2, stride=(10, 10)) == TINY_PASST


def test_passt_loads_embeds_and_classifies(passt_checkpoint):
    path, source = passt_checkpoint
    emb = load_embedder("passt", path, num_heads=2)
    assert isinstance(emb, Embedder) and emb.sample_rate == 32_000 and emb.modalities == ("audio",)
    x = noise(2, 3.0, 32_000)
    e, logits = emb.embed(x), emb.logits(x)
    assert e.shape == (2, TINY_PASST.embed_dim) and logits.shape == (2, 527)
    torch.testing.assert_close(emb.embed(x), e, atol=0, rtol=0)  # deterministic
    torch.testing.assert_close(emb.logits(x[:1]), logits[:1], atol=1e-5, rtol=1e-5)  # per row
    with torch.no_grad():
        mel = emb.mel(torch.from_numpy(emb.prepare_audio(x)))
        assert mel.shape == (2, 1, 128, 1000)  # 10 s after padding: 12 x 99 patches
        assert source.tokens(mel).shape == (2, 2 + 12 * 99, TINY_PASST.embed_dim)
        want_e, want_logits = source(mel)
    torch.testing.assert_close(e, want_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="audio only"):
        emb.embed(x, "video")
    assert emb.embed(x[:0]).shape == (0, TINY_PASST.embed_dim) and emb.logits(x[:0]).shape == (0, 527)


def test_passt_pads_or_crops_to_ten_seconds():
    x = np.ones((1, 5), dtype=np.float32)
    np.testing.assert_array_equal(passt.fit_clip(x, 8), [[1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(passt.fit_clip(np.arange(10.0)[None], 4), [[0, 1, 2, 3]])


def test_passt_front_end_matches_librosa():
    x = noise(1, 2.0, 32_000)[0].astype(np.float64)
    ours = passt.PaSSTMel()(torch.from_numpy(x.astype(np.float32))[None])[0, 0].numpy()  # (128, frames)
    emphasised = x[1:] - 0.97 * x[:-1]
    window = librosa.filters.get_window("hann", 800, fftbins=False)  # symmetric, as torch periodic=False
    spec = librosa.stft(emphasised, n_fft=1024, hop_length=320, win_length=800, window=window, center=True,
                        pad_mode="reflect")
    banks = common.kaldi_mel_banks(128, 1024, 32_000, 0.0, 15_000.0)  # checked in test_embed_common.py
    mel = banks.double().numpy() @ np.abs(spec) ** 2
    want = (np.log(mel + 1e-5) + 4.5) / 5.0
    assert ours.shape == want.shape == (128, 1 + (x.size - 1) // 320)
    np.testing.assert_allclose(ours, want, atol=2e-4)


def test_passt_weights_missing_and_wrong_files(tmp_path, clap_checkpoint):
    with pytest.raises(WeightsMissing, match="passt-s-f128-p16-s10-ap.476-swa.pt") as err:
        passt.load(weights=None)
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsMissing, match="missing.pt"):
        passt.load(weights=tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not a PaSST state dict"):
        passt.load(weights=clap_checkpoint[0])
