import argparse
import json
import shlex

import pytest
import torch
from safetensors.torch import save_file

from avlink import cli
from avlink.checkpoint import FAST_CARD, FAST_OVERRIDES, save_config
from avlink.data import prepare as prepare_command
from avlink.data import syncbench
from avlink.errors import UserError
from avlink.system import build_model, load_fast_link, load_link
from avlink.train import cli as train_command
from avlink.train import recipe
from avlink.train.recipe import SETTINGS, Budget, budget_overrides, collect, run_recipe, size_overrides
from avlink.train.scorecard import markdown

from helpers import tiny_link


def test_budget_scales_and_keeps_minimums():
    full = Budget()
    assert full.fusion_steps == 1000 and full.batch_size == 32
    small = full.scaled(0.001)
    assert small.train_clips == 8 and small.fusion_steps == 2 and small.batch_size == 8
    assert (small.fusion_lr, small.vae_lr, small.video_lr) == (full.fusion_lr, full.vae_lr, full.video_lr)


def fake_exports(runs, model):
    def part(folder, name, tensors):
        export = runs / folder / "export"
        export.mkdir(parents=True)
        save_file(tensors, str(export / f"{name}.safetensors"))
        (export / f"{name}.card.json").write_text(json.dumps({"part": folder}))
        save_config(export / "config.json", model.cfg)

    part("vae", "vae", {"w": torch.zeros(1)})
    part("classifiers", "classifiers", {"w": torch.zeros(1)})
    part("audio", "audio_dit", model.audio.state_dict())
    part("video", "video_dit", model.video.state_dict())
    for task in ("v2a", "a2v"):
        state = {k: v for k, v in model.fusion.state_dict().items() if k.startswith(task)}
        part(task, "fusion", state)
    fast = fast_fusion_state(model)
    part("v2a-fast", "fusion", fast)
    return fast


def fast_fusion_state(model):
    """V2A Fusion Blocks without reinjection on the model's generators, of random weights."""
    static = build_model(model.cfg.override(**FAST_OVERRIDES), "meta", tasks=("v2a",))
    static.fusion.to_empty(device="cpu")
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(v.shape, generator=g) for k, v in static.fusion.state_dict().items()}


