"""SyncBench classifiers: networks, accuracy, weight files, the Embedder adapters against the training pipeline,
`avlink train classifiers`, and the evaluation's class_acc (the training objective: tests/train/test_objectives.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from avlink import cli
from avlink.config import get_preset
from avlink.data import media
from avlink.data.shards import ShardDataset, collate
from avlink.data.syncbench import CLASSES
from avlink.errors import UserError
from avlink.eval import classifiers as clf
from avlink.eval.embed import syncbench as sb_embed
from avlink.eval.embedders import Embedder, WeightsMissing, load_embedder
from avlink.train.objectives import CLASSIFIER_TRAIN_DEFAULTS

CLIP = get_preset("tiny").clip
SMALL = clf.ClassifierConfig(audio_width=16, video_width=8, embed_dim=24)
NUM_CLIPS = 3


def small_model(seed: int = 0) -> clf.SyncBenchClassifiers:
    torch.manual_seed(seed)
    return clf.SyncBenchClassifiers(SMALL).eval()


@pytest.fixture(scope="module")
def syncbench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avlink.data.syncbench import synth

    out = tmp_path_factory.mktemp("sb_classifiers")
    synth(out, n=NUM_CLIPS, seed=7, split="test", preset="tiny")
    return out


@pytest.fixture(scope="module")
def shards(syncbench_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avlink.data.prepare import prepare

    out = tmp_path_factory.mktemp("sb_classifier_shards")
    assert prepare(f"syncbench:{syncbench_dir}", out, shard_size=2, workers=1, progress=False)["complete"]
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sb_weights") / "classifiers.safetensors"
    clf.save_classifiers(path, small_model())
    return path


# --- networks and accuracy --------------------------------------------------------------------------------


def test_shapes_for_the_tiny_geometry_and_other_lengths() -> None:
    model = small_model()
    mel = torch.randn(2, CLIP.audio.n_mels, CLIP.num_mel_frames) - 5  # (2, 80, 232)
    video = torch.rand(2, *CLIP.video_shape) * 2 - 1  # (2, 3, 16, 16, 16)
    assert model.audio.embed(mel).shape == (2, SMALL.embed_dim)
    assert model.audio(mel).shape == (2, len(CLASSES))
    assert model.video.embed(video).shape == (2, SMALL.embed_dim)
    assert model.video(video).shape == (2, len(CLASSES))
    # pooled over time (and space): any clip length reads
    assert model.audio(mel[..., :37]).shape == (2, len(CLASSES))
    assert model.video(video[:, :, :5]).shape == (2, len(CLASSES))
    with pytest.raises(AssertionError, match="log-mel"):
        model.audio(mel[:, :64])


def test_accuracy_is_exact_match_of_the_sets_at_sigmoid_one_half() -> None:
    labels = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    logits = torch.tensor([[2.0, -1, 0.5, -3, -2, -2],  # right set
                           [0.1, 3, -1, -1, -1, -1],  # one extra class: wrong clip, 5 of 6 labels right
                           [-1, -1, -1, -1, 4, -0.1]])  # one missed: wrong clip, 5 of 6 labels right
    acc = clf.accuracy(logits, labels)
    assert acc.exact == pytest.approx(1 / 3) and acc.per_label == pytest.approx(16 / 18) and acc.clips == 3
    assert clf.predicted_classes(logits[1]) == {"ball", "hammer"}
    assert clf.predicted_classes(np.array([-1.0] * 6)) == set()
    assert clf.multi_hot(["lamp", "ball", "lamp"]).tolist() == [1, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown SyncBench class 'dog'"):
        clf.multi_hot(["dog"])


# --- weight files -----------------------------------------------------------------------------------------


def test_saved_weights_round_trip(weights: Path) -> None:
    model, classes = clf.load_classifiers(weights)
    assert classes == CLASSES and model.cfg == SMALL
    reference = small_model().state_dict()
    assert model.state_dict().keys() == reference.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    with safe_open(str(weights), framework="pt") as f:
        assert f.metadata() == {"part": "classifiers", "classes": ",".join(CLASSES)}


def test_missing_and_bad_weight_files_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsMissing) as err:
        sb_embed.load_audio(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(sb_embed, "REPO_ROOT", tmp_path)  # the default place, empty here
    with pytest.raises(WeightsMissing) as err:
        load_embedder("syncbench-video")
    text = str(err.value)
    assert text.startswith(str(tmp_path / "checkpoints" / "tiny" / "classifiers.safetensors"))
    assert "avlink train classifiers" in text and "\n" not in text
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="bad.safetensors: not a safetensors file"):
        sb_embed.load_video(bad)
    other = tmp_path / "other.safetensors"
    clf.save_classifiers(other, small_model())
    state = {k: v for k, v in small_model().state_dict().items() if not k.startswith("video.")}
    from safetensors.torch import save_file

    save_file(state, str(other))
    with pytest.raises(UserError, match="other.safetensors: does not hold SyncBench classifiers"):
        sb_embed.load_audio(other)


# --- the adapters against the training pipeline -----------------------------------------------------------


def test_adapters_read_media_as_the_shards_hold_it(syncbench_dir: Path, shards: Path, weights: Path) -> None:
    audio, video = load_embedder("syncbench-audio", weights), load_embedder("syncbench-video", weights)
    assert isinstance(audio, Embedder) and isinstance(video, Embedder)
    assert audio.sample_rate == 22050 and audio.fps is None and video.fps == 6.0 and audio.classes == CLASSES
    model, _ = clf.load_classifiers(weights)
    batch = collate(list(ShardDataset(shards)))
    rows = {json.loads(line)["id"]: json.loads(line) for line in (syncbench_dir / "metadata.jsonl").open()}
    files = [syncbench_dir / rows[i]["file"] for i in batch["id"]]
    waves = np.stack([media.read_audio(f, 22050, duration=CLIP.duration).samples for f in files])
    frames = np.stack([media.read_video(f, 6.0, (16, 16), duration=CLIP.duration).frames for f in files])
    with torch.no_grad():
        torch.testing.assert_close(audio.logits(waves, "audio"), model.audio(batch["mel"]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(audio.embed(waves, "audio"), model.audio.embed(batch["mel"]), atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(video.logits(frames, "video"), model.video(batch["video"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(video.embed(frames, "video"), model.video.embed(batch["video"]), atol=1e-5,
                                   rtol=1e-5)
    # the labels the training reads are the metadata's classes
    labels = clf.shard_labels(shards)
    assert {i: clf.predicted_classes(labels[i] * 2 - 1) for i in labels} == \
           {i: clf.clip_classes(row) for i, row in rows.items()}
    with pytest.raises(ValueError, match="syncbench-audio embeds audio only"):
        audio.logits(frames, "video")


def test_video_of_another_size_is_cover_resized_to_the_training_view(syncbench_dir: Path, weights: Path) -> None:
    video = sb_embed.load_video(weights)
    path = next((syncbench_dir / "test").glob("*.mp4"))
    full = media.read_video(path, 6.0, duration=CLIP.duration).frames  # 256 x 144
    small = media.read_video(path, 6.0, (16, 16), duration=CLIP.duration).frames
    resized = sb_embed.cover_resize(torch.from_numpy(full), 16, 16).numpy()
    assert resized.shape == small.shape and resized.dtype == np.uint8
    # FFmpeg's scaler and ours agree to a few levels of 255 on average
    assert np.abs(resized.astype(int) - small.astype(int)).mean() < 6
    assert video.logits(full[None], "video").shape == (1, len(CLASSES))


# --- `avlink train classifiers` and the evaluation's class_acc ---------------------------------------------


def test_train_cli_exports_weights_the_embedders_load(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "classifiers", "--data", str(shards), "--out", str(out), "--max-steps", "2",
                     "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert code == 0
    exported = out / "export" / "classifiers.safetensors"
    card = json.loads((out / "export" / "classifiers.card.json").read_text())
    assert card["part"] == "classifiers" and card["steps"] == 2
    assert card["train"]["lr"] == CLASSIFIER_TRAIN_DEFAULTS["lr"]
    embedder = sb_embed.load_audio(exported)
    assert embedder.logits(np.zeros((1, 22050), np.float32), "audio").shape == (1, len(CLASSES))


def test_runner_class_acc_counts_exact_sets() -> None:
    from avlink.eval.scoring import Features, Pair, RowScorer, Scored

    class Fixed:
        classes = CLASSES

    meta = {"objects": [{"class": "ball"}, {"class": "lamp"}]}
    pairs = [Pair(str(i), Path(f"g{i}.wav"), Path(f"r{i}.mp4"), meta) for i in range(3)]
    key = "syncbench-audio:audio"
    logits = [[3, -1, 2, -1, -1, -1], [3, -1, -2, -1, -1, -1], [3, 1, 2, -1, -1, -1]]  # right, missed, extra
    xs = [Features(logits={key: np.array(row, np.float32)}) for row in logits]
    scorer = RowScorer("v2a", xs, pairs, [2.0] * 3, {"syncbench-audio": Fixed()})
    out = Scored()
    scorer.class_acc(xs, "syncbench-audio", out)
    assert out.per_clip["class_acc"] == [1.0, 0.0, 0.0]
    assert out.values["class_acc"] == pytest.approx(1 / 3)


# --- the video classifier of the upsampler's output geometry ----------------------------------------------

SCALE = get_preset("tiny").upsampler.scale  # (4, 4): 64 x 64 px at 24 fps
UPSAMPLED = clf.ClassifierConfig(video_width=8, embed_dim=24, audio=False, video_scale=SCALE)


def test_upsampled_stem_starts_as_the_base_view() -> None:
    """At initialisation the stem hands the body the block's mean frame and the change over one base frame: on a
    clip whose base frames are held and whose pixels are repeated (nearest neighbour), the upsampled classifier
    with the base body gives the base classifier's logits, and it costs the base network plus one 1x1x1 conv."""
    from avlink.upsampler import upsample_nearest

    base = small_model().video
    up = clf.SyncBenchClassifiers(UPSAMPLED).video.eval()
    missing, unexpected = up.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) == {"stem.weight", "stem.bias"} and not unexpected
    video = torch.rand(2, *CLIP.video_shape) * 2 - 1  # (2, 3, 16, 16, 16)
    high = upsample_nearest(video, SCALE)  # (2, 3, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(up(high), base(video), atol=1e-5, rtol=1e-5)
        assert up.frame_features(high).shape == base.frame_features(video).shape
    st, ss = SCALE
    assert up.time_stride == 2 * st
    extra = sum(p.numel() for p in up.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 6 * 6 * st * ss * ss + 6
    with pytest.raises(AssertionError, match="not whole blocks"):
        up(high[:, :, :63])


def test_upsampled_weights_round_trip_and_stay_out_of_the_base_embedder(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = clf.SyncBenchClassifiers(UPSAMPLED)
    path = tmp_path / clf.UPSAMPLED_FILE
    clf.save_classifiers(path, model)
    loaded, classes = clf.load_classifiers(path)
    assert loaded.audio is None and loaded.cfg == UPSAMPLED and classes == CLASSES
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["video_scale"] == "4,4"
    with pytest.raises(UserError, match="output geometry; syncbench-video reads the base frames"):
        sb_embed.load_video(path)


@pytest.fixture(scope="module")
def pairs(syncbench_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avlink.data.pairs import prepare_pairs

    cfg = get_preset("tiny")
    return prepare_pairs(f"syncbench:{syncbench_dir}", tmp_path_factory.mktemp("pairs") / "pairs", cfg.clip,
                         cfg.upsampler.output(cfg.clip.video), progress=False)


def test_train_cli_upsampled_exports_the_output_geometry_classifier(pairs: Path, syncbench_dir: Path,
                                                                    weights: Path, tmp_path: Path) -> None:
    from avlink.train.objectives import UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS

    def train(out: Path, steps: int, *extra: str) -> int:
        return cli.main(["train", "classifiers", "--upsampled", "--data", str(pairs), "--out", str(out),
                         "--max-steps", str(steps), "--batch-size", "2", "--no-progress", "--device", "cpu", *extra])

    out = tmp_path / "run"
    assert train(out, 2) == 0  # labels: the SyncBench folder the pairs were decoded from
    exported = out / "export" / clf.UPSAMPLED_FILE
    card = json.loads((out / "export" / "classifiers-upsampled.card.json").read_text())
    assert card["steps"] == 2 and card["train"]["lr"] == UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS["lr"]
    model, _ = clf.load_classifiers(exported)
    assert model.audio is None and model.cfg.video_scale == SCALE
    assert model.video(torch.zeros(1, 3, 64, 64, 64)).shape == (1, len(CLASSES))
    # --init: the body starts from the base classifiers' video network
    init = tmp_path / "init"
    assert train(init, 1, "--labels", str(syncbench_dir), "--init", str(weights)) == 0
    started, _ = clf.load_classifiers(init / "export" / clf.UPSAMPLED_FILE)
    assert started.cfg.video_width == SMALL.video_width and started.cfg.embed_dim == SMALL.embed_dim
    # its own step budget where neither --max-steps nor the config gives one
    from avlink.train.cli import load_settings, train_args

    for upsampled, defaults in ((True, UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS), (False, CLASSIFIER_TRAIN_DEFAULTS)):
        _, tc, _, _ = load_settings(train_args("classifiers", data=pairs, out=out, upsampled=upsampled))
        assert tc.max_steps == defaults["max_steps"]
    assert UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS["max_steps"] != CLASSIFIER_TRAIN_DEFAULTS["max_steps"]


def test_train_cli_upsampled_refuses_bad_flags_in_one_line(pairs: Path, weights: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--data", str(pairs), "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu"]
    cases = [(["train", "video", "--upsampled", *base], "--upsampled: trains the upsampled-geometry"),
             (["train", "classifiers", "--labels", str(tmp_path), *base], "--labels: goes with"),
             (["train", "classifiers", "--upsampled", "--labels", str(tmp_path), *base], "not a SyncBench folder"),
             (["train", "classifiers", "--upsampled", "--init", str(tmp_path / "no.safetensors"), *base],
              "no.safetensors: no such file (--init)")]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # pairs whose SyncBench folder is not where their spec says: the labels need --labels
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("low.npy", "high.npy", "envelope.npy"):
        (moved / name).symlink_to(pairs / name)
    meta = json.loads((pairs / "pairs.json").read_text())
    (moved / "pairs.json").write_text(json.dumps({**meta, "spec": "syncbench:gone:train"}))
    assert cli.main(["train", "classifiers", "--upsampled", *base[:1], str(moved), *base[2:]]) == 2
    assert "give the SyncBench folder with --labels DIR" in capsys.readouterr().err
