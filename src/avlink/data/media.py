"""Media I/O on PyAV: the one reader behind real videos, SyncBench, the data sets and the CLI.

Video is resampled to a target fps by presentation time (output frame k, at `start + k/fps`, is the source
frame on screen then), turned upright by its rotation metadata, scaled with its aspect ratio kept and
centre-cropped (cover). Audio is decoded, downmixed to mono float32 and resampled with soxr. Times are seconds
from the container's start, so audio and video read from one file stay in sync.

With `duration` given, clips have exactly round(duration*fps) frames / round(duration*sr) samples; past the
end of the source the video repeats the source's last frame, the audio is zeros, and `mask` is False there.

Every failure on a file is a `MediaError` whose text is one line, "<path>: <reason>". Writes are atomic (a
temp file in the target folder, then os.replace): a failed write leaves nothing half-written behind.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
import soxr

from avlink.errors import UserError
from avlink.files import atomic_path

# A seek that lands this far past `start` missed it (the sinks need data from `start` on).
_SEEK_OVERSHOOT = 1e-3
# Container headers that overstate what decodes by more than this mean the file was cut short.
_TRUNCATION_SLACK = 0.5
# Demuxers for ANSI/text art: FFmpeg opens a .txt with escape codes as "video", which no user means.
_TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
# Seek this far before `start`: audio decoders (AAC, Opus) need a frame of warm-up to decode right.
_PREROLL = 0.25
_AUDIO_SUFFIXES = {".wav": "WAV", ".flac": "FLAC"}
_VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_AAC_FRAME = 1024


class MediaError(UserError):
    """A media file we cannot use; str(err) is one line "<path>: <reason>"."""


@dataclass
class MediaInfo:
    path: str
    duration: float  # seconds, whole container
    has_video: bool
    has_audio: bool
    fps: float | None  # average rate of the video stream
    # Upright display size (rotation and pixel aspect applied), as read_video(size=None) gives.
    width: int | None
    height: int | None
    sample_rate: int | None
    channels: int | None
    rotation: int = 0  # degrees counter-clockwise the stored picture is turned for display


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 (T, H, W, 3) RGB
    fps: float
    mask: np.ndarray  # bool (T,), False where padded past the end of the source


@dataclass
class AudioClip:
    samples: np.ndarray  # float32 (n,) mono in [-1, 1]
    sample_rate: int
    mask: np.ndarray  # bool (n,), False where padded


# ------------------------------------------------------------------------------------------ opening


def _reason(err: BaseException) -> str:
    """A short one-line reason from an FFmpeg/OS error, without the path FFmpeg likes to append."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:200]


@contextmanager
def _opened(path: str | os.PathLike) -> Iterator[tuple[str, av.container.InputContainer]]:
    """Open `path` for reading; every failure inside the block becomes a one-line MediaError."""
    name, file = str(path), Path(path)
    if not file.exists():
        raise MediaError(f"{name}: no such file")
    if file.is_dir():
        raise MediaError(f"{name}: is a directory, not a media file")
    if file.stat().st_size == 0:
        raise MediaError(f"{name}: empty file")
    try:
        container = av.open(name, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, ValueError, UnicodeError) as err:
        raise MediaError(f"{name}: not a media file FFmpeg can read ({_reason(err)})") from None
    try:
        if container.format.name in _TEXT_DEMUXERS:
            raise MediaError(f"{name}: not a media file (text)")
        yield name, container
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:
        raise MediaError(f"{name}: cannot decode ({_reason(err)})") from None
    finally:
        container.close()


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    # Cover art in m4a/mp3 is a one-picture "video" stream; it is not a video.
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream | None:
    return container.streams.audio[0] if container.streams.audio else None


def _origin(container: av.container.InputContainer) -> float:
    """The container's start time in seconds; all our times are measured from it."""
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def _declared_end(stream: av.stream.Stream, origin: float) -> float | None:
    """End of `stream` in seconds from the origin as its header says, or None where the header is silent."""
    if stream.duration is None or stream.time_base is None or stream.duration <= 0:
        return None
    start = stream.start_time if stream.start_time is not None else 0
    return float((start + stream.duration) * stream.time_base) - origin


