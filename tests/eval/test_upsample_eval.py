"""`avlink eval --task upsample` and its image measures."""

import json
import math

import numpy as np
import pytest

from avlink.cli import main
from avlink.eval.upsample import psnr, ssim

from helpers import random_checkpoint, random_upsampler


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
