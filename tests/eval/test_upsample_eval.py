"""`avlink eval --task upsample` and its image measures."""

import json
import math

import numpy as np
import pytest

from avlink.cli import main
from avlink.eval.upsample import psnr, ssim

from helpers import random_checkpoint, random_upsampler, randomize_published


def test_psnr_known_values():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # MSE 100: 28.13 dB
    ramp = np.tile(np.arange(16, dtype=np.uint8)[None, None, :, None] * 10, (1, 16, 1, 3))
    shifted = np.roll(ramp, 1, axis=2)  # one pixel to the right: 15 columns off by 10, one by 150
    assert psnr(shifted, ramp) == pytest.approx(10 * math.log10(255**2 / ((15 * 100 + 150**2) / 16)))


def test_ssim_known_values():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    c1 = (0.01 * 255) ** 2  # constant frames: only the luminance term is left
    assert ssim(a, a + 10) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    assert ssim(noise, other) < 0.1 < 0.9 < ssim(noise, np.clip(noise.astype(int) + 2, 0, 255).astype(np.uint8))
    with pytest.raises(AssertionError, match="smaller than the SSIM window"):
        ssim(a[:, :8, :8], a[:, :8, :8])


@pytest.fixture(scope="module")
def syncbench(tmp_path_factory):
    from avlink.data.syncbench import synth

    root = tmp_path_factory.mktemp("syncbench")
    synth(root, n=2, split="test", preset="tiny")
    return root


