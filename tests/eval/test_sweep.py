"""`avlink eval --sweep evals` (network evaluations on the axis), `--sweep cfg` and `--sweep link` (guidance scales),
prompts,
batches, precision and resuming, on a random tiny checkpoint and a few SyncBench clips."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from avlink import cli
from avlink.data.syncbench import synth
from avlink.eval import runner, sweep
from avlink.pipeline import bf16_matmul
from avlink.sample import sample_link

from helpers import random_checkpoint

FAST = ("--n", "2", "--metrics", "events", "av_align")


@pytest.fixture(scope="module")
def syncbench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syncbench")
    synth(root, n=2, seed=0, split="test", preset="tiny")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"))  # text width 384: MiniLM captions fit


def run_sweep(checkpoint: Path, syncbench: Path, out: Path, *argv: str, task: str = "a2v") -> int:
    return cli.main(["eval", "--sweep", "evals", "--ckpt", str(checkpoint), "--data", str(syncbench),
                     "--task", task, "--out", str(out), *FAST, *argv])


def test_plan_puts_every_solver_on_the_same_evaluations():
    points, notes = sweep.plan("evals", ["euler", "midpoint", "heun"], [2.0, 3.0, 4.0], steps=64)
    assert [p.steps for p in points["euler"]] == [2, 3, 4]
    assert [None if p is None else p.steps for p in points["midpoint"]] == [1, None, 2]
    assert all(p is None or p.evals == v for ps in points.values() for p, v in zip(ps, [2, 3, 4], strict=True))
    assert notes == ["midpoint at 3 evaluations: skipped, 2 evaluations per step do not divide it",
                     "heun at 3 evaluations: skipped, 2 evaluations per step do not divide it"]
    steps, _ = sweep.plan("steps", ["heun"], [4.0], steps=64)
    assert steps["heun"][0].evals == 8
    t_cond, _ = sweep.plan("t_cond", ["euler"], [0.5], steps=7)
    assert (t_cond["euler"][0].steps, t_cond["euler"][0].t_cond) == (7, 0.5)


def test_evals_sweep_scores_each_solver_at_equal_cost(syncbench, checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_sweep(checkpoint, syncbench, out, "--methods", "euler", "midpoint", "--values", "2", "3") == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["sweep"] == "evals" and summary["values"] == [2.0, 3.0] and summary["clips"] == 2
    assert summary["steps"] == {"euler": [2, 3], "midpoint": [1, None]}
    assert summary["evals"] == {"euler": [2, 3], "midpoint": [2, None]}
    assert summary["precision"] == "fp32" and summary["prompts"] == "none" and summary["batch"] == 1
    f1 = summary["metrics"]["event_f1"]["model"]
    assert f1["midpoint"][1] is None and all(v is not None for v in (*f1["euler"], f1["midpoint"][0]))
    assert summary["notes"] == ["midpoint at 3 evaluations: skipped, 2 evaluations per step do not divide it"]
    table = (out / "sweep.md").read_text()
    assert "| solver | evaluations | steps |" in table and "| midpoint | 2 | 1 |" in table
    assert "| midpoint | 3 |" not in table and "do not divide it" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "midpoint" / "evals=3").exists()
    assert len(list((out / "midpoint" / "evals=2" / "generated").glob("*.mp4"))) == 2
    assert "do not divide it" in capsys.readouterr().out


def test_a_finished_point_is_reused_and_a_changed_one_redone(syncbench, checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_sweep(checkpoint, syncbench, out, "--values", "2") == 0
    generated = out / "euler" / "evals=2" / "generated"
    first = {p.name: p.stat().st_mtime_ns for p in generated.iterdir()}
    before = json.loads((out / "sweep.json").read_text())
    capsys.readouterr()
    assert run_sweep(checkpoint, syncbench, out, "--values", "2", "4") == 0
    assert "evals=2 (2 steps, 2 evaluations): already scored" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in generated.iterdir()} == first
    after = json.loads((out / "sweep.json").read_text())
    assert after["metrics"]["event_f1"]["model"]["euler"][0] == before["metrics"]["event_f1"]["model"]["euler"][0]
    assert after["wall_s"]["euler"][0] == before["wall_s"]["euler"][0]
    assert run_sweep(checkpoint, syncbench, out, "--values", "2", "--sample-seed", "5") == 0
    assert "already scored" not in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in generated.iterdir()} != first
    # a killed point (no point.json) is redone, not read back
    (out / "euler" / "evals=2" / sweep.POINT_FILE).unlink()
    assert run_sweep(checkpoint, syncbench, out, "--values", "2", "--sample-seed", "5") == 0
    assert "already scored" not in capsys.readouterr().out


def test_batches_keep_the_per_clip_seeds_and_captions_condition(syncbench, checkpoint, tmp_path, monkeypatch):
    """Clip i samples its own noise streams of sample_seed (clip index i) whatever --batch: --batch 1 and --batch 2
    give the same clips; captions reach both streams."""
    calls = []
    real = sweep.write_output

    def record(task, x, cond, folder, *rest):
        calls.append((folder.parts[-4], cond.id, x.clone()))  # OUT/method/point/generated
        return real(task, x, cond, folder, *rest)

    monkeypatch.setattr(sweep, "write_output", record)
    for name, argv in {"one": ("--batch", "1"), "two": ("--batch", "2"),
                       "captions": ("--batch", "2", "--prompts", "captions")}.items():
        assert run_sweep(checkpoint, syncbench, tmp_path / name, "--values", "2", "--sample-seed", "3", *argv) == 0
    got = {(out, cid): x for out, cid, x in calls}
    ids = sorted({cid for _, cid, _ in calls})
    run = sweep.prepare_run(cli_args(checkpoint, syncbench, tmp_path))
    for index, cid in enumerate(ids):
        alone = sample_link(run.model, "a2v", run.conds[index].x_cond, steps=2, seed=3, clip=index)
        torch.testing.assert_close(got[("one", cid)], alone)
        torch.testing.assert_close(got[("two", cid)], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got[("captions", cid)], got[("two", cid)], atol=1e-3)


def record_points(monkeypatch) -> dict:
    """Every generated clip the sweep writes, by (point folder, clip id)."""
    calls = {}
    real = sweep.write_output

    def record(task, x, cond, folder, *rest):
        calls[(folder.parts[-2], cond.id)] = x.clone()  # OUT/method/point/generated
        return real(task, x, cond, folder, *rest)

    monkeypatch.setattr(sweep, "write_output", record)
    return calls


def test_cfg_sweep_guides_the_captions_and_counts_both_evaluations(syncbench, checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    calls = record_points(monkeypatch)
    out = tmp_path / "cfg"
    argv = ("--sweep", "cfg", "--values", "1", "3", "--steps", "2", "--batch", "2", "--prompts", "captions")
    assert run_sweep(checkpoint, syncbench, out, *argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["sweep"] == "cfg" and summary["steps"] == {"euler": [2, 2]}
    assert summary["evals"] == {"euler": [2, 4]}  # a guided step runs the prompt and the null text
    assert "| euler | 3 | 4 |" in (out / "sweep.md").read_text()
    run = sweep.prepare_run(cli_args(checkpoint, syncbench, tmp_path, "--prompts", "captions"))
    x_cond = torch.cat([c.x_cond for c in run.conds])
    for scale in (1.0, 3.0):
        expected = sample_link(run.model, "a2v", x_cond, text_gen=run.texts, text_cond=run.texts, steps=2, seed=0,
                               cfg_scale=scale)
        for index, c in enumerate(run.conds):
            torch.testing.assert_close(calls[(f"cfg={scale:g}", c.id)], expected[index:index + 1])
    assert not torch.allclose(calls[("cfg=1", run.conds[0].id)], calls[("cfg=3", run.conds[0].id)], atol=1e-3)
    capsys.readouterr()
    assert run_sweep(checkpoint, syncbench, tmp_path / "bare", "--sweep", "cfg", "--values", "3") == 2
    assert run_sweep(checkpoint, syncbench, tmp_path / "neg", *argv[:2], "--values", "-1", "--prompts",
                     "captions") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "add --prompts captions" in err[0] and "guidance scales must be >= 0" in err[1] and len(err) == 2


def test_link_sweep_guides_on_the_input_without_prompts_and_counts_the_generator_alone(syncbench, checkpoint,
                                                                                     tmp_path, monkeypatch):
    calls = record_points(monkeypatch)
    out = tmp_path / "link"
    assert run_sweep(checkpoint, syncbench, out, "--sweep", "link", "--values", "1", "3", "--steps", "2",
                     "--batch", "2") == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["sweep"] == "link" and summary["evals"] == {"euler": [2, 4]}  # the generator alone as well
    run = sweep.prepare_run(cli_args(checkpoint, syncbench, tmp_path))
    x_cond = torch.cat([c.x_cond for c in run.conds])
    for scale in (1.0, 3.0):
        expected = sample_link(run.model, "a2v", x_cond, steps=2, seed=0, link_scale=scale)
        for index, c in enumerate(run.conds):
            torch.testing.assert_close(calls[(f"link={scale:g}", c.id)], expected[index:index + 1])
    assert not torch.allclose(calls[("link=1", run.conds[0].id)], calls[("link=3", run.conds[0].id)], atol=1e-3)


def cli_args(checkpoint: Path, syncbench: Path, out: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return parser.parse_args(["--sweep", "evals", "--ckpt", str(checkpoint), "--data", str(syncbench),
                              "--task", "a2v", "--out", str(out), *FAST, *argv])


@pytest.mark.skipif(not bf16_matmul("cpu"), reason="this CPU has no bf16 matrix instructions")
def test_bf16_sweep_is_labelled_and_generates(syncbench, checkpoint, tmp_path):
    """V2A in bf16 through the vocoder; closeness to fp32 is tested on the samples in tests/test_pipeline.py."""
    out = tmp_path / "bf16"
    argv = ("--values", "2", "--precision", "bf16", "--vocoder", "griffin-lim")
    assert run_sweep(checkpoint, syncbench, out, *argv, task="v2a") == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["precision"] == "bf16" and summary["clips"] == 2
    assert "precision bf16" in (out / "sweep.md").read_text()
    assert len(list((out / "euler" / "evals=2" / "generated").glob("*.wav"))) == 2


def test_refusals_are_one_line(syncbench, checkpoint, tmp_path, capsys, monkeypatch):
    assert run_sweep(checkpoint, syncbench, tmp_path / "a", "--methods", "heun", "--values", "3") == 2
    assert run_sweep(checkpoint, syncbench, tmp_path / "b", "--values", "2.5") == 2
    assert run_sweep(checkpoint, syncbench, tmp_path / "c", "--batch", "0") == 2
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx2": True})
    assert run_sweep(checkpoint, syncbench, tmp_path / "d", "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    assert "no solver of --methods can run any of them" in err[0]
    assert "evals must be whole numbers" in err[1] and "--batch 0" in err[2]
    assert "--precision bf16: this CPU has no bf16 matrix instructions" in err[3]
    assert not any((tmp_path / name).exists() for name in "abcd")