def test_collect_lays_out_a_loadable_link(tmp_path):
    model = tiny_link()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.5)
    fast = fake_exports(tmp_path / "runs", model)
    collect(tmp_path / "out", tmp_path / "runs")
    loaded = load_link(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    cards = json.loads((tmp_path / "out" / "fusion.card.json").read_text())
    assert set(cards) == {"v2a", "a2v"}
    # The fast V2A set beside them, with its card and its overrides, links the same generators.
    quick = load_fast_link(tmp_path / "out", loaded)
    assert quick.cfg.fusion.injection == "static" and quick.audio is loaded.audio
    for key, value in fast.items():
        assert torch.equal(quick.fusion.state_dict()[key], value), key
    card = json.loads((tmp_path / "out" / FAST_CARD).read_text())
    assert card["model_overrides"] == FAST_OVERRIDES and card["part"] == "v2a-fast"


def test_scores_say_which_guidance_made_them():
    block = {"clips": 2, "rows": {"avlink": {"onset_acc": 0.5}, "t2a_alone": {"onset_acc": 0.25}}}
    a2v = {"clips": 2, "rows": {"avlink": {"event_f1": 0.5}}}
    results = {"steps": 64, "seed": 0, "v2a": block, "a2v": a2v}
    assert "no guidance" in markdown(results).splitlines()[0]  # scores written before the option
    text = markdown({**results, "cfg_scale": 3.0})
    assert "guidance 3)" in text.splitlines()[0] and "| AV-Link | 0.500 |" in text


def test_recipe_runs_end_to_end_at_a_tiny_scale(tmp_path, monkeypatch):
    def entry_point(argv=None):
        raise AssertionError(f"a recipe step went through avlink.cli.main: {argv}")

    monkeypatch.setattr(cli, "main", entry_point)  # the steps call library functions
    summary = run_recipe(tmp_path / "out", tmp_path / "work", scale=0.005, progress=False)
    assert all(s["command"].startswith("avlink ") for s in summary["steps"][:-1])
    names = [s["step"] for s in summary["steps"]]
    assert "model" not in summary  # the preset's sizes: nothing to record
    assert names.index("train classifiers") < names.index("train audio") and names[-1] == "score"
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    for task, system in (("v2a", "t2a_alone"), ("a2v", "t2v_alone")):
        rows = scores[task]["rows"]
        assert {"avlink", system, "ceiling", "floor"} <= set(rows)
        assert rows["ceiling"]["event_f1"] is not None
    card = json.loads((tmp_path / "out" / "fusion.card.json").read_text())
    assert card["v2a"]["eval"]["model"] == scores["v2a"]["rows"]["avlink"]
    assert "t2a_alone" in json.loads((tmp_path / "out" / "audio_dit.card.json").read_text())["eval"]
    # Each generator and fusion run validated at its last step, with class accuracy from the classifiers.
    for part in ("audio", "video", "v2a", "a2v"):
        name = "fusion" if part in ("v2a", "a2v") else f"{part}_dit"
        validation = json.loads((tmp_path / "work" / "runs" / part / "export" / f"{name}.card.json").read_text())[
            "validation"]
        assert validation["data"].endswith(":val")
        assert any(k.endswith("class_acc") for k in validation["metrics"]), (part, validation)
    assert "| AV-Link |" in (tmp_path / "out" / "scores.md").read_text()
    assert load_link(tmp_path / "out") is not None
    for name in ("vae", "audio_dit", "video_dit", "fusion", "fusion-fast", "classifiers", "upsampler", "sync",
                 "classifiers-upsampled"):
        assert (tmp_path / "out" / f"{name}.safetensors").is_file(), name
        assert (tmp_path / "out" / f"{name}.card.json").is_file(), name
    # The sync scorer and the upsampled-geometry classifier load as best-of-N and the upsample eval read them.
    from avlink.eval.classifiers import load_classifiers
    from avlink.sync import load_sync

    assert load_sync(tmp_path / "out" / "sync.safetensors", load_link(tmp_path / "out").cfg.clip) is not None
    upsampled, _ = load_classifiers(tmp_path / "out" / "classifiers-upsampled.safetensors")
    assert upsampled.cfg.video_scale != (1, 1)
    commands = {s["step"]: s["command"] for s in summary["steps"]}
    assert commands["train sync"].startswith("avlink train sync ")
    assert "--upsampled" in commands["train classifiers-upsampled"]
    assert "--init " + str(tmp_path / "work" / "runs" / "classifiers" / "export" / "classifiers.safetensors") in \
        commands["train classifiers-upsampled"]
    assert names.index("train classifiers") < names.index("train sync") < names.index("train vae")
    fast_card = json.loads((tmp_path / "out" / FAST_CARD).read_text())
    assert "model.fusion.injection=static" in fast_card["command"] and fast_card["task"] == "v2a"
    assert load_fast_link(tmp_path / "out", load_link(tmp_path / "out")).cfg.fusion.injection == "static"
    assert names.index("train fusion a2v") < names.index("train upsampler") < names.index(
        "train classifiers-upsampled") < names.index("score")
    assert card["v2a"]["train"]["lr"] == Budget().fusion_lr
    for name, lr in (("vae", Budget().vae_lr), ("video_dit", Budget().video_lr)):
        assert json.loads((tmp_path / "out" / f"{name}.card.json").read_text())["train"]["lr"] == lr
    # A second run finds every step done: same parts, nothing retrained.
    before = (tmp_path / "out" / "fusion.safetensors").read_bytes()
    again = run_recipe(tmp_path / "out", tmp_path / "work", scale=0.005, progress=False)
    assert (tmp_path / "out" / "fusion.safetensors").read_bytes() == before
    assert again["steps"][-2]["wall_s"] < 5
    assert again["earlier_runs"][0]["wall_s"] == summary["wall_s"]
    assert again["total_wall_s"] >= summary["wall_s"]


def test_budget_and_sizes_are_checked_before_anything_runs():
    assert budget_overrides(["video_steps=3600", "fusion_lr=3e-4"]) == {"video_steps": 3600, "fusion_lr": 3e-4}
    for bad, says in (("video_step=10", "KEY one of"), ("video_steps=1.5", "whole number"),
                      ("fusion_steps=0", "> 0"), ("video_steps", "KEY=VALUE")):
        with pytest.raises(UserError, match=says):
            budget_overrides([bad])
    assert size_overrides(["model.video.dim=256", "model.video.heads=8"], "tiny") == [
        "model.video.dim=256", "model.video.heads=8"]
    for bad in (["train.lr=1"], ["model.clip.video.height=32"], ["model.video.width=3"], ["model.video.dim=102"]):
        with pytest.raises(UserError, match="--set"):
            size_overrides(bad, "tiny")


def parsed(module, command: str) -> dict:
    """What an `avlink COMMAND ...` line parses to with that command's own parser."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return vars(parser.parse_args(shlex.split(command)[2:]))


class Stop(Exception):
    pass


@pytest.fixture
def fake_steps(monkeypatch):
    """The library calls of the recipe's steps, recorded instead of run; the recipe stops at collect."""
    calls = {"synth": [], "prepare": [], "train": []}

    def fake_synth(out, progress=None, **options):
        calls["synth"].append((out, options))
        return []

    def fake_prepare(spec, out, progress=True, **options):
        calls["prepare"].append((spec, out, options))
        return {"skipped": []}

    def fake_train(args):
        calls["train"].append(args)
        return args.out / "export" / f"{args.part}.safetensors"

    def stop(*_):
        raise Stop

    monkeypatch.setattr(syncbench, "synth", fake_synth)
    monkeypatch.setattr(recipe, "prepare", fake_prepare)
    monkeypatch.setattr(recipe, "train_part", fake_train)
    monkeypatch.setattr(recipe, "collect", stop)
    return calls


def test_overrides_reach_every_training_and_the_work_folder_keeps_its_settings(tmp_path, fake_steps, capsys):
    work = tmp_path / "work"
    sizes = ["model.video.dim=64", "model.fusion.dim=32"]
    with pytest.raises(Stop):
        run_recipe(tmp_path / "out", work, budget={"video_steps": 7}, model=sizes, progress=False)
    trained = {args.out.name: args for args in fake_steps["train"]}  # by run folder
    assert set(trained) == {"classifiers", "sync", "vae", "audio", "video", "v2a", "a2v", "v2a-fast", "upsampler",
                            "classifiers-upsampled"}
    for part in ("audio", "video", "v2a"):
        assert all(item in trained[part].set for item in sizes), part
    assert trained["upsampler"].data == f"syncbench:{work / 'syncbench'}:train"
    assert trained["upsampler"].max_steps == Budget().upsampler_steps
    for part in ("classifiers", "sync", "vae", "upsampler", "classifiers-upsampled"):
        assert not any(a.startswith("model.") for a in trained[part].set), part
    assert trained["sync"].part == "sync" and trained["sync"].data == str(work / "shards" / "mel")
    assert trained["sync"].max_steps == Budget().sync_steps == 1000 and trained["sync"].batch_size == 32
    upsampled = trained["classifiers-upsampled"]
    assert upsampled.part == "classifiers" and upsampled.upsampled and upsampled.labels == work / "syncbench"
    assert upsampled.data == str(trained["upsampler"].out / "pairs")  # where the upsampler decodes its clips
    assert upsampled.init == trained["classifiers"].out / "export" / "classifiers.safetensors"
    assert upsampled.max_steps == Budget().upsampled_classifier_steps == 400
    assert trained["video"].max_steps == 7 and f"train.lr={Budget().video_lr}" in trained["video"].set
    assert trained["v2a"].video_dit == trained["video"].out / "export" / "video.safetensors"
    # Each step announces the command line that does what its library call did.
    printed = capsys.readouterr().out.splitlines()
    commands = dict(line.removeprefix("avlink recipe: ").split(": ", 1) for line in printed
                    if line.startswith("avlink recipe: "))
    for (out, options), split in zip(fake_steps["synth"], ("train", "val", "test"), strict=True):
        # the recipe's clips have the preset's duration: synth's --duration left at its default
        assert parsed(syncbench, commands[f"synth {split}"]) == {"out": out, "duration": None, **options}, split
    for (spec, out, options), name in zip(fake_steps["prepare"], ("prepare mel", "prepare latents"), strict=True):
        line = parsed(prepare_command, commands[name])
        assert line["data"] == spec and line["out"] == str(out), name
        assert all(line[k] == v for k, v in options.items()), name
    for args in fake_steps["train"]:
        assert parsed(train_command, args.command_line) == {k: v for k, v in vars(args).items() if k != "command_line"}
        name = f"train fusion {args.out.name}" if args.part == "fusion" else f"train {args.out.name}"
        assert commands[name] == args.command_line
    fast = [args for args in fake_steps["train"] if args.out.name == "v2a-fast"]
    assert len(fast) == 1 and fast[0].task == "v2a" and fast[0].set[-1] == "model.fusion.injection=static"
    settings = json.loads((work / SETTINGS).read_text())
    assert settings["model"] == sizes and settings["budget"]["video_steps"] == 7
    # The same settings go on (every step resumes); other ones are refused before any step runs.
    fake_steps["train"].clear()
    with pytest.raises(Stop):
        run_recipe(tmp_path / "out", work, budget={"video_steps": 7}, model=sizes, progress=False)
    assert fake_steps["train"]
    fake_steps["train"].clear()
    with pytest.raises(UserError, match=r"budget\.video_steps.*another --work"):
        run_recipe(tmp_path / "out", work, budget={"video_steps": 8}, model=sizes, progress=False)
    with pytest.raises(UserError, match="model"):
        run_recipe(tmp_path / "out", work, budget={"video_steps": 7}, progress=False)
    assert fake_steps["train"] == []


def test_a_failing_step_is_named_in_its_error(tmp_path, fake_steps, monkeypatch):
    def refuse(args):
        raise UserError(f"{args.data}: no shards")

    monkeypatch.setattr(recipe, "train_part", refuse)
    with pytest.raises(UserError, match=r"^step train classifiers: .*mel: no shards$"):
        run_recipe(tmp_path / "out", tmp_path / "work", progress=False)
    monkeypatch.setattr(recipe, "prepare", lambda spec, out, **_: {"skipped": [{"file": "a.mp4", "reason": "bad"}]})
    with pytest.raises(UserError, match=r"^step prepare mel: 1 clips skipped \(a\.mp4: bad"):
        run_recipe(tmp_path / "out", tmp_path / "work", progress=False)


@pytest.mark.slow
def test_recipe_with_other_sizes_end_to_end(tmp_path):
    sizes = ["model.video.dim=64", "model.video.heads=2", "model.fusion.dim=32"]
    summary = run_recipe(tmp_path / "out", tmp_path / "work", scale=0.005, progress=False,
                         budget={"video_steps": 1000}, model=sizes)
    assert summary["model"] == sizes and summary["budget"]["video_steps"] == 5  # 1000 x 0.005
    model = load_link(tmp_path / "out")
    assert (model.cfg.video.dim, model.cfg.video.heads, model.cfg.fusion.dim) == (64, 2, 32)
    assert model.cfg.audio.dim == 128  # the preset's: nothing asked to change it
    card = json.loads((tmp_path / "out" / "video_dit.card.json").read_text())
    assert card["steps"] == 5 and "model.video.dim=64" in card["command"]
    assert "| AV-Link |" in (tmp_path / "out" / "scores.md").read_text()


def test_a_fusion_only_recipe_trains_the_fusion_blocks_on_a_checkpoints_parts(tmp_path, fake_steps, monkeypatch):
    """--fusion-only CKPT: no classifiers, VAE or generators are trained; the Fusion Blocks train on that folder's
    files, the latents come from its VAE, and collect copies its parts."""
    from helpers import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"--fusion-only .*: missing .*classifiers\.safetensors"):
        run_recipe(tmp_path / "out", tmp_path / "work0", fusion_only=ckpt, progress=False)
    for name in ("classifiers.safetensors", "vae.card.json", "audio_dit.card.json", "video_dit.card.json",
                 "classifiers.card.json"):
        (ckpt / name).write_text("{}")
    with pytest.raises(UserError, match="give another --out"):
        run_recipe(ckpt, tmp_path / "work1", fusion_only=ckpt, progress=False)
    collected = {}
    monkeypatch.setattr(recipe, "collect", lambda out, runs, reused=None: collected.update(reused=reused))

    class Scored(Exception):
        pass

    def score(*args, **kwargs):
        raise Scored

    import avlink.train.scorecard as scorecard

    monkeypatch.setattr(scorecard, "score_checkpoint", score)
    with pytest.raises(Scored):
        run_recipe(tmp_path / "out", tmp_path / "work", fusion_only=ckpt, progress=False)
    trained = [(args.part, args.task, args.out.name) for args in fake_steps["train"]]
    assert trained == [("fusion", "v2a", "v2a"), ("fusion", "a2v", "a2v"), ("fusion", "v2a", "v2a-fast")]
    assert all(args.audio_dit == ckpt.resolve() / "audio_dit.safetensors" for args in fake_steps["train"])
    assert all(args.val_classifiers == ckpt.resolve() / "classifiers.safetensors" for args in fake_steps["train"])
    assert [spec for spec, _, _ in fake_steps["prepare"]] == [f"syncbench:{tmp_path / 'work' / 'syncbench'}:train"]
    assert fake_steps["prepare"][0][2]["vae"] == str(ckpt.resolve() / "vae.safetensors")
    assert collected["reused"] == ckpt.resolve()


