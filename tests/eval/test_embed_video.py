"""The FID Inception and the FVD I3D: published layout and size, preprocessing, loading, embedding rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avlink.errors import UserError
from avlink.eval.embed import i3d, inception
from avlink.eval.embedders import Embedder, WeightsMissing, load_embedder

from helpers import randomize_published as randomize

TINY = 1 / 16  # channel width of the test networks
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def frames(b: int, t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(b, t, h, w, 3), dtype=np.uint8)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def numpy_bilinear(img: np.ndarray, out: int, half_pixel: bool) -> np.ndarray:
    """(H, W, C) -> (out, out, C) by separable linear interpolation, written with plain loops."""
    def axis(a: np.ndarray, n_out: int) -> np.ndarray:
        n = a.shape[0]
        rows = []
        for i in range(n_out):
            src = (i + 0.5) * n / n_out - 0.5 if half_pixel else i * n / n_out
            src = max(src, 0.0)
            lo = min(int(np.floor(src)), n - 1)
            hi = min(lo + 1, n - 1)
            f = src - lo
            rows.append(a[lo] * (1 - f) + a[hi] * f)
        return np.stack(rows)
    return axis(axis(img.astype(np.float64), out).swapaxes(0, 1), out).swapaxes(0, 1)


# ---------------------------------------------------------------- Inception: the published network


INCEPTION_BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", *(f"branch7x7_{i}" for i in (1, 2, 3)), *(f"branch7x7dbl_{i}" for i in range(1, 6)),
          "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", *(f"branch7x7x3_{i}" for i in (1, 2, 3, 4))],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
INCEPTION_BLOCKS = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
                    "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
                    "Mixed_7c": "E"}


def inception_keys() -> set[str]:
    """The key set of pytorch-fid's checkpoint: torchvision's Inception3 names, no AuxLogits, with fc."""
    convs = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    convs += [f"{block}.{branch}" for block, kind in INCEPTION_BLOCKS.items()
              for branch in INCEPTION_BRANCHES[kind]]
    per_conv = ["conv.weight", *(f"bn.{k}" for k in BN_KEYS)]
    return {f"{c}.{k}" for c in convs for k in per_conv} | {"fc.weight", "fc.bias"}


def test_inception_full_size_matches_published_parameter_count():
    with torch.device("meta"):
        no_fc = inception.FIDInceptionV3(num_classes=None)
        fid = inception.FIDInceptionV3()
    # torchvision publishes 27,161,264 parameters for Inception3 with its auxiliary head and a 1000-way fc;
    # that head is conv 768->128 1x1 + BN, conv 128->768 5x5 + BN, fc 768->1000.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    assert n_params(no_fc) + aux + (2048 * 1000 + 1000) == 27_161_264
    assert n_params(fid) == n_params(no_fc) + 2048 * 1008 + 1008
    assert fid.pool_dim == inception.POOL_DIM == 2048
    # the FID graph's quirk: the last block pools by max, every other pool branch by (exclusive) average
    assert fid.Mixed_7c.pool == "max" and fid.Mixed_7b.pool == "avg"


def test_inception_state_dict_has_the_published_keys_and_shapes():
    with torch.device("meta"):
        state = inception.FIDInceptionV3().state_dict()
    assert set(state) == inception_keys()
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_inception_pools_follow_the_tf_graph():
    x = torch.ones(1, 2, 5, 5)
    # TF's SAME average ignores the padding: a constant stays constant up to the corners
    assert torch.equal(inception.pool_3x3_same(x, "avg"), x)
    torch.manual_seed(0)
    c = inception.Scale(TINY)
    block_a = randomize(inception.InceptionA(8, 32, c))
    last_e = randomize(inception.InceptionE(8, "max", c))
    y = torch.randn(2, 8, 9, 9)
    counts = F.conv2d(F.pad(torch.ones(1, 1, 9, 9), (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))
    sums = F.conv2d(F.pad(y, (1, 1, 1, 1)).flatten(0, 1)[:, None], torch.ones(1, 1, 3, 3)).reshape(2, 8, 9, 9)
    want_a = block_a.branch_pool(sums / counts)
    windows = F.pad(y, (1, 1, 1, 1), value=-math.inf).unfold(2, 3, 1).unfold(3, 3, 1)  # (2, 8, 9, 9, 3, 3)
    want_e = last_e.branch_pool(windows.amax((-1, -2)))
    with torch.no_grad():
        torch.testing.assert_close(block_a(y)[:, -want_a.shape[1]:], want_a)
        torch.testing.assert_close(last_e(y)[:, -want_e.shape[1]:], want_e)


def test_inception_preprocess_matches_an_independent_bilinear():
    img = frames(1, 1, 37, 53)[0]  # (1, 37, 53, 3)
    got = inception.preprocess(img).numpy()  # (1, 3, 299, 299)
    want = numpy_bilinear(img[0], 299, half_pixel=True) / 255.0 * 2 - 1
    np.testing.assert_allclose(got[0].transpose(1, 2, 0), want, atol=1e-5)
    ends = inception.preprocess(np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]))
    torch.testing.assert_close(ends[0], torch.full_like(ends[0], -1.0))
    torch.testing.assert_close(ends[1], torch.ones_like(ends[1]))


def test_inception_last_map_is_8x8_at_299():
    model = inception.FIDInceptionV3(width=TINY).eval()
    seen = []
    model.Mixed_7c.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 299, 299))
    assert seen == [(1, model.pool_dim, 8, 8)]


# ---------------------------------------------------------------- Inception: loading and rows


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> tuple[Path, inception.FIDInceptionV3]:
    torch.manual_seed(1)
    model = randomize(inception.FIDInceptionV3(width=TINY), seed=1)
    return save(model.state_dict(), tmp_path_factory.mktemp("inc") / inception.WEIGHTS_FILE), model


def test_inception_loads_and_embeds_every_frame(inception_file):
    path, model = inception_file
    emb = load_embedder("inception", path, width=TINY, batch_size=5)
    assert isinstance(emb, Embedder) and emb.modalities == ("video",)
    x = frames(2, 4, 24, 32)
    rows, logits = emb.embed(x, "video"), emb.logits(x, "video")
    assert rows.shape == (8, model.pool_dim) and rows.dtype == torch.float32
    assert logits.shape == (8, inception.NUM_CLASSES)
    with torch.no_grad():
        pool, want_logits = model(inception.preprocess(x.reshape(8, 24, 32, 3)))
    torch.testing.assert_close(rows, pool)  # clip-major: clip 0's four frames come first
    torch.testing.assert_close(logits, want_logits)
    assert rows.std() > 1e-2, "features collapsed; the comparison above would be vacuous"
    assert torch.equal(emb.embed(x, "video"), rows)  # deterministic
    torch.testing.assert_close(emb.embed(x[1:], "video"), rows[4:])  # a clip's rows don't depend on its batch


def test_inception_clip_rows_and_frame_subsampling(inception_file):
    path, _ = inception_file
    x = frames(2, 5, 16, 16, seed=3)
    per_frame = inception.load(path, width=TINY).embed(x, "video").reshape(2, 5, -1)
    clip_rows = inception.load(path, width=TINY, rows="clip").embed(x, "video")
    torch.testing.assert_close(clip_rows, per_frame.mean(1))
    picked = inception.load(path, width=TINY, frames_per_clip=3).embed(x, "video").reshape(2, 3, -1)
    torch.testing.assert_close(picked, per_frame[:, [0, 2, 4]])


def test_inception_old_file_without_counters_or_fc_loads(inception_file, tmp_path):
    path, model = inception_file
    state = {k: v for k, v in model.state_dict().items()
             if "num_batches_tracked" not in k and not k.startswith("fc.")}
    emb = inception.load(save(state, tmp_path / "nofc.pth"), width=TINY)
    x = frames(1, 2, 20, 20)
    assert emb.logits(x, "video") is None
    torch.testing.assert_close(emb.embed(x, "video"), inception.load(path, width=TINY).embed(x, "video"))


# ---------------------------------------------------------------- I3D: the published network


def i3d_keys(classes: int = 400) -> set[str]:
    """The key set of pytorch-i3d's rgb_imagenet.pt."""
    units = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
    units += [f"{m}.{b}" for m in ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                                   "Mixed_4f", "Mixed_5b", "Mixed_5c")
              for b in ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")]
    per_unit = ["conv3d.weight", *(f"bn.{k}" for k in BN_KEYS)]
    return {f"{u}.{k}" for u in units for k in per_unit} | {"logits.conv3d.weight", "logits.conv3d.bias"}


