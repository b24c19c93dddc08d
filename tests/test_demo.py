import contextlib
import io
import re
import struct

import pytest

from avlink import demo
from avlink.cli import main
from avlink.data import media
from avlink.data.syncbench import SPLIT_SEEDS, SPLIT_SIZE

from helpers import random_checkpoint

ROW_TITLES = ("ground truth (ceiling)", "**AV-Link**", "no fusion", "shuffled pairs (floor)")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One small demo run on a random checkpoint: 2 clips, 2 steps, Griffin-Lim. The clip is the tiny
    preset's (SyncBench plans some scenes only for clips of a couple of seconds)."""
    ckpt = random_checkpoint(tmp_path_factory.mktemp("ckpt"), **{"clip.duration": 16 / 6})
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--ckpt", str(ckpt), "--out", str(out), "--n", "2", "--steps", "2",
                     "--vocoder", "griffinlim"])
    return code, out, stdout.getvalue()


def _tables(text: str) -> dict[str, list[list[str]]]:
    """The markdown table under each '## ' heading, as rows of cells (header and rule left out)."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|") and heading is not None:
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return {h: rows[2:] for h, rows in tables.items()}


def _is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d+\.\d+", text) is not None


def test_demo_clips_use_seeds_no_split_uses():
    for start in SPLIT_SEEDS.values():
        assert not start <= demo.DEMO_SEED < start + SPLIT_SIZE


def test_demo_writes_report_with_both_tables(demo_run):
    code, out, stdout = demo_run
    assert code == 0
    report = (out / "report.md").read_text()
    tables = _tables(report)
    for task in ("v2a", "a2v"):
        rows = tables[demo.TASK_TITLES[task]]
        assert [r[0] for r in rows] == list(ROW_TITLES)
        header = report.split(f"## {demo.TASK_TITLES[task]}")[1].splitlines()[2]
        assert "av_align" in header and "event_f1" in header
        assert ("onset_acc" in header) == (task == "v2a")
        for row in rows:  # every row holds measured numbers (a metric may be undefined: "-")
            assert all(_is_number(c) or c == "-" for c in row[1:]), row
            assert sum(_is_number(c) for c in row[1:]) >= 2, row
        ceiling = dict(zip(header.strip("|").split("|")[1:], rows[0][1:], strict=True))
        assert float(next(v for k, v in ceiling.items() if "event_recall" in k)) > 0.5, \
            "ground truth finds its own events"
    assert re.search(r"Wall time \d+\.\d s", report)
    assert "class_acc: no classifiers.safetensors" in report
    assert str(out / "report.md") in stdout


def test_demo_writes_sheets_and_playable_mp4s(demo_run):
    _, out, _ = demo_run
    ids = [f"{demo.DEMO_SPLIT}-{demo.DEMO_SEED + i:07d}" for i in range(2)]
    assert sorted(p.stem for p in out.glob("*.png")) == ids
    for cid in ids:
        assert (out / f"{cid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        truth = media.probe(out / "clips" / f"{cid}.mp4")
        for system in demo.SYSTEMS:
            info = media.probe(out / f"{cid}.{system}.mp4")
            assert info.has_audio and info.has_video, system
            assert abs(info.duration - truth.duration) < 0.1, (system, info.duration, truth.duration)
            if system.startswith("v2a"):  # the clip's own video stream
                assert (info.width, info.height) == (truth.width, truth.height)
            else:  # the 16x16 model frames upscaled
                assert (info.width, info.height) == (16 * demo.UPSCALE, 16 * demo.UPSCALE)
        png = (out / f"{cid}.png").read_bytes()
        width, height = struct.unpack(">II", png[16:24])
        assert width > 1000 and height > 400, "six rows: clip, sound, two sounds, two videos"
    # the evaluation's own files beside each system's exact outputs
    for system in demo.SYSTEMS:
        assert (out / "eval" / system / "metrics.json").is_file()
        assert len(list((out / "eval" / system / "generated").iterdir())) == 2


def test_demo_without_checkpoints_says_how_to_make_them(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["demo", "--ckpt", str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "make checkpoints" in err and str(tmp_path / "missing") in err
    assert not out.exists(), "nothing is written without checkpoints"


def test_demo_shows_the_upsampled_a2v_under_the_base_frames(tmp_path):
    """A checkpoint with a video upsampler: the demo writes AV-Link's A2V through it too, and the contact sheet
    gets a row more."""
    from avlink.pipeline import Pipeline

    from helpers import random_upsampler

    ckpt = random_upsampler(random_checkpoint(tmp_path / "ckpt", **{"clip.duration": 16 / 6}))
    pipe = Pipeline.load(ckpt, vocoder="griffinlim")
    (clip,) = demo.render_clips(tmp_path / "clips", 1, 16 / 6, "tiny")
    made = demo.generate(pipe, clip, steps=1, seed=0)
    assert set(made.upsampled) == {"a2v"} and made.upsampled["a2v"].shape == (64, 64, 64, 3)
    demo.write_outputs(tmp_path, pipe, clip, made)
    info = media.probe(tmp_path / f"{clip.id}.a2v.upsampled.mp4")
    assert (info.width, info.fps) == (16 * demo.UPSCALE, 24.0) and info.has_audio
    sheet = demo.draw_sheet(tmp_path, pipe, clip, made)
    height = struct.unpack(">II", sheet.read_bytes()[16:24])[1]
    sheet = demo.draw_sheet(tmp_path, pipe, clip, demo.Generated(made.waves, made.videos))
    assert height > struct.unpack(">II", sheet.read_bytes()[16:24])[1]  # one frame row more
