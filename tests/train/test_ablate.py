"""`avlink ablate`: every Table 2 variant trained on a random checkpoint's frozen generators, scored, tabled."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from avlink import cli
from avlink.checkpoint import load_config
from avlink.errors import UserError
from avlink.train import ablate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import random_checkpoint, tiny_config  # noqa: E402

TINY_CLIP = {"clip.duration": 16 / 6}  # the tiny preset's clip, which `avlink prepare --preset tiny` writes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avlink.data.prepare import prepare
    from avlink.data.syncbench import synth

    root = tmp_path_factory.mktemp("ablate")
    ckpt = random_checkpoint(root / "ckpt", **TINY_CLIP)
    syncbench = root / "syncbench"
    synth(syncbench, n=4, split="train", preset="tiny")
    synth(syncbench, n=2, split="test", preset="tiny")
    shards = root / "shards"
    prepare(f"syncbench:{syncbench}:train", shards, shard_size=2, vae=str(ckpt / "vae.safetensors"), progress=False)
    return {"ckpt": ckpt, "syncbench": syncbench, "shards": shards, "root": root}


def ablate_argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["ablate", "--ckpt", str(inputs["ckpt"]), "--data", str(inputs["shards"]), "--syncbench",
            str(inputs["syncbench"]), "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-clips", "2",
            "--sample-steps", "2", "--vocoder", "griffinlim", "--no-progress", *extra]


def test_ablate_writes_one_row_per_variant_and_resumes(inputs: dict[str, Path], capsys) -> None:
    out = inputs["root"] / "out"
    assert cli.main(ablate_argv(inputs, out)) == 0
    table = (out / "table2.md").read_text()
    summary = json.loads((out / "table2.json").read_text())
    assert list(summary["rows"]) == [*ablate.DEFAULT_VARIANTS, "ceiling", "floor"]
    assert summary["clips"] == 2 and {"onset_acc", "event_f1", "av_align"} <= set(summary["columns"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == len(ablate.DEFAULT_VARIANTS) + 2
    for variant in ablate.DEFAULT_VARIANTS:
        assert f"| {ablate.VARIANTS[variant][0]} |" in table
        run = out / "runs" / variant
        assert (run / "export" / "fusion.safetensors").is_file()
        assert sorted(p.name for p in (run / "eval" / "generated").iterdir()) == sorted(
            f"{name}.wav" for name in json.loads((run / "eval" / "source.json").read_text())["clips"])
        # The variant's fusion settings on the checkpoint's own generators.
        cfg = load_config(run / "export" / "config.json")
        expected = tiny_config(**{"audio.text_dim": 384, "video.text_dim": 384, **TINY_CLIP,
                                  **ablate.VARIANTS[variant][1]})
        assert cfg == expected, variant
    # Rerun: every variant is trained already and its clips are kept.
    generated = out / "runs" / "fusion" / "eval" / "generated"
    before = {p.name: p.stat().st_mtime_ns for p in generated.iterdir()}
    capsys.readouterr()
    assert cli.main(ablate_argv(inputs, out, "--variants", "fusion")) == 0
    assert "already trained to step 2" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in generated.iterdir()} == before
    assert list(json.loads((out / "table2.json").read_text())["rows"]) == ["fusion", "ceiling", "floor"]


def test_captions_prompt_the_generation_and_match_the_scorecard(inputs: dict[str, Path]) -> None:
    """The fusion row samples as the scorecard's AV-Link row does (captions, batches, seed per batch); without
    prompts the same weights generate something else, and a changed setting regenerates the clips."""
    import soundfile as sf
    import torch

    from avlink.eval.conditions import caption_texts, load_conditions
    from avlink.system import load_codecs
    from avlink.train.scorecard import generate

    out = inputs["root"] / "prompts"
    argv = ablate_argv(inputs, out, "--variants", "fusion", "--batch", "2")
    assert cli.main(argv) == 0
    folder = out / "runs" / "fusion" / "eval"
    assert json.loads((folder / "source.json").read_text())["prompts"] == "captions"
    assert "prompts: captions" in (out / "table2.md").read_text()
    with_captions = {p.name: sf.read(p)[0] for p in (folder / "generated").iterdir()}

    model = ablate.load_variant(inputs["ckpt"], out / "runs" / "fusion", "v2a", torch.device("cpu"))
    cfg = load_config(inputs["ckpt"] / "config.json")
    codecs = load_codecs(inputs["ckpt"], cfg, "griffinlim")
    conds = load_conditions(inputs["syncbench"], 2, "v2a", cfg.clip, codecs)
    texts = caption_texts(model, inputs["syncbench"], conds)
    expected = generate(model, "v2a", "avlink", conds, texts, 2, 0, batch=2)
    from avlink.eval.conditions import write_output

    mine = out / "mine"
    mine.mkdir()
    for x, cond in zip(expected, conds, strict=True):
        write_output("v2a", x, cond, mine, cfg.clip, codecs)
    assert all(np.array_equal(sf.read(mine / name)[0], wave) for name, wave in with_captions.items())
    bare = generate(model, "v2a", "avlink", conds, None, 2, 0, batch=2)
    assert not any(torch.allclose(a, b) for a, b in zip(expected, bare, strict=True))
    # Guidance on the generated stream's prompt, for AV-Link and the generator alone alike.
    from avlink.sample import sample_link

    guided = generate(model, "v2a", "avlink", conds, texts, 2, 0, batch=2, cfg_scale=3.0)
    assert not any(torch.allclose(a, b) for a, b in zip(expected, guided, strict=True))
    direct = sample_link(model, "v2a", torch.cat([c.x_cond for c in conds]), text_gen=texts.rows(0, 2),
                         text_cond=texts.rows(0, 2), steps=2, seed=0, cfg_scale=3.0)
    assert torch.equal(torch.cat(guided), direct)
    alone, alone_guided = (generate(model, "v2a", "t2a_alone", conds, texts, 2, 0, batch=2, cfg_scale=c)
                           for c in (1.0, 3.0))
    assert not any(torch.allclose(a, b) for a, b in zip(alone, alone_guided, strict=True))

    assert cli.main([*argv, "--prompts", "none"]) == 0
    assert json.loads((folder / "source.json").read_text())["prompts"] == "none"
    without = {p.name: sf.read(p)[0] for p in (folder / "generated").iterdir()}
    assert without.keys() == with_captions.keys()
    assert not any(np.array_equal(without[k], with_captions[k]) for k in without)


def test_variants_trained_elsewhere_are_scored_from_their_exports(inputs: dict[str, Path], tmp_path: Path,
                                                                   capsys) -> None:
    """--train-only trains and stops (no SyncBench needed); a copy of the export folders alone is scored without
    retraining, and an export trained with other settings is retrained."""
    import shutil

    remote, local = tmp_path / "remote", tmp_path / "local"
    argv = ablate_argv(inputs, remote, "--variants", "fusion", "direct", "--train-only", "--syncbench",
                       str(tmp_path / "absent"), "--set", "train.ema_decay=0.5")
    assert cli.main(argv) == 0
    assert not (remote / "table2.md").exists() and not (remote / "runs" / "fusion" / "eval").exists()
    for variant in ("fusion", "direct"):
        card = json.loads((remote / "runs" / variant / "export" / "fusion.card.json").read_text())
        assert card["steps"] == 2 and card["train"]["ema_decay"] == 0.5  # --set reached the training
        shutil.copytree(remote / "runs" / variant / "export", local / "runs" / variant / "export")
    weights = {v: (local / "runs" / v / "export" / "fusion.safetensors").read_bytes() for v in ("fusion", "direct")}
    capsys.readouterr()
    assert cli.main(ablate_argv(inputs, local, "--variants", "fusion", "direct", "--set", "train.ema_decay=0.5")) == 0
    printed = capsys.readouterr().out
    assert printed.count("trained export found (2 steps") == 2 and "avlink train fusion" not in printed
    assert {v: (local / "runs" / v / "export" / "fusion.safetensors").read_bytes() for v in weights} == weights
    assert list(json.loads((local / "table2.json").read_text())["rows"]) == ["fusion", "direct", "ceiling", "floor"]
    # Other settings (here another --set value, --steps 3, or the "direct" export filed under another variant's
    # name): trained here.
    capsys.readouterr()
    assert cli.main([*ablate_argv(inputs, local, "--variants", "direct"), "--train-only", "--set",
                     "train.ema_decay=0.9"]) == 0
    assert "avlink train fusion" in capsys.readouterr().out
    assert json.loads((local / "runs" / "direct" / "export" / "fusion.card.json").read_text())["train"][
        "ema_decay"] == 0.9
    shutil.rmtree(local / "runs" / "no_reinjection", ignore_errors=True)
    shutil.copytree(local / "runs" / "direct" / "export", local / "runs" / "no_reinjection" / "export")
    capsys.readouterr()
    assert cli.main([*ablate_argv(inputs, local, "--variants", "no_reinjection"), "--train-only"]) == 0
    assert "avlink train fusion" in capsys.readouterr().out
    assert cli.main([*ablate_argv(inputs, local, "--variants", "fusion"), "--steps", "3", "--train-only"]) == 0
    assert json.loads((local / "runs" / "fusion" / "export" / "fusion.card.json").read_text())["steps"] == 3


def test_ablate_refuses_missing_inputs_in_one_line(inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert cli.main(ablate_argv(inputs, tmp_path / "o", "--ckpt", str(tmp_path))) == 2
    assert "missing config.json" in capsys.readouterr().err
    assert cli.main(ablate_argv(inputs, tmp_path / "o", "--batch-size", "64")) == 2
    assert "fewer than one batch of 64" in capsys.readouterr().err
    assert cli.main(ablate_argv(inputs, tmp_path / "o", "--data", str(tmp_path))) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_variants_train_through_the_library_and_a_failure_names_the_variant(inputs: dict[str, Path],
                                                                          tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    """Training is a library call, not a second entry into `avlink`; the card and the log keep the equivalent
    command line."""
    def entry_point(argv=None):
        raise AssertionError(f"a variant trained through avlink.cli.main: {argv}")

    monkeypatch.setattr(cli, "main", entry_point)
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    args = parser.parse_args(ablate_argv(inputs, tmp_path / "o", "--variants", "fusion", "--train-only")[1:])
    assert ablate.run(args) == 0
    card = json.loads((tmp_path / "o" / "runs" / "fusion" / "export" / "fusion.card.json").read_text())
    assert card["command"].startswith("avlink train fusion ") and "--resume" in card["command"]
    assert f"avlink ablate: fusion: {card['command']}" in capsys.readouterr().out
    bad = parser.parse_args([*ablate_argv(inputs, tmp_path / "bad", "--variants", "direct", "--train-only")[1:],
                             "--set", "train.nope=1"])
    with pytest.raises(UserError, match=r"^variant direct: bad config: .*nope"):
        ablate.run(bad)


def test_overrides_rebuild_the_checkpoint_config_with_the_variant() -> None:
    from avlink.config import get_preset

    base = tiny_config(**{"fusion.injection": "direct"})
    preset, overrides = ablate.model_overrides(base, "no_reinjection")
    assert preset == "tiny" and overrides["fusion.injection"] == "static"
    assert get_preset(preset).override(**overrides) == base.override(**{"fusion.injection": "static"})
