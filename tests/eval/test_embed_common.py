"""The helpers every evaluation embedder shares: input contracts, resampling, frame conversion, reading a
foreign weight file safely, strict loading (meta-built models included) and the shared network pieces."""

from __future__ import annotations

import argparse

import librosa
import numpy as np
import pytest
import torch
from torch import nn

from avlink import weights
from avlink.errors import UserError
from avlink.eval.embed import common

# ---------------------------------------------------------------- audio input


@pytest.mark.parametrize(("bad", "words"), [
    (np.zeros(16_000, np.float32), "expected float waveforms"),
    (np.zeros((1, 16_000), np.int16), "expected float waveforms"),
    ([[0.0, 0.1]], "expected float waveforms"),
    (np.full((1, 16_000), np.nan, np.float32), "NaN or infinite"),
    (np.array([[0.0, np.inf]], np.float32), "NaN or infinite"),
    (np.zeros((0, 16_000), np.float32), "no audio"),
    (np.zeros((2, 0), np.float32), "no audio"),
])
def test_check_waveforms_refuses_bad_arrays_in_one_line(bad, words):
    with pytest.raises(ValueError, match=words) as err:
        common.check_waveforms(bad, "audio", "net")
    assert str(err.value).startswith("net: ") and "\n" not in str(err.value)


def test_check_waveforms_casts_to_float32_and_may_allow_an_empty_batch():
    x = np.linspace(-1, 1, 10)[None]  # float64
    out = common.check_waveforms(x, "audio", "net")
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))
    empty = np.zeros((0, 5), np.float32)
    assert common.check_waveforms(empty, "audio", "net", allow_empty=True).shape == (0, 5)
    with pytest.raises(ValueError, match="no audio"):
        common.check_waveforms(empty, "audio", "net")
    with pytest.raises(ValueError, match="net: this call reads audio only, not video"):
        common.check_waveforms(x, "video", "net")


def test_resample_with_soxr_and_pass_through():
    t16, t48 = np.arange(32_000) / 16_000, np.arange(96_000) / 48_000
    at16 = (0.5 * np.sin(2 * np.pi * 1000 * t16))[None].astype(np.float32)
    at48 = np.stack([0.5 * np.sin(2 * np.pi * 1000 * t48), 0.2 * np.sin(2 * np.pi * 300 * t48)])
    at48 = at48.astype(np.float32)
    resampled = common.resample(at48, 48_000, 16_000)
    assert resampled.shape == (2, 32_000) and resampled.dtype == np.float32
    np.testing.assert_allclose(resampled[0, 1000:-1000], at16[0, 1000:-1000], atol=2e-3)
    # rows are channels: each is resampled on its own
    np.testing.assert_array_equal(resampled[1], common.resample(at48[1:], 48_000, 16_000)[0])
    assert common.resample(at16, 16_000, 16_000) is at16 and common.resample(at16, None, 8_000) is at16


def test_pad_to_pads_short_rows_with_silence_only():
    wave = torch.ones(2, 3)
    assert torch.equal(common.pad_to(wave, 5), torch.tensor([[1.0, 1, 1, 0, 0]] * 2))
    assert common.pad_to(wave, 2).shape == (2, 3)


# ---------------------------------------------------------------- video input


@pytest.mark.parametrize(("bad", "words"), [
    (np.zeros((1, 4, 8, 8, 3), np.float32), "uint8 frames"),
    (np.zeros((4, 8, 8, 3), np.uint8), "uint8 frames"),
    (np.zeros((1, 4, 8, 8, 4), np.uint8), "uint8 frames"),
    (np.zeros((1, 0, 8, 8, 3), np.uint8), "no frames"),
])
def test_check_frames_refuses_bad_arrays(bad, words):
    with pytest.raises(ValueError, match=words):
        common.check_frames(bad, "video", "net")
    with pytest.raises(ValueError, match="net embeds video only, not audio"):
        common.check_frames(np.zeros((1, 2, 4, 4, 3), np.uint8), "audio", "net")


