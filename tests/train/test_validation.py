"""Validation during `avlink train` (--val-data): samples and scores of a few SyncBench val clips with the EMA
weights, as val/... scalars, TensorBoard media and the model card's "validation"; a failing one never stops
training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from avlink import cli
from avlink.train import validation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import random_checkpoint  # noqa: E402

# The random checkpoint's sizes (helpers.tiny_config, MiniLM-wide text) on the tiny preset's clip, which
# `avlink prepare --preset tiny` writes.
MODEL = ["--set", "model.audio.dim=32", "model.audio.depth=4", "model.audio.heads=2", "model.video.dim=48",
         "model.video.depth=6", "model.video.heads=2", "model.fusion.dim=32", "model.fusion.heads=2",
         "model.fusion.num_blocks=2", "train.log_every=1"]
FAST_VAL = ["--val-clips", "2", "--val-steps", "2", "--val-vocoder", "griffinlim"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avlink.data.prepare import prepare
    from avlink.data.syncbench import synth

    root = tmp_path_factory.mktemp("validation")
    ckpt = random_checkpoint(root / "ckpt", **{"clip.duration": 16 / 6})
    syncbench = root / "syncbench"
    synth(syncbench, n=2, split="train", preset="tiny")
    synth(syncbench, n=2, split="val", preset="tiny")
    shards = root / "shards"
    prepare(f"syncbench:{syncbench}:train", shards, shard_size=2, vae=str(ckpt / "vae.safetensors"), progress=False)
    return {"ckpt": ckpt, "syncbench": syncbench, "shards": shards}


def val_ids(inputs: dict[str, Path]) -> list[str]:
    from avlink.data.datasets import syncbench_dataset

    return [item.id for item in syncbench_dataset(inputs["syncbench"], "val").items]


def train(inputs: dict[str, Path], out: Path, part: str, *extra: str) -> int:
    ckpt = inputs["ckpt"]
    parts = {"fusion": ["--audio-dit", str(ckpt / "audio_dit.safetensors"),
                        "--video-dit", str(ckpt / "video_dit.safetensors")]}.get(part, [])
    vae = ["--vae", str(ckpt / "vae.safetensors")] if part in ("fusion", "audio") else []
    return cli.main(["train", part, "--data", str(inputs["shards"]), "--out", str(out), "--max-steps", "2",
                     "--batch-size", "2", "--no-progress", *parts, *vae, *extra, *MODEL])


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]


def card(out: Path, name: str) -> dict:
    return json.loads((out / "export" / f"{name}.card.json").read_text())


def tb_tags(out: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"audio": 0, "images": 0, "scalars": 0}).Reload()
    return events.Tags()


def test_v2a_validates_the_last_step_into_samples_scalars_tensorboard_and_card(inputs, tmp_path) -> None:
    out = tmp_path / "v2a"
    assert train(inputs, out, "fusion", "--task", "v2a", "--val-data", str(inputs["syncbench"]), *FAST_VAL) == 0
    step = out / "samples" / "step_000000002"
    ids = val_ids(inputs)
    assert sorted(p.name for p in (step / "v2a").glob("*.wav")) == sorted(f"{i}.wav" for i in ids)
    report = json.loads((step / "v2a" / "metrics.json").read_text())
    assert report["clips"] == 2
    summary = json.loads((step / validation.SUMMARY_FILE).read_text())
    assert {"v2a/onset_acc", "v2a/event_f1", "v2a/av_align"} <= set(summary["metrics"])
    assert summary["metrics"]["v2a/event_f1"] == report["metrics"]["event_f1"]["model"]
    # Only the last step validates (--val-every 0), logged beside the loss of that step.
    val_lines = [line for line in logged(out) if any(k.startswith("val/") for k in line)]
    assert [line["step"] for line in val_lines] == [2]
    assert {f"val/{k}": v for k, v in summary["metrics"].items()}.items() <= val_lines[0].items()
    assert card(out, "fusion")["validation"]["metrics"] == summary["metrics"]
    assert card(out, "fusion")["validation"]["step"] == 2
    assert len(list((out / "samples").iterdir())) == 1
    tags = tb_tags(out)
    assert {f"val_samples/v2a/{i}" for i in ids} <= set(tags["audio"])
    assert {f"val_reference/v2a/{i}" for i in ids} <= set(tags["images"])
    assert "val/v2a/event_f1" in tags["scalars"]


def test_joint_validates_both_directions_every_step_without_moving_the_losses(inputs, tmp_path) -> None:
    out = tmp_path / "joint"
    assert train(inputs, out, "fusion", "--task", "joint", "--val-data", f"syncbench:{inputs['syncbench']}:val",
                 "--val-every", "1", *FAST_VAL) == 0
    ids = val_ids(inputs)
    for step in (1, 2):
        folder = out / "samples" / f"step_{step:09d}"
        assert sorted(p.name for p in (folder / "v2a").glob("*.wav")) == sorted(f"{i}.wav" for i in ids)
        assert sorted(p.name for p in (folder / "a2v").glob("*.mp4")) == sorted(f"{i}.mp4" for i in ids)
    lines = logged(out)
    val_lines = [line for line in lines if "val/a2v/event_f1" in line]
    assert [line["step"] for line in val_lines] == [1, 2] and all("val/v2a/av_align" in x for x in val_lines)
    assert card(out, "fusion")["validation"]["step"] == 2
    assert {f"val_samples/a2v/{i}" for i in ids} <= set(tb_tags(out)["images"])
    # The same run without validation trains to the same losses: validation leaves the RNGs as they were (a
    # different noise draw would move the loss in the first digits; kernels may differ in the last bits).
    bare = tmp_path / "bare"
    assert train(inputs, bare, "fusion", "--task", "joint") == 0
    losses = {x["step"]: x["loss"] for x in lines if "loss" in x}
    assert losses == pytest.approx({x["step"]: x["loss"] for x in logged(bare) if "loss" in x}, rel=1e-5)
    assert len(losses) == 2
    assert card(bare, "fusion")["validation"] is None and not (bare / "samples").exists()


def test_a_failing_validation_prints_one_line_and_training_goes_on(inputs, tmp_path, monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("clip unreadable\nsecond line")

    monkeypatch.setattr(validation, "evaluate", broken)
    out = tmp_path / "broken"
    assert train(inputs, out, "fusion", "--task", "v2a", "--val-data", str(inputs["syncbench"]), "--val-every", "1",
                 *FAST_VAL) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "validation" in line]
    assert err == [f"avlink train: validation at step {s} failed (RuntimeError: clip unreadable); training goes on"
                   for s in (1, 2)]
    assert (out / "export" / "fusion.safetensors").is_file()
    assert card(out, "fusion")["validation"] == {"step": 2, "error": "RuntimeError: clip unreadable"}
    assert [x["step"] for x in logged(out) if "loss" in x] == [1, 2]
    assert all(set(x) != {"step"} for x in logged(out))  # no empty line where the validation failed


@pytest.mark.parametrize("part, name, keys, suffix", [
    ("audio", "t2a", {"onset_acc", "av_align"}, ".wav"),
    ("video", "t2v", {"event_f1", "av_align"}, ".mp4"),
    ("vae", "vae", {"mel_l1"}, ".wav"),
    ("classifiers", "classifiers", {"audio_acc", "video_acc", "audio_label_acc", "video_label_acc"}, None),
])
def test_every_part_validates(inputs, tmp_path, part, name, keys, suffix) -> None:
    out = tmp_path / part
    extra = ["--set", "vae={hidden: 16, depth: 1}"] if part == "vae" else []
    assert train(inputs, out, part, "--val-data", str(inputs["syncbench"]), *FAST_VAL, *extra) == 0
    folder = out / "samples" / "step_000000002" / name
    if suffix is not None:
        assert sorted(p.name for p in folder.glob(f"*{suffix}")) == sorted(f"{i}{suffix}" for i in val_ids(inputs))
    metrics = json.loads((folder.parent / validation.SUMMARY_FILE).read_text())["metrics"]
    assert set(metrics) >= {f"{name}/{k}" for k in keys}
    export = {"audio": "audio_dit", "video": "video_dit"}.get(part, part)
    assert card(out, export)["validation"]["metrics"] == metrics
    if part == "vae":
        assert metrics["vae/mel_l1"] > 0
    if part == "classifiers":
        assert all(0 <= v <= 1 for v in metrics.values())


def test_bad_validation_flags_are_one_line(inputs, tmp_path, capsys) -> None:
    out = tmp_path / "refused"
    cases = [
        (["--val-data", str(tmp_path / "nowhere")], "not a SyncBench folder"),
        (["--val-data", f"syncbench:{inputs['syncbench']}:test"], "no clips of split 'test'"),
        (["--val-every", "2"], "--val-every 2: needs --val-data"),
        (["--val-data", str(inputs["syncbench"]), "--val-clips", "0"], "--val-clips 0"),
        (["--val-data", str(inputs["syncbench"]), "--val-classifiers", str(tmp_path / "none.safetensors")],
         "classifier weights not found"),
    ]
    for extra, message in cases:
        assert train(inputs, out, "fusion", "--task", "v2a", *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # Fusion on latent shards trains without --vae, but its samples cannot be decoded without one.
    ckpt = inputs["ckpt"]
    assert cli.main(["train", "fusion", "--data", str(inputs["shards"]), "--out", str(out), "--max-steps", "2",
                     "--audio-dit", str(ckpt / "audio_dit.safetensors"), "--video-dit",
                     str(ckpt / "video_dit.safetensors"), "--val-data", str(inputs["syncbench"]), *MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the audio VAE" in err and len(err.splitlines()) == 1, err
    assert not (out / "checkpoints").exists()


def test_val_data_spec_and_frame_strip(inputs) -> None:
    root = inputs["syncbench"]
    assert validation.parse_val_data(str(root)) == validation.ValData(root, "val")
    assert validation.parse_val_data(f"syncbench:{root}:train").split == "train"
    assert validation.parse_val_data(f"syncbench:{root}:all").split is None
    video = torch.linspace(-1, 1, 3 * 4 * 16 * 16).reshape(3, 4, 16, 16)  # (C, T, H, W)
    strip = validation.frame_strip(video)
    assert strip.shape == (3, 64, 256)  # frames side by side, 4x nearest
    assert torch.allclose(strip[:, ::4, 16 * 4 * 2::4][:, :, :16], (video[:, 2] + 1) / 2)


def test_classifier_weights_add_class_accuracy(inputs, tmp_path) -> None:
    assert train(inputs, tmp_path / "classifiers", "classifiers") == 0
    weights = tmp_path / "classifiers" / "export" / "classifiers.safetensors"
    out = tmp_path / "v2a"
    assert train(inputs, out, "fusion", "--task", "v2a", "--val-data", str(inputs["syncbench"]),
                 "--val-classifiers", str(weights), *FAST_VAL) == 0
    validated = card(out, "fusion")["validation"]
    assert 0 <= validated["metrics"]["v2a/class_acc"] <= 1 and validated["classifiers"] == str(weights)
