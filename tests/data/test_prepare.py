"""`avlink prepare` and the shard reader: shards + manifest, resume, kills, exit status, exactly-once reading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avlink import cli
from avlink.config import get_preset
from avlink.data import prepare as prep
from avlink.data.datasets import ItemRef, syncbench_dataset
from avlink.data.shards import ShardDataset, ShardError, collate, read_records
from avlink.errors import UserError

CLIP = get_preset("tiny").clip
NUM_CLIPS = 5


@pytest.fixture(scope="module")
def syncbench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avlink.data.syncbench import synth

    out = tmp_path_factory.mktemp("syncbench")
    synth(out, n=NUM_CLIPS, seed=1, split="train", preset="tiny")
    return out


@pytest.fixture(scope="module")
def prepared(syncbench_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    manifest = prep.prepare(f"syncbench:{syncbench_dir}", out, shard_size=2, workers=1, progress=False)
    assert manifest["complete"]
    return out


def make_folder(root: Path, syncbench_dir: Path) -> Path:
    """Three SyncBench clips as a plain folder (one nested, one uncaptioned), a broken file, a captions CSV."""
    for item, name in zip(syncbench_dataset(syncbench_dir), ["a.mp4", "sub/b.mp4", "c.mp4"], strict=False):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(item.path, root / name)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    (root / "captions.csv").write_text("file,caption\na.mp4,a dog barks\nsub/b.mp4,\"drums, loud\"\n"
                                       "broken.mp4,noise\ngone.mp4,never downloaded\n")
    return root


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """Each shard's inode and bytes: a shard left alone keeps both."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(out.glob("shard-*.tar"))}


