"""`avlink v2a` / `avlink a2v` end to end on a random tiny checkpoint (Griffin-Lim, 2 steps)."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from avlink.cli import main
from avlink.data.media import MediaError, probe, read_audio, write_audio, write_video
from avlink.pipeline import Pipeline, bf16_matmul, windows_for
from avlink.rank import best

from helpers import clicks, random_checkpoint

FAST = ["--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def geometry(ckpt) -> Pipeline:
    return Pipeline.load(ckpt, vocoder="griffinlim")


def v2a(ckpt: Path, *args: str) -> int:
    return main(["v2a", *args, "--ckpt", str(ckpt), "--vocoder", "griffinlim", *FAST])


def a2v(ckpt: Path, *args: str) -> int:
    return main(["a2v", *args, "--ckpt", str(ckpt), *FAST])


def make_video(path: Path, frames: int, fps: float = 10.0, size: tuple[int, int] = (20, 24), seed: int = 0) -> Path:
    """A video at a rate and size that are not the model's: (frames, H, W, 3) of noise."""
    rng = np.random.default_rng(seed)
    write_video(path, rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8), fps)
    return path


def make_sound(path: Path, seconds: float, rate: int = 44100) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    write_audio(path, (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 0.25 < 0.05)).astype(np.float32), rate)
    return path


def video_packets(path: Path) -> list[tuple[float, float, bytes]]:
    """(pts, dts) in seconds to a millisecond and the payload of every video packet."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(round(float(p.pts * p.time_base), 3), round(float(p.dts * p.time_base), 3), bytes(p))
                for p in container.demux(stream) if p.size]


def decoded_seconds(path: Path) -> tuple[float, float]:
    """(video, audio) seconds of a file, from its decoded frames."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = [f for f in container.decode(video)]
        last = frames[-1]
        video_end = float((last.pts + last.duration) * last.time_base) if last.duration else float(last.time)
    with av.open(str(path)) as container:
        audio = sum(f.samples for f in container.decode(audio=0)) / container.streams.audio[0].sample_rate
    return video_end, audio


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def test_v2a_single_file(ckpt, geometry, tmp_path: Path, capsys):
    source = make_video(tmp_path / "in.mp4", frames=13)  # 1.3 s at 10 fps, 20x24: neither the model's
    (tmp_path / "out").mkdir()
    assert v2a(ckpt, str(source), "-o", str(tmp_path / "out" / "x.wav")) == 0
    wav, mp4 = tmp_path / "out" / "x.wav", tmp_path / "out" / "x.mp4"
    info = soundfile.info(str(wav))
    assert info.samplerate == geometry.sample_rate and info.frames == round(1.3 * geometry.sample_rate)
    assert video_packets(mp4) == video_packets(source), "the user's video stream is copied packet for packet"
    video_s, audio_s = decoded_seconds(mp4)
    assert abs(video_s - 1.3) < 1e-3 and abs(audio_s - 1.3) <= 1024 / geometry.sample_rate
    muxed = read_audio(mp4, geometry.sample_rate).samples
    assert np.abs(muxed).max() > 0, "the muxed sound is the generated one, not silence"
    assert "x.wav" in capsys.readouterr().out and leftovers(tmp_path) == []


def test_v2a_default_names_and_baseline(ckpt, tmp_path: Path):
    source = make_video(tmp_path / "clip.mp4", frames=7, fps=7.0)
    assert v2a(ckpt, str(source), "--no-fusion") == 0
    assert (tmp_path / "clip.v2a.wav").is_file() and (tmp_path / "clip.v2a.mp4").is_file()


def test_a2v_single_file_upscaled(ckpt, geometry, tmp_path: Path):
    source = make_sound(tmp_path / "drums.wav", 1.05)  # ends inside the model's 7th frame (6 fps)
    out = tmp_path / "drums.mp4"
    assert a2v(ckpt, str(source), "-o", str(out), "--upscale", "3") == 0
    info = probe(out)
    height, width = geometry.size
    assert (info.height, info.width) == (3 * height, 3 * width) and info.has_audio
    assert info.sample_rate == 44100, "the user's sound keeps its own rate"
    video_s, audio_s = decoded_seconds(out)
    assert abs(video_s - 7 / geometry.fps) < 1e-3, "frames cover the whole sound"
    assert audio_s >= 1.05 - 1e-3
    kept = read_audio(out, 44100).samples[: round(1.0 * 44100)]
    original = read_audio(source, 44100).samples[: round(1.0 * 44100)]
    assert np.corrcoef(kept, original)[0, 1] > 0.9, "the user's sound is in the mp4"
    assert leftovers(tmp_path) == []


