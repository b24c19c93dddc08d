import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch

from avlink import cli
from avlink.checkpoint import save_link, save_weights
from avlink.codecs.vae import AudioVAE
from avlink.data import media
from avlink.data.syncbench import CLASSES, load_metadata, synth
from avlink.errors import UserError
from avlink.eval import scoring
from avlink.eval.embed import imagebind, synchformer
from avlink.eval.embedders import WeightsMissing, load_embedder
from avlink.eval.scoring import EvalSettings, derangement, evaluate

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
    # Named metrics: the defaults also hold embedder metrics, which depend on which weight files are present.
    report = evaluate(gen, syncbench, EvalSettings("a2v", metrics=("onset", "av_align", "events"), progress=False))
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
    pairing = scoring.pair_files(gen, ref)
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
    assert "not a complete checkpoint folder, missing vae.safetensors" in err and err.count("\n") == 1


# --- ImageBind (IB-AI, IB-AV) and DeSync on tiny random-weight networks -----------------------------------

IB_TINY = imagebind.ImageBindConfig(out_dim=16, vision_width=32, vision_depth=2, vision_heads=2,
                                    audio_width=32, audio_depth=2, audio_heads=2)
SF_TINY = synchformer.SynchformerConfig(width=32, video_depth=1, video_heads=2, image_size=32, audio_depth=1,
                                        audio_heads=2, sync_width=24, sync_depth=1, sync_heads=2)
HEADS = {"imagebind": {"vision_heads": 2, "audio_heads": 2},
         "synchformer": {"video_heads": 2, "audio_heads": 2, "sync_heads": 2}}
AV_FPS, AV_RATE = 25.0, 16_000
AV_SECONDS = (5.2, 5.2, 5.2, 2.0)  # 5.2 s: two Synchformer windows; 2 s: shorter than one


def av_clip(k: int, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, 32, 32, 3) uint8 frames at 25 fps and (n,) audio at 16 kHz, each clip unlike the others."""
    rng = np.random.default_rng(k)
    t = np.arange(round(seconds * AV_RATE)) / AV_RATE
    sounds = [0.5 * np.sin(2 * np.pi * 440 * t), 0.9 * (np.sin(2 * np.pi * 2 * t) > 0.99),
              0.3 * rng.standard_normal(t.size), 0.4 * np.sin(2 * np.pi * (200 + 400 * t) * t)]
    frames = np.zeros((round(seconds * AV_FPS), 32, 32, 3), np.uint8)
    if k == 0:
        frames[:] = rng.integers(0, 256, frames.shape)
    for i, frame in enumerate(frames):
        if k == 1:
            frame[:, (2 * i) % 32] = 255  # a bar sweeping right
        elif k == 2:
            frame[..., 1] = 255 * (i % 12 < 3)  # green flashes
        elif k == 3:
            frame[..., 2] = np.linspace(0, 255, 32)[None].astype(np.uint8)
    return frames, sounds[k].astype(np.float32)


def read_av(path: Path, duration: float, size: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """What the evaluation reads of a file for these two networks (25 fps, 16 kHz), through its own reader."""
    reader = scoring.Reader(path, duration, size)
    out = {"video": reader.video(AV_FPS)} if media.probe(path).has_video else {}
    return out | ({"audio": reader.audio(AV_RATE)} if media.probe(path).has_audio else {})


def tuned_synchformer(refs: list[dict[str, np.ndarray]]) -> synchformer.Synchformer:
    """A random tiny Synchformer whose offset head reads how each pair's OFF state differs from the mean over
    these clips, with a gain that makes its class depend on both streams. With plain random weights the OFF
    token averages ~200 near-identical tokens and every clip gets the same class, which would let a test of
    the pairing pass whatever is paired."""
    g = torch.Generator().manual_seed(0)
    model = synchformer.Synchformer(SF_TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    embedder = synchformer.SynchformerEmbedder(model.eval())
    long = [r for r in refs if len(r["audio"]) >= embedder.window_seconds * AV_RATE]
    videos = [embedder.video_features(r["video"][None])[:, :SF_TINY.segments] for r in long]
    audios = [embedder.audio_features(r["audio"][None])[:, :SF_TINY.segments] for r in long]
    head = model.transformer
    with torch.no_grad():
        pooled = torch.cat([head.pooled(model.vproj(v).flatten(1, 2), model.aproj(a).flatten(1, 2))
                            for v in videos for a in audios])  # (pairs, D)
        weight = torch.randn(SF_TINY.num_offsets, SF_TINY.sync_width, generator=g) / pooled.std(0)
        head.off_head.weight.copy_(weight)
        head.off_head.bias.copy_(-weight @ pooled.mean(0))
    return model


@pytest.fixture(scope="module")
def av_reference(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A folder of 25 fps mp4s with 16 kHz audio, and tiny ImageBind and Synchformer weight files."""
    root = tmp_path_factory.mktemp("av_ref")
    clips = [av_clip(k, seconds) for k, seconds in enumerate(AV_SECONDS)]
    for k, (frames, audio) in enumerate(clips):
        media.write_video(root / f"clip{k}.mp4", frames, AV_FPS, audio, AV_RATE)
    weights = tmp_path_factory.mktemp("av_weights")
    torch.manual_seed(0)
    ib_model = imagebind.ImageBindAV(IB_TINY)
    with torch.no_grad():
        for p in ib_model.parameters():
            p.copy_(0.2 * torch.randn(p.shape))
    paths = {"imagebind": weights / imagebind.WEIGHTS_FILE, "synchformer": weights / synchformer.WEIGHTS_FILE}
    torch.save(ib_model.state_dict(), paths["imagebind"])
    streams = [{"video": frames, "audio": audio} for frames, audio in clips]  # close to what decodes
    torch.save(tuned_synchformer(streams).state_dict(), paths["synchformer"])
    return root, paths


