"""`avlink app`: the handlers called directly, the server's upload limit, the page in headless Chromium.

The browser test needs the Debian packages chromium and chromium-driver; without them it is skipped, unless
AVLINK_REQUIRE_BROWSER=1 (CI sets it), where a missing browser fails it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import time
import urllib.parse
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile

from avlink import app as avapp
from avlink import cli
from avlink.data import media
from avlink.data.syncbench import render_clip
from avlink.errors import UserError
from avlink.pipeline import Pipeline

from helpers import random_checkpoint

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WINDOW = 2.0  # seconds: the test checkpoint's window (SyncBench plans every seed at this length)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), **{"clip.duration": WINDOW})


@pytest.fixture(scope="module")
def pipeline(checkpoint) -> Pipeline:
    return Pipeline.load(checkpoint, vocoder="griffinlim")


@pytest.fixture
def generator(pipeline, tmp_path) -> avapp.Generator:
    return avapp.Generator(pipeline, avapp.Limits(max_seconds=3.0, max_megabytes=5.0), tmp_path)


def clip_file(path: Path, seconds: float, seed: int = 2_000_100, audio: bool = True) -> Path:
    clip = render_clip(seed, seconds)
    media.write_video(path, clip.frames, clip.fps, clip.audio if audio else None, clip.sample_rate)
    return path


def assert_playable(path: str | Path, seconds: float) -> media.MediaInfo:
    """An mp4 with video and audio of about `seconds` whose first frames and sound decode."""
    info = media.probe(path)
    assert info.has_video and info.has_audio, f"{path}: video {info.has_video}, audio {info.has_audio}"
    assert abs(info.duration - seconds) < 0.15, f"{path}: {info.duration:.3f} s, wanted {seconds} s"
    frames = media.read_video(path, 6.0).frames
    sound = media.read_audio(path, 22050).samples
    assert frames.shape[0] >= 1 and frames.std() > 0, f"{path}: frames {frames.shape} decode blank"
    assert abs(sound.shape[0] / 22050 - info.duration) < 0.15, f"{path}: {sound.shape[0]} samples"
    return info


# ------------------------------------------------------------------------------------------ handlers


def test_v2a_returns_the_video_with_generated_sound(generator, pipeline, tmp_path):
    upload = clip_file(tmp_path / "upload.mp4", 2.5)
    movie, sound = generator.v2a(str(upload), "", 2, 3)
    assert_playable(movie, 2.5)
    wave = media.read_audio(sound, pipeline.sample_rate).samples
    assert abs(wave.shape[0] - round(2.5 * pipeline.sample_rate)) <= 256, f"wav has {wave.shape[0]} samples"
    # The upload is H.264 in mp4: its video stream goes out as it came in; the sound is the generated one.
    assert np.array_equal(media.read_video(movie, 24.0).frames, media.read_video(upload, 24.0).frames)
    heard, original = (media.read_audio(f, pipeline.sample_rate).samples for f in (movie, upload))
    n = min(len(heard), len(wave), len(original))
    generated_r, original_r = (np.corrcoef(heard[:n], x[:n])[0, 1] for x in (wave, original))
    assert generated_r > 0.9 and abs(original_r) < 0.5, f"r: generated {generated_r}, original {original_r}"


def test_v2a_reencodes_what_a_browser_cannot_play(generator, tmp_path):
    upload = clip_file(tmp_path / "upload.mkv", 1.5)
    movie, _ = generator.v2a(str(upload), "", 2, 0)
    assert Path(movie).suffix == ".mp4"
    info = assert_playable(movie, 1.5)
    assert (info.width, info.height) == (256, 144), f"re-encoded at {info.width}x{info.height}"


def test_a2v_returns_an_upscaled_video_with_the_sound(generator, pipeline, tmp_path):
    upload = tmp_path / "drums.wav"
    media.write_audio(upload, render_clip(2_000_101, 2.0).audio, 44100)
    movie = generator.a2v(str(upload), "", 2, 1)
    info = assert_playable(movie, 2.0)
    height, width = pipeline.size
    assert min(info.width, info.height) >= avapp.VIEW_SIDE, f"{info.width}x{info.height} not upscaled"
    assert info.width * height == info.height * width, "upscaling changed the aspect ratio"


def test_a2v_goes_through_the_checkpoints_upsampler(checkpoint, tmp_path):
    import shutil

    from helpers import random_upsampler

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    random_upsampler(folder)
    pipe = Pipeline.load(folder, vocoder="griffinlim")
    generator = avapp.Generator(pipe, avapp.Limits(max_seconds=3.0, max_megabytes=5.0), tmp_path)
    upload = tmp_path / "drums.wav"
    media.write_audio(upload, render_clip(2_000_101, 2.0).audio, 44100)
    movie = generator.a2v(str(upload), "", 2, 1)
    info = assert_playable(movie, 2.0)
    assert info.fps == pytest.approx(4 * pipe.fps)
    assert len(media.read_video(movie, fps=4 * pipe.fps).frames) == 4 * round(2.0 * pipe.fps)


def refusal(call, *args) -> str:
    """The message of the gr.Error that `call(*args)` raises (what the page shows)."""
    with pytest.raises(gr.Error) as caught:
        call(*args)
    message = caught.value.message
    assert "\n" not in message and "/" not in message, f"not one short line: {message!r}"
    return message


def test_uploads_over_the_limits_or_unusable_are_refused_with_one_clear_line(generator, tmp_path):
    long = clip_file(tmp_path / "long.mp4", 3.5)
    assert refusal(generator.v2a, str(long), "", 2, 0) == (
        "long.mp4: 3.5 s is longer than the 3 s limit; trim it and upload again.")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01 not a video " * 64)
    assert refusal(generator.v2a, str(broken), "", 2, 0).startswith("broken.mp4: not a media file")
    sound = tmp_path / "sound.wav"
    media.write_audio(sound, np.zeros(22050, np.float32), 22050)
    assert refusal(generator.v2a, str(sound), "", 2, 0) == "sound.wav: has no video stream."
    silent = clip_file(tmp_path / "silent.mp4", 1.5, audio=False)
    assert refusal(generator.a2v, str(silent), "", 2, 0) == "silent.mp4: has no audio stream."
    assert refusal(generator.v2a, None, "", 2, 0) == "Upload a video first."
    assert refusal(generator.a2v, None, "", 2, 0) == "Upload a sound first."
    big = avapp.Generator(generator.pipeline, avapp.Limits(max_megabytes=0.001), tmp_path)
    upload = clip_file(tmp_path / "upload.mp4", 1.5)
    assert re.fullmatch(r"upload\.mp4: 0\.\d MB is larger than the 0\.001 MB upload limit\.",
                        refusal(big.v2a, str(upload), "", 2, 0))
    assert list(tmp_path.glob("run-*")) == [], "a refused upload left files behind"


def test_examples_are_rendered_once_into_the_cache(tmp_path):
    examples = avapp.render_examples(tmp_path, WINDOW, count=2)
    assert [e.video.name for e in examples] == ["test-2000000.mp4", "test-2000001.mp4"]
    for e in examples:
        video, audio = media.probe(e.video), media.probe(e.audio)
        assert video.has_video and not video.has_audio and audio.has_audio and not audio.has_video
        assert abs(video.duration - WINDOW) < 0.1 and e.caption
    stamps = [e.video.stat().st_mtime_ns for e in examples]
    again = avapp.render_examples(tmp_path, WINDOW, count=2)
    assert again == examples and [e.video.stat().st_mtime_ns for e in again] == stamps


def test_server_refuses_an_upload_over_the_size_limit(pipeline, tmp_path):
    limits = avapp.Limits(max_megabytes=0.01)
    app = avapp.build_app(pipeline, limits=limits, workdir=tmp_path / "work")
    url = avapp.launch(app, limits=limits, port=avapp.free_port())
    try:
        assert urllib.parse.urlparse(url).hostname == "127.0.0.1", f"serves on {url}"
        assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
        status, text = post_file(url + "gradio_api/upload", "big.mp4", b"x" * 20_000)
        assert status == 413 and "maximum allowed size of 10485 bytes" in text, (status, text)
        status, _ = post_file(url + "gradio_api/upload", "small.mp4", b"x" * 5_000)
        assert status == 200
    finally:
        app.close()


def post_file(url: str, name: str, data: bytes) -> tuple[int, str]:
    boundary = "avlinktestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    avapp.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_defaults_stay_local():
    args = parse([])
    assert (args.host, args.share, args.ckpt) == ("127.0.0.1", False, None)
    assert (args.max_seconds, args.max_upload_mb) == (20.0, 50.0)


def test_command_loads_the_checkpoint_renders_examples_and_serves(checkpoint, tmp_path, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr(avapp, "launch", lambda app, **kw: served.update(kw, app=app) or "http://here/")
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda app: served.update(waited=True))
    args = parse(["--ckpt", str(checkpoint), "--vocoder", "griffinlim", "--examples", str(tmp_path),
                  "--port", "0", "--max-seconds", "5"])
    assert avapp.run(args) == 0
    assert isinstance(served["app"], gr.Blocks) and served["limits"] == avapp.Limits(5.0, 50.0)
    assert (served["host"], served["share"], served["allowed_paths"]) == ("127.0.0.1", False, [tmp_path])
    assert served["port"] > 0 and served["waited"] and "serving on http://here/" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.mp4"))) == len(list(tmp_path.glob("*.wav"))) == avapp.EXAMPLE_COUNT
    assert cli.main(["app", "--ckpt", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a complete checkpoint folder" in error, error


def test_a_port_in_use_is_one_line(pipeline, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = avapp.build_app(pipeline, workdir=tmp_path)
        with pytest.raises(UserError, match=rf"^127\.0\.0\.1:{port}: cannot serve there"):
            avapp.launch(app, port=port)


# ------------------------------------------------------------------------------------------ browser


def browser_or_skip():
    """A headless Chromium driver, or a skip (a failure if AVLINK_REQUIRE_BROWSER=1) naming what's missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("AVLINK_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; AVLINK_REQUIRE_BROWSER=1 requires it")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))


