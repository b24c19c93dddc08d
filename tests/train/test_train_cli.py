"""`avlink train` end to end on a tiny folder of videos: VAE, both generators, then the Fusion Blocks."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from avlink.cli import main
from avlink.data.media import write_video

SMALL = ["--set", "model.audio.dim=32", "model.audio.depth=2", "model.audio.heads=2",
         "model.video.dim=32", "model.video.depth=2", "model.video.heads=2",
         "model.fusion.dim=32", "model.fusion.heads=2", "model.fusion.num_blocks=2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i in range(4):
        frames = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
        t = np.arange(44100 * 3) / 44100
        tone = (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32)
        write_video(root / f"clip{i}.mp4", frames, 8.0, tone, 44100)
    (root / "captions.csv").write_text("file,caption\n" + "".join(f"clip{i}.mp4,tone number {i}\n" for i in range(4)))
    return root


@pytest.fixture(scope="module")
def shards(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert main(["prepare", "--data", f"folder:{videos}", "--out", str(out), "--shard-size", "2"]) == 0
    return out


def train(part, out, data, *extra):
    args = ["train", part, "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
            "--no-progress", *extra, *SMALL]
    assert main(args) == 0
    return out / "export"


def test_all_parts_train_and_export(shards, tmp_path):
    vae = train("vae", tmp_path / "vae", shards, "--set", "vae={hidden: 16, depth: 1}")
    assert (vae / "vae.safetensors").is_file()
    card = json.loads((vae / "vae.card.json").read_text())
    assert card["steps"] == 2 and card["final_loss"] > 0 and card["seed"] == 0
    t2a = train("audio", tmp_path / "t2a", shards, "--vae", str(vae / "vae.safetensors"))
    t2v = train("video", tmp_path / "t2v", shards)
    v2a = train("fusion", tmp_path / "v2a", shards, "--task", "v2a", "--vae", str(vae / "vae.safetensors"),
                "--audio-dit", str(t2a / "audio_dit.safetensors"), "--video-dit", str(t2v / "video_dit.safetensors"))
    weights = load_file(str(v2a / "fusion.safetensors"))
    assert weights and all(k.startswith("v2a.") for k in weights)
    # resume: two more steps continue from step 2
    assert main(["train", "fusion", "--data", str(shards), "--out", str(tmp_path / "v2a"), "--max-steps", "4",
                 "--batch-size", "2", "--no-progress", "--resume", "--vae", str(vae / "vae.safetensors"),
                 "--audio-dit", str(t2a / "audio_dit.safetensors"), "--video-dit", str(t2v / "video_dit.safetensors"),
                 *SMALL]) == 0
    assert json.loads((v2a / "fusion.card.json").read_text())["steps"] == 4


def test_fusion_without_generators_is_one_line(shards, tmp_path, capsys):
    assert main(["train", "fusion", "--data", str(shards), "--out", str(tmp_path), "--no-progress", *SMALL]) == 2
    assert "--audio-dit" in capsys.readouterr().err


def test_bad_override_is_one_line(shards, tmp_path, capsys):
    assert main(["train", "vae", "--data", str(shards), "--out", str(tmp_path), "--set", "model.nope=1"]) == 2
    assert "bad config" in capsys.readouterr().err


def test_bad_override_after_a_good_one_is_one_line(shards, tmp_path, capsys):
    # each --set adds to the ones before it (a later one used to replace them, dropping the bad key silently)
    assert main(["train", "vae", "--data", str(shards), "--out", str(tmp_path), "--set", "model.nope=1",
                 "--set", "train.lr=0.001"]) == 2
    assert "bad config" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, dest", [
    ("avlink.train.cli", ["vae", "--data", "d", "--out", "o", "--set", "a=1", "--set", "b=2", "c=3"], "set"),
    ("avlink.train.recipe", ["--set", "a=1", "--set", "b=2", "c=3"], "set"),
    ("avlink.train.recipe", ["--budget", "a=1", "--budget", "b=2", "c=3"], "budget"),
    ("avlink.train.ablate", ["--task", "v2a", "--set", "a=1", "--set", "b=2", "c=3"], "set"),
    ("avlink.train.ablate", ["--task", "v2a", "--weights", "a=1", "--weights", "b=2", "c=3"], "weights"),
    ("avlink.eval.runner", ["--task", "v2a", "--out", "o", "--weights", "a=1", "--weights", "b=2", "c=3"],
     "weights"),
])
def test_repeated_key_value_options_add_up(module, argv, dest):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    assert getattr(parser.parse_args(argv), dest) == ["a=1", "b=2", "c=3"]


def test_scientific_notation_is_a_number():
    from avlink.train.cli import scalar

    assert scalar("1e-3") == 1e-3 and scalar("2E+2") == 200.0
    assert scalar("fusion") == "fusion" and scalar("nan") == "nan" and scalar(5) == 5


def test_train_args_are_what_their_command_line_parses_to(tmp_path):
    """Code that trains (the recipe, ablations) gets the parser's defaults, and a command line that rebuilds the
    same arguments."""
    import argparse
    import shlex

    from avlink.train.cli import add_arguments, train_args

    args = train_args("fusion", data=tmp_path / "shards", out=tmp_path / "run", task="a2v", max_steps=3,
                      set=["train.lr=1e-3", "model.fusion.dim=32"], resume=True, no_progress=False,
                      vae=tmp_path / "my vae.safetensors", val_classifiers=None)
    assert args.workers == 0 and args.val_clips == 4 and args.data == str(tmp_path / "shards")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = shlex.split(args.command_line)
    assert argv[:3] == ["avlink", "train", "fusion"] and "--no-progress" not in argv
    assert vars(parser.parse_args(argv[2:])) == {k: v for k, v in vars(args).items() if k != "command_line"}
    with pytest.raises(TypeError, match="max_step"):
        train_args("vae", data=tmp_path, out=tmp_path, max_step=3)


def test_the_sync_scorer_trains_and_exports_a_file_the_ranker_loads(shards, tmp_path, capsys):
    from avlink.config import get_preset
    from avlink.sync import SYNC_FILE, load_sync

    export = train("sync", tmp_path / "sync", shards)
    card = json.loads((export / "sync.card.json").read_text())
    assert card["part"] == "sync" and card["steps"] == 2 and card["final_loss"] > 0
    ranker = load_sync(export / SYNC_FILE, get_preset("tiny").clip)
    assert ranker.name == "sync"
    assert main(["train", "sync", "--data", str(shards), "--out", str(tmp_path / "val"), "--val-data",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-data: the sync scorer" in err[0]


def test_a_run_folder_in_use_is_refused_in_one_line(shards, tmp_path, capsys):
    """Two trainings into one --out would resume from the same checkpoints and write the same files: while one
    holds the folder, the other stops with one line and writes nothing; once it is free, training goes on."""
    from filelock import FileLock

    out = tmp_path / "run"
    out.mkdir()
    held = FileLock(str(out / "run.lock"), timeout=0)
    held.acquire()
    try:
        argv = ["train", "vae", "--data", str(shards), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
                "--no-progress", "--set", "vae={hidden: 16, depth: 1}"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "another training is writing this run folder" in err and str(out) in err and "\n" not in err
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    finally:
        held.release()
    assert main(argv) == 0
    assert (out / "export" / "vae.safetensors").is_file()