def _container_duration(container: av.container.InputContainer) -> float:
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    origin = _origin(container)
    ends = [end for s in container.streams if (end := _declared_end(s, origin)) is not None]
    if ends:
        return max(ends)
    # Headers without durations (raw streams): walk the packets, which is cheap next to decoding.
    last = 0.0
    for packet in container.demux():
        if packet.pts is not None and packet.time_base is not None:
            last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base) - origin)
    return last


# ------------------------------------------------------------------------------------------ probing


def probe(path: str | os.PathLike) -> MediaInfo:
    """What `path` holds: its header plus one decoded video frame (for rotation, and to prove it decodes)."""
    with _opened(path) as (name, container):
        video, audio = _video_stream(container), _audio_stream(container)
        if video is None and audio is None:
            raise MediaError(f"{name}: no audio or video stream")
        duration = _container_duration(container)
        if not duration > 0:
            raise MediaError(f"{name}: zero duration")
        info = MediaInfo(name, duration, video is not None, audio is not None, None, None, None, None, None)
        if audio is not None:
            info.sample_rate, info.channels = audio.sample_rate, audio.channels
        if video is not None:
            frame = next(container.decode(video), None)
            if frame is None:
                raise MediaError(f"{name}: video stream has no decodable frames")
            rate = video.average_rate or video.guessed_rate
            info.fps = float(rate) if rate else None
            info.rotation = _rotation(frame)
            info.width, info.height = _display_size(frame, video, info.rotation)
        return info


def audio_rate(path: str | os.PathLike) -> int:
    """The sample rate of the audio stream of `path`, from its header alone: a file's video stream, which may not
    decode, is not touched (A2V needs only the sound)."""
    with _opened(path) as (name, container):
        audio = _audio_stream(container)
        if audio is None or not audio.sample_rate:
            raise MediaError(f"{name}: no audio stream")
        return audio.sample_rate


