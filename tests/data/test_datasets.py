"""Data sets: SyncBench, VGGSound layout, plain folder; items resolve, bad files are listed and skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from avlink.config import get_preset
from avlink.data.datasets import (
    ClipDataset,
    collate_clips,
    fit_length,
    folder_dataset,
    open_dataset,
    syncbench_dataset,
    vggsound_dataset,
)
from avlink.data.media import MediaError, write_video
from avlink.errors import UserError

CLIP = get_preset("tiny").clip


def make_video(path: Path, seconds: float = 1.0, audio: bool = True, fps: float = 6.0, seed: int = 0) -> Path:
    """A small mp4: a bright square that moves on a dark floor, and a tone with a click per frame."""
    rng = np.random.default_rng(seed)
    num = round(seconds * fps)
    frames = np.full((num, 32, 32, 3), 20, dtype=np.uint8)
    for t in range(num):
        x = (4 * t) % 24
        frames[t, 8:16, x:x + 8] = (230, 200, 60)
    sr = 22050
    n = round(seconds * sr)
    wave = 0.2 * np.sin(2 * np.pi * (220 + 40 * seed) * np.arange(n) / sr)
    wave[:: round(sr / fps)] += 0.5 * rng.standard_normal(len(wave[:: round(sr / fps)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    if audio:
        write_video(path, frames, fps, audio=wave.astype(np.float32), sample_rate=sr)
    else:
        write_video(path, frames, fps)
    return path


def make_folder(root: Path) -> Path:
    """Three good clips (one in a sub-folder, one uncaptioned), one broken file, and a captions CSV."""
    make_video(root / "a.mp4", 1.0, seed=0)
    make_video(root / "sub" / "b.mp4", 3.5, seed=1)
    make_video(root / "c.mp4", 0.5, seed=2)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    (root / "captions.csv").write_text("file,caption\na.mp4,a dog barks\nsub/b.mp4,\"drums, loud\"\n"
                                       "broken.mp4,noise\ngone.mp4,never downloaded\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def syncbench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avlink.data.syncbench import synth

    out = tmp_path_factory.mktemp("syncbench")
    synth(out, n=3, seed=0, split="train", preset="tiny")
    return out


def test_syncbench_items_resolve_and_load(syncbench_dir: Path) -> None:
    rows = [json.loads(line) for line in (syncbench_dir / "metadata.jsonl").read_text().splitlines() if line]
    ds = syncbench_dataset(syncbench_dir)
    assert [it.id for it in ds] == [str(r["id"]) for r in rows]
    assert [it.caption for it in ds] == [r["caption"] for r in rows]
    assert ds.skipped == []
    clip = ds.load(0, CLIP)
    assert clip.video.shape == CLIP.video_shape and clip.video.dtype == torch.float32
    assert clip.video.min() >= -1.0 and clip.video.max() <= 1.0 and clip.video.std() > 0.05
    assert clip.audio.shape == (CLIP.num_samples,) and clip.audio_mask.shape == (CLIP.num_samples,)
    assert clip.audio.abs().max() > 0.01
    expected = [t for t in rows[0]["events"] if t < CLIP.duration]
    assert clip.events is not None and clip.events.tolist() == pytest.approx(expected)


def test_syncbench_missing_clip_is_listed(syncbench_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "sb"
    shutil.copytree(syncbench_dir, copy)
    gone = syncbench_dataset(copy)[1].path
    gone.unlink()
    ds = syncbench_dataset(copy)
    assert len(ds) == 2 and gone not in [it.path for it in ds]
    assert [(s.file, s.reason) for s in ds.skipped] == [(str(gone), "file not found")]


def test_vggsound_layout(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    make_video(videos / "train" / "-abc_d-EF1_000030.mp4", seed=0)  # the common {id}_{start:06d} naming
    make_video(videos / "xyz987_12.mp4", seed=1)  # {id}_{start}
    make_video(videos / "tst00000001_000000.mp4", seed=2)
    csv_path = tmp_path / "vggsound.csv"
    csv_path.write_text(
        "# YouTube ID,start seconds,label,train/test split\n"
        '-abc_d-EF1,30,"male speech, man speaking",train\n'
        "xyz987,12,dog barking,train\n"
        "missing0001,5,cat purring,train\n"
        "tst00000001,0,playing drums,test\n"
        "bad,row\n"
    )
    ds = vggsound_dataset(csv_path, videos)
    assert [it.id for it in ds] == ["-abc_d-EF1_000030", "xyz987_000012", "tst00000001_000000"]
    assert [it.caption for it in ds] == ["male speech, man speaking", "dog barking", "playing drums"]
    assert ds[0].start == 0.0 and ds[0].meta["start_seconds"] == 30
    reasons = {Path(s.file).name: s.reason for s in ds.skipped}
    assert reasons["missing0001_000005.mp4"] == "file not found"
    assert reasons["vggsound.csv:6"].startswith("expected 4 fields")
    assert len(ds.skipped) == 2  # the header line is not a skipped row

    train = open_dataset(f"vggsound:{csv_path}:{videos}:train")
    assert [it.id for it in train] == ["-abc_d-EF1_000030", "xyz987_000012"]
    assert train.load(1, CLIP).caption == "dog barking"


def test_folder_captions_and_bad_files(folder: Path) -> None:
    ds = open_dataset(f"folder:{folder}")
    assert [it.id for it in ds] == ["a.mp4", "broken.mp4", "c.mp4", "sub/b.mp4"]
    assert {it.id: it.caption for it in ds} == {
        "a.mp4": "a dog barks", "broken.mp4": "noise", "c.mp4": "", "sub/b.mp4": "drums, loud"}
    assert [(Path(s.file).name, s.reason) for s in ds.skipped] == [("gone.mp4", "listed in captions.csv but not found")]

    with pytest.raises(MediaError, match="broken.mp4"):
        ds.load(1, CLIP)
    ds.check()
    assert [it.id for it in ds] == ["a.mp4", "c.mp4", "sub/b.mp4"]  # nothing else lost
    assert str(folder / "broken.mp4") in [s.file for s in ds.skipped]
    assert all(s.reason for s in ds.skipped)


def test_short_clip_is_padded_and_masked(folder: Path) -> None:
    ds = folder_dataset(folder)
    clip = next(ds.load(i, CLIP) for i, it in enumerate(ds) if it.id == "c.mp4")  # 0.5 s of a 2.67 s clip
    assert clip.video.shape == CLIP.video_shape
    assert clip.video_mask.sum() == 3 and not clip.video_mask[3:].any()
    valid = int(clip.audio_mask.sum())
    assert abs(valid - 0.5 * CLIP.audio.sample_rate) < 0.05 * CLIP.audio.sample_rate
    assert (clip.audio[valid:] == 0).all()


def test_fit_length_cuts_and_pads_with_mask() -> None:
    x, mask = torch.arange(1, 4).float(), torch.ones(3, dtype=torch.bool)
    padded, padded_mask = fit_length(x, mask, 5)
    assert padded.tolist() == [1, 2, 3, 0, 0] and padded_mask.tolist() == [True] * 3 + [False] * 2
    cut, cut_mask = fit_length(x, mask, 2)
    assert cut.tolist() == [1, 2] and cut_mask.tolist() == [True, True]


def test_silent_video_is_refused(tmp_path: Path) -> None:
    path = make_video(tmp_path / "silent.mp4", audio=False)
    ds = folder_dataset(tmp_path)
    with pytest.raises(MediaError, match="silent.mp4: no audio"):
        ds.load(0, CLIP)
    assert [s.reason for s in ds.check().skipped] == ["no audio stream"] and len(ds) == 0
    assert path.exists()


def test_clip_dataset_batches_skip_bad_items(folder: Path) -> None:
    ds = ClipDataset(folder_dataset(folder), CLIP)
    assert ds[1] is None  # broken.mp4
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_clips)
    batch = next(iter(loader))
    assert batch["id"] == ["a.mp4", "c.mp4", "sub/b.mp4"]
    assert batch["video"].shape == (3, *CLIP.video_shape)
    assert batch["audio"].shape == (3, CLIP.num_samples)
    assert collate_clips([None, None]) is None


@pytest.mark.parametrize("spec", ["nope:x", "syncbench:", "vggsound:only.csv", "folder:/no/such/dir"])
def test_bad_specs_are_user_errors(spec: str) -> None:
    with pytest.raises(UserError):
        open_dataset(spec)


def test_syncbench_split_filter(syncbench_dir: Path, tmp_path: Path) -> None:
    from avlink.data.syncbench import synth

    both = tmp_path / "both"
    shutil.copytree(syncbench_dir, both)
    synth(both, n=1, seed=0, split="test", preset="tiny")
    assert len(syncbench_dataset(both)) == 4
    assert len(open_dataset(f"syncbench:{both}:train")) == 3
    test = open_dataset(f"syncbench:{both}:test")
    assert len(test) == 1 and test[0].meta["split"] == "test"
