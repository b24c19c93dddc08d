"""SyncBench: determinism, classes, event timing, audio onsets, the 6 fps visual cue, and `avlink synth`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avlink import cli
from avlink.data import media
from avlink.data import syncbench as sb
from avlink.errors import UserError

TINY = 16 / 6  # the tiny preset's clip duration
READ_FPS, READ_SIZE = 6.0, 16


def obj_caption(meta: dict, index: int) -> str:
    """The part of a joined caption ("A, B and C") that describes object `index`."""
    parts = meta["caption"].replace(" and a", ", a").replace(" and rain", ", rain").split(", ")
    return parts[index]


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# --- determinism and content ------------------------------------------------------------------------------


def test_same_seed_same_clip_other_seed_other_clip():
    a, b, c = sb.render_clip(11, TINY), sb.render_clip(11, TINY), sb.render_clip(12, TINY)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert json.dumps(a.meta) == json.dumps(b.meta)
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.audio, c.audio)
    assert a.meta["caption"] != c.meta["caption"] or a.meta["events"] != c.meta["events"]


@pytest.mark.parametrize("duration", [TINY, 5.16])
def test_clip_shapes_follow_duration(duration):
    clip = sb.render_clip(3, duration)
    frames = int(np.ceil(duration * 24 - 1e-6))
    assert clip.frames.shape == (frames, 144, 256, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (round(duration * 44100),) and clip.audio.dtype == np.float32
    assert np.abs(clip.audio).max() <= 0.9 + 1e-6
    assert all(0.0 < t < duration for t in clip.meta["events"])


def test_every_class_appears_in_a_few_seeds_and_renders():
    seen: dict[str, int] = {}
    for seed in range(60):
        for obj in sb.plan_scene(seed, TINY).objects:
            seen.setdefault(obj.cls, seed)
    assert set(seen) == set(sb.CLASSES) and len(sb.CLASSES) >= 6
    for cls, seed in seen.items():
        clip = sb.render_clip(seed, TINY, stems=True)
        index = [o["class"] for o in clip.meta["objects"]].index(cls)
        obj = clip.meta["objects"][index]
        x0, y0, x1, y1 = obj["cell"]
        cell = clip.frames[:, y0:y1, x0:x1].astype(np.float32)
        background = sb.plan_scene(seed, TINY).background[y0:y1, x0:x1]
        assert np.abs(cell - background).mean() > 5, f"{cls}: nothing drawn in its cell"
        assert cell.std(axis=0).mean() > 1, f"{cls}: nothing moves or flashes"
        assert np.sqrt(np.mean(clip.stems[index] ** 2)) > 1e-3, f"{cls}: silent"
        # Everything lives in the central square: what a centre crop to a square keeps.
        assert 56 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 144, f"{cls}: cell {obj['cell']}"
        word = {"slider": "sliding"}.get(cls, cls)
        assert word in obj_caption(clip.meta, index), clip.meta["caption"]


def test_event_times_are_irregular_spaced_and_inside_the_clip():
    gaps, times, spreads = [], [], []
    for seed in range(150):
        meta = sb.plan_scene(seed, TINY).meta()
        assert meta["events"] == sorted(t for o in meta["objects"] for t in o["events"])
        assert [meta["objects"][i]["class"] for i in meta["event_objects"]] == meta["event_classes"]
        for obj in meta["objects"]:
            ev = obj["events"]
            assert (obj["class"] == "rain") == (len(ev) == 0)
            assert all(sb.MIN_EVENT - 1e-9 <= t <= TINY - sb.END_MARGIN + 1e-9 for t in ev), (seed, ev)
            assert np.all(np.diff(ev) >= 0.25 - 1e-9), (seed, obj["class"], ev)
            gaps += np.diff(ev).tolist()
            times += ev
            if len(ev) >= 3:
                spreads.append(np.ptp(np.diff(ev)))
    gaps = np.array(gaps)
    assert gaps.std() > 0.1  # not one fixed spacing
    assert np.unique(np.round(gaps, 2), return_counts=True)[1].max() < 0.1 * len(gaps)  # no common spacing
    assert (np.array(spreads) > 0.02).mean() > 0.9  # within an object, not a steady beat either
    on_frames = np.abs(np.array(times) * 24 - np.round(np.array(times) * 24)) < 1e-3
    assert on_frames.mean() < 0.05  # events fall between video frames, not on them


def test_splits_never_overlap_and_bad_ranges_are_refused(tmp_path):
    assert sb.clip_seed("val", 0, 0) - sb.clip_seed("train", 0, 0) == sb.SPLIT_SIZE
    assert sb.clip_seed("test", 5, 2) == 2 * sb.SPLIT_SIZE + 7
    with pytest.raises(UserError, match="splits never overlap"):
        sb.synth(tmp_path, n=2, seed=sb.SPLIT_SIZE - 1)
    with pytest.raises(UserError, match="unknown preset"):
        sb.synth(tmp_path, n=1, preset="huge")


# --- audio: an onset at each event -----------------------------------------------------------------------


def energy_jump(x: np.ndarray, sr: int, t: float, window: float = 0.02) -> float:
    """Energy in the `window` after t over the energy in the `window` before it."""
    i, n = int(round(t * sr)), int(window * sr)
    before = np.mean(x[max(0, i - n):i].astype(np.float64) ** 2) + 1e-12
    return float(np.mean(x[i:i + n].astype(np.float64) ** 2) / before)


def test_audio_has_an_onset_at_each_event():
    own, mixed = [], []
    for seed in range(20, 32):
        clip = sb.render_clip(seed, TINY, stems=True)
        for t, k in zip(clip.meta["events"], clip.meta["event_objects"], strict=True):
            own.append(energy_jump(clip.stems[k], clip.sample_rate, t))
            mixed.append(energy_jump(clip.audio, clip.sample_rate, t))
    own, mixed = np.array(own), np.array(mixed)
    assert len(own) >= 30
    assert own.min() > 2.0, f"an object's own sound has no onset at one of its events: {np.sort(own)[:5]}"
    # In the mix a loud sound of another object can mask a quiet one now and then, as in any recording.
    assert (mixed > 1.5).mean() >= 0.9, f"mix onsets: {np.sort(mixed)[:10]}"


def test_no_onsets_away_from_events():
    clip = sb.render_clip(21, TINY, stems=True)
    events = np.array(clip.meta["events"])
    rng = np.random.default_rng(0)
    quiet = [t for t in rng.uniform(0.1, TINY - 0.1, 200) if np.all(np.abs(events - t) > 0.05)][:40]
    jumps = np.array([energy_jump(clip.audio, clip.sample_rate, t) for t in quiet])
    assert (jumps < 3.0).mean() >= 0.95, np.sort(jumps)[-5:]


def test_ball_impacts_are_louder_when_faster():
    for seed in range(200):
        scene = sb.plan_scene(seed, TINY)
        balls = [i for i, o in enumerate(scene.objects) if o.cls == "ball" and len(o.events) >= 3]
        if balls:
            break
    clip = sb.render_clip(seed, TINY, stems=True)
    obj = clip.meta["objects"][balls[0]]
    stem = clip.stems[balls[0]]
    peaks = [np.abs(stem[int(t * 44100):int((t + 0.05) * 44100)]).max() for t in obj["events"]]
    speeds = obj["impact_speeds"]
    assert np.all(np.diff(speeds) < 0), speeds  # each bounce is lower than the one before
    assert np.corrcoef(speeds, peaks)[0, 1] > 0.8, (speeds, peaks)


# --- the visual cue: event times from 16x16 frames at 6 fps ----------------------------------------------


def pixel_depth(box: list[float], width: int = 256, height: int = 144) -> np.ndarray:
    """(16, 16): how far inside `box` (frame px) each read pixel's centre lies, for a cover-resize to 16x16
    and centre crop (what the media reader does)."""
    scale = max(READ_SIZE / width, READ_SIZE / height)
    scaled_w, scaled_h = max(READ_SIZE, round(width * scale)), max(READ_SIZE, round(height * scale))
    left, top = (scaled_w - READ_SIZE) // 2, (scaled_h - READ_SIZE) // 2
    cx = (np.arange(READ_SIZE) + left + 0.5) * width / scaled_w
    cy = (np.arange(READ_SIZE) + top + 0.5) * height / scaled_h
    x0, y0, x1, y1 = box
    return np.minimum(np.minimum(cy - y0, y1 - cy)[:, None], np.minimum(cx - x0, x1 - cx)[None, :])


def cue_onsets(frames: np.ndarray, obj: dict, fps: float) -> list[float]:
    """Event times of one object found blind from its cue regions in low-rate frames (T, 16, 16, 3).

    In the cue region a = (brightness - rest) / (cue - rest) is exp(-(t - t_event) / tau) after an event, so
    a new event shows as a rise above the decay of the frame before, at t_event = t_frame + tau * ln(a)."""
    tau, cue = obj["cue"]["tau"], float(luma(np.array(obj["cue"]["rgb"])))
    bright = luma(frames.astype(np.float64))  # (T, 16, 16)
    regions = []
    for boxes in obj["cue"]["regions"]:
        if boxes not in regions:
            regions.append(boxes)
    found = []
    for boxes in regions:
        depth = np.max([pixel_depth(b) for b in boxes], axis=0)
        pick = depth >= min(4.5, depth.max())  # pixels well inside the region (or the best one)
        trace = bright[:, pick].mean(axis=1)  # (T,)
        rest = np.percentile(trace, 10)  # the cue only ever brightens
        a = np.clip((trace - rest) / (cue - rest), 0.0, 1.0)
        decay = np.exp(-1.0 / (fps * tau))
        for k in range(1, len(a)):
            if a[k] > 0.25 and a[k] > decay * a[k - 1] + 0.15:
                found.append(k / fps + tau * np.log(a[k]))
    return sorted(found)


def recover_events(root: Path, seeds: range) -> tuple[int, int, int]:
    """(events, recovered within 0.1 s, spurious detections) over clips written to mp4 and read back."""
    total = hits = spurious = 0
    for seed in seeds:
        clip = sb.render_clip(seed, TINY)
        path = root / f"{seed}.mp4"
        media.write_video(path, clip.frames, clip.fps, clip.audio, clip.sample_rate)
        video, audio = media.read_clip(path, fps=READ_FPS, size=(READ_SIZE, READ_SIZE), sample_rate=22050)
        assert video.frames.shape[1:] == (READ_SIZE, READ_SIZE, 3) and audio.sample_rate == 22050
        for obj in clip.meta["objects"]:
            found = cue_onsets(video.frames, obj, READ_FPS)
            for t in obj["events"]:
                total += 1
                hits += any(abs(f - t) <= 0.1 for f in found)
            spurious += sum(all(abs(f - t) > 0.1 for t in obj["events"]) for f in found)
    return total, hits, spurious


def test_event_times_are_recoverable_from_16px_frames_at_6fps(tmp_path):
    total, hits, spurious = recover_events(tmp_path, range(40, 48))
    assert total >= 20
    assert hits / total >= 0.9, f"only {hits}/{total} event times recovered within 0.1 s"
    assert spurious <= 0.1 * total, f"{spurious} detections without an event"


def test_without_the_decay_the_frame_grid_alone_misses_the_time():
    """The cue's brightness carries the timing: rounding each event up to the next 6 fps frame (what a cue
    without a known decay would give) misses many events by more than 0.1 s."""
    times = np.array([t for s in range(40, 60) for t in sb.plan_scene(s, TINY).meta()["events"]])
    next_frame = np.ceil(times * READ_FPS - 1e-9) / READ_FPS
    assert (next_frame - times > 0.1).mean() > 0.3


# --- files and the command ---------------------------------------------------------------------------------


def test_synth_command_writes_clips_and_a_second_run_skips_them(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["synth", "--out", str(out), "--n", "3", "--seed", "5", "--split", "val"]
    assert cli.main(args) == 0
    rows = sb.load_metadata(out)
    assert [r["seed"] for r in rows] == [sb.SPLIT_SIZE + 5 + i for i in range(3)]
    assert {r["split"] for r in rows} == {"val"} and len({r["id"] for r in rows}) == 3
    for row in rows:
        path = out / row["file"]
        video, audio = media.read_clip(path, fps=24.0, size=None, sample_rate=44100, duration=row["duration"])
        assert video.frames.shape == (64, 144, 256, 3) and video.mask.all()
        assert audio.samples.shape == (117600,)
        assert row["caption"] and row["events"] == sorted(row["events"])
    stamps = {r["id"]: (out / r["file"]).stat().st_mtime_ns for r in rows}
    capsys.readouterr()

    assert cli.main(args) == 0
    assert "0 clips written, 3 already there" in capsys.readouterr().out
    assert sb.load_metadata(out) == rows
    assert {r["id"]: (out / r["file"]).stat().st_mtime_ns for r in rows} == stamps
    assert not list(out.rglob("*.tmp*"))

    # A lost file is made again without a second metadata line; a bigger --n adds only the new clips.
    (out / rows[1]["file"]).unlink()
    assert cli.main([*args[:4], "4", *args[5:]]) == 0
    again = sb.load_metadata(out)
    assert [r["id"] for r in again] == [r["id"] for r in rows] + [sb.clip_id("val", sb.SPLIT_SIZE + 8)]
    assert (out / rows[1]["file"]).is_file()
    assert len((out / sb.METADATA).read_text().splitlines()) == 4


def test_a_run_killed_mid_line_resumes(tmp_path):
    rows = sb.synth(tmp_path, n=1, seed=0)
    index = tmp_path / sb.METADATA
    with index.open("a") as f:
        f.write('{"id": "train-0000001", "fi')  # a kill while appending the second line
    assert [r["id"] for r in sb.load_metadata(tmp_path)] == [rows[0]["id"]]
    more = sb.synth(tmp_path, n=2, seed=0)
    assert [r["id"] for r in more] == ["train-0000000", "train-0000001"]
    assert [json.loads(line)["id"] for line in index.read_text().splitlines()] == [r["id"] for r in more]


def test_bad_metadata_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    lines = ['{"id": "a", "file": "a.mp4"}', "not json", '{"id": "b", "file": "b.mp4"}']
    (tmp_path / sb.METADATA).write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metadata.jsonl: line 2 is not valid JSON"):
        sb.load_metadata(tmp_path)
    with pytest.raises(UserError, match="not found"):
        sb.load_metadata(tmp_path / "nowhere")
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--n", "1", "--preset", "huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avlink synth: ") and "huge" in err and "\n" not in err


def test_workers_give_the_same_clips(tmp_path):
    one = sb.synth(tmp_path / "one", n=2, seed=30, split="test")
    two = sb.synth(tmp_path / "two", n=2, seed=30, split="test", workers=2)
    assert one == two
    for a, b in zip(one, two, strict=True):
        va, _ = media.read_clip(tmp_path / "one" / a["file"], fps=6.0, size=(16, 16), sample_rate=None,
                                audio=False)
        vb, _ = media.read_clip(tmp_path / "two" / b["file"], fps=6.0, size=(16, 16), sample_rate=None,
                                audio=False)
        assert np.array_equal(va.frames, vb.frames)


def test_short_clips_plan_for_every_seed():
    for seed in range(2_000_000, 2_000_080):  # test-split seeds; 1.0 s clips once failed for sliders
        scene = sb.plan_scene(seed, 1.0)
        assert all(0 <= e < 1.0 for obj in scene.objects for e in obj.events)


def test_a_longer_clip_keeps_the_event_rate_and_the_preset_clip_is_unchanged():
    """base (the preset's clip duration) changes nothing at that duration; three times as long, hammers, lamps and
    drums may draw more events than the preset clip's cap and spread them over the whole clip."""
    for seed in range(2_000_000, 2_000_020):
        assert sb.plan_scene(seed, TINY, base=TINY).meta() == sb.plan_scene(seed, TINY).meta()
    capped = {"hammer": 4, "lamp": 3, "drum": 5}
    over, late = 0, 0
    for seed in range(2_000_000, 2_000_060):
        for obj in sb.plan_scene(seed, 3 * TINY, base=TINY).objects:
            if obj.cls in capped:
                over += len(obj.events) > capped[obj.cls]
                late += any(e > 2 * TINY for e in obj.events)
    assert over >= 5 and late >= 20


def test_synth_duration_is_recorded_and_checked(tmp_path, capsys):
    out = tmp_path / "long"
    assert cli.main(["synth", "--out", str(out), "--n", "1", "--split", "test", "--duration", "8"]) == 0
    (row,) = sb.load_metadata(out)
    assert row["duration"] == 8.0
    video, _ = media.read_clip(out / row["file"], fps=6.0, size=(16, 16), sample_rate=None, audio=False)
    assert video.frames.shape[0] == 48
    capsys.readouterr()
    assert cli.main(["synth", "--out", str(out), "--n", "1", "--split", "test"]) == 2
    assert cli.main(["synth", "--out", str(tmp_path / "x"), "--n", "1", "--duration", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "has duration 8.0 s, not 2.66667 s" in err[0]
    assert err[1] == "avlink synth: --duration 0.3: a clip needs more than 0.55 s"