def test_folder_with_a_bad_file_skips_it_and_resumes(ckpt, tmp_path: Path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a", "b"):
        make_video(folder / f"{name}.mp4", frames=5, seed=ord(name))
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "notes.txt").write_text("not a video")
    assert v2a(ckpt, str(folder)) == 3
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines()
                                                                  if "broken.mp4" in line]
    assert err.count("broken.mp4") == 1 and "2 written" in out
    made = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if ".v2a." in p.name}
    assert sorted(made) == ["a.v2a.mp4", "a.v2a.wav", "b.v2a.mp4", "b.v2a.wav"]
    assert leftovers(tmp_path) == []

    assert v2a(ckpt, str(folder)) == 3, "the bad file is still bad"
    out, err = capsys.readouterr()
    assert "0 written, 2 already done" in out and err.count("broken.mp4") == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if ".v2a." in p.name} == made


def test_list_file_with_comments_and_a_missing_file(ckpt, geometry, tmp_path: Path, capsys):
    make_sound(tmp_path / "one.flac", 0.5)
    listing = tmp_path / "inputs.txt"
    listing.write_text("# sounds to animate\n\none.flac\n  missing.wav\n")
    assert a2v(ckpt, str(listing), "-o", str(tmp_path / "made"), "--upscale", "1") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.wav" in err[0] and "no such file" in err[0]
    assert probe(tmp_path / "made" / "one.a2v.mp4").width == geometry.size[1]


def test_long_video_gets_sound_for_its_whole_length(ckpt, geometry, tmp_path: Path):
    seconds = 2.5 * geometry.clip_seconds
    source = make_video(tmp_path / "long.mp4", frames=round(seconds * 10))
    assert v2a(ckpt, str(source)) == 0
    wave, rate = soundfile.read(str(tmp_path / "long.v2a.wav"))
    assert rate == geometry.sample_rate and wave.shape == (round(seconds * rate),)
    tail = wave[-round(0.3 * rate):]
    assert np.abs(tail).max() > 0, "the last window is generated, not padding"
    _, audio_s = decoded_seconds(tmp_path / "long.v2a.mp4")
    assert abs(audio_s - seconds) <= 1024 / rate


