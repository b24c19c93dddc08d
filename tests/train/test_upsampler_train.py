"""`avlink train upsampler` end to end on a few SyncBench clips: pairs decoded, steps, export, loaded again."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from avlink.cli import main
from avlink.data.pairs import Pairs

from helpers import tiny_config

SMALL = ["--set", "model.upsampler.dim=16", "model.upsampler.depth=1", "model.upsampler.crop=[2,4,4]"]


@pytest.fixture(scope="module")
def syncbench(tmp_path_factory):
    from avlink.data.syncbench import synth

    root = tmp_path_factory.mktemp("syncbench")
    synth(root, n=4, split="train", preset="tiny")
    return root


def test_train_upsampler_decodes_pairs_trains_and_exports(syncbench, tmp_path):
    out = tmp_path / "up"
    args = ["train", "upsampler", "--data", f"syncbench:{syncbench}:train", "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--no-progress", *SMALL]
    assert main(args) == 0
    pairs = Pairs(out / "pairs")
    assert len(pairs) == 4
    assert pairs.low.shape == (4, 16, 16, 16, 3) and pairs.high.shape == (4, 64, 64, 64, 3)
    assert pairs.envelope.shape == (4, 2, 64)
    # the 24 fps frame at a base frame's time shows what the base frame shows, 4x finer
    hi = pairs.high[0, ::4].reshape(16, 16, 4, 16, 4, 3).mean(axis=(2, 4))
    assert np.abs(hi - pairs.low[0]).mean() < 12
    export = out / "export" / "upsampler.safetensors"
    card = json.loads((out / "export" / "upsampler.card.json").read_text())
    assert card["part"] == "upsampler" and card["steps"] == 2 and card["final_loss"] > 0
    with safe_open(str(export), framework="pt") as f:
        assert json.loads(f.metadata()["upsampler"])["dim"] == 16
    from avlink.system import load_upsampler

    model = load_upsampler(export, tiny_config(**{"clip.duration": 16 / 6}))
    assert model.cfg.depth == 1 and not any(p.requires_grad for p in model.parameters())
    # resume to 3 steps reads the pairs folder again
    assert main([*args[:7], "3", *args[8:], "--resume"]) == 0
    assert json.loads((out / "export" / "upsampler.card.json").read_text())["steps"] == 3
    # pairs whose envelope another definition made are refused, not trained on
    meta = json.loads((out / "pairs" / "pairs.json").read_text())
    (out / "pairs" / "pairs.json").write_text(json.dumps({**meta, "envelope": 1}))
    assert main([*args[:7], "4", *args[8:], "--resume"]) == 2


def test_train_upsampler_refuses_shards_and_val_data(syncbench, tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    assert main(["train", "upsampler", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "trains on clips" in capsys.readouterr().err
    assert main(["train", "upsampler", "--data", f"syncbench:{syncbench}", "--out", str(tmp_path / "o"),
                 "--val-data", str(syncbench), "--no-progress"]) == 2
    assert "eval --task upsample" in capsys.readouterr().err