def test_i3d_full_size_matches_published_parameter_count_and_keys():
    with torch.device("meta"):
        model = i3d.InceptionI3d()
    # the TF release has no batch-norm scale (pytorch-i3d stores ones there); its RGB Kinetics-400 graph is
    # listed at 12.69 M parameters (OpenVINO model zoo, i3d-rgb-tf)
    gammas = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    assert round((n_params(model) - gammas) / 1e6, 2) == 12.69
    state = model.state_dict()
    assert set(state) == i3d_keys()
    assert tuple(state["Conv3d_1a_7x7.conv3d.weight"].shape) == (64, 3, 7, 7, 7)
    assert tuple(state["Mixed_4b.b1b.conv3d.weight"].shape) == (208, 96, 3, 3, 3)
    assert tuple(state["Mixed_5c.b3b.conv3d.weight"].shape) == (128, 832, 1, 1, 1)
    assert tuple(state["logits.conv3d.weight"].shape) == (400, 1024, 1, 1, 1)
    assert model.pool_dim == i3d.POOL_DIM


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 2, 3, 7])
def test_same_padding_matches_the_tensorflow_formula(kernel, stride):
    for size in range(1, 30):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        assert i3d.same_pad(size, kernel, stride) == (total // 2, total - total // 2)
        padded = sum(i3d.same_pad(size, kernel, stride)) + size
        assert (padded - kernel) // stride + 1 == out


def test_i3d_time_steps_after_the_network():
    model = i3d.InceptionI3d(width=1 / 32).eval()
    with torch.no_grad():
        for t, steps in ((9, 1), (16, 1), (17, 2), (64, 7)):
            assert model.features(torch.zeros(1, 3, t, 224, 224)).shape == (1, model.pool_dim, steps)


def test_i3d_resize_is_tf1_legacy_bilinear():
    img = frames(1, 1, 41, 30)[0, 0]
    got = i3d.resize_bilinear_tf1(torch.from_numpy(img).permute(2, 0, 1)[None].double(), (224, 224))
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), numpy_bilinear(img, 224, half_pixel=False),
                               atol=1e-9)
    # legacy coordinates: halving picks the even pixels; doubling keeps every source pixel at even places
    big = torch.rand(1, 3, 448, 448, dtype=torch.float64)
    torch.testing.assert_close(i3d.resize_bilinear_tf1(big, (224, 224)), big[..., ::2, ::2])
    small = torch.rand(1, 3, 112, 112, dtype=torch.float64)
    up = i3d.resize_bilinear_tf1(small, (224, 224))
    torch.testing.assert_close(up[..., ::2, ::2], small)
    torch.testing.assert_close(up[..., 1:-1:2, ::2], (small[..., :-1, :] + small[..., 1:, :]) / 2)


