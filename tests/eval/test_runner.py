import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from avlink import cli
from avlink.checkpoint import save_link, save_weights
from avlink.codecs.vae import AudioVAE
from avlink.data import media
from avlink.data.syncbench import CLASSES, load_metadata, synth
from avlink.eval import runner
from avlink.eval.embedders import WeightsMissing
from avlink.eval.runner import EvalSettings, derangement, evaluate

from helpers import tiny_link

PAIRED = ("onset_acc", "onset_ap", "onset_count_acc", "av_align", "event_precision", "event_recall",
          "event_f1")


@pytest.fixture(scope="module")
def syncbench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syncbench")
    synth(root, n=4, seed=0, split="test", preset="tiny")
    return root


def reference_audio(root: Path) -> dict[str, np.ndarray]:
    return {row["id"]: media.read_audio(root / row["file"], 22050).samples for row in load_metadata(root)}


def write_float_wav(path: Path, samples: np.ndarray) -> None:
    soundfile.write(path, samples, 22050, subtype="FLOAT")  # no 16-bit rounding: the exact reference samples


def run_cli(*argv: str) -> int:
    return cli.main(["eval", *map(str, argv)])


def test_v2a_ground_truth_as_generated_scores_the_ceiling(syncbench, tmp_path, capsys):
    audio = reference_audio(syncbench)
    ids = sorted(audio)
    gen = tmp_path / "gen"
    gen.mkdir()
    for cid in ids[:3]:
        write_float_wav(gen / f"{cid}.wav", audio[cid])
    (gen / f"{ids[3]}.wav").write_bytes(b"RIFF, but not really a wave")  # paired but unreadable
    write_float_wav(gen / "stray.wav", audio[ids[0]])  # no reference of this name
    out = tmp_path / "out"
    assert run_cli("--task", "v2a", "--generated", gen, "--reference", syncbench, "--out", out) == 0
    assert "3 clips scored" in capsys.readouterr().out

    report = json.loads((out / "metrics.json").read_text())
    assert report["clips"] == 3
    assert [p["file"] for p in report["problems"]] == [str(gen / f"{ids[3]}.wav")]
    assert [p["file"] for p in report["unpaired"]] == [str(gen / "stray.wav")]
    metrics = report["metrics"]
    for name in PAIRED:
        assert metrics[name]["model"] == metrics[name]["ceiling"], name
    assert metrics["onset_acc"]["model"] == 1.0
    assert metrics["onset_acc"]["floor"] < 1.0
    assert metrics["event_f1"]["floor"] < metrics["event_f1"]["ceiling"]
    rows = list(csv.DictReader((out / "per_clip.csv").open()))
    assert [r["clip"] for r in rows] == ids[:3] and float(rows[0]["onset_acc"]) == 1.0
    table = (out / "metrics.md").read_text()
    assert "| onset_acc | 1.0000 | 1.0000 |" in table and "stray.wav" in table


def test_v2a_shuffled_ground_truth_scores_the_floor(syncbench, tmp_path):
    audio = reference_audio(syncbench)
    ids = sorted(audio)
    perm = derangement(len(ids), seed=0)
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, cid in enumerate(ids):
        write_float_wav(gen / f"{cid}.wav", audio[ids[perm[i]]])
    settings = EvalSettings("v2a", metrics=("onset", "av_align", "events"), progress=False)
    report = evaluate(gen, syncbench, settings)
    for name in PAIRED:
        assert report.value(name) == report.value(name, "floor"), name
    assert report.settings["floor_permutation"] == perm.tolist()


def test_a2v_scores_videos_against_the_true_events(syncbench, tmp_path):
    from avlink.config import get_preset
    from avlink.data.datasets import load_item, syncbench_dataset

    clip = get_preset("tiny").clip
    gen = tmp_path / "gen"
    gen.mkdir()
    for item in syncbench_dataset(syncbench):
        frames = load_item(item, clip).frames.numpy()  # the model's view: 16x16 px, 6 fps
        media.write_video(gen / f"{item.id}.mp4", frames, clip.video.fps)
    report = evaluate(gen, syncbench, EvalSettings("a2v", progress=False))
    names = [m.name for m in report.metrics]
    assert names == ["av_align", "event_precision", "event_recall", "event_f1"]
    assert any(note.startswith("onset: V2A only") for note in report.notes)
    assert report.settings["task"] == "a2v" and report.clips == 4
    # re-encoded ground truth: the cue detector sees the same events as on the reference itself
    assert report.value("event_f1") == pytest.approx(report.value("event_f1", "ceiling"), abs=0.1)
    assert report.value("event_f1", "ceiling") > report.value("event_f1", "floor")


class FakeEmbedder:
    """A tiny deterministic audio network: band energies as the embedding, a linear map of them as logits."""

    name, modalities, sample_rate, fps, classes = "fake", ("audio",), 22050, None, CLASSES

    def embed(self, x, modality):
        spec = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64), axis=-1))
        bands = np.stack([b.mean(-1) for b in np.array_split(spec, 8, axis=-1)], axis=-1)
        return torch.from_numpy(np.log(bands + 1e-6)).float()

    def logits(self, x, modality):
        weights = np.random.default_rng(0).normal(size=(8, len(CLASSES)))
        return torch.from_numpy(self.embed(x, modality).double().numpy() @ weights)