def test_refusals_are_one_line(ckpt, tmp_path: Path, capsys):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    assert v2a(ckpt, str(tmp_path / "bad.mp4")) == 2
    assert v2a(ckpt, str(make_video(tmp_path / "ok.mp4", frames=3)), "-o", str(tmp_path / "x.ogg")) == 2
    assert a2v(ckpt, str(tmp_path / "nothing.wav")) == 2
    assert a2v(ckpt, str(tmp_path / "ok.mp4"), "-o", str(tmp_path / "ok.mp4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "bad.mp4" in err[0] and "x.ogg" in err[1] and "nothing.wav" in err[2]
    assert "overwrite the input" in err[3]
    assert not (tmp_path / "bad.v2a.wav").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(not bf16_matmul("cpu"), reason="this CPU has no bf16 matrix instructions")
def test_bf16_writes_the_same_files(ckpt, geometry, tmp_path: Path):
    source = make_sound(tmp_path / "beat.wav", 1.0)
    outs = {p: tmp_path / f"{p}.mp4" for p in ("fp32", "bf16")}
    for precision, out in outs.items():
        assert a2v(ckpt, str(source), "-o", str(out), "--upscale", "1", "--precision", precision) == 0
    fp32, bf16 = (read_frames(out) for out in outs.values())
    assert fp32.shape == bf16.shape == (6, *geometry.size, 3)
    assert np.abs(fp32.astype(int) - bf16.astype(int)).mean() < 4.0  # H.264 of near-identical frames


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_bf16_refused_in_one_line_on_a_cpu_without_it(ckpt, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx2": True})
    source = make_video(tmp_path / "in.mp4", frames=3)
    assert v2a(ckpt, str(source), "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--precision bf16: this CPU has no bf16 matrix instructions" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_one_file_is_not_written_over_without_overwrite_sibling_included(ckpt, tmp_path: Path, capsys):
    source = make_video(tmp_path / "in.mp4", frames=5)
    (tmp_path / "song.wav").write_bytes(b"mine")  # the user's file; -o names only song.mp4
    assert v2a(ckpt, str(source), "-o", str(tmp_path / "song.mp4")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "song.wav: exists" in err and "--overwrite" in err
    assert (tmp_path / "song.wav").read_bytes() == b"mine" and not (tmp_path / "song.mp4").exists()
    assert v2a(ckpt, str(source), "-o", str(tmp_path / "song.mp4"), "--overwrite") == 0
    assert soundfile.info(str(tmp_path / "song.wav")).frames > 0
    assert a2v(ckpt, str(make_sound(tmp_path / "beat.wav", 0.5))) == 0
    assert a2v(ckpt, str(tmp_path / "beat.wav")) == 2
    assert "beat.a2v.mp4: exists" in capsys.readouterr().err


def test_folder_lists_entries_that_are_no_files_without_opening_them(ckpt, tmp_path: Path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    make_video(folder / "good.mp4", frames=5)
    (folder / "gone.mp4").symlink_to(folder / "nowhere.mp4")
    (folder / "loop.mp4").symlink_to(folder / "loop.mp4")
    os.mkfifo(folder / "pipe.mp4")  # opening it for reading would block
    (folder / "x.mp4").mkdir()
    assert v2a(ckpt, str(folder)) == 3
    out, err = capsys.readouterr()
    assert "1 written" in out and "4 left out" in out
    lines = sorted(err.strip().splitlines())
    assert [line.split(":")[0] for line in lines] == [str(folder / n) for n in
                                                      ("gone.mp4", "loop.mp4", "pipe.mp4", "x.mp4")]
    assert "broken symbolic link" in lines[0] and "loops" in lines[1] and "pipe" in lines[2] and "folder" in lines[3]


LIMIT = 25_000  # bytes a file may grow to; the outputs below are measured without a limit:
LIMITED_FOLDER = [  # (input, frames, still): its outputs, and which of them passes the limit
    ("a_short.mp4", 3, False),  # mp4 7 kB, wav 13 kB: written
    ("b_long.mp4", 25, False),  # mp4 38 kB: the muxer fails (PyAV)
    ("c_still.mp4", 12, True),  # mp4 13 kB, wav 53 kB: the wav writer fails (soundfile)
    ("d_short.mp4", 3, False),  # written
]


def limited_folder(folder: Path) -> Path:
    folder.mkdir()
    for seed, (name, frames, still) in enumerate(LIMITED_FOLDER):
        if still:
            write_video(folder / name, np.full((frames, 20, 24, 3), 90, np.uint8), 10.0)
        else:
            make_video(folder / name, frames=frames, seed=seed)
    return folder


def check_limited_folder(folder: Path, code: int, out: str, err: str) -> None:
    """A write that hits the limit (as a full disk would) is one line; nothing of that input stays behind."""
    assert code == 3, err[-2000:]
    assert "Traceback" not in err and "2 written" in out
    assert err.strip().splitlines() == [
        f"{folder / 'b_long.mp4'}: {folder / 'b_long.v2a.mp4'}: cannot write (File too large)",
        f"{folder / 'c_still.mp4'}: {folder / 'c_still.v2a.wav'}: cannot write (File too large)"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "a_short.mp4", "a_short.v2a.mp4", "a_short.v2a.wav", "b_long.mp4", "c_still.mp4", "d_short.mp4",
        "d_short.v2a.mp4", "d_short.v2a.wav"]


def test_a_file_size_limit_leaves_that_input_out_and_the_batch_goes_on(ckpt, tmp_path: Path, capsys):
    folder = limited_folder(tmp_path / "in")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))  # this process only, for the run
    try:
        code = v2a(ckpt, str(folder))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    check_limited_folder(folder, code, *capsys.readouterr())


@pytest.mark.slow
def test_a_file_size_limit_on_the_command_in_its_own_process(ckpt, tmp_path: Path):
    """The same as the command a user runs under `ulimit -f`: the process is not killed (SIGXFSZ) and says so."""
    folder = limited_folder(tmp_path / "in")

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    avlink = Path(sys.executable).with_name("avlink")
    done = subprocess.run([str(avlink), "v2a", str(folder), "--ckpt", str(ckpt), "--vocoder", "griffinlim", *FAST],
                          preexec_fn=limited, capture_output=True, text=True, timeout=300)
    check_limited_folder(folder, done.returncode, done.stdout, done.stderr)


def test_gif_gets_its_sound_in_an_h264_mp4(ckpt, geometry, tmp_path: Path):
    source = tmp_path / "anim.gif"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb8"
        for index in range(12):
            rgb = np.random.default_rng(index).integers(0, 256, (24, 32, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="rgb8")
            frame.pts, frame.time_base = index, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert v2a(ckpt, str(source)) == 0
    info = probe(tmp_path / "anim.v2a.mp4")
    assert info.has_audio and (info.width, info.height) == (32, 24)
    with av.open(str(tmp_path / "anim.v2a.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    assert abs(decoded_seconds(tmp_path / "anim.v2a.mp4")[0] - 1.2) < 0.11
    assert leftovers(tmp_path) == []


def corrupt_video_packets(path: Path) -> None:
    """Overwrite every video packet's bytes in the file with zeros; the audio packets stay intact."""
    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size and p.pos >= 0]
    data = bytearray(path.read_bytes())
    for pos, size in spans:
        data[pos:pos + size] = bytes(size)
    path.write_bytes(bytes(data))


def test_a2v_takes_the_sound_of_a_file_whose_video_stream_is_broken(ckpt, tmp_path: Path):
    rate, seconds = 44100, 1.0
    t = np.arange(round(seconds * rate)) / rate
    sound = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    source = tmp_path / "film.mp4"
    write_video(source, np.zeros((10, 16, 16, 3), np.uint8), 10.0, audio=sound, sample_rate=rate)
    corrupt_video_packets(source)
    with pytest.raises(MediaError):
        probe(source)  # the video stream no longer decodes
    assert a2v(ckpt, str(source), "-o", str(tmp_path / "out.mp4")) == 0
    assert probe(tmp_path / "out.mp4").has_audio


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_sound_is_refused_naming_the_input(ckpt, tmp_path: Path, capsys, bad):
    wave = np.zeros(16000, np.float32)
    wave[100] = bad
    source = tmp_path / "odd.wav"
    soundfile.write(str(source), wave, 16000, subtype="FLOAT")
    assert a2v(ckpt, str(source)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{source}: audio contains NaN or infinite samples" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.wav"]


def test_temps_of_killed_runs_are_removed_by_the_next_run_in_that_folder(ckpt, tmp_path: Path):
    """kill -9 during a write leaves a hidden temp; the next run writing into that folder removes it, even when
    the input it was for is gone, and leaves a running writer's temps and other files' alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = [f".gone.v2a.wav.{dead.pid}-abc123.tmp.wav", f".gone.v2a.mp4.{dead.pid}-k_9.tmp.mp4",
              f".in.v2a.mp4.{dead.pid}-xyz.tmp.mp4"]
    kept = [f".other.v2a.mp4.{os.getppid()}-live1.tmp.mp4",  # a process that runs: maybe writing now
            f".notes.txt.{dead.pid}-abc123.tmp.txt",  # not an output of these commands
            ".gone.v2a.wav.tmp"]  # not a temp name
    for name in killed + kept:
        (tmp_path / name).write_bytes(b"x")
    source = make_video(tmp_path / "in.mp4", frames=3)
    assert v2a(ckpt, str(source)) == 0
    assert leftovers(tmp_path) == sorted(kept)


@pytest.mark.parametrize(("out", "existing"), [("song.wav", "song.mp4"), ("song.mp4", "song.mp4"),
                                               ("made", "made/in.v2a.wav"), (None, "in.v2a.mp4")])
def test_one_file_refuses_each_existing_output(ckpt, tmp_path: Path, capsys, out, existing):
    source = make_video(tmp_path / "in.mp4", frames=3)
    (tmp_path / "made").mkdir()
    (tmp_path / existing).write_bytes(b"mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert v2a(ckpt, str(source), *(["-o", str(tmp_path / out)] if out else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"avlink v2a: {tmp_path / existing}: exists (outputs of {source}); --overwrite replaces it"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / existing).read_bytes() == b"mine"


def test_v2a_fast_uses_the_fast_set_and_a_folder_without_one_is_refused_in_one_line(tmp_path: Path, capsys):
    from helpers import add_fast_set

    source = make_video(tmp_path / "in.mp4", frames=7, fps=7.0)
    plain = random_checkpoint(tmp_path / "plain")
    assert v2a(plain, str(source), "--fast") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{plain / 'fusion-fast.safetensors'}: not found" in err
    assert not (tmp_path / "in.v2a.wav").exists()
    assert v2a(plain, str(source), "--fast", "--no-fusion") == 2
    assert "--no-fusion" in capsys.readouterr().err
    add_fast_set(plain)
    assert v2a(plain, str(source), "--fast") == 0
    fast = read_audio(tmp_path / "in.v2a.wav", 22050).samples
    assert v2a(plain, str(source), "--overwrite") == 0
    assert not np.array_equal(fast, read_audio(tmp_path / "in.v2a.wav", 22050).samples)


# --- best-of-N -----------------------------------------------------------------------------------------------


def test_best_of_n_writes_every_candidate_s_score_beside_the_outputs(ckpt, geometry, tmp_path: Path):
    source = make_video(tmp_path / "clip.mp4", frames=round(2 * geometry.clip_seconds * 10))  # 3 windows
    assert v2a(ckpt, str(source), "--candidates", "3") == 0
    record = json.loads((tmp_path / "clip.v2a.json").read_text())
    assert (record["task"], record["candidates"], record["score"], record["seed"]) == ("v2a", 3, "av_align", 3)
    assert [w["window"] for w in record["windows"]] == list(range(windows_for(2 * geometry.clip_seconds, geometry)))
    for window in record["windows"]:
        scores = [math.nan if s is None else s for s in window["scores"]]
        assert len(scores) == 3 and window["kept"] == best(scores)
    sound = make_sound(tmp_path / "beat.wav", 1.0)
    assert a2v(ckpt, str(sound), "--candidates", "2", "-o", str(tmp_path / "beat.mp4")) == 0
    assert len(json.loads((tmp_path / "beat.json").read_text())["windows"][0]["scores"]) == 2
    assert a2v(ckpt, str(sound), "-o", str(tmp_path / "one.mp4")) == 0
    assert not (tmp_path / "one.json").exists(), "one candidate has nothing to rank"


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_best_of_n_never_reads_the_input_s_other_stream(ckpt, geometry, tmp_path: Path, task):
    """The ranker sees the conditioning input and the candidates only: the same frames with their true sound, a
    deliberately wrong one or none (V2A), or the same sound with another video stream (A2V), give the same
    output and the same scores."""
    rate, seconds = 22050, 1.5 * geometry.clip_seconds
    frames = np.random.default_rng(9).integers(0, 256, (round(seconds * 10), 16, 16, 3), dtype=np.uint8)
    true = clicks([0.3, 0.8, 1.2], seconds, rate)
    wrong = (0.3 * np.random.default_rng(10).standard_normal(true.shape[0])).astype(np.float32)
    if task == "v2a":
        variants = {"true": (frames, true), "wrong": (frames, wrong), "none": (frames, None)}
    else:
        variants = {"true": (frames, true), "wrong": (frames[::-1] // 2, true), "black": (0 * frames, true)}
    outputs = []
    for name, (video, sound) in variants.items():
        source = tmp_path / f"{name}.mp4"
        write_video(source, video, 10.0, audio=sound, sample_rate=rate)
        run = v2a if task == "v2a" else a2v
        assert run(ckpt, str(source), "--candidates", "3") == 0
        made = tmp_path / (f"{name}.v2a.wav" if task == "v2a" else f"{name}.a2v.mp4")
        scores = json.loads((tmp_path / f"{name}.{task}.json").read_text())["windows"]
        outputs.append((read_audio(made, rate).samples if task == "v2a" else read_frames(made), scores))
    for made, scores in outputs[1:]:
        assert np.array_equal(made, outputs[0][0]) and scores == outputs[0][1]


def test_candidates_below_one_are_refused_in_one_line(ckpt, tmp_path: Path, capsys):
    source = make_video(tmp_path / "in.mp4", frames=3)
    assert v2a(ckpt, str(source), "--candidates", "0") == 2
    assert a2v(ckpt, str(make_sound(tmp_path / "beat.wav", 0.5)), "--candidates", "-2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["avlink v2a: --candidates must be at least 1, got 0",
                   "avlink a2v: --candidates must be at least 1, got -2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beat.wav", "in.mp4"]


def test_continuation_flags_are_checked_in_one_line_before_any_input(ckpt, tmp_path: Path, capsys):
    source = make_video(tmp_path / "in.mp4", frames=3)
    assert v2a(ckpt, str(source), "--guidance", "2") == 2
    assert a2v(ckpt, str(make_sound(tmp_path / "beat.wav", 0.5)), "--continuation", "guided", "--guidance", "0") == 2
    assert v2a(ckpt, str(source), "--continuation", "guided", "--guidance", "nan") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["avlink v2a: --guidance applies to --continuation guided only (the default for A2V)",
                   "avlink a2v: --guidance must be a positive number, got 0.0",
                   "avlink v2a: --guidance must be a positive number, got nan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beat.wav", "in.mp4"]
    with pytest.raises(SystemExit):
        v2a(ckpt, str(source), "--continuation", "blend")
    assert "invalid choice: 'blend'" in capsys.readouterr().err


def test_guided_continuation_reaches_the_pipeline(ckpt, geometry, tmp_path: Path):
    """A sound of three windows: the guided video is the replaced one over the first window and not after it."""
    source = make_sound(tmp_path / "beat.wav", 3 * geometry.clip_seconds)
    for name, extra in (("r", ("--continuation", "replace")), ("g", ("--continuation", "guided", "--guidance", "50"))):
        assert a2v(ckpt, str(source), "-o", str(tmp_path / f"{name}.mp4"), "--upscale", "1", *extra) == 0
    replaced, guided = read_frames(tmp_path / "r.mp4"), read_frames(tmp_path / "g.mp4")
    first = geometry.clip.num_frames
    assert replaced.shape == guided.shape
    assert np.abs(replaced[first:].astype(int) - guided[first:].astype(int)).mean() > 2 * np.abs(
        replaced[:first].astype(int) - guided[:first].astype(int)).mean()


def test_link_guidance_flags_are_checked_in_one_line_before_any_input(ckpt, tmp_path: Path, capsys):
    source = make_video(tmp_path / "in.mp4", frames=3)
    assert v2a(ckpt, str(source), "--link-cfg", "-1") == 2
    assert a2v(ckpt, str(make_sound(tmp_path / "beat.wav", 0.5)), "--link-cfg", "2", "--no-fusion") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["avlink v2a: --link-cfg must be a number >= 0, got -1.0",
                   "avlink a2v: --link-cfg and --no-fusion: guidance on the input needs the Fusion Blocks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beat.wav", "in.mp4"]


def test_link_guidance_reaches_the_pipeline_and_zero_is_the_generator_alone(ckpt, tmp_path: Path):
    """--link-cfg 0 keeps only the unconditional branch, the frozen generator: the --no-fusion baseline's video;
    1 is the link unguided, and A2V is guided by default."""
    source = make_sound(tmp_path / "beat.wav", 1.0)
    runs = {"linked": ("--link-cfg", "1"), "s0": ("--link-cfg", "0"), "default": (), "alone": ("--no-fusion",)}
    for name, extra in runs.items():
        assert a2v(ckpt, str(source), "-o", str(tmp_path / f"{name}.mp4"), "--upscale", "1", "--no-upsample",
                   *extra) == 0
    frames = {name: read_frames(tmp_path / f"{name}.mp4").astype(int) for name in runs}
    assert np.abs(frames["s0"] - frames["alone"]).mean() < 0.5
    assert np.abs(frames["linked"] - frames["alone"]).mean() > 2
    assert np.abs(frames["default"] - frames["linked"]).mean() > 2