# ------------------------------------------------------------------------------------------ pictures


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of `frame`, snapped to a multiple of 90 degrees."""
    return int(round((frame.rotation or 0) / 90.0)) * 90 % 360


def _display_size(
    frame: av.VideoFrame, stream: av.video.stream.VideoStream, rotation: int
) -> tuple[int, int]:
    """(width, height) of the upright picture: non-square pixels stretched, rotation applied."""
    sar = stream.sample_aspect_ratio
    width = max(1, round(frame.width * float(sar))) if sar else frame.width
    return (frame.height, width) if rotation in (90, 270) else (width, frame.height)


def _to_rgb(frame: av.VideoFrame, stream: av.video.stream.VideoStream, size: tuple[int, int]) -> np.ndarray:
    """Upright RGB uint8 (H, W, 3) of `frame`: scale to cover `size` = (W, H) keeping aspect, centre-crop."""
    width, height = size
    rotation = _rotation(frame)
    display_w, display_h = _display_size(frame, stream, rotation)
    scale = max(width / display_w, height / display_h)
    scaled_w, scaled_h = max(width, round(display_w * scale)), max(height, round(display_h * scale))
    turned = rotation in (90, 270)
    coded_w, coded_h = (scaled_h, scaled_w) if turned else (scaled_w, scaled_h)
    rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24").to_ndarray()  # (coded_h, coded_w, 3)
    rgb = np.rot90(rgb, k=rotation // 90)  # np.rot90 turns counter-clockwise, as the display matrix does
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    out = np.ascontiguousarray(rgb[top : top + height, left : left + width])
    assert out.shape == (height, width, 3), f"crop gave {out.shape}, wanted {(height, width, 3)}"
    return out


# ------------------------------------------------------------------------------------------ decoding


class _VideoSampler:
    """Takes decoded frames in presentation order; keeps the frame on screen at each output time."""

    def __init__(self, stream, fps: float, size: tuple[int, int] | None, start: float, count: int | None):
        self.stream, self.fps, self.size, self.start, self.count = stream, fps, size, start, count
        self.origin = _origin(stream.container)
        self.picks: list[np.ndarray] = []
        self.taken = 0  # picks handed out by drain() before those in self.picks
        self.current: av.VideoFrame | None = None  # the frame on screen at the newest decoded time
        # A frame shown for several outputs converts once.
        self.converted: tuple[av.VideoFrame, np.ndarray] | None = None
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.end = 0.0  # seconds where the last decoded frame stops being shown
        # Timestamps are rounded to the stream's tick (Matroska: 1 ms, so a frame for 1/24 s sits at 0.042 s):
        # a frame late by up to half a tick counts as shown at its nominal time. Ticks coarser than a
        # millisecond (AVI counts whole frames) are exact frame times, hence the cap.
        tick = float(stream.time_base) if stream.time_base else 0.0
        self.tolerance = min(tick, 1e-3) / 2 + 1e-9

    @property
    def done(self) -> bool:
        return self.count is not None and self.taken + len(self.picks) >= self.count

    def _next_time(self) -> float:
        return self.start + (self.taken + len(self.picks)) / self.fps

    def drain(self) -> list[np.ndarray]:
        """The frames picked since the last drain, in order (for a stream that hands them out as they come)."""
        picks, self.picks = self.picks, []
        self.taken += len(picks)
        return picks

    def drain_rest(self, name: str) -> list[np.ndarray]:
        """The last frames of the whole stream, once it has decoded: those while the last frame is on screen."""
        if self.current is None:
            raise MediaError(f"{name}: no decodable video frames")
        while self._next_time() < self.end - self.tolerance:
            self._pick(self.current)
        return self.drain()

    def _pick(self, frame: av.VideoFrame) -> None:
        if self.converted is None or self.converted[0] is not frame:
            if self.size is None:  # the first frame fixes the size, so a mid-stream size change still stacks
                self.size = _display_size(frame, self.stream, _rotation(frame))
            self.converted = (frame, _to_rgb(frame, self.stream, self.size))
        self.picks.append(self.converted[1])

    def push(self, frame: av.VideoFrame) -> None:
        time = float(frame.time) - self.origin if frame.time is not None else self._guess_time()
        if self.first_time is None:
            self.first_time = time
        # Outputs before this frame's time show the previous frame (or this one, if none came before: no gap).
        while not self.done and self._next_time() < time - self.tolerance:
            self._pick(self.current if self.current is not None else frame)
        self.current, self.end = frame, time + self._frame_length(frame, time)
        self.last_time = time

    def _guess_time(self) -> float:
        return self.end if self.last_time is not None else 0.0

    def _frame_length(self, frame: av.VideoFrame, time: float) -> float:
        if frame.duration and frame.time_base:
            return float(frame.duration * frame.time_base)
        if self.last_time is not None and time > self.last_time:
            return time - self.last_time
        rate = self.stream.average_rate or self.stream.guessed_rate
        return 1.0 / float(rate) if rate else 1.0 / self.fps

    def finish(self, name: str) -> VideoClip:
        if self.current is None:
            raise MediaError(f"{name}: no decodable video frames")
        if self.count is None:  # the whole stream: every output time while the last frame is on screen
            while self._next_time() < self.end - self.tolerance:
                self._pick(self.current)
        else:  # a fixed length: past the end the last frame repeats, masked out below
            while not self.done:
                self._pick(self.current)
        times = self.start + (self.taken + np.arange(len(self.picks))) / self.fps
        mask = times < self.end - self.tolerance
        if not mask.any():
            raise MediaError(
                f"{name}: start {self.start:.3f} s is at or past the end of the video ({self.end:.3f} s)"
            )
        frames = np.stack(self.picks)  # (T, H, W, 3)
        return VideoClip(frames=frames, fps=self.fps, mask=mask)


class _AudioCollector:
    """Takes decoded audio frames; keeps mono float32 at the source rate and where it starts in time."""

    def __init__(self, stream, start: float, stop: float | None):
        self.start, self.stop = start, stop
        self.origin = _origin(stream.container)
        self.chunks: list[np.ndarray] = []
        self.rate: int | None = None
        self.first_time: float | None = None
        self.length = 0  # samples collected
        # Keeps the layout and rate; only the sample format changes, to planar float.
        self.to_float = av.AudioResampler(format="fltp")

    @property
    def decoded_end(self) -> float:
        return self.first_time + self.length / self.rate if self.rate else 0.0

    @property
    def done(self) -> bool:
        # 50 ms past `stop`, so the resampler has real signal beyond the edge of the window.
        return self.stop is not None and self.rate is not None and self.decoded_end >= self.stop + 0.05

    def push(self, frame: av.AudioFrame) -> None:
        if self.rate is None:
            self.rate = frame.sample_rate
            self.first_time = float(frame.time) - self.origin if frame.time is not None else 0.0
        if frame.sample_rate != self.rate:
            raise ValueError(f"sample rate changes mid-stream ({self.rate} -> {frame.sample_rate} Hz)")
        for out in self.to_float.resample(frame):
            self.chunks.append(_downmix(out))
            self.length += self.chunks[-1].shape[0]

    def finish(self, name: str, sample_rate: int, declared_end: float | None) -> AudioClip:
        if self.rate is None or self.length == 0:
            raise MediaError(f"{name}: no decodable audio")
        source = np.concatenate(self.chunks)  # (n,) at self.rate, from self.first_time
        self.chunks.clear()  # a long sound is held once or twice here, not four times
        if declared_end is not None:  # decoders emit codec padding past the stream's declared end (AAC)
            source = source[: max(0, round((declared_end - self.first_time) * self.rate))]
        offset = round((self.start - self.first_time) * self.rate)
        lead = max(0, -offset)  # audio that starts after `start` gets silence in front
        real = source[max(0, offset) :]
        if self.stop is not None:
            real = real[: max(0, round((self.stop - self.start) * self.rate) - lead)]
        if real.shape[0] == 0:
            raise MediaError(f"{name}: start {self.start:.3f} s is at or past the end of the audio")
        samples = np.concatenate([np.zeros(lead, np.float32), real]) if lead else real
        if self.rate != sample_rate:
            samples = soxr.resample(samples, self.rate, sample_rate).astype(np.float32, copy=False)
        ratio = sample_rate / self.rate
        mask = np.zeros(samples.shape[0], bool)
        mask[round(lead * ratio) : round((lead + real.shape[0]) * ratio)] = True
        if self.stop is not None:
            samples, mask = _fit(samples, mask, round((self.stop - self.start) * sample_rate))
        return AudioClip(samples=np.clip(samples, -1.0, 1.0, out=samples), sample_rate=sample_rate, mask=mask)


def _downmix(frame: av.AudioFrame) -> np.ndarray:
    """Mono float32 (n,) as the mean of the channels, LFE left out (it is not part of a mono mix)."""
    planes = frame.to_ndarray().astype(np.float32, copy=False)  # (channels, n) for planar float
    names = [channel.name for channel in frame.layout.channels]
    keep = [i for i, channel in enumerate(names) if channel != "LFE"] or list(range(len(names)))
    return planes[keep].mean(axis=0) if len(keep) > 1 else planes[keep[0]].copy()


_Sink = _VideoSampler | _AudioCollector


def _fit(samples: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or zero-pad to exactly `length` samples."""
    if samples.shape[0] >= length:
        return samples[:length], mask[:length]
    pad = length - samples.shape[0]
    return np.concatenate([samples, np.zeros(pad, np.float32)]), np.concatenate([mask, np.zeros(pad, bool)])


