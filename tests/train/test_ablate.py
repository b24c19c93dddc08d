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
    assert set(summary["intervals"]) == set(ablate.DEFAULT_VARIANTS) - {"fusion"} and "| vs fusion |" in table
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
    assert "vs fusion" not in (out / "table2.md").read_text()  # nothing to compare with


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


# --- the rows beyond the default six: w/FT, conditioning features, fusion block arrangement ------------------


def test_finetuned_rows_export_their_generator_and_are_scored_with_it(inputs: dict[str, Path], tmp_path: Path,
                                                                      capsys) -> None:
    """"w/FT": the generated stream's generator trains too; the export holds it beside the Fusion Blocks, and
    the variant is loaded and scored with it (the conditioning generator stays the checkpoint's)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "ft"
    assert cli.main(ablate_argv(inputs, out, "--variants", "direct_ft", "text_concat_ft")) == 0
    table = (out / "table2.md").read_text()
    ckpt_audio = load_file(inputs["ckpt"] / "audio_dit.safetensors")
    ckpt_video = load_file(inputs["ckpt"] / "video_dit.safetensors")
    for variant in ("direct_ft", "text_concat_ft"):
        assert f"| {ablate.VARIANTS[variant][0]} |" in table
        run = out / "runs" / variant
        tuned = load_file(run / "export" / "audio_dit.safetensors")
        assert tuned.keys() == ckpt_audio.keys()
        assert any(not torch.equal(tuned[k], ckpt_audio[k]) for k in tuned)
        assert all(k.startswith("v2a.") for k in load_file(run / "export" / "fusion.safetensors"))
        assert load_config(run / "export" / "config.json").fusion.finetune
        model = ablate.load_variant(inputs["ckpt"], run, "v2a", torch.device("cpu"))
        assert all(torch.equal(v, tuned[k]) for k, v in model.audio.state_dict().items())
        assert all(torch.equal(v, ckpt_video[k]) for k, v in model.video.state_dict().items())
        assert "audio_dit.safetensors" in json.loads((run / "eval" / "source.json").read_text())
    # An export that lacks its fine-tuned generator is not this variant trained: it is trained here.
    local = tmp_path / "local"
    shutil.copytree(out / "runs" / "direct_ft" / "export", local / "runs" / "direct_ft" / "export")
    (local / "runs" / "direct_ft" / "export" / "audio_dit.safetensors").unlink()
    capsys.readouterr()
    assert cli.main(ablate_argv(inputs, local, "--variants", "direct_ft", "--train-only")) == 0
    assert "avlink train fusion" in capsys.readouterr().out
    assert (local / "runs" / "direct_ft" / "export" / "audio_dit.safetensors").is_file()


@pytest.fixture(scope="module")
def feature_ckpt(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test checkpoint with SyncBench classifiers of random weights (the syncbench-video row's extractor)."""
    import shutil

    import torch

    from avlink.eval import classifiers as clf

    folder = tmp_path_factory.mktemp("feature_ckpt") / "ckpt"
    shutil.copytree(inputs["ckpt"], folder)
    torch.manual_seed(0)
    clf.save_classifiers(folder / "classifiers.safetensors",
                         clf.SyncBenchClassifiers(clf.ClassifierConfig(audio_width=16, video_width=8, embed_dim=24)))
    return folder