def tiny_loader(name, weights=None):
    if name in HEADS and weights is not None:
        return load_embedder(name, weights, **HEADS[name])
    raise WeightsMissing(f"{name}: no weight file given")


def embedded(streams: dict[str, np.ndarray], ib, sync) -> dict[str, Any]:
    """The ImageBind embeddings and Synchformer segment features of one file's streams, straight from the
    embedders (segment features None where a stream is shorter than one window)."""
    out: dict[str, Any] = {}
    if "audio" in streams:
        a = streams["audio"][None]
        out["audio"] = ib.embed(a, "audio")[0]
        out["sync:audio"] = sync.audio_features(a) if a.shape[1] >= sync.window_seconds * AV_RATE else None
    if "video" in streams:
        v = streams["video"][None]
        out["video"], out["image"] = ib.embed(v, "video")[0], ib.embed(v, "video", video_as="image")[0]
        out["sync:video"] = sync.video_features(v) if v.shape[1] >= sync.window_seconds * AV_FPS else None
    return out


def expected_pair(video: dict[str, Any], audio: dict[str, Any], sync) -> dict[str, float]:
    """IB-AV, IB-AI and DeSync of the video side of one file against the audio side of another."""
    a = audio["audio"]
    desync = math.nan
    if video["sync:video"] is not None and audio["sync:audio"] is not None:
        desync = float(sync.desync_from_features(video["sync:video"], audio["sync:audio"])[0])
    return {"ib_av": float(a @ video["video"]), "ib_ai": float(a @ video["image"]), "desync": desync}


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_imagebind_and_desync_rows_pair_the_right_streams(av_reference, tmp_path, task):
    root, weights = av_reference
    durations = [media.probe(root / f"clip{k}.mp4").duration for k in range(len(AV_SECONDS))]
    size = None if task == "v2a" else (32, 32)
    refs = [read_av(root / f"clip{k}.mp4", d, size) for k, d in enumerate(durations)]
    source = [0, 2, 1, 3]  # generated clip k holds clip source[k]'s stream: 1 and 2 swapped
    gen = tmp_path / "gen"
    gen.mkdir()
    for k, j in enumerate(source):
        if task == "v2a":
            media.write_audio(gen / f"clip{k}.wav", refs[j]["audio"], AV_RATE, subtype="FLOAT")
        else:
            media.write_video(gen / f"clip{k}.mp4", refs[j]["video"], AV_FPS)
    settings = EvalSettings(task, metrics=("fd", "imagebind", "desync"), weights=weights, progress=False)
    report = evaluate(gen, root, settings, loader=tiny_loader)

    gen_m, cond_m = scoring.MODALITY[task]
    ib, sync = (tiny_loader(name, weights[name]) for name in ("imagebind", "synchformer"))
    suffix = ".wav" if task == "v2a" else ".mp4"
    gens = [embedded(read_av(gen / f"clip{k}{suffix}", d, size), ib, sync) for k, d in enumerate(durations)]
    refs = [embedded(r, ib, sync) for r in refs]

    def row(xs: list[dict[str, Any]], perm=None) -> list[dict[str, float]]:
        """X[i]'s generated-side stream against reference i's other stream (X = xs, or xs shuffled)."""
        out = []
        for i, r in enumerate(refs):
            side = {gen_m: xs[i if perm is None else perm[i]], cond_m: r}
            out.append(expected_pair(side["video"], side["audio"], sync))
        return out

    model, ceiling = row(gens), row(refs)
    floor = row(refs, report.settings["floor_permutation"])
    for name in ("ib_av", "ib_ai", "desync"):
        got = [clip[name] for clip in report.per_clip]
        np.testing.assert_allclose(got, [m[name] for m in model], rtol=0, atol=1e-5)  # NaN where short
        for label, values in (("model", model), ("ceiling", ceiling), ("floor", floor)):
            want = np.nanmean([v[name] for v in values])
            assert report.value(name, label) == pytest.approx(want, abs=1e-5), (name, label)
    # the checks above can fail: the swapped clips and the shuffled pairs score otherwise than ground truth
    assert [m["desync"] for m in model[1:3]] != [c["desync"] for c in ceiling[1:3]]
    assert len({round(f["desync"], 3) for f in floor if not math.isnan(f["desync"])}) > 1
    # The image path is another path: where the frames move (clips 0-2 on the video side, in both tasks) IB-AI
    # differs from IB-AV. Clip 3's frames are one still picture, which both paths see alike: its gap is small
    # (about 1e-4, and it moves with what ran before in the process), so it is held close instead.
    gaps = [abs(m["ib_av"] - m["ib_ai"]) for m in model]
    assert all(gap > 1e-4 for gap in gaps[:3]) and gaps[3] < 1e-3, gaps
    if task == "v2a":  # clip 0 is generated as its own ground truth (a lossless wave; video is re-encoded)
        assert model[0] == ceiling[0]
    assert report.used["desync"] == 3 and report.used["ib_av"] == 4
    assert any(n.startswith("desync: 1 of 4 clips are shorter than one 4.8 s") for n in report.notes)
    names = {m.name for m in report.metrics}
    assert "fd_imagebind" in names and "fd_synchformer" not in names  # segment features are not FD features
    assert {m.name: m.better for m in report.metrics}["desync"] == "lower"