def _decode(container: av.container.InputContainer, sinks: dict[int, _Sink], start: float) -> None:
    """Demux the sinks' streams from about `start` and feed each sink its frames until every sink is done."""
    for _ in _decoding(container, sinks, start):
        pass


def _decoding(container: av.container.InputContainer, sinks: dict[int, _Sink], start: float) -> Iterator[None]:
    """_decode one packet per step: a stream's reader takes the sinks' output between steps.

    A packet that does not decode is skipped, as FFmpeg's own tools do; a file that stops demuxing ends there.
    """
    streams = [container.streams[index] for index in sinks]
    if start > 0:
        primary = streams[0]
        # backward=True lands on the keyframe at or before `start`; the sinks drop what comes before it.
        target = round((max(0.0, start - _PREROLL) + _origin(container)) / primary.time_base)
        with suppress(av.error.FFmpegError):  # not seekable: decode from the beginning, sinks skip to `start`
            container.seek(target, stream=primary, backward=True)
    packets = container.demux(*streams)
    while not all(sink.done for sink in sinks.values()):
        try:
            packet = next(packets)
        except StopIteration:
            return
        except (av.error.FFmpegError, OSError):
            break  # unreadable from here on: keep what decoded; truncation checks judge it
        sink = sinks[packet.stream.index]
        if sink.done:
            continue
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            continue
        for frame in frames:
            sink.push(frame)
        yield
    for index, sink in sinks.items():  # flush the decoders of a file that stopped demuxing
        if not sink.done:
            with suppress(av.error.FFmpegError):
                for frame in container.streams[index].decode(None):
                    sink.push(frame)
    yield