def test_eval_upsample_scores_every_row(syncbench, tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path / "ckpt", **{"clip.duration": 16 / 6})
    out = tmp_path / "eval"
    assert main(["eval", "--task", "upsample", "--ckpt", str(ckpt), "--data", str(syncbench), "--out", str(out)]) == 2
    assert "no upsampler.safetensors" in capsys.readouterr().err
    random_upsampler(ckpt)
    assert main(["eval", "--task", "upsample", "--ckpt", str(ckpt), "--data", str(syncbench), "--out", str(out),
                 "--upsample-steps", "2"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["clips"] == 2 and result["output"] == "64x64 at 24 fps"
    rows = result["rows"]
    assert set(rows) == {"truth", "base", "nearest", "linear", "upsampler"}
    assert rows["base"]["fps"] == 6 and rows["upsampler"]["fps"] == 24
    assert rows["truth"]["psnr"] is None and rows["truth"]["event_f1"] > 0.5  # the true clip finds its events
    # AV-Align's parts: nearest neighbour holds each base frame for 4 output frames (no flow between them), so
    # its motion peaks can only fall where a base frame starts, at most 6 a second at 24 fps
    for row in rows:
        assert 0 <= rows[row]["onsets_matched"] <= 1 and rows[row]["motion_peaks_per_s"] >= 0, row
    assert 0 < rows["nearest"]["motion_peaks_per_s"] <= 6
    assert "| onsets matched | motion peaks/s |" in (out / "metrics.md").read_text()
    for row in ("nearest", "linear", "upsampler"):
        assert rows[row]["psnr"] > 5 and -1 <= rows[row]["ssim"] <= 1, row
    # interpolation of the true base frames is closer to the truth than random weights' output
    assert rows["linear"]["psnr"] > rows["upsampler"]["psnr"]
    assert "| **upsampler** | 24 |" in (out / "metrics.md").read_text()
    # base frames from the checkpoint's A2V of the clip's sound
    assert main(["eval", "--task", "upsample", "--ckpt", str(ckpt), "--data", str(syncbench), "--out",
                 str(tmp_path / "a2v"), "--source", "a2v", "--steps", "1", "--n", "1", "--upsample-steps", "1"]) == 0
    result = json.loads((tmp_path / "a2v" / "metrics.json").read_text())
    assert result["source"] == "a2v" and result["a2v_steps"] == 1 and result["clips"] == 1
    assert result["rows"]["linear"]["psnr"] < rows["linear"]["psnr"]  # random A2V frames are far from the truth


def fixed_classifier(path, classes: set[str], scale=(1, 1)):
    """A classifiers file that says `classes` of every clip (zero head weights, a bias of +-5 per class)."""
    import torch

    from avlink.data.syncbench import CLASSES
    from avlink.eval import classifiers as clf

    cfg = clf.ClassifierConfig(audio_width=8, video_width=8, embed_dim=8, audio=scale == (1, 1), video_scale=scale)
    model = clf.SyncBenchClassifiers(cfg)
    with torch.no_grad():
        model.video.head.weight.zero_()
        model.video.head.bias.copy_(torch.tensor([5.0 if c in classes else -5.0 for c in CLASSES]))
    clf.save_classifiers(path, model)
    return path


def test_eval_upsample_class_accuracy_by_the_classifier_of_each_geometry(syncbench, tmp_path, capsys):
    from avlink.data.syncbench import load_metadata
    from avlink.eval.classifiers import clip_classes

    ckpt = random_upsampler(random_checkpoint(tmp_path / "ckpt", **{"clip.duration": 16 / 6}))
    out = tmp_path / "eval"
    argv = ["eval", "--task", "upsample", "--ckpt", str(ckpt), "--data", str(syncbench), "--out", str(out),
            "--upsample-steps", "1"]
    assert main(argv) == 0  # no classifier files: the column is '-'
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert all(r["class_acc"] is None and r["fvd"] is None for r in rows.values())
    text = (out / "metrics.md").read_text()
    assert "| **upsampler** | 24 |" in text and text.split("| **upsampler** |")[1].split("\n")[0].endswith("| - | - |")
    assert "no classifiers-upsampled.safetensors" in text
    truth = [clip_classes(row) for row in load_metadata(syncbench)]
    # the base classifier sees no class (every clip has one: 0 right); the output one says the first clip's set
    fixed_classifier(ckpt / "classifiers.safetensors", set())
    fixed_classifier(ckpt / "classifiers-upsampled.safetensors", truth[0], scale=(4, 4))
    assert main(argv) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    expected = np.mean([t == truth[0] for t in truth])
    assert rows["base"]["class_acc"] == 0.0
    for row in ("truth", "nearest", "linear", "upsampler"):
        assert rows[row]["class_acc"] == pytest.approx(expected), row
    # an output classifier of another scale is refused in one line
    fixed_classifier(ckpt / "classifiers-upsampled.safetensors", truth[0], scale=(2, 2))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "classifiers-upsampled.safetensors: a video classifier of scale (2, 2)" in err and err.count("\n") == 1


def test_eval_upsample_fvd_with_i3d_weights(syncbench, tmp_path, monkeypatch, capsys):
    """FVD through `--weights i3d=PATH`, with a random I3D of 1/16 the published width (a full-size one runs
    for minutes on a CPU): the truth row against itself is 0, the others are not."""
    import functools

    import torch

    from avlink.eval.embed import i3d

    tiny = 1 / 16
    weights = tmp_path / "rgb_imagenet.pt"
    torch.save(randomize_published(i3d.InceptionI3d(width=tiny), seed=2).state_dict(), weights)
    monkeypatch.setattr(i3d, "load", functools.partial(i3d.load, width=tiny))
    ckpt = random_upsampler(random_checkpoint(tmp_path / "ckpt", **{"clip.duration": 16 / 6}))
    out = tmp_path / "eval"
    argv = ["eval", "--task", "upsample", "--ckpt", str(ckpt), "--data", str(syncbench), "--out", str(out),
            "--upsample-steps", "1", "--weights", f"i3d={weights}"]
    assert main(argv) == 0
    result = json.loads((out / "metrics.json").read_text())
    rows = result["rows"]
    assert result["fvd"] == {"embedder": "i3d", "clips": 2, "frames": 16} and rows["base"]["fvd"] is None
    scale = max(rows[row]["fvd"] for row in ("nearest", "linear", "upsampler"))
    assert abs(rows["truth"]["fvd"]) <= 1e-6 * scale
    for row in ("nearest", "linear", "upsampler"):
        assert rows[row]["fvd"] > 0, row
    assert "biased upward" in (out / "metrics.md").read_text()
    # one clip has no covariance: no FVD, no error
    assert main([*argv, "--n", "1"]) == 0
    assert all(r["fvd"] is None for r in json.loads((out / "metrics.json").read_text())["rows"].values())
    capsys.readouterr()
    assert main([*argv[:-1], f"clap={weights}"]) == 2
    assert "--task upsample takes i3d=PATH (FVD) only" in capsys.readouterr().err