def requested_hosts(driver) -> set[str]:
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urllib.parse.urlparse(message["params"]["request"]["url"])
            if url.scheme not in ("data", "blob"):
                hosts.add(url.netloc)
    return hosts


def test_browser_uploads_a_clip_and_gets_it_back_with_sound(pipeline, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    calls = []
    original = pipeline.video_to_audio
    monkeypatch.setattr(pipeline, "video_to_audio",
                        lambda frames, **kw: calls.append(kw) or original(frames, **kw))
    examples = avapp.render_examples(tmp_path / "examples", WINDOW, count=1)
    limits = avapp.Limits(max_seconds=3.0)
    app = avapp.build_app(pipeline, limits=limits, examples=examples, workdir=tmp_path / "work")
    url = avapp.launch(app, limits=limits, port=avapp.free_port(),
                       allowed_paths=[tmp_path / "examples"])
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 180)
        upload = clip_file(tmp_path / "upload.mp4", 2.5)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#v2a-input input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#v2a-input input[type=file]").send_keys(str(upload))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#v2a-input video"))
        steps = driver.find_element(By.CSS_SELECTOR, "#v2a-steps input[type=number]")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("2", Keys.TAB)
        driver.find_element(By.ID, "v2a-run").click()
        video = wait.until(lambda d: next((v for v in d.find_elements(By.CSS_SELECTOR, "#v2a-output video")
                                           if v.get_attribute("src")), None))
        # readyState 2 (HAVE_CURRENT_DATA): the browser has decoded the frame at the current position
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 2", video))
        driver.save_screenshot(str(tmp_path / "app-v2a.png"))
        result = tmp_path / "result.mp4"
        with urllib.request.urlopen(video.get_attribute("src"), timeout=30) as response:
            result.write_bytes(response.read())
        assert_playable(result, 2.5)
        assert [(c["steps"], c["seed"]) for c in calls] == [(2, 0)], f"the model got {calls}"

        # Over the length limit: the page says so, in one line naming the file.
        driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Audio -> Video')]").click()
        long = tmp_path / "long.wav"
        media.write_audio(long, np.zeros(22050 * 4, np.float32), 22050)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#a2v-input input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#a2v-input input[type=file]").send_keys(str(long))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#a2v-input audio, #a2v-input canvas"))
        driver.find_element(By.ID, "a2v-run").click()
        wait.until(lambda d: "long.wav: 4.0 s is longer than the 3 s limit" in d.find_element(By.TAG_NAME,
                                                                                               "body").text)
        driver.save_screenshot(str(tmp_path / "app-a2v-too-long.png"))
        host = urllib.parse.urlparse(url).netloc
        assert requested_hosts(driver) == {host}, "the page fetched something from outside"
    finally:
        driver.quit()
        app.close()
    print(f"screenshots: {tmp_path / 'app-v2a.png'}, {tmp_path / 'app-a2v-too-long.png'}")