def test_prepare_writes_shards_and_manifest(prepared: Path, syncbench_dir: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["audio"] == "mel"
    assert manifest["counts"] == {"items": NUM_CLIPS, "written": NUM_CLIPS, "skipped": 0, "shards": 3,
                                  "shards_planned": 3}
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(os.listdir(prepared)) == ["manifest.json", *[s["name"] for s in manifest["shards"]]]

    # One sample, field by field, against the data set decoded directly.
    ds = syncbench_dataset(syncbench_dir)
    record = next(read_records(str(prepared / "shard-000000.tar")))
    assert record["json"]["id"] == ds[0].id and record["json"]["caption"] == ds[0].caption
    clip = ds.load(0, CLIP)
    assert np.array_equal(record["video.npy"], clip.frames.numpy())
    assert record["video.npy"].dtype == np.uint8 and record["video.npy"].shape == (16, 16, 16, 3)
    assert record["mel.npy"].shape == (CLIP.audio.n_mels, CLIP.num_mel_frames)
    from avlink.codecs.mel import MelSpectrogram, fit_frames

    mel = fit_frames(MelSpectrogram(CLIP.audio)(clip.audio[None]), CLIP.num_mel_frames)[0]
    torch.testing.assert_close(torch.from_numpy(record["mel.npy"]), mel, atol=1e-5, rtol=1e-5)
    assert record["mel_mask.npy"].sum() >= CLIP.num_samples // CLIP.audio.hop_length
    assert record["text.npy"].ndim == 2 and record["text.npy"].shape[1] == 384
    assert record["json"]["events"] == pytest.approx(clip.events.tolist())


def test_resume_redoes_only_the_missing_shard(prepared: Path, tmp_path: Path, syncbench_dir: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = snapshot(out)
    (out / "shard-000001.tar").unlink()
    manifest = prep.prepare(f"syncbench:{syncbench_dir}", out, shard_size=2, workers=1, progress=False)
    after = snapshot(out)
    assert manifest["complete"] and manifest["counts"]["written"] == NUM_CLIPS
    for name in ("shard-000000.tar", "shard-000002.tar"):
        assert after[name] == before[name]  # same inode: not rewritten
    assert after["shard-000001.tar"][0] != before["shard-000001.tar"][0]
    assert after["shard-000001.tar"][1] == before["shard-000001.tar"][1]  # redone to the same bytes


def test_injected_failure_leaves_no_corrupt_shard(syncbench_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    spec = f"syncbench:{syncbench_dir}"
    real = prep.ClipEncoder.encode_clip
    calls = []

    def dies_on_fourth(self: prep.ClipEncoder, item: ItemRef) -> dict:
        calls.append(item.id)
        if len(calls) == 4:  # mid-way through the second shard
            raise RuntimeError("power cut")
        return real(self, item)

    monkeypatch.setattr(prep.ClipEncoder, "encode_clip", dies_on_fourth)
    with pytest.raises(RuntimeError, match="power cut"):
        prep.prepare(spec, out, shard_size=2, workers=1, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["name"] for s in manifest["shards"]] == ["shard-000000.tar"]
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000000.tar"]  # no partial file left
    first = snapshot(out)

    monkeypatch.setattr(prep.ClipEncoder, "encode_clip", real)
    manifest = prep.prepare(spec, out, shard_size=2, workers=1, progress=False)
    assert manifest["complete"] and manifest["counts"]["written"] == NUM_CLIPS
    assert snapshot(out)["shard-000000.tar"] == first["shard-000000.tar"]
    assert len(list(ShardDataset(out))) == NUM_CLIPS


def test_changed_settings_are_refused(prepared: Path, syncbench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    with pytest.raises(UserError, match="different data set or settings"):
        prep.prepare(f"syncbench:{syncbench_dir}", out, shard_size=3, workers=1, progress=False)


def test_exit_status_3_and_bad_file_listed_with_two_workers(syncbench_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = make_folder(tmp_path / "data", syncbench_dir)
    out = tmp_path / "out"
    status = cli.main(["prepare", "--data", f"folder:{data}", "--out", str(out), "--workers", "2",
                       "--shard-size", "2"])
    assert status == prep.EXIT_SKIPPED
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["written"] == 3
    reasons = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"broken.mp4", "gone.mp4"} and all(reasons.values())
    assert "broken.mp4" in capsys.readouterr().err
    samples = {s["id"]: s for s in ShardDataset(out)}
    assert set(samples) == {"a.mp4", "c.mp4", "sub/b.mp4"}
    assert samples["c.mp4"]["caption"] == "" and samples["sub/b.mp4"]["caption"] == "drums, loud"
    # no caption, no states: training reads the row as the generators' null text, as inference reads no prompt
    records = [r for shard in sorted(out.glob("shard-*.tar")) for r in read_records(str(shard))]
    stored = {r["json"]["id"]: r["text.npy"] for r in records}
    assert stored["c.mp4"].shape == (0, 384) and stored["a.mp4"].shape[0] > 0
    batch = collate([samples["c.mp4"], samples["a.mp4"]])
    assert batch["text_mask"].sum(1).tolist() == [0, stored["a.mp4"].shape[0]]
    assert collate([samples["c.mp4"]])["text_mask"].shape == (1, 1)  # one masked token when no clip has a caption


def test_older_shards_drop_the_states_of_an_empty_caption(prepared: Path) -> None:
    """Shards written before empty captions went without states hold the encoder's states for "": read as none."""
    from avlink.data.shards import to_sample

    record = next(read_records(str(prepared / "shard-000000.tar")))
    assert to_sample(record)["text"].shape[0] > 0
    old = {**record, "json": {**record["json"], "caption": ""}}
    sample = to_sample(old)
    assert sample["text"].shape == (0, 384) and sample["text_mask"].shape == (0,)


def test_exit_status_0_when_nothing_skipped(syncbench_dir: Path, tmp_path: Path) -> None:
    assert cli.main(["prepare", "--data", f"syncbench:{syncbench_dir}", "--out", str(tmp_path),
                     "--workers", "1", "--shard-size", "8"]) == prep.EXIT_OK


def test_bad_arguments_are_one_line_errors(syncbench_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prepare", "--data", f"folder:{tmp_path / 'none'}", "--out", str(tmp_path)]) == 2
    assert cli.main(["prepare", "--data", f"syncbench:{syncbench_dir}", "--out", str(tmp_path),
                     "--audio", "latent"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "no such folder" in lines[0] and "--vae" in lines[1]


def test_vae_latents_are_stored(syncbench_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from avlink.codecs.vae import AudioVAE

    vae = AudioVAE(CLIP.audio, hidden=16, depth=1).freeze()
    ckpt = tmp_path / "vae.safetensors"
    save_file(vae.state_dict(), str(ckpt))
    out = tmp_path / "out"
    manifest = prep.prepare(f"syncbench:{syncbench_dir}", out, shard_size=8, vae=str(ckpt), progress=False)
    assert manifest["audio"] == "latent" and manifest["shapes"]["latent"] == list(CLIP.latent_shape)
    sample = next(iter(ShardDataset(out)))
    assert sample["latent"].shape == CLIP.latent_shape == sample["latent_logvar"].shape
    with torch.no_grad():
        expected = vae.encode(sample["mel"][None]).mean[0]
    torch.testing.assert_close(sample["latent"], expected, atol=1e-5, rtol=1e-5)

    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.safetensors: not a readable safetensors file"):
        prep.prepare(f"syncbench:{syncbench_dir}", tmp_path / "o2", vae=str(tmp_path / "junk.safetensors"))


def test_two_ranks_read_everything_exactly_once(prepared: Path, syncbench_dir: Path) -> None:
    expected = sorted(it.id for it in syncbench_dataset(syncbench_dir))
    for shuffle in (False, True):
        per_rank = [[s["id"] for s in ShardDataset(prepared, rank, 2, shuffle=shuffle, seed=3)] for rank in (0, 1)]
        assert per_rank[0] and per_rank[1]
        assert sorted(per_rank[0] + per_rank[1]) == expected
    # 2 ranks x 2 DataLoader workers: each reader its own shards, none read twice.
    shards = ShardDataset(prepared, 0, 2).shards
    readers = [ShardDataset(prepared, r, 2).shards_for(w, 2) for r in (0, 1) for w in (0, 1)]
    assert sorted(s for mine in readers for s in mine) == sorted(shards)


def test_dataloader_workers_split_shards(prepared: Path) -> None:
    loader = torch.utils.data.DataLoader(ShardDataset(prepared), batch_size=2, num_workers=2, collate_fn=collate)
    ids = [i for batch in loader for i in batch["id"]]
    assert len(ids) == NUM_CLIPS == len(set(ids))


def test_collate_pads_text_and_stacks(prepared: Path) -> None:
    samples = list(ShardDataset(prepared))
    batch = collate(samples)
    lengths = [s["text"].shape[0] for s in samples]
    assert batch["text"].shape == (NUM_CLIPS, max(lengths), 384)
    assert batch["text_mask"].sum(1).tolist() == lengths
    assert batch["mel"].shape == (NUM_CLIPS, CLIP.audio.n_mels, CLIP.num_mel_frames)
    assert batch["video"].shape == (NUM_CLIPS, *CLIP.video_shape)
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert len(batch["events"]) == NUM_CLIPS and batch["caption"][0] == samples[0]["caption"]


def test_truncated_shard_is_named(prepared: Path, tmp_path: Path) -> None:
    data = (prepared / "shard-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="cut.tar: unexpected end of data"):
        list(ShardDataset(cut))


@pytest.mark.slow
def test_sigkill_mid_run_resumes(syncbench_dir: Path, tmp_path: Path) -> None:
    """A real kill: SIGKILL the command once its first shard is recorded, then rerun it."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "avlink.cli", "prepare", "--data", f"syncbench:{syncbench_dir}",
            "--out", str(out), "--workers", "1", "--shard-size", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    manifest_path = out / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest_path.is_file() and json.loads(manifest_path.read_text())["shards"]:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    manifest = json.loads(manifest_path.read_text())
    assert not manifest["complete"]
    for entry in manifest["shards"]:  # every recorded shard is whole
        assert sum(1 for _ in read_records(str(out / entry["name"]))) == entry["count"]
    assert subprocess.run(args, stderr=subprocess.DEVNULL).returncode == 0
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert len(list(ShardDataset(out))) == NUM_CLIPS