def fake_loader(name, weights=None):
    if name in ("vggish", "syncbench-audio"):
        return FakeEmbedder()
    raise WeightsMissing(f"{name}: no weight file given")


def test_embedder_metrics_on_identical_sets(syncbench, tmp_path):
    audio = reference_audio(syncbench)
    gen = tmp_path / "gen"
    gen.mkdir()
    for cid, samples in audio.items():
        write_float_wav(gen / f"{cid}.wav", samples)
    weights = {"vggish": tmp_path / "vggish.pt"}
    settings = EvalSettings("v2a", metrics=("fd", "kl", "is", "class_acc", "clap"), weights=weights,
                            progress=False)
    report = evaluate(gen, syncbench, settings, loader=fake_loader)
    for name in ("vggish", "syncbench-audio"):
        # 4 clips in 8 dimensions: square roots of rounding-level zero eigenvalues stay
        assert abs(report.value(f"fd_{name}")) < 1e-4
        assert report.value(f"fd_{name}", "ceiling") is None
        assert report.value(f"kl_{name}") == pytest.approx(0.0, abs=1e-12)
        assert report.value(f"kl_{name}", "floor") > 0
        assert report.value(f"is_{name}") == report.value(f"is_{name}", "ceiling") >= 1.0
    assert 0.0 <= report.value("class_acc") <= 1.0
    assert report.value("class_acc") == report.value("class_acc", "ceiling")
    assert any(n.startswith("clap: skipped, weights missing") for n in report.notes)


def test_without_classifier_weights_class_acc_is_skipped_with_a_note(syncbench, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    report = evaluate(gen, syncbench, EvalSettings("v2a", metrics=("class_acc",), progress=False),
                      loader=lambda name, weights=None: (_ for _ in ()).throw(ImportError(name)))
    assert report.clips == 0 and report.metrics == []
    assert report.notes == ["syncbench-audio: skipped, not available in this installation"]
    assert len(report.unpaired) == 4


def test_plain_folders_pair_by_stem_across_suffixes(tmp_path):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    (gen / "sub").mkdir(parents=True)
    ref.mkdir()
    for path in (gen / "a.wav", gen / "sub" / "b.flac", gen / "sub" / "a.mp4", ref / "a.mp4", ref / "b.wav",
                 ref / "c.wav", ref / "notes.txt"):
        path.write_bytes(b"x")
    pairing = runner.pair_files(gen, ref)
    assert [(p.stem, p.generated.name, p.reference.name) for p in pairing.pairs] == [
        ("a", "a.wav", "a.mp4"), ("b", "b.flac", "b.wav")]
    assert [Path(p.file).name for p in pairing.problems] == ["a.mp4"]  # second file named a
    assert [Path(p.file).name for p in pairing.unpaired] == ["c.wav"]
    assert not pairing.syncbench


def test_derangement_moves_everything_and_is_fixed_by_seed():
    for n in range(2, 12):
        perm = derangement(n, seed=3)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
        assert np.array_equal(perm, derangement(n, seed=3))
    assert derangement(1, 0) is None and derangement(0, 0) is None


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "none"
    assert run_cli("--task", "v2a", "--generated", missing, "--reference", tmp_path, "--out", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a folder (--generated)" in err
    assert run_cli("--task", "v2a", "--generated", tmp_path, "--reference", tmp_path, "--out", tmp_path,
                   "--weights", "nonsense=/x") == 2
    assert "unknown embedder 'nonsense'" in capsys.readouterr().err


# --- sweep ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random linked model and a tiny random audio VAE, saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_link()
    save_link(folder, model)
    torch.manual_seed(0)
    vae = AudioVAE(model.cfg.clip.audio, hidden=16, depth=1)
    save_weights(folder / "vae.safetensors", vae, metadata={"hidden": "16", "depth": "1"})
    return folder


@pytest.mark.parametrize(("task", "sweep", "values"),
                         [("v2a", "t_cond", ("0.5", "1")), ("a2v", "steps", ("1", "2"))])
def test_sweep_generates_scores_and_plots(syncbench, checkpoint, tmp_path, task, sweep, values):
    out = tmp_path / "sweep"
    code = run_cli("--sweep", sweep, "--ckpt", checkpoint, "--data", syncbench, "--task", task, "--out", out,
                   "--values", *values, "--n", "2", "--steps", "2", "--vocoder", "griffin-lim",
                   "--metrics", "onset", "av_align", "events")
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["values"] == [float(v) for v in values] and summary["clips"] == 2
    assert len(summary["metrics"]["event_f1"]["model"]["euler"]) == 2
    assert summary["metrics"]["event_f1"]["ceiling"] is not None
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = out / "euler" / f"{sweep}={values[0]}"
    suffix = ".wav" if task == "v2a" else ".mp4"
    assert len(list((first / "generated").glob(f"*{suffix}"))) == 2
    report = json.loads((first / "metrics.json").read_text())
    assert report["clips"] == 2 and report["unpaired"] == []
    assert not math.isnan(report["metrics"]["av_align"]["ceiling"])


def test_sweep_without_a_vae_says_where_to_put_it(syncbench, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    save_link(folder, tiny_link())
    assert run_cli("--sweep", "t_cond", "--ckpt", folder, "--data", syncbench, "--task", "v2a",
                   "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "vae.safetensors: not found" in err and err.count("\n") == 1
