import json

import pytest

from avlink.cli import main


def run_json(capsys, preset):
    assert main(["params", "--preset", preset, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["parts"]


def test_paper_preset_matches_the_paper(capsys):
    parts = run_json(capsys, "paper")
    # Paper: 576M-parameter audio and video backbones, 8 fusion blocks of 186M.
    assert parts["audio backbone"]["params"] == pytest.approx(576e6, rel=0.05)
    assert parts["video backbone"]["params"] == pytest.approx(576e6, rel=0.05)
    fusion = parts["fusion v2a (8 blocks)"]
    assert fusion["params"] == pytest.approx(186e6, rel=0.10)
    assert fusion["trainable"] == fusion["params"]
    assert parts["audio backbone"]["trainable"] == 0 and parts["video backbone"]["trainable"] == 0


def test_table_output(capsys):
    assert main(["params", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "audio backbone" in out and "fusion a2v" in out and "total" in out


def test_the_upsampler_is_listed_apart_from_the_linked_model(capsys):
    import torch

    from avlink.config import get_preset
    from avlink.system import build_upsampler

    parts = run_json(capsys, "paper")
    up = parts["video upsampler (to 512x288 at 24 fps)"]
    assert up["trainable"] == up["params"] > 100e6
    assert parts["total"]["params"] < parts["audio backbone"]["params"] * 3  # not added into the linked total
    tiny = run_json(capsys, "tiny")["video upsampler (to 64x64 at 24 fps)"]
    with torch.device("cpu"):
        assert tiny["params"] == sum(p.numel() for p in build_upsampler(get_preset("tiny")).parameters())