def test_browser_requirement_is_reported(monkeypatch):
    """Without a browser the test above skips with the reason, or fails when CI requires the browser."""
    monkeypatch.setitem(globals(), "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setenv("AVLINK_REQUIRE_BROWSER", "0")
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        browser_or_skip()
    monkeypatch.setenv("AVLINK_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="AVLINK_REQUIRE_BROWSER=1"):
        browser_or_skip()


# ------------------------------------------------------------------------------------------ hostile uploads


def lying_mp4(path: Path, seconds: float, claimed: float, fps: int = 10) -> Path:
    """An mp4 whose headers (mvhd, tkhd, mdhd) claim `claimed` s while it holds `seconds` s of frames and sound."""
    frames = np.random.default_rng(0).integers(0, 256, (int(seconds * fps), 16, 16, 3), dtype=np.uint8)
    t = np.arange(int(seconds * 16000)) / 16000
    media.write_video(path, frames, fps, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    data = bytearray(path.read_bytes())
    movie_scale = struct.unpack(">I", data[data.find(b"mvhd") + 16:data.find(b"mvhd") + 20])[0]
    for box, offset in ((b"mvhd", 20), (b"mdhd", 20), (b"tkhd", 24)):  # version 0 boxes: 32-bit durations
        at = data.find(box)
        while at >= 0:
            scale = movie_scale if box == b"tkhd" else struct.unpack(">I", data[at + 16:at + 20])[0]
            data[at + offset:at + offset + 4] = struct.pack(">I", int(claimed * scale))
            at = data.find(box, at + 4)
    path.write_bytes(bytes(data))
    assert abs(media.probe(path).duration - claimed) < 0.1  # the header says so
    return path


def test_the_length_limit_counts_decoded_frames_and_stops_decoding_past_it(generator, tmp_path, monkeypatch):
    upload = lying_mp4(tmp_path / "lie.mp4", seconds=30.0, claimed=2.0)
    pushed = []
    push = media._VideoSampler.push
    monkeypatch.setattr(media._VideoSampler, "push", lambda self, frame: pushed.append(1) or push(self, frame))
    with pytest.raises(gr.Error, match=r"lie.mp4: longer than the 3 s limit") as err:
        generator.v2a(str(upload), "", 1, 0)
    assert str(tmp_path) not in str(err.value.message)
    assert len(pushed) < 10 * 4, f"{len(pushed)} frames decoded for a 3 s limit at 10 fps"
    # A2V reads the sound no further than the limit, nor past the end that the header declares
    assert media.probe(generator.a2v(str(upload), "", 1, 0)).duration <= 3.0 + 0.2


@pytest.mark.parametrize("seed", [1e30, -1, float("nan"), 2.5])
def test_odd_seeds_and_steps_are_refused_without_a_traceback_or_a_path(generator, tmp_path, seed):
    upload = clip_file(tmp_path / "clip.mp4", 1.0)
    with pytest.raises(gr.Error, match="seed must be a whole number from 0 to 4294967295") as err:
        generator.v2a(str(upload), "", 1, seed)
    assert "/" not in err.value.message
    with pytest.raises(gr.Error, match="steps must be a whole number from 1 to 1024"):
        generator.a2v(str(upload), "", float("nan"), 0)


@pytest.mark.parametrize("candidates", [0, 9, 2.5, float("nan")])
def test_odd_candidates_are_refused(generator, tmp_path, candidates):
    upload = clip_file(tmp_path / "clip.mp4", 1.0)
    with pytest.raises(gr.Error, match="candidates must be a whole number from 1 to 8"):
        generator.v2a(str(upload), "", 1, 0, candidates)


def test_the_candidates_control_reaches_the_pipeline(generator, pipeline, tmp_path, monkeypatch):
    calls = []
    for name in ("video_to_audio", "audio_to_video"):
        original = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda media_in, original=original, **kw: calls.append(kw["candidates"])
                            or original(media_in, **kw))
    upload = clip_file(tmp_path / "clip.mp4", 1.0)
    generator.v2a(str(upload), "", 1, 0, 3)
    generator.a2v(str(upload), "", 1, 0, 2.0)
    assert calls == [3, 2]


def test_a_sound_with_nan_is_refused_by_name(generator, tmp_path):
    wave = np.zeros(22050, np.float32)
    wave[10] = np.nan
    upload = tmp_path / "odd.wav"
    soundfile.write(str(upload), wave, 22050, subtype="FLOAT")
    with pytest.raises(gr.Error) as err:
        generator.a2v(str(upload), "", 1, 0)
    assert err.value.message == "odd.wav: audio contains NaN or infinite samples"


def test_results_and_uploads_are_deleted_by_the_next_request_and_when_the_session_ends(generator, tmp_path):
    uploads = [make_sound(tmp_path / f"up{i}.wav", 1.0) for i in range(3)]
    request = gr.Request(session_hash="visitor")
    results = [Path(generator.a2v(str(path), "", 1, i, request=request)) for i, path in enumerate(uploads)]
    runs = sorted(tmp_path.glob("run-*"))
    assert len(runs) == 1 and results[-1].parent == runs[0], "earlier requests' results were swept"
    other = make_sound(tmp_path / "other.wav", 1.0)
    generator.a2v(str(other), "", 1, 0, request=gr.Request(session_hash="someone else"))
    generator.end_session(gr.Request(session_hash="visitor"))
    assert not any(path.exists() for path in uploads), "the session's uploads are gone"
    assert other.exists() and not list(tmp_path.glob("run-*"))


def make_sound(path: Path, seconds: float) -> Path:
    t = np.arange(round(seconds * 22050)) / 22050
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
    return path


class SlowPipeline:
    """The test pipeline, with A2V held back so that requests pile up in the queue."""

    def __init__(self, pipeline: Pipeline, seconds: float):
        self.pipeline, self.seconds = pipeline, seconds

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def audio_to_video(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.pipeline.audio_to_video(*args, **kwargs)


def test_a_full_queue_refuses_more_and_nothing_is_left_after_shutdown(pipeline, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    limits = avapp.Limits(max_seconds=3.0, max_megabytes=5.0, max_queue=1, max_age_minutes=60)
    app = avapp.build_app(SlowPipeline(pipeline, 2.0), limits=limits, workdir=tmp_path / "work")
    url = avapp.launch(app, limits=limits, port=avapp.free_port())
    try:
        client = Client(url, verbose=False)
        sound = handle_file(str(make_sound(tmp_path / "beat.wav", 1.0)))
        jobs = [client.submit(sound, "", 1, i, api_name="/a2v") for i in range(4)]
        outcomes = []
        for job in jobs:
            try:
                result = job.result(timeout=120)
                outcomes.append(Path(result["video"] if isinstance(result, dict) else result).exists())
            except Exception as err:  # gradio_client raises its own types
                outcomes.append(str(err))
        served = [o for o in outcomes if o is True]
        refused = [o for o in outcomes if isinstance(o, str)]
        assert served and refused and len(served) + len(refused) == 4, outcomes
        assert all("queue is full" in o.lower() for o in refused), refused
        files = [p for p in cache.rglob("*") if p.is_file()]
        assert files, "the uploads and results were in gradio's cache while serving"
    finally:
        app.close()
    assert [p for p in cache.rglob("*") if p.is_file()] == [], "gradio's cache is emptied when the app stops"


def elem_ids(app: gr.Blocks) -> set[str]:
    return {c["props"].get("elem_id") for c in app.config["components"]}


def test_the_fast_box_is_offered_where_the_checkpoint_has_a_fast_set(pipeline, generator, tmp_path):
    from helpers import add_fast_set

    assert "v2a-fast" not in elem_ids(avapp.build_app(pipeline, workdir=tmp_path / "a"))
    upload = clip_file(tmp_path / "upload.mp4", 1.0)
    with pytest.raises(gr.Error, match=r"the checkpoint/fusion-fast\.safetensors: not found") as err:
        generator.v2a(str(upload), "", 1, 0, fast=True)
    assert str(pipeline.folder) not in str(err.value)
    folder = random_checkpoint(tmp_path / "fast", **{"clip.duration": WINDOW})
    add_fast_set(folder)
    fast = Pipeline.load(folder, vocoder="griffinlim")
    assert "v2a-fast" in elem_ids(avapp.build_app(fast, workdir=tmp_path / "b"))
    movie, _ = avapp.Generator(fast, avapp.Limits(), tmp_path).v2a(str(upload), "", 1, 0, fast=True)
    assert_playable(movie, 1.0)