def test_as_tensor_copies_read_only_frames():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames.setflags(write=False)  # as decoded frames can be
    out = common.as_tensor(frames)
    out += 1  # would fail (or write into the decoder's buffer) without a copy
    assert frames.max() == 0 and out.min() == 1
    t = torch.zeros(3)
    assert common.as_tensor(t) is t


def test_center_crop_and_short_side_resize():
    x = torch.arange(5 * 8).view(1, 1, 5, 8).float()
    crop = common.center_crop(x, 3)  # offsets round((5 - 3) / 2) = 1 and round((8 - 3) / 2) = round(2.5) = 2
    assert torch.equal(crop, x[..., 1:4, 2:5])
    images = torch.randint(0, 256, (2, 3, 30, 50), dtype=torch.uint8)
    for pil in (False, True):
        out = common.resize_short_side_bicubic(images, 12, pil=pil)
        assert out.shape == (2, 3, 12, 20)  # 50 * 12 / 30
        assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255  # 8-bit values
    flat = torch.full((1, 3, 40, 24), 77, dtype=torch.uint8)
    assert torch.equal(common.resize_short_side_bicubic(flat, 12), torch.full((1, 3, 20, 12), 77.0))


# ---------------------------------------------------------------- weight files


def test_read_weights_allows_numpy_arrays_and_refuses_other_classes(tmp_path):
    """weights_only stays on: numpy arrays (as the PANNs sampler state) load, any other class does not."""
    allowed = tmp_path / "with_numpy.pth"
    torch.save({"w": torch.ones(2), "sampler": [np.arange(3), np.int64(4), np.float32(0.5)]}, allowed)
    raw = weights.read_weights(allowed, "Net")
    assert torch.equal(raw["w"], torch.ones(2)) and np.array_equal(raw["sampler"][0], np.arange(3))
    refused = tmp_path / "with_namespace.pth"
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(a=1)}, refused)
    with pytest.raises(weights.RefusedPickle, match="pickled argparse.Namespace, which is refused") as err:
        weights.read_weights(refused, "Net")
    text = str(err.value)
    # torch's message for this case carries terminal colour codes and advice to turn weights_only off
    assert text.startswith(f"{refused}: cannot read as a Net weight file with weights_only=True")
    assert "\n" not in text and "\x1b" not in text and "weights_only=False" not in text
    assert "`weights_only` set to `False`" not in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, only to write a TorchScript file
def test_read_weights_refuses_unreadable_files_and_torchscript_in_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    script = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), script)
    for path, words in ((junk, "cannot read as a Net weight file"), (script, "TorchScript archive"),
                        (tmp_path, "cannot read")):
        with pytest.raises(UserError) as err:
            weights.read_weights(path, "Net")
        text = str(err.value)
        assert text.startswith(str(path)) and words in text and "\n" not in text, text
        assert not isinstance(err.value, weights.RefusedPickle)
        assert "`False`" not in text  # torch's advice is not the reason


def test_load_failure_keeps_torch_reason_not_its_advice():
    err = RuntimeError("Weights only load failed. Re-run with \x1b[1mweights_only=False\x1b[0m.\n"
                       "WeightsUnpickler error: \n\nUnsupported operand 110\n\nCheck the documentation")
    assert weights.load_failure(err) == "RuntimeError: Unsupported operand 110"
    assert weights.load_failure(ValueError("\x1b[31mbad\x1b[0m header\nmore")) == "ValueError: bad header"


def test_state_dict_in_unwraps_training_checkpoints(tmp_path):
    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    ddp = {f"module.{k}": v for k, v in state.items()}
    nested = {"epoch": 1, "state_dict": {"model": state}}
    for raw in (state, {"state_dict": state, "epoch": 3}, {"model": ddp}, nested):
        assert common.state_dict_in(raw, tmp_path, "Net") == state
    for bad in ({"epoch": 3}, {}, [torch.ones(1)], {"a": torch.ones(1), "b": 3}):
        with pytest.raises(UserError, match="holds no Net state dict") as err:
            common.state_dict_in(bad, tmp_path, "Net")
        assert "\n" not in str(err.value)
    path = tmp_path / "nested.pt"
    torch.save({"model": ddp, "step": 7}, path)
    assert common.read_state_dict(path, "Net").keys() == state.keys()


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)