# ------------------------------------------------------------------------------------------ reading


def _check_args(
    fps: float | None, size, sample_rate: int | None, start: float, duration: float | None
) -> None:
    assert fps is None or (math.isfinite(fps) and fps > 0), f"fps must be positive, got {fps}"
    assert size is None or (len(size) == 2 and min(size) > 0), f"size must be (width, height) > 0, got {size}"
    assert sample_rate is None or sample_rate > 0, f"sample_rate must be positive, got {sample_rate}"
    assert start >= 0, f"start must be >= 0, got {start}"
    assert duration is None or duration > 0, f"duration must be > 0, got {duration}"


def _check_complete(name: str, kind: str, decoded_end: float, stream, want_end: float) -> None:
    """Refuse a stream whose header promises more than decodes, when the caller asked for the missing part."""
    declared_end = _declared_end(stream, _origin(stream.container))
    if declared_end is None or decoded_end >= declared_end - _TRUNCATION_SLACK:
        return
    if want_end > decoded_end + _TRUNCATION_SLACK:
        reason = (
            f"truncated or corrupt {kind} stream (decodes to {decoded_end:.2f} s of {declared_end:.2f} s)"
        )
        raise MediaError(f"{name}: {reason}")


def _read_once(path, fps, size, sample_rate, start, duration, video: bool, audio: bool, seek: bool):
    """One pass over the container; None when a seek overshot `start` and the caller must read from 0."""
    with _opened(path) as (name, container):
        vstream = _video_stream(container) if video else None
        astream = _audio_stream(container) if audio else None
        if video and vstream is None:
            raise MediaError(f"{name}: no video stream")
        if audio and astream is None:
            raise MediaError(f"{name}: no audio stream")
        stop = None if duration is None else start + duration
        sampler = collector = None
        sinks: dict[int, _Sink] = {}
        if vstream is not None:
            vstream.thread_type = "AUTO"
            count = None if duration is None else round(duration * fps)
            sampler = sinks[vstream.index] = _VideoSampler(vstream, fps, size, start, count)
        if astream is not None:
            collector = sinks[astream.index] = _AudioCollector(astream, start, stop)
        _decode(container, sinks, start if seek else 0.0)
        firsts = [sink.first_time for sink in sinks.values() if sink.first_time is not None]
        if seek and start > 0 and any(first > start + _SEEK_OVERSHOOT for first in firsts):
            return None
        want_end = math.inf if stop is None else stop
        clip_v = clip_a = None
        if sampler is not None:
            if sampler.current is not None:
                _check_complete(name, "video", sampler.end, vstream, want_end)
            clip_v = sampler.finish(name)
        if collector is not None:
            if collector.rate is not None:
                _check_complete(name, "audio", collector.decoded_end, astream, want_end)
            clip_a = collector.finish(name, sample_rate, _declared_end(astream, collector.origin))
        return clip_v, clip_a


def read_clip(
    path: str | os.PathLike,
    *,
    fps: float | None,
    size: tuple[int, int] | None,
    sample_rate: int | None,
    start: float = 0.0,
    duration: float | None = None,
    video: bool = True,
    audio: bool = True,
) -> tuple[VideoClip | None, AudioClip | None]:
    """Video and/or audio of `path` from `start` (seconds), in one pass over the container.

    fps: output frame rate (frames picked by presentation time); size: (width, height) to cover-crop to, or
    None for the upright source size; sample_rate: rate of the mono audio. With `duration`, both are cut or
    padded to exactly that long, and their masks say which part is real.
    """
    assert video or audio, "read_clip needs video=True or audio=True"
    _check_args(fps if video else None, size, sample_rate if audio else None, start, duration)
    assert not video or fps is not None, "fps is needed to read video"
    assert not audio or sample_rate is not None, "sample_rate is needed to read audio"
    result = _read_once(path, fps, size, sample_rate, start, duration, video, audio, seek=True)
    if result is None:
        result = _read_once(path, fps, size, sample_rate, start, duration, video, audio, seek=False)
    return result