def test_i3d_preprocess_layout_and_scaling():
    x = frames(2, 3, 50, 60)
    got = i3d.preprocess(x)
    assert got.shape == (2, 3, 3, 224, 224)
    want = numpy_bilinear(x[1, 2], 224, half_pixel=False) * 2 / 255 - 1  # clip 1, frame 2
    np.testing.assert_allclose(got[1, :, 2].permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert got.min() >= -1 and got.max() <= 1


# ---------------------------------------------------------------- I3D: loading and embedding


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> tuple[Path, i3d.InceptionI3d]:
    torch.manual_seed(2)
    model = randomize(i3d.InceptionI3d(width=TINY), seed=2)
    return save(model.state_dict(), tmp_path_factory.mktemp("i3d") / i3d.WEIGHTS_FILE), model


def test_i3d_loads_and_embeds_clips(i3d_file):
    path, model = i3d_file
    emb = load_embedder("i3d", path, width=TINY, batch_size=1)
    assert isinstance(emb, Embedder) and emb.fps is None
    x = frames(2, 20, 32, 40, seed=4)
    rows = emb.embed(x, "video")
    assert rows.shape == (2, 400)
    with torch.no_grad():
        pool, logits = model(i3d.preprocess(x[:, :16]))
    torch.testing.assert_close(rows, logits)
    assert rows.std() > 1e-2, "features collapsed; the comparison above would be vacuous"
    torch.testing.assert_close(emb.logits(x, "video"), logits)
    assert torch.equal(emb.embed(x, "video"), rows)  # deterministic
    changed = x.copy()
    changed[:, 16:] = 0  # frames after the first 16 are not looked at
    assert torch.equal(emb.embed(changed, "video"), rows)


def test_i3d_pool_features_map_linearly_to_the_logits(i3d_file):
    path, model = i3d_file
    x = frames(2, 16, 24, 24, seed=5)
    pool = i3d.load(path, width=TINY, features="pool").embed(x, "video")
    assert pool.shape == (2, model.pool_dim)
    w, b = model.logits.conv3d.weight.flatten(1), model.logits.conv3d.bias
    torch.testing.assert_close(pool @ w.T + b, i3d.load(path, width=TINY).embed(x, "video"))


def test_i3d_logits_are_averaged_over_time_steps(i3d_file):
    path, model = i3d_file
    x = frames(1, 24, 20, 20, seed=6)  # 24 frames leave 2 time steps after the final pool
    with torch.no_grad():
        steps = model.features(i3d.preprocess(x))  # (1, D, 2)
    assert steps.shape[2] == 2
    w, b = model.logits.conv3d.weight.flatten(1), model.logits.conv3d.bias
    per_step = torch.einsum("kd,bdt->bkt", w, steps) + b[:, None]
    assert (per_step[..., 0] - per_step[..., 1]).abs().max() > 1e-3  # the two steps differ: the mean matters
    got = i3d.load(path, width=TINY, num_frames=None).embed(x, "video")
    torch.testing.assert_close(got, per_step.mean(2))


def test_i3d_frame_counts(i3d_file):
    path, _ = i3d_file
    with pytest.raises(ValueError, match="12 frames are too short"):
        i3d.load(path, width=TINY).embed(frames(1, 12, 16, 16), "video")
    assert i3d.load(path, width=TINY, num_frames=None).embed(frames(1, 12, 16, 16), "video").shape == (1, 400)
    with pytest.raises(ValueError, match="8 frames are too short"):
        i3d.load(path, width=TINY, num_frames=None).embed(frames(1, 8, 16, 16), "video")


# ---------------------------------------------------------------- refusals, one line each


@pytest.mark.parametrize("module, expected", [(inception, inception.WEIGHTS_FILE), (i3d, i3d.WEIGHTS_FILE)])
def test_missing_weights_say_what_to_put_where(module, expected, tmp_path):
    for weights in (None, tmp_path / "absent.pt"):
        with pytest.raises(WeightsMissing) as err:
            module.load(weights)
        assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "absent.pt") in str(err.value)


@pytest.mark.parametrize("module", [inception, i3d])
def test_bad_weight_files_are_refused_in_one_line(module, tmp_path):
    """Unreadable files and TorchScript archives: test_embed_common.py; here, a foreign layout."""
    wrong = save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(UserError) as err:
        module.load(wrong, width=TINY)
    text = str(err.value)
    assert text.startswith(str(wrong)) and "published layout" in text and "\n" not in text


def test_wrong_inputs_are_refused(inception_file, i3d_file):
    for emb in (inception.load(inception_file[0], width=TINY), i3d.load(i3d_file[0], width=TINY)):
        with pytest.raises(ValueError, match="video only"):
            emb.embed(np.zeros((1, 16000), np.float32), "audio")
        with pytest.raises(ValueError, match="uint8 frames"):
            emb.embed(np.zeros((1, 16, 8, 8, 3), np.float32), "video")