def test_load_strict_fills_counters_of_a_meta_built_model(tmp_path):
    """The file's tensors take the place of meta ones; a missing batch-norm counter becomes a real zero."""
    source = TinyNet()
    with torch.no_grad():
        source.bn.running_mean.normal_()
    state = {k: v.double() for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):
        model = TinyNet()
    common.load_strict(model, state, tmp_path, "Tiny")
    loaded = model.state_dict()
    assert not any(t.is_meta for t in loaded.values())
    assert loaded["bn.num_batches_tracked"].dtype == torch.long and loaded["bn.num_batches_tracked"] == 0
    assert loaded["conv.weight"].dtype == torch.float32  # cast to the model's dtype
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype))
    x = torch.randn(1, 1, 5, 5)
    torch.testing.assert_close(model.eval().bn(model.conv(x)), source.eval().bn(source.conv(x)))
    plain = TinyNet()  # an ordinary model loads the same way
    common.load_strict(plain, source.state_dict(), tmp_path, "Tiny")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in source.state_dict().items())


def test_load_strict_names_what_does_not_match(tmp_path):
    state = TinyNet().state_dict()
    cases = ({k: v for k, v in state.items() if k != "conv.bias"}, "missing ['conv.bias']"), \
        ({**state, "extra.weight": torch.zeros(1)}, "unexpected ['extra.weight']"), \
        ({**state, "conv.weight": torch.zeros(2, 1, 5, 5)}, "wrong shape ['conv.weight']"), \
        ({"conv.weight": "not a tensor"}, "holds no Tiny state dict")
    for bad, words in cases:
        with pytest.raises(UserError) as err:
            common.load_strict(TinyNet(), bad, tmp_path / "t.pt", "Tiny")
        text = str(err.value)
        assert text.startswith(str(tmp_path / "t.pt")) and words in text and "\n" not in text, text


# ---------------------------------------------------------------- network pieces


def test_scale_rounds_channel_counts_and_keeps_at_least_one():
    assert [common.Scale(1 / 16)(c) for c in (64, 192, 8)] == [4, 12, 1]
    assert common.Scale(1.0)(2048) == 2048
    with pytest.raises(AssertionError):
        common.Scale(0)


def test_in_proj_attention_with_bias_kv_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = common.InProjAttention(24, heads=3, bias_kv=True)
    with torch.no_grad():
        for p in ours.parameters():  # the zero-initialised biases too, so every tensor reaches the output
            p.copy_(0.2 * torch.randn(p.shape))
    reference = nn.MultiheadAttention(24, 3, bias=True, add_bias_kv=True, batch_first=True)
    reference.load_state_dict(ours.state_dict())  # strict: the names are torch's own
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_mlp_is_linear_gelu_linear():
    mlp = common.Mlp(4, 6)
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
        torch.testing.assert_close(mlp(x), expected)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


@pytest.mark.parametrize(("n_mels", "n_fft", "rate", "fmin", "fmax"),
                         [(128, 1024, 32_000, 0.0, 15_000.0), (128, 512, 16_000, 20.0, 8_000.0)])
def test_kaldi_mel_banks_match_an_independent_bank(n_mels, n_fft, rate, fmin, fmax):
    """PaSST's bank and ImageBind's: triangles linear on the HTK mel scale, nothing on the Nyquist bin."""
    ours = common.kaldi_mel_banks(n_mels, n_fft, rate, fmin, fmax).numpy()
    assert ours.shape == (n_mels, n_fft // 2 + 1) and not ours[:, -1].any()
    edges = np.linspace(librosa.hz_to_mel(fmin, htk=True), librosa.hz_to_mel(fmax, htk=True), n_mels + 2)
    bin_mels = librosa.hz_to_mel(np.arange(n_fft // 2) * rate / n_fft, htk=True)
    want = np.stack([np.interp(bin_mels, edges[i:i + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
                     for i in range(n_mels)])
    np.testing.assert_allclose(ours[:, :-1], want, atol=1e-5)