def test_the_syncbench_feature_row_conditions_on_the_classifier_not_the_video_generator(
        inputs: dict[str, Path], feature_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    from avlink.backbones.video_dit import VideoDiT
    from avlink.eval.embed.syncbench import SyncBenchEmbedder

    calls = []
    timed = SyncBenchEmbedder.timed_features

    def counted(self, x, modality):
        calls.append(len(x))
        return timed(self, x, modality)

    def ran(*_):
        raise AssertionError("the video generator ran in a feature row")

    monkeypatch.setattr(SyncBenchEmbedder, "timed_features", counted)
    for name in ("embed", "run_blocks", "head"):
        monkeypatch.setattr(VideoDiT, name, ran)
    out = tmp_path / "features"
    assert cli.main(ablate_argv(inputs, out, "--ckpt", str(feature_ckpt), "--variants", "features_syncbench")) == 0
    assert calls == [2, 2, 2]  # two training steps of 2 clips, then the 2 clips generated in one batch
    assert "| Conditioning features: SyncBench classifier |" in (out / "table2.md").read_text()
    run = out / "runs" / "features_syncbench"
    assert load_config(run / "export" / "config.json").fusion.features == "syncbench-video"
    assert "--feature-weights" in json.loads((run / "export" / "fusion.card.json").read_text())["command"]
    assert "syncbench-video" in json.loads((run / "eval" / "source.json").read_text())  # the extractor's digest


def test_the_clip_and_cavp_rows_train_on_imagebind_and_synchformer(inputs: dict[str, Path], tmp_path: Path,
                                                                   capsys) -> None:
    """The rows of the published extractors build and train on their weight files (small random networks in the
    published layouts), and are refused in one line without them or for A2V."""
    import torch
    from safetensors.torch import load_file

    from avlink.eval.embed import imagebind as ib
    from avlink.eval.embed import synchformer as sf

    torch.manual_seed(0)
    ib_file, sf_file = tmp_path / ib.WEIGHTS_FILE, tmp_path / sf.WEIGHTS_FILE
    heads = {"vision_heads": 2, "audio_heads": 2}  # not in the files: loading takes one head of these widths
    torch.save(ib.ImageBindAV(ib.ImageBindConfig(out_dim=16, vision_width=32, vision_depth=1, audio_width=32,
                                                 audio_depth=1, **heads)).state_dict(), ib_file)
    torch.save(sf.Synchformer(sf.SynchformerConfig(width=32, video_depth=1, video_heads=2, image_size=32,
                                                   audio_depth=1, audio_heads=2, sync_width=24, sync_depth=1,
                                                   sync_heads=2)).state_dict(), sf_file)
    out = tmp_path / "out"
    assert cli.main(ablate_argv(inputs, out, "--variants", "features_imagebind", "features_synchformer", "--train-only",
                                "--weights", f"imagebind={ib_file}", f"synchformer={sf_file}")) == 0
    for variant, name, dim in (("features_imagebind", "imagebind", 16), ("features_synchformer", "synchformer", 32)):
        export = out / "runs" / variant / "export"
        assert load_config(export / "config.json").fusion.features == name
        assert load_file(export / "fusion.safetensors")["v2a.blocks.0.v.proj_in.weight"].shape[1] == dim
    capsys.readouterr()
    assert cli.main(ablate_argv(inputs, tmp_path / "r", "--variants", "features_imagebind", "--train-only")) == 2
    assert "needs the extractor's weights: pass --weights imagebind=PATH" in capsys.readouterr().err
    assert cli.main(ablate_argv(inputs, tmp_path / "r", "--variants", "features_syncbench", "--train-only")) == 2
    assert "classifiers.safetensors: not found; variant features_syncbench" in capsys.readouterr().err
    assert cli.main(ablate_argv(inputs, tmp_path / "r", "--variants", "features_synchformer", "--task", "a2v",
                                "--weights", f"synchformer={sf_file}", "--train-only")) == 2
    assert "V2A only" in capsys.readouterr().err


def test_the_arrangement_rows_take_the_papers_blocks_to_the_checkpoint_depth(inputs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """After Block-1 / 11 / 22 of the paper's 24 video blocks: after block 1 / 3 / 5 of the test checkpoint's 6
    (its audio backbone has 4: the same fractions), the blocks themselves on the paper preset."""
    from avlink.config import PRESETS
    from avlink.fusion.linked import fusion_points
    from avlink.system import build_model

    out = tmp_path / "out"
    assert cli.main(ablate_argv(inputs, out, "--variants", "after_block_11", "after_block_22", "--train-only")) == 0
    base = load_config(inputs["ckpt"] / "config.json")
    for variant, points in (("after_block_1", (1, 1)), ("after_block_11", (2, 3)), ("after_block_22", (3, 5))):
        if variant != "after_block_1":
            cfg = load_config(out / "runs" / variant / "export" / "config.json")
            assert build_model(cfg, tasks=("v2a",)).points == [points] * cfg.fusion.num_blocks
        preset, overrides = ablate.model_overrides(base, variant)
        fusion = PRESETS[preset].override(**overrides).fusion  # the checkpoint's config with the variant's rows
        assert fusion_points(fusion, 4, 6) == [points] * fusion.num_blocks
        paper = PRESETS["paper"].override(**ablate.VARIANTS[variant][1]).fusion
        k = int(variant.rsplit("_", 1)[1])
        assert fusion_points(paper, 24, 24) == [(k, k)] * 8


def test_each_variant_gets_a_paired_bootstrap_interval_against_the_fusion_blocks() -> None:
    """The interval is of the per-clip differences, resampled in pairs: a variant better on every clip by 0.25
    gets exactly [0.25, 0.25]; one that trades clips gets an interval around its mean difference; the table shows
    it beside onset accuracy, and the reference row's cell stays empty."""
    assert ablate.paired_interval({"a": 0.5, "b": 0.0}, {"a": 0.75, "b": 0.25}) == (0.25, 0.25)
    rng = np.random.default_rng(1)
    ref = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(size=100))}
    var = {c: v + (0.1 if i % 2 else -0.3) for i, (c, v) in enumerate(ref.items())}
    low, high = ablate.paired_interval(ref, var)
    assert low < -0.1 < high and high - low < 0.2  # the mean difference is -0.1
    assert ablate.paired_interval(ref, {"other": 1.0}) is None
    assert ablate.paired_interval({"a": float("nan")}, {"a": 1.0}) is None

    class Report:
        def __init__(self, values: dict[str, float]) -> None:
            self.per_clip = [{"clip": c, "onset_acc": v} for c, v in values.items()]

    spans = ablate.intervals({"fusion": Report(ref), "direct": Report(var)})
    assert list(spans) == ["direct"] and spans["direct"] == [low, high]
    summary = {"task": "v2a", "steps": 1000, "clips": 100, "split": "test", "sample_steps": 64, "prompts": "captions",
               "columns": ["onset_acc", "event_f1"], "titles": {"fusion": "Fusion blocks (ours)", "direct": "Direct"},
               "rows": {"fusion": {"onset_acc": 0.8, "event_f1": 0.7}, "direct": {"onset_acc": 0.7, "event_f1": 0.6}},
               "notes": [], "intervals": spans, "bootstrap": ablate.BOOTSTRAP}
    table = ablate.table_markdown(summary)
    assert "| variant | onset_acc | vs fusion | event_f1 |" in table
    assert f"| Direct | 0.7000 | {low:+.3f} .. {high:+.3f} | 0.6000 |" in table
    assert "| Fusion blocks (ours) | 0.8000 |  | 0.7000 |" in table