def test_a_weight_file_given_with_weights_that_does_not_load_stops_the_run(syncbench, tmp_path):
    """Never a silent skip and exit 0: the user named that file."""
    gen = tmp_path / "gen"
    gen.mkdir()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")

    def loader(name, weights=None):
        if weights is not None:
            raise UserError(f"{weights}: cannot read as a VGGish weight file")
        return fake_loader(name, weights)

    settings = EvalSettings("v2a", metrics=("fd",), weights={"vggish": bad}, progress=False)
    with pytest.raises(UserError, match=r"^--weights vggish=.*bad.pth: .*bad.pth: cannot read"):
        evaluate(gen, syncbench, settings, loader=loader)


def test_eval_command_exits_non_zero_on_a_bad_weight_file(syncbench, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"config": argparse.Namespace(depth=3)}, bad)  # a pickled class: refused, not run
    gen = tmp_path / "gen"
    gen.mkdir()
    code = cli.main(["eval", "--task", "v2a", "--generated", str(gen), "--reference", str(syncbench), "--out",
                 str(tmp_path / "out"), "--metrics", "fd", "--weights", f"vggish={bad}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "bad.pth" in err and "argparse.Namespace" in err


@pytest.mark.parametrize("failure, note", [(WeightsMissing("no weight file given"), "weights missing"),
                                           (RuntimeError("size mismatch"), "failed to load")])
def test_an_embedder_not_named_by_weights_is_skipped_with_one_note(syncbench, tmp_path, failure, note):
    gen = tmp_path / "gen"
    gen.mkdir()

    def loader(name, weights=None):
        raise failure

    report = evaluate(gen, syncbench, EvalSettings("v2a", metrics=("class_acc",), progress=False), loader=loader)
    assert report.notes == [f"syncbench-audio: skipped, {note} ({failure})"]
