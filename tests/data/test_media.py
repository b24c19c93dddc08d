"""Media I/O against a corpus of odd and broken files that the tests make themselves (PyAV, numpy, bytes)."""

from __future__ import annotations

import signal
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from avlink.data.media import (
    FrameChunks,
    MediaError,
    mux_audio,
    probe,
    read_audio,
    read_clip,
    read_video,
    stream_video,
    write_audio,
    write_video,
)

SINE_HZ = 440.0

# ------------------------------------------------------------------------------------------ corpus


def index_picture(index: int, width: int, height: int) -> np.ndarray:
    """A frame whose grey levels spell its index: left half index % 16, right half index // 16."""
    picture = np.empty((height, width, 3), np.uint8)
    picture[:, : width // 2] = (index % 16) * 16 + 8
    picture[:, width // 2 :] = (index // 16) * 16 + 8
    return picture


def picture_index(rgb: np.ndarray) -> int:
    height, width = rgb.shape[:2]
    low, high = rgb[height // 2, width // 4].mean(), rgb[height // 2, 3 * width // 4].mean()
    return round((low - 8) / 16) + 16 * round((high - 8) / 16)


def sine(seconds: float, rate: int, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = (amplitude * np.sin(2 * np.pi * SINE_HZ * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)  # (n, channels)


def make_video(
    path: Path,
    times: list[Fraction],
    *,
    size: tuple[int, int] = (32, 24),
    time_base: Fraction = Fraction(1, 24),
    container_format: str | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: int | None = None,
    audio: tuple[str, int, str] | None = None,  # (codec, sample rate, layout)
    container_options: dict[str, str] | None = None,
    picture=index_picture,
) -> Path:
    """Encode frames shown at exact `times` (seconds), each picturing its index, plus an optional sine."""
    options = {"libx264": {"crf": "4", "g": "12"}, "libvpx-vp9": {"lossless": "1", "deadline": "realtime"}}
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(1, 1) / time_base, options=options.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        stream.codec_context.time_base = time_base
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = None if audio is None else container.add_stream(audio[0], rate=audio[1], layout=audio[2])
        for index, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(picture(index, *size), format="rgb24")
            frame.pts, frame.time_base = int(time / time_base), time_base
            container.mux(stream.encode(frame.reformat(format=pix_fmt)))
        container.mux(stream.encode(None))
        if sound is not None:
            seconds = float(times[-1] + (times[-1] - times[-2]))
            encode_audio(container, sound, sine(seconds, audio[1], sound.channels), audio[1], audio[2])
    return path


def encode_audio(container, stream, samples: np.ndarray, rate: int, layout: str) -> None:
    codec = stream.codec_context.name
    planar = np.ascontiguousarray(samples.T)  # (channels, n)
    sample_format = "s16p" if codec == "pcm_s16le" else "fltp"
    if sample_format == "s16p":
        planar = (planar * 32767).astype(np.int16)
    step = 1024
    for begin in range(0, planar.shape[1], step):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(planar[:, begin : begin + step]), format=sample_format, layout=layout
        )
        frame.sample_rate, frame.pts, frame.time_base = rate, begin, Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_audio_only(path: Path, codec: str, rate: int, layout: str, seconds: float, fmt: str | None = None):
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        encode_audio(container, stream, sine(seconds, rate, stream.channels), rate, layout)
    return path


def regular(count: int, fps: Fraction) -> list[Fraction]:
    return [Fraction(index) / fps for index in range(count)]


# Irregular presentation times in milliseconds; none lies within 1 ms of a multiple of 1/6 s or 1/10 s.
VFR_MS = [0, 40, 70, 230, 260, 420, 610, 640, 900, 1130, 1160, 1390, 1510, 1770, 1890]


def build_corpus(root: Path) -> dict[str, tuple[Path, list[Fraction] | None]]:
    """name -> (path, exact frame times or None). Readable files first, broken ones after."""
    corpus: dict[str, tuple[Path, list[Fraction] | None]] = {}

    def video(name: str, times: list[Fraction], **kwargs) -> None:
        corpus[name] = (make_video(root / name, times, **kwargs), times)

    video("24fps_aac.mp4", regular(48, Fraction(24)), audio=("aac", 44100, "stereo"))
    video("60fps.mp4", regular(60, Fraction(60)), time_base=Fraction(1, 60))
    video("1fps.mp4", regular(4, Fraction(1)), time_base=Fraction(1, 1))
    ntsc = Fraction(30000, 1001)
    video("29.97fps.mp4", regular(30, ntsc), time_base=1 / ntsc)
    video("vfr.mp4", [Fraction(ms, 1000) for ms in VFR_MS], time_base=Fraction(1, 1000))
    video("rotated90.mp4", regular(6, Fraction(24)), size=(64, 48), rotation=90, picture=marker_picture)
    video("rotated270.mp4", regular(6, Fraction(24)), size=(64, 48), rotation=-90, picture=marker_picture)
    video("odd_171x97.mp4", regular(6, Fraction(24)), size=(171, 97), pix_fmt="yuv444p")
    video("tiny_2x2.mp4", regular(6, Fraction(24)), size=(2, 2), pix_fmt="yuv444p", picture=flat_picture)
    video("portrait.mp4", regular(6, Fraction(24)), size=(36, 64), picture=gradient_picture)
    video("vp9_opus.webm", regular(24, Fraction(24)), codec="libvpx-vp9", audio=("libopus", 48000, "stereo"))
    video("h264_aac.mkv", regular(24, Fraction(24)), audio=("aac", 22050, "mono"))
    video("h264_pcm.mov", regular(24, Fraction(24)), audio=("pcm_s16le", 48000, "stereo"))
    video("mpeg4.avi", regular(24, Fraction(24)), codec="mpeg4")
    video(
        "faststart.mp4",
        regular(96, Fraction(24)),
        audio=("aac", 44100, "mono"),
        container_options={"movflags": "+faststart"},
    )
    corpus["8k_mono.wav"] = (root / "8k_mono.wav", None)
    soundfile.write(root / "8k_mono.wav", sine(1.5, 8000), 8000)
    corpus["48k_stereo.m4a"] = (
        make_audio_only(root / "48k_stereo.m4a", "aac", 48000, "stereo", 1.0, "mp4"),
        None,
    )
    corpus["5.1.mp4"] = (make_audio_only(root / "5.1.mp4", "aac", 48000, "5.1", 1.0), None)
    corpus["22k_stereo.flac"] = (root / "22k_stereo.flac", None)
    soundfile.write(root / "22k_stereo.flac", sine(1.0, 22050, 2), 22050)

    # Broken and not-media files.
    whole = corpus["24fps_aac.mp4"][0].read_bytes()
    fast = corpus["faststart.mp4"][0].read_bytes()
    broken = {
        "empty.mp4": b"",
        "truncated.mp4": whole[: len(whole) // 2],  # moov sits at the end: the first half has no index
        "truncated_faststart.mp4": fast[: len(fast) // 3],  # index intact, two thirds of the data gone
        "random.mp4": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "text.txt": b"not a video at all\n" * 20,
        "text.mp4": b"not a video at all\n" * 20,
        "ansi_art.txt": b"\x1b[1;31mred\x1b[0m text\r\n" * 50,  # FFmpeg's tty demuxer calls this a video
    }
    for name, data in broken.items():
        (root / name).write_bytes(data)
        corpus[name] = (root / name, None)
    with av.open(str(root / "zero_length.mp4"), "w") as container:  # a header and no frames
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        container.start_encoding()
    corpus["zero_length.mp4"] = (root / "zero_length.mp4", None)
    soundfile.write(root / "zero_length.wav", np.zeros(0, np.float32), 16000)
    corpus["zero_length.wav"] = (root / "zero_length.wav", None)
    (root / "folder.mp4").mkdir()
    corpus["folder.mp4"] = (root / "folder.mp4", None)
    corpus["missing.mp4"] = (root / "missing.mp4", None)
    return corpus


def marker_picture(index: int, width: int, height: int) -> np.ndarray:
    """Black with a white block in the top-left corner: shows which way the picture was turned."""
    picture = np.zeros((height, width, 3), np.uint8)
    picture[: height // 3, : width // 4] = 255
    return picture


def flat_picture(index: int, width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 40 * index + 20, np.uint8)


def gradient_picture(index: int, width: int, height: int) -> np.ndarray:
    """Rows brighten downwards: row r has grey level 4r."""
    return np.repeat((np.arange(height, dtype=np.uint8) * 4)[:, None, None], width, axis=1).repeat(3, axis=2)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, list[Fraction] | None]]:
    return build_corpus(tmp_path_factory.mktemp("media_corpus"))


@pytest.fixture(autouse=True)
def _deadline():
    """No read may hang: each test gets 60 s, then fails with TimeoutError."""

    def _expired(signum, frame):
        raise TimeoutError("media test ran past its 60 s deadline")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def shown_until(path: Path) -> Fraction:
    """When the last frame leaves the screen, as the packets say (muxers guess the last frame's duration)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        last = max((p for p in container.demux(stream) if p.pts is not None), key=lambda p: p.pts)
        return (last.pts + last.duration) * last.time_base - Fraction(container.start_time or 0, av.time_base)


def shown_at(times: list[Fraction], start: Fraction, fps: Fraction, count: int) -> list[int]:
    """Index of the frame on screen at each output time: the last one with time <= start + k/fps."""
    picks = []
    for k in range(count):
        moment = start + k / fps
        shown = [index for index, time in enumerate(times) if time <= moment]
        picks.append(shown[-1] if shown else 0)
    return picks


# ------------------------------------------------------------------------------------------ reading video

RESAMPLED = ["24fps_aac.mp4", "60fps.mp4", "1fps.mp4", "29.97fps.mp4", "vfr.mp4"]
CONTAINERS = ["vp9_opus.webm", "h264_aac.mkv", "h264_pcm.mov", "mpeg4.avi"]


@pytest.mark.parametrize("name", RESAMPLED + CONTAINERS)
@pytest.mark.parametrize("fps", [6, 10, 24])
def test_frames_follow_presentation_time(corpus, name: str, fps: int):
    path, times = corpus[name]
    clip = read_video(path, fps=fps)
    end = shown_until(path)
    assert end > times[-1]
    count = -(-end * fps // 1)  # ceil: every output time while a frame is shown
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (count, 24, 32, 3), clip.frames.shape
    assert clip.mask.all() and clip.fps == fps
    got = [picture_index(frame) for frame in clip.frames]
    assert got == shown_at(times, Fraction(0), Fraction(fps), count)


@pytest.mark.parametrize("name", RESAMPLED + CONTAINERS + ["rotated90.mp4"])
def test_a_stream_gives_the_frames_of_a_whole_read(corpus, name: str):
    path, _ = corpus[name]
    whole = read_video(path, fps=10, size=(20, 12)).frames
    streamed = list(stream_video(path, fps=10, size=(20, 12)))
    assert np.array_equal(np.stack(streamed), whole)


def test_a_stream_decodes_as_it_is_read(corpus, monkeypatch):
    """Frames come out while the file decodes, not after it: the first frame is there before most of the file
    is decoded, so a reader that stops early (a length limit) stops the decoding."""
    from avlink.data import media

    decoded, push = [], media._VideoSampler.push
    monkeypatch.setattr(media._VideoSampler, "push", lambda self, frame: (decoded.append(frame.pts), push(self, frame)))
    path, times = corpus["24fps_aac.mp4"]
    stream = stream_video(path, fps=24)
    assert picture_index(next(stream)) == 0
    assert 0 < len(decoded) < len(times) // 2, f"{len(decoded)} of {len(times)} frames decoded for the first"
    stream.close()
    assert sum(1 for _ in stream_video(path, fps=24)) > 0 and len(decoded) >= len(times)


@pytest.mark.parametrize("name", ["24fps_aac.mp4", "vfr.mp4", "60fps.mp4"])
def test_window_cuts_and_pads_with_mask(corpus, name: str):
    path, times = corpus[name]
    start, duration, fps = Fraction(7, 10), 2.0, 10  # past the end of every source here: padding is needed
    clip = read_video(path, fps=fps, start=float(start), duration=duration)
    assert clip.frames.shape[0] == 20
    end = shown_until(path)
    real = [start + Fraction(k, fps) < end for k in range(20)]
    assert clip.mask.tolist() == real and not all(real)
    got = [picture_index(frame) for frame in clip.frames]
    expected = shown_at(times, start, Fraction(fps), 20)
    assert got[: sum(real)] == expected[: sum(real)]
    assert all(index == len(times) - 1 for index in got[sum(real) :]), (
        "padding repeats the source's last frame"
    )


def test_seek_into_the_middle_matches_reading_from_the_start(corpus):
    path, _ = corpus["faststart.mp4"]  # 4 s, keyframes every 0.5 s
    whole = read_video(path, fps=24)
    middle = read_video(path, fps=24, start=2.3, duration=1.0)
    assert middle.mask.all()
    first = round(2.3 * 24)
    assert [picture_index(f) for f in middle.frames] == [
        picture_index(f) for f in whole.frames[first : first + 24]
    ]


@pytest.mark.parametrize("name", ["rotated90.mp4", "rotated270.mp4"])
def test_rotation_metadata_is_applied(corpus, name: str):
    path, _ = corpus[name]
    info = probe(path)
    assert (info.width, info.height) == (48, 64) and info.rotation == (90 if "90." in name else 270)
    frame = read_video(path, fps=24).frames[0].astype(float)  # (64, 48, 3): upright portrait
    assert frame.shape == (64, 48, 3)
    # The block in the stored top-left corner lands bottom-left after a counter-clockwise quarter turn,
    # top-right after a clockwise one.
    corner = frame[-8:, :8] if info.rotation == 90 else frame[:8, -8:]
    assert corner.mean() > 200 and frame.mean() < 100


def test_cover_resize_keeps_aspect_and_crops_the_centre(corpus):
    path, _ = corpus["portrait.mp4"]  # 36x64, rows brighten downwards by 4 per row
    clip = read_video(path, fps=24, size=(32, 18))
    assert clip.frames.shape == (6, 18, 32, 3)
    middle_row = clip.frames[0, 9, :, 0].astype(float)
    # The middle of the picture survives the crop: source row 32 has level 128, the crop spans rows ~21..42.
    assert abs(middle_row.mean() - 128) < 12, middle_row.mean()
    assert 70 < clip.frames[0, 0, :, 0].mean() < 100 and 150 < clip.frames[0, -1, :, 0].mean() < 185


@pytest.mark.parametrize(
    ("name", "size", "shape"),
    [
        ("odd_171x97.mp4", None, (97, 171, 3)),
        ("odd_171x97.mp4", (64, 36), (36, 64, 3)),
        ("tiny_2x2.mp4", None, (2, 2, 3)),
        ("tiny_2x2.mp4", (16, 9), (9, 16, 3)),
    ],
)
def test_odd_and_tiny_sizes(corpus, name: str, size, shape):
    clip = read_video(corpus[name][0], fps=24, size=size)
    assert clip.frames.shape == (6, *shape)
    if name == "tiny_2x2.mp4":  # frame k is flat grey 40k + 20
        assert np.abs(clip.frames.reshape(6, -1).mean(axis=1) - (40 * np.arange(6) + 20)).max() < 6
    else:
        assert [picture_index(f) for f in clip.frames] == list(range(6))


# ------------------------------------------------------------------------------------------ reading audio


def pitch(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(
    ("name", "seconds", "amplitude"),
    [
        ("8k_mono.wav", 1.5, 0.5),
        ("48k_stereo.m4a", 1.0, 0.5),
        ("5.1.mp4", 1.0, 0.5),
        ("22k_stereo.flac", 1.0, 0.5),
        ("24fps_aac.mp4", 2.0, 0.5),
        ("h264_pcm.mov", 1.0, 0.5),
        ("h264_aac.mkv", 1.0, 0.5),
        ("vp9_opus.webm", 1.0, 0.5),
    ],
)
@pytest.mark.parametrize("rate", [16000, 22050])
def test_audio_comes_back_mono_at_pitch_and_length(
    corpus, name: str, seconds: float, amplitude: float, rate: int
):
    clip = read_audio(corpus[name][0], rate)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1 and clip.sample_rate == rate
    # Lossy codecs pad their last frame; our reader cuts it where the container declares the stream's length.
    # Matroska declares none, so its AAC keeps up to one frame (1024 samples) of padding.
    slack = 1024 / 22050 if name.endswith(".mkv") else 1 / rate
    assert 0 <= len(clip.samples) / rate - seconds <= slack, len(clip.samples) / rate
    assert abs(pitch(clip.samples, rate) - SINE_HZ) < 3
    steady = clip.samples[len(clip.samples) // 4 : 3 * len(clip.samples) // 4]
    assert abs(np.abs(steady).max() - amplitude) < 0.05, "a downmix of equal channels keeps the level"
    assert np.abs(clip.samples).max() <= 1.0


def test_audio_window_is_exact_with_mask(corpus):
    path, _ = corpus["8k_mono.wav"]  # 1.5 s
    clip = read_audio(path, 16000, start=1.0, duration=1.0)
    assert clip.samples.shape == (16000,) and clip.mask.sum() == 8000 and not clip.mask[8000:].any()
    assert np.abs(clip.samples[8000:]).max() == 0
    source, _ = soundfile.read(path, dtype="float32")
    # Phase check: the window starts at sample 8000 of the source, resampled 2x.
    np.testing.assert_allclose(clip.samples[200:7800:2], source[8100:11900], atol=0.02)


def test_read_clip_reads_both_in_sync(corpus):
    path, times = corpus["24fps_aac.mp4"]
    video, audio = read_clip(path, fps=12, size=(16, 12), sample_rate=16000, start=0.5, duration=1.0)
    assert video.frames.shape == (12, 12, 16, 3) and audio.samples.shape == (16000,)
    assert video.mask.all() and audio.mask.all()
    assert [picture_index(f) for f in video.frames] == shown_at(times, Fraction(1, 2), Fraction(12), 12)
    alone = read_audio(path, 16000, start=0.5, duration=1.0)
    np.testing.assert_allclose(audio.samples, alone.samples, atol=1e-6)


# ------------------------------------------------------------------------------------------ probing


def test_probe_reports_streams(corpus):
    info = probe(corpus["24fps_aac.mp4"][0])
    assert (info.has_video, info.has_audio, info.fps, info.width, info.height) == (True, True, 24.0, 32, 24)
    assert (info.sample_rate, info.channels) == (44100, 2) and abs(info.duration - 2.0) < 0.05
    info = probe(corpus["5.1.mp4"][0])
    assert (info.has_video, info.has_audio, info.channels, info.fps) == (False, True, 6, None)
    info = probe(corpus["29.97fps.mp4"][0])
    assert abs(info.fps - 30000 / 1001) < 1e-3 and not info.has_audio


# ------------------------------------------------------------------------------------------ refusing

BROKEN = [
    "empty.mp4",
    "truncated.mp4",
    "random.mp4",
    "text.txt",
    "text.mp4",
    "ansi_art.txt",
    "zero_length.mp4",
    "zero_length.wav",
    "folder.mp4",
    "missing.mp4",
]
READERS = {
    "probe": probe,
    "video": lambda path: read_video(path, fps=6),
    "audio": lambda path: read_audio(path, 16000),
    "clip": lambda path: read_clip(path, fps=6, size=(8, 8), sample_rate=16000),
    "stream": lambda path: list(stream_video(path, fps=6)),
}


def assert_refused(path: Path, read, words: str | None = None) -> None:
    with pytest.raises(MediaError) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 300, message
    assert words is None or words in message, message


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_are_refused_in_one_line(corpus, name: str, reader: str):
    assert_refused(corpus[name][0], READERS[reader])


@pytest.mark.parametrize("reader", ["video", "audio", "clip", "stream"])
def test_truncated_data_with_intact_index_is_refused(corpus, reader: str):
    assert_refused(corpus["truncated_faststart.mp4"][0], READERS[reader], "truncated")


def test_truncated_file_still_serves_the_part_that_is_there(corpus):
    clip = read_video(corpus["truncated_faststart.mp4"][0], fps=24, duration=0.5)
    assert clip.mask.all() and [picture_index(f) for f in clip.frames] == list(range(12))


def test_missing_streams_are_named(corpus):
    assert_refused(corpus["60fps.mp4"][0], READERS["audio"], "no audio stream")
    assert_refused(corpus["8k_mono.wav"][0], READERS["video"], "no video stream")
    assert_refused(corpus["8k_mono.wav"][0], READERS["stream"], "no video stream")
    assert_refused(corpus["24fps_aac.mp4"][0], lambda p: read_video(p, fps=6, start=5.0), "past the end")


# ------------------------------------------------------------------------------------------ writing


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_write_audio_round_trip(tmp_path: Path, suffix: str):
    samples = sine(0.5, 16000)[:, 0]
    write_audio(tmp_path / f"a{suffix}", samples, 16000)
    clip = read_audio(tmp_path / f"a{suffix}", 16000)
    np.testing.assert_allclose(clip.samples, samples, atol=1 / 16000)  # 16-bit quantisation
    assert leftovers(tmp_path) == []


def test_failed_writes_leave_the_old_file_and_no_temp(tmp_path: Path):
    target = tmp_path / "a.wav"
    target.write_bytes(b"old")
    bad = np.array([0.0, np.nan], np.float32)
    assert_refused(target, lambda p: write_audio(p, bad, 16000), "NaN")
    assert_refused(tmp_path / "a.mp3", lambda p: write_audio(p, np.zeros(10), 16000), ".wav or .flac")
    assert_refused(
        tmp_path / "v.avi", lambda p: write_video(p, np.zeros((2, 4, 4, 3), np.uint8), 6), "not '.avi'"
    )
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize(("width", "height"), [(32, 24), (33, 25)])
def test_write_video_round_trip(tmp_path: Path, width: int, height: int):
    frames = np.stack([index_picture(k, width, height) for k in range(18)])  # 1.5 s at 12 fps
    audio = sine(1.3, 16000)[:, 0]  # shorter than the video: padded to 1.5 s
    write_video(tmp_path / "v.mp4", frames, 12, audio=audio, sample_rate=16000)
    info = probe(tmp_path / "v.mp4")
    assert (info.width, info.height) == (width + width % 2, height + height % 2), (
        "odd sizes gain one edge copy"
    )
    clip = read_video(tmp_path / "v.mp4", fps=12, size=(width, height))
    assert [picture_index(f) for f in clip.frames] == list(range(18))
    sound = read_audio(tmp_path / "v.mp4", 16000)
    assert sound.samples.shape == (24000,) and abs(pitch(sound.samples[:20000], 16000) - SINE_HZ) < 3
    assert np.abs(sound.samples[21500:]).max() < 0.02, "the padding is silence"
    assert leftovers(tmp_path) == []


def test_frames_written_as_they_come_in_chunks(tmp_path: Path):
    """FrameChunks: the frames a generator makes while they are written give the video of the whole array; a
    wrong count or a chunk of another size is one line, and no output is left."""
    frames = np.stack([index_picture(k, 32, 24) for k in range(18)])
    audio = sine(1.5, 16000)[:, 0]
    chunks = (frames[i:i + 5] for i in range(0, 18, 5))  # made lazily, 5 at a time
    write_video(tmp_path / "c.mp4", FrameChunks(frames.shape, chunks), 12, audio=audio, sample_rate=16000)
    write_video(tmp_path / "a.mp4", frames, 12, audio=audio, sample_rate=16000)
    chunked, whole = (read_video(tmp_path / n, fps=12, size=(32, 24)) for n in ("c.mp4", "a.mp4"))
    assert [picture_index(f) for f in chunked.frames] == list(range(18))
    assert np.array_equal(chunked.frames, whole.frames)
    assert read_audio(tmp_path / "c.mp4", 16000).samples.shape == (24000,)
    for bad, says in ((FrameChunks(frames.shape, iter([frames[:10]])), "10 frames came for 18"),
                      (FrameChunks(frames.shape, iter([frames[:, :12]])), "does not fit")):
        with pytest.raises(MediaError, match=says):
            write_video(tmp_path / "bad.mp4", bad, 12)
        assert not (tmp_path / "bad.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "c.mp4"]


def video_packets(path: Path) -> list[tuple[float, float, bytes]]:
    """(pts, dts) in seconds, rounded to a millisecond as containers' time bases differ, and the payload."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        seconds = [
            (p.pts * p.time_base, p.dts * p.time_base, bytes(p)) for p in container.demux(stream) if p.size
        ]
        return [(round(float(pts), 3), round(float(dts), 3), data) for pts, dts, data in seconds]


def decoded_audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        return (
            sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].sample_rate
        )


@pytest.mark.parametrize("name", ["24fps_aac.mp4", "rotated90.mp4", "vp9_opus.webm", "vfr.mp4"])
@pytest.mark.parametrize("seconds", [0.5, 3.0])  # shorter and longer than the video
def test_mux_audio_copies_video_and_fits_audio(corpus, tmp_path: Path, name: str, seconds: float):
    path, _ = corpus[name]
    out = tmp_path / "muxed.mp4"
    mux_audio(path, sine(seconds, 22050)[:, 0], 22050, out)
    assert video_packets(out) == video_packets(path), "the video stream is copied packet for packet"
    video_seconds = float(shown_until(path))
    assert abs(decoded_audio_seconds(out) - video_seconds) <= 1024 / 22050, "within one AAC frame"
    assert probe(out).rotation == probe(path).rotation
    assert leftovers(tmp_path) == []


def test_mux_audio_refuses_without_leaving_output(corpus, tmp_path: Path):
    out = tmp_path / "muxed.mp4"
    assert_refused(
        corpus["8k_mono.wav"][0], lambda p: mux_audio(p, np.zeros(100), 16000, out), "no video stream"
    )
    assert_refused(corpus["random.mp4"][0], lambda p: mux_audio(p, np.zeros(100), 16000, out))
    assert not out.exists() and leftovers(tmp_path) == []


# A child process that writes with each writer under a file-size limit (a full disk fails the same way: the OS
# refuses the write) and prints what each raised. The targets hold old content that must survive.
_LIMITED_WRITES = """
import sys
import numpy as np
from avlink.data.media import MediaError, mux_audio, write_audio, write_video
folder, source = sys.argv[1], sys.argv[2]
noise = np.random.default_rng(0).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
sound = np.random.default_rng(1).uniform(-0.5, 0.5, 4 * 22050).astype(np.float32)
writes = {
    "a.wav": lambda path: write_audio(path, sound, 22050),
    "a.flac": lambda path: write_audio(path, sound, 22050),
    "v.mp4": lambda path: write_video(path, noise, 10, audio=sound, sample_rate=22050),
    "m.mp4": lambda path: mux_audio(source, sound, 22050, path),
}
for name, write in writes.items():
    try:
        write(f"{folder}/{name}")
        print(f"{name}: written")
    except MediaError as err:
        print(err)
"""


def test_writes_past_a_file_size_limit_are_one_line_and_keep_the_old_file(tmp_path: Path):
    import resource
    import subprocess
    import sys

    source = tmp_path / "source.mp4"
    write_video(source, np.random.default_rng(2).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8), 10)
    out = tmp_path / "out"
    out.mkdir()
    names = ("a.wav", "a.flac", "v.mp4", "m.mp4")
    for name in names:
        (out / name).write_bytes(b"old")
    limit = 20_000  # every output is larger (measured: 4 s of noise is >= 45 kB in each format)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-c", _LIMITED_WRITES, str(out), str(source)], preexec_fn=limited,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines == [f"{out / name}: cannot write (File too large)" for name in names]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == dict.fromkeys(names, b"old")


@pytest.mark.parametrize("step", ["mkstemp", "replace"])
def test_a_full_disk_when_the_temp_is_made_or_renamed_is_one_line(tmp_path: Path, monkeypatch, step: str):
    import errno
    import os

    import avlink.files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if step == "mkstemp":
        monkeypatch.setattr(avlink.files.tempfile, "mkstemp", full)
    else:
        monkeypatch.setattr(avlink.files.os, "replace", full)
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    for path, write in [(tmp_path / "a.wav", lambda p: write_audio(p, np.zeros(100), 16000)),
                        (tmp_path / "v.mp4", lambda p: write_video(p, frames, 6))]:
        assert_refused(path, write, "cannot write (No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_video_outputs_get_the_permissions_of_the_umask(tmp_path: Path, umask: int):
    import os
    import stat

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    old = os.umask(umask)
    try:
        write_video(tmp_path / "v.mp4", frames, 6)
        mux_audio(tmp_path / "v.mp4", np.zeros(8000, np.float32), 16000, tmp_path / "m.mov")
        write_audio(tmp_path / "a.flac", np.zeros(100, np.float32), 16000)
    finally:
        os.umask(old)
    for name in ("v.mp4", "m.mov", "a.flac"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