def read_video(
    path: str | os.PathLike,
    fps: float,
    size: tuple[int, int] | None = None,
    start: float = 0.0,
    duration: float | None = None,
) -> VideoClip:
    """Frames of `path` at `fps`, upright, cover-cropped to `size` = (width, height); see read_clip."""
    clip, _ = read_clip(
        path, fps=fps, size=size, sample_rate=None, start=start, duration=duration, audio=False
    )
    return clip


def read_audio(
    path: str | os.PathLike, sample_rate: int, start: float = 0.0, duration: float | None = None
) -> AudioClip:
    """Mono float32 audio of `path` at `sample_rate`; see read_clip."""
    _, clip = read_clip(
        path, fps=None, size=None, sample_rate=sample_rate, start=start, duration=duration, video=False
    )
    return clip


def stream_video(path: str | os.PathLike, fps: float, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """read_video's frames of the whole file, (H, W, 3) uint8 one at a time as they decode: a reader of a long
    video holds what it keeps, not the video. The file stays open until the stream ends or is closed. Errors are
    read_video's, raised when they show: a stream cut short is refused after its last frame."""
    _check_args(fps, size, None, 0.0, None)
    with _opened(path) as (name, container):
        stream = _video_stream(container)
        if stream is None:
            raise MediaError(f"{name}: no video stream")
        stream.thread_type = "AUTO"
        sampler = _VideoSampler(stream, fps, size, 0.0, None)
        for _ in _decoding(container, {stream.index: sampler}, 0.0):
            yield from sampler.drain()
        if sampler.current is not None:
            _check_complete(name, "video", sampler.end, stream, math.inf)
        yield from sampler.drain_rest(name)


# ------------------------------------------------------------------------------------------ writing


@contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[str]:
    """A temp path beside `path` that replaces it only if the block succeeds (avlink.files.atomic_path). Every
    error on the way, in making the temp and renaming it too, is one line naming `path` (`_writing`)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise MediaError(f"{target}: folder does not exist")
    with _writing(str(target)), atomic_path(target) as temp:
        yield str(temp)


@contextmanager
def _writing(name: str) -> Iterator[None]:
    """Turn encoder/muxer/disk errors while writing `name` into a one-line MediaError: a full disk or a file-size
    limit (EFBIG: Python ignores SIGXFSZ, so the write fails instead of killing the process) included."""
    try:
        yield
    except (av.error.FFmpegError, OSError, ValueError, soundfile.SoundFileError) as err:
        raise MediaError(f"{name}: cannot write ({_reason(err)})") from None


class _SoundSink(io.FileIO):
    """The file soundfile writes through. libsndfile reports a failed write as "System error" (and soundfile
    asserts on a short one), so the OS's own error (no space left on device, file too large) is kept here, the
    rest of the data dropped, and the writer raises it when soundfile is done."""

    error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data)
        while view and self.error is None:
            try:
                view = view[super().write(view):]  # a write can be short (up to a size limit), then fail
            except OSError as err:
                self.error = err
        return len(data)


def _mono(name: str, samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.shape[0] == 0:
        raise MediaError(f"{name}: audio must be a non-empty 1-D array, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples")
    return np.clip(samples.astype(np.float32, copy=False), -1.0, 1.0)


def write_audio(
    path: str | os.PathLike, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16"
) -> None:
    """Write mono `samples` (n,) in [-1, 1] as .wav or .flac (by suffix); 16-bit unless `subtype` says."""
    name = str(path)
    audio_format = _AUDIO_SUFFIXES.get(Path(path).suffix.lower())
    if audio_format is None:
        raise MediaError(f"{name}: audio can be written as .wav or .flac, not '{Path(path).suffix}'")
    samples = _mono(name, samples)
    with _atomic(path) as temp, _SoundSink(temp, "w+") as sink:
        soundfile.write(sink, samples, sample_rate, subtype=subtype, format=audio_format)
        if sink.error is not None:
            raise sink.error


def _output_format(name: str) -> str:
    container_format = _VIDEO_FORMATS.get(Path(name).suffix.lower())
    if container_format is None:
        suffixes = ", ".join(_VIDEO_FORMATS)
        raise MediaError(f"{name}: video can be written as {suffixes}, not '{Path(name).suffix}'")
    return container_format


def _encode_audio(container, stream, samples: np.ndarray, sample_rate: int, start_pts: int = 0) -> None:
    """Encode `samples` (n,) into the mono AAC `stream`, first sample at `start_pts` (in 1/sample_rate)."""
    for begin in range(0, samples.shape[0], _AAC_FRAME):
        chunk = samples[None, begin : begin + _AAC_FRAME]  # (1, <=1024): the encoder takes fixed-size frames
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        frame.sample_rate, frame.time_base = sample_rate, Fraction(1, sample_rate)
        frame.pts = start_pts + begin
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


@dataclass(frozen=True)
class FrameChunks:
    """Frames that are made while they are written: `shape` (T, H, W, 3) known ahead, `chunks` yielding uint8
    (n, H, W, 3) arrays whose n add up to T (e.g. a generator that upsamples one window at a time), so that
    `write_video` never holds the whole clip."""

    shape: tuple[int, int, int, int]
    chunks: Iterable[np.ndarray]


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | FrameChunks,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    crf: int = 18,
    scale: int = 1,
) -> None:
    """Write uint8 RGB `frames` (T, H, W, 3) as H.264 yuv420p, with `audio` as mono AAC cut/padded to T/fps s.

    scale: nearest-neighbour upscaling of each frame as it is encoded (for viewing small generated frames; no
    upscaled copy of the whole clip is held). yuv420p needs even sizes: an odd width or height gets one more
    column/row copied from the edge.
    """
    name = str(path)
    container_format = _output_format(name)
    if isinstance(frames, FrameChunks):
        shape, chunks = tuple(frames.shape), frames.chunks
    else:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4:
            raise MediaError(f"{name}: frames must be uint8 (T, H, W, 3), T > 0; got {frames.dtype} {frames.shape}")
        shape, chunks = frames.shape, (frames,)
    if len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
        raise MediaError(f"{name}: frames must be uint8 (T, H, W, 3), T > 0; got {shape}")
    assert math.isfinite(fps) and fps > 0, f"fps must be positive, got {fps}"
    assert scale >= 1, f"scale must be >= 1, got {scale}"
    if audio is not None:
        assert sample_rate is not None and sample_rate > 0, "write_video needs sample_rate with audio"
        length = round(shape[0] / fps * sample_rate)
        audio, _ = _fit(_mono(name, audio), np.ones(len(audio), bool), length)
    height, width = shape[1] * scale, shape[2] * scale
    rate = Fraction(fps).limit_denominator(1001)
    with _atomic(path) as temp, av.open(temp, "w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        # Every stream must exist before the first packet is muxed (the header is written then).
        sound = None if audio is None else container.add_stream("aac", rate=sample_rate, layout="mono")
        index = 0
        for chunk in chunks:
            if chunk.dtype != np.uint8 or chunk.shape[1:] != tuple(shape[1:]) or index + len(chunk) > shape[0]:
                raise MediaError(f"{name}: a chunk of {chunk.dtype} {chunk.shape} does not fit frames {shape}")
            for small in chunk:
                rgb = small.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else small
                rgb = np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame = frame.reformat(format="yuv420p")
                frame.pts, frame.time_base = index, 1 / rate
                container.mux(stream.encode(frame))
                index += 1
        if index != shape[0]:
            raise MediaError(f"{name}: {index} frames came for {shape[0]}")
        container.mux(stream.encode(None))
        if sound is not None:
            _encode_audio(container, sound, audio, sample_rate)


def _stream_span(container, stream) -> tuple[int, int]:
    """(first pts, end pts) of `stream` in its time base, from its packets (headers can be wrong).

    The end is the last-shown packet's pts plus its duration; packets come in decode order, so with B-frames
    the largest pts + duration over all packets would overshoot.
    """
    pts = [(packet.pts, packet.duration or 0) for packet in container.demux(stream) if packet.pts is not None]
    if not pts:
        return 0, 0
    last_pts, last_duration = max(pts)
    return min(pts)[0], last_pts + last_duration


def _video_span(name: str, container) -> tuple[av.video.stream.VideoStream, int, int]:
    """The video stream and its (first pts, end pts); refused without one or when it lasts nothing."""
    video = _video_stream(container)
    if video is None:
        raise MediaError(f"{name}: no video stream")
    first, end = _stream_span(container, video)
    if end <= first:
        raise MediaError(f"{name}: zero duration")
    return video, first, end


def video_duration(path: str | os.PathLike) -> float:
    """Seconds the video stream of `path` lasts, from its packets: the length `mux_audio` fits audio to."""
    with _opened(path) as (name, container):
        video, first, end = _video_span(name, container)
        return float((end - first) * video.time_base)


def _copyable(video: av.video.stream.VideoStream, container_format: str) -> bool:
    """Whether `container_format` holds `video`'s codec as it is (GIF, for one, does not go into mp4): tried by
    writing a header into memory, where FFmpeg's muxer says so."""
    with suppress(av.error.FFmpegError, ValueError), av.open(io.BytesIO(), "w", format=container_format) as trial:
        trial.add_stream_from_template(video)
        trial.start_encoding()
        return True
    return False


def mux_audio(
    video_path: str | os.PathLike, audio: np.ndarray, sample_rate: int, out_path: str | os.PathLike
) -> None:
    """Copy the video stream of `video_path` untouched (no re-encode) into `out_path` with `audio` as AAC.

    The audio is cut or zero-padded to the exact duration of the input video and starts with its first frame.
    Other streams of the input (its own audio, subtitles) are left out. A video codec that the output container
    cannot hold (GIF into mp4) is re-encoded as H.264 instead (`reencode_with_audio`).
    """
    out_name = str(out_path)
    container_format = _output_format(out_name)
    audio = _mono(out_name, audio)
    with _opened(video_path) as (name, source):
        video, first, end = _video_span(name, source)
        if _copyable(video, container_format):
            _copy_with_audio(source, video, first, end, audio, sample_rate, out_path, container_format)
            return
    reencode_with_audio(video_path, audio, sample_rate, out_path)


def _copy_with_audio(source, video, first: int, end: int, audio: np.ndarray, sample_rate: int,
                     out_path: str | os.PathLike, container_format: str) -> None:
    start_seconds = float(first * video.time_base)  # absolute: the copied packets keep their timestamps
    seconds = float((end - first) * video.time_base)
    audio, _ = _fit(audio, np.ones(len(audio), bool), round(seconds * sample_rate))
    source.seek(0)
    with _atomic(out_path) as temp, av.open(temp, "w", format=container_format) as output:
        copy = output.add_stream_from_template(video)
        sound = output.add_stream("aac", rate=sample_rate, layout="mono")
        _encode_audio(output, sound, audio, sample_rate, round(max(0.0, start_seconds) * sample_rate))
        for packet in source.demux(video):
            if packet.dts is None:  # the flush packet at the end carries no data
                continue
            packet.stream = copy
            output.mux(packet)


def reencode_with_audio(
    video_path: str | os.PathLike, audio: np.ndarray, sample_rate: int, out_path: str | os.PathLike,
    max_fps: float | None = None, max_side: int | None = None,
) -> None:
    """Write `out_path`: the video of `video_path` re-encoded as H.264 (at its own rate and upright size, or at
    most `max_fps` and `max_side` px, even sizes), with `audio` cut or padded to the video's length."""
    info = probe(video_path)
    if not info.has_video:
        raise MediaError(f"{video_path}: no video stream")
    fps = min(info.fps or 25.0, max_fps or math.inf)
    scale = min(1.0, (max_side or math.inf) / max(info.width, info.height))
    size = (2 * max(1, round(info.width * scale / 2)), 2 * max(1, round(info.height * scale / 2)))
    clip = read_video(video_path, fps, size=size)
    write_video(out_path, clip.frames, fps, audio, sample_rate)