def test_an_upsampler_only_recipe_adds_the_upsampler_to_a_checkpoints_parts(tmp_path, fake_steps, monkeypatch):
    """--upsampler-only CKPT: the train clips are synthesized, the upsampler and its upsampled-geometry classifier
    (from CKPT's classifiers) alone trained, and CKPT's parts written to --out beside them, with CKPT's recipe.json
    and the stage's steps and wall time."""
    from helpers import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt")
    (ckpt / "recipe.json").write_text(json.dumps({"preset": "tiny", "wall_s": 1.0}))
    with pytest.raises(UserError, match="give another --out"):
        recipe.run_upsampler_only(ckpt, ckpt, tmp_path / "work", progress=False)
    with pytest.raises(UserError, match="clip geometry"):  # the helper's checkpoint has a 1 s clip
        recipe.run_upsampler_only(ckpt, tmp_path / "out", tmp_path / "work", progress=False)
    save_config(ckpt / "config.json", tiny_link().cfg.override(**{"clip.duration": 16 / 6}))
    with pytest.raises(UserError, match="no classifiers.safetensors"):
        recipe.run_upsampler_only(ckpt, tmp_path / "out", tmp_path / "work", progress=False)
    save_file({"w": torch.ones(1)}, str(ckpt / "classifiers.safetensors"))
    (ckpt / "classifiers-upsampled.card.json").write_text(json.dumps({"part": "old"}))  # replaced, not kept

    def fake_train(args):
        fake_steps["train"].append(args)
        export = args.out / "export"
        export.mkdir(parents=True)
        name = args.out.name  # the run folders are named after their exports
        save_file({"w": torch.zeros(1)}, str(export / f"{name}.safetensors"))
        (export / f"{name}.card.json").write_text(json.dumps({"part": name}))
        return export / f"{name}.safetensors"

    monkeypatch.setattr(recipe, "train_part", fake_train)
    assert cli.main(["recipe", "--upsampler-only", str(ckpt), "--out", str(tmp_path / "out"), "--work",
                     str(tmp_path / "work"), "--budget", "upsampler_steps=5", "--no-progress"]) == 0
    assert [args.part for args in fake_steps["train"]] == ["upsampler", "classifiers"]
    assert fake_steps["train"][0].max_steps == 5 and fake_steps["train"][0].batch_size == Budget().upsampler_batch
    upsampled = fake_steps["train"][1]
    assert upsampled.upsampled and upsampled.init == ckpt / "classifiers.safetensors"
    assert upsampled.data == str(fake_steps["train"][0].out / "pairs")
    assert upsampled.labels == tmp_path / "work" / "syncbench"
    assert upsampled.max_steps == Budget().upsampled_classifier_steps
    assert [options["split"] for _, options in fake_steps["synth"]] == ["train"]
    out = tmp_path / "out"
    for name in ("config.json", "fusion.safetensors", "vae.safetensors", "classifiers.safetensors",
                 "upsampler.safetensors", "upsampler.card.json", "classifiers-upsampled.safetensors",
                 "classifiers-upsampled.card.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "classifiers-upsampled.card.json").read_text())["part"] == "classifiers-upsampled"
    summary = json.loads((out / "recipe.json").read_text())
    assert summary["wall_s"] == 1.0  # the checkpoint's own recipe, kept
    steps = summary["upsampler_only"]["steps"]
    assert [s["step"] for s in steps] == ["synth train", "train upsampler", "train classifiers-upsampled"]
    assert steps[2]["command"] == upsampled.command_line and "--upsampled" in steps[2]["command"]
    assert summary["upsampler_only"]["budget"]["upsampler_steps"] == 5
