"""`avlink app`: a local web app (Gradio) for V2A and A2V on one loaded checkpoint.

Two tabs. Video -> Audio: upload a video, get it back with generated sound (and the sound alone as a wav).
Audio -> Video: upload a sound, get a generated video that moves with it (through the checkpoint's video
upsampler where it has one, then upscaled for viewing, with that sound). Both take an optional prompt, the number
of sampling steps, a seed and a number of candidates (best-of-N: each window is sampled that many times and the
one whose timing agrees best with the upload is kept, see pipeline.py); where the checkpoint holds a fast V2A set
(fusion-fast.safetensors), the V2A tab offers it as a "fast" box, which also moves the steps to the fast default
(pipeline.py, `avlink v2a --fast`). Example clips are SyncBench test-split clips (never trained on), rendered once
into a cache folder when the app starts.

Offline by design: Gradio's analytics and version check are off, the Hugging Face hub is set offline, the
theme uses the fonts Gradio ships (no web fonts), server-side rendering is off, and so is the run history
(which can save to a remote bucket). The server listens on 127.0.0.1 unless --host says otherwise; a public
share link is made only with --share.

Limits: an upload larger than --max-upload-mb is refused by the server before it reaches the model, one longer
than --max-seconds is refused with the clip's length, and a file that is not usable media is refused with the
reader's one-line reason. All three show as an error message in the page. Generation runs one request at a
time (both tabs share the model).

The V2A result keeps the uploaded video stream untouched when the browser can play it (H.264 in mp4/mov) and
adds the sound; other inputs are re-encoded as H.264 at their own rate (30 fps at most) and at most 640 px.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Read by gradio and huggingface_hub when they are imported: no analytics, no version check, no hub calls.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from avlink.data import media  # noqa: E402
from avlink.errors import UserError  # noqa: E402
from avlink.pipeline import DEFAULT_STEPS, FAST_STEPS, Pipeline  # noqa: E402

VIEW_SIDE = 256  # generated video is upscaled (nearest) until its shorter side reaches this
REENCODE_SIDE = 640  # longest side of a re-encoded V2A result
REENCODE_FPS = 30.0
BROWSER_CONTAINERS = {".mp4", ".m4v", ".mov"}
EXAMPLE_COUNT = 3
EXAMPLE_SEED = 0  # first seed within SyncBench's test split


@dataclass(frozen=True)
class Limits:
    """What one upload may be: checked by the server (size) and by the handlers (size, length)."""

    max_seconds: float = 20.0
    max_megabytes: float = 50.0
    max_queue: int = 8  # requests waiting for the model; one more is refused with "queue is full"
    max_age_minutes: float = 60.0  # uploads and results older than this are deleted

    @property
    def max_bytes(self) -> int:
        return int(self.max_megabytes * 1024 * 1024)


@dataclass(frozen=True)
class Example:
    """One SyncBench clip offered in both tabs: its silent video, its sound and its caption."""

    video: Path  # mp4 without audio (the V2A tab adds sound)
    audio: Path  # wav (the A2V tab makes the video)
    caption: str


# ------------------------------------------------------------------------------------------ examples


def examples_folder(seconds: float) -> Path:
    """Where example clips of `seconds` length are cached (per length: another checkpoint may differ)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "avlink" / "app-examples" / f"syncbench-{seconds:.2f}s"


def render_examples(folder: Path, seconds: float, count: int = EXAMPLE_COUNT) -> list[Example]:
    """SyncBench test clips 0..count-1 of `seconds` length as <id>.mp4 (silent) and <id>.wav in `folder`.

    Files already there are kept (the writers are atomic, so a file that exists is whole)."""
    from avlink.data.syncbench import clip_id, clip_seed, plan_scene, render_clip

    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(count):
        seed = clip_seed("test", EXAMPLE_SEED, index)
        stem = folder / clip_id("test", seed)
        video, audio = stem.with_suffix(".mp4"), stem.with_suffix(".wav")
        if video.is_file() and audio.is_file():
            caption = plan_scene(seed, seconds).caption  # drawing nothing: the caption is in the plan
        else:
            clip = render_clip(seed, seconds)
            media.write_video(video, clip.frames, clip.fps)
            media.write_audio(audio, clip.audio, clip.sample_rate)
            caption = clip.meta["caption"]
        examples.append(Example(video, audio, caption))
    return examples


# ------------------------------------------------------------------------------------------ generation


class Generator:
    """The app's two actions on one Pipeline; each writes its results into a fresh folder under `workdir`.

    Files: a request's results live in its own folder until gradio has copied them into its cache; the folders
    of finished requests are deleted when the next request starts (requests run one at a time), when the user's
    session ends (with that session's uploads), and all of them when the app closes. Gradio deletes its own
    cache (uploads, served results) past `Limits.max_age_minutes` and when the server stops."""

    def __init__(self, pipeline: Pipeline, limits: Limits, workdir: Path):
        self.pipeline, self.limits, self.workdir = pipeline, limits, workdir
        self.uploads: dict[str, set[Path]] = {}  # session -> its uploaded files

    def v2a(self, video: str | None, prompt: str, steps: float, seed: float, candidates: float = 1,
            fast: bool = False, request: gr.Request | None = None) -> tuple[str, str]:
        """Uploaded video -> (mp4 with the generated sound, wav of it); fast: the checkpoint's fast set."""
        if not video:
            raise _refusal("Upload a video first.")
        self._remember(video, request)
        self._check(video, "video")
        steps, seed, candidates = _steps(steps), _seed(seed), _candidates(candidates)
        # (T, H, W, 3) at the model's fps and size; decoding stops past the limit, whatever the header says
        frames = _user_media(lambda p: self.pipeline.read_video(p, max_seconds=self.limits.max_seconds), video)
        try:
            wave = self.pipeline.video_to_audio(frames, prompt=prompt.strip() or None, steps=steps, seed=seed,
                                                candidates=candidates, fast=bool(fast))
        except UserError as err:  # a fast set that does not load: its one line, no server path
            raise _refusal(str(err).replace(str(self.pipeline.folder), "the checkpoint")) from None
        out = self._folder()
        sound, movie = out / "generated.wav", out / f"{Path(video).stem}.v2a.mp4"
        _user_media(lambda p: media.write_audio(sound, wave, self.pipeline.sample_rate), video)
        _with_sound(video, wave, self.pipeline.sample_rate, movie)
        return str(movie), str(sound)

    def a2v(self, audio: str | None, prompt: str, steps: float, seed: float, candidates: float = 1,
            request: gr.Request | None = None) -> str:
        """Uploaded sound -> mp4 of the generated video (upscaled for viewing) with that sound."""
        if not audio:
            raise _refusal("Upload a sound first.")
        self._remember(audio, request)
        self._check(audio, "audio")
        steps, seed, candidates = _steps(steps), _seed(seed), _candidates(candidates)
        wave = _user_media(lambda p: self.pipeline.read_audio(p, max_seconds=self.limits.max_seconds), audio)
        frames = self.pipeline.audio_to_video(wave, prompt=prompt.strip() or None, steps=steps, seed=seed,
                                              candidates=candidates)
        fps = self.pipeline.fps
        if self.pipeline.upsampler is not None:  # the checkpoint's second video stage
            frames = self.pipeline.upsample(frames, wave, seed=seed)
            fps = self.pipeline.upsampled_fps
        factor = max(1, math.ceil(VIEW_SIDE / min(frames.shape[1:3])))
        movie = self._folder() / f"{Path(audio).stem}.a2v.mp4"
        _user_media(lambda p: media.write_video(movie, frames, fps, wave, self.pipeline.sample_rate,
                                                scale=factor), audio)
        return str(movie)

    def _check(self, path: str, stream: str) -> media.MediaInfo:
        """Size, readability, stream and declared length of an upload, or a gr.Error saying what is wrong. The
        header can lie: the readers then stop decoding at the limit (Pipeline.read_video / read_audio)."""
        name = Path(path).name
        size = Path(path).stat().st_size
        if size > self.limits.max_bytes:
            raise _refusal(f"{name}: {size / 2**20:.1f} MB is larger than the "
                           f"{self.limits.max_megabytes:g} MB upload limit.")
        info = _user_media(media.probe, path)
        if not (info.has_video if stream == "video" else info.has_audio):
            raise _refusal(f"{name}: has no {stream} stream.")
        if info.duration > self.limits.max_seconds:
            raise _refusal(f"{name}: {info.duration:.1f} s is longer than the {self.limits.max_seconds:g} s "
                           "limit; trim it and upload again.")
        return info

    def _remember(self, upload: str, request: gr.Request | None) -> None:
        if request is not None and request.session_hash:
            self.uploads.setdefault(request.session_hash, set()).add(Path(upload))

    def _folder(self) -> Path:
        self.sweep()  # requests run one at a time: every earlier folder is a finished request's
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))

    def sweep(self) -> int:
        """Delete the result folders of finished requests; returns how many went."""
        gone = 0
        for folder in self.workdir.glob("run-*"):
            shutil.rmtree(folder, ignore_errors=True)
            gone += 1
        return gone

    def end_session(self, request: gr.Request | None = None) -> None:
        """The user closed or reloaded the page: that session's uploads and the finished results go."""
        if request is not None:
            for upload in self.uploads.pop(request.session_hash, set()):
                upload.unlink(missing_ok=True)
        self.sweep()


def _refusal(message: str) -> gr.Error:
    """What the page shows for a bad upload; no traceback in the server's log (it is the user's file)."""
    return gr.Error(message, print_exception=False)


def _user_media(read, path: str):
    """read(path), with a bad file reported in the page as the reader's one-line reason."""
    try:
        return read(path)
    except UserError as err:  # MediaError included: "<path>: <reason>"
        raise _refusal(str(err).replace(str(path), Path(path).name)) from None


MAX_STEPS = 1024
MAX_SEED = 2**32 - 1
MAX_CANDIDATES = 8  # each one costs a window's sampling: the page offers a few


def _steps(value: float | None) -> int:
    if value is None or not math.isfinite(value) or not 1 <= value <= MAX_STEPS:
        raise _refusal(f"steps must be a whole number from 1 to {MAX_STEPS}, got {value}")
    return int(value)


def _seed(value: float | None) -> int:
    if value is None:
        return 0
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= MAX_SEED:
        raise _refusal(f"seed must be a whole number from 0 to {MAX_SEED}, got {value}")
    return int(value)


def _candidates(value: float | None) -> int:
    if value is None or not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_CANDIDATES:
        raise _refusal(f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, got {value}")
    return int(value)


def _browser_plays(path: str) -> bool:
    """Whether the video stream of `path` is H.264 in an mp4/mov container (copied as it is, then)."""
    import av

    if Path(path).suffix.lower() not in BROWSER_CONTAINERS:
        return False
    with av.open(path) as container:
        return any(s.codec_context.name == "h264" for s in container.streams.video)


def _with_sound(video: str, wave: np.ndarray, sample_rate: int, out: Path) -> None:
    """Write `out`: the uploaded video with `wave` as its sound (re-encoded where browsers cannot play it)."""
    if _browser_plays(video):
        media.mux_audio(video, wave, sample_rate, out)
        return
    _user_media(lambda p: media.reencode_with_audio(p, wave, sample_rate, out, REENCODE_FPS, REENCODE_SIDE), video)


# ------------------------------------------------------------------------------------------ the page


def build_app(pipeline: Pipeline, *, limits: Limits = Limits(), examples: Sequence[Example] = (),
              workdir: str | Path | None = None) -> gr.Blocks:
    """The app's page on `pipeline` (loaded once, shared by every request); launch it with `launch`."""
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="avlink-app-"))
    work.mkdir(parents=True, exist_ok=True)
    generator = Generator(pipeline, limits, work)
    height, width = pipeline.size
    about = (f"AV-Link on a {pipeline.clip_seconds:.2f} s window ({width}x{height} px at {pipeline.fps:g} "
             f"fps, {pipeline.sample_rate} Hz); longer inputs are generated window by window. "
             + (f"Audio -> Video is upsampled to {pipeline.upsampler.output.width}x"
                f"{pipeline.upsampler.output.height} px at {pipeline.upsampled_fps:g} fps. "
                if pipeline.upsampler is not None else "")
             + f"Uploads: at most {limits.max_seconds:g} s and {limits.max_megabytes:g} MB; uploads and results "
             f"are deleted when you leave the page, or after {limits.max_age_minutes:g} minutes.")
    age = max(1, round(limits.max_age_minutes * 60))
    with gr.Blocks(title="avlink", analytics_enabled=False, delete_cache=(min(age, 60), age)) as app:
        gr.Markdown(f"# avlink: video to audio, audio to video\n{about}")
        with gr.Tabs():
            with gr.Tab("Video -> Audio", id="v2a"):
                _v2a_tab(generator, examples)
            with gr.Tab("Audio -> Video", id="a2v"):
                _a2v_tab(generator, examples)
        app.unload(generator.end_session)
    app.queue(max_size=limits.max_queue, default_concurrency_limit=1)
    return app


def _controls(prefix: str, placeholder: str) -> tuple[gr.Textbox, gr.Slider, gr.Number, gr.Slider]:
    prompt = gr.Textbox(label="prompt (optional)", placeholder=placeholder, elem_id=f"{prefix}-prompt")
    with gr.Row():
        steps = gr.Slider(1, 256, value=DEFAULT_STEPS, step=1, label="steps", elem_id=f"{prefix}-steps")
        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id=f"{prefix}-seed")
        candidates = gr.Slider(1, MAX_CANDIDATES, value=1, step=1, label="candidates (best of N)",
                               elem_id=f"{prefix}-candidates")
    return prompt, steps, seed, candidates


def _v2a_tab(generator: Generator, examples: Sequence[Example]) -> None:
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="your video", sources=["upload"], include_audio=True, elem_id="v2a-input")
            prompt, steps, seed, candidates = _controls("v2a", "what it should sound like")
            inputs = [video, prompt, steps, seed, candidates]
            if generator.pipeline.has_fast:
                fast = gr.Checkbox(value=False, label=f"fast: Fusion Blocks without reinjection, {FAST_STEPS} steps",
                                   elem_id="v2a-fast")
                fast.change(lambda on: FAST_STEPS if on else DEFAULT_STEPS, inputs=fast, outputs=steps)
                inputs.append(fast)
            button = gr.Button("Generate sound", variant="primary", elem_id="v2a-run")
        with gr.Column():
            movie = gr.Video(label="video with generated sound", interactive=False, elem_id="v2a-output")
            sound = gr.Audio(label="generated sound", type="filepath", interactive=False, elem_id="v2a-audio")
    if examples:
        gr.Examples([[str(e.video), e.caption] for e in examples], inputs=[video, prompt],
                    label="SyncBench test clips")
    button.click(generator.v2a, inputs=inputs, outputs=[movie, sound],
                 concurrency_limit=1, concurrency_id="model")


def _a2v_tab(generator: Generator, examples: Sequence[Example]) -> None:
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(label="your sound", sources=["upload"], type="filepath", elem_id="a2v-input")
            prompt, steps, seed, candidates = _controls("a2v", "what it should look like")
            button = gr.Button("Generate video", variant="primary", elem_id="a2v-run")
        with gr.Column():
            movie = gr.Video(label="generated video with your sound", interactive=False, elem_id="a2v-output")
    if examples:
        gr.Examples([[str(e.audio), e.caption] for e in examples], inputs=[audio, prompt],
                    label="SyncBench test clips")
    button.click(generator.a2v, inputs=[audio, prompt, steps, seed, candidates], outputs=[movie],
                 concurrency_limit=1, concurrency_id="model")


def launch(app: gr.Blocks, *, limits: Limits = Limits(), host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, allowed_paths: Sequence[str | Path] = ()) -> str:
    """Start serving `app` in a background thread and return its local URL; `app.block_thread()` waits."""
    try:
        _, url, _ = app.launch(
            server_name=host, server_port=port, share=share, max_file_size=limits.max_bytes,
            allowed_paths=[str(Path(p).resolve()) for p in allowed_paths], prevent_thread_lock=True,
            ssr_mode=False, run_history=False, mcp_server=False, show_error=True, quiet=True,
        )
    except OSError as err:  # the port is taken, the address is not this machine's
        raise UserError(f"{host}:{port}: cannot serve there ({' '.join(str(err).split())})") from None
    return url


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for tests and for --port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint folder (default: the shipped checkpoints/tiny)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    parser.add_argument("--share", action="store_true", help="also make a public share link (off by default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--vocoder", default="hifigan",
                        help="hifigan (universal, default) | griffinlim | a HiFi-GAN checkpoint path")
    parser.add_argument("--max-seconds", type=float, default=Limits.max_seconds,
                        help=f"longest upload in seconds (default {Limits.max_seconds:g})")
    parser.add_argument("--max-upload-mb", type=float, default=Limits.max_megabytes,
                        help=f"largest upload in MB (default {Limits.max_megabytes:g})")
    parser.add_argument("--max-queue", type=int, default=Limits.max_queue,
                        help=f"requests that may wait for the model; more are refused (default {Limits.max_queue})")
    parser.add_argument("--max-age-minutes", type=float, default=Limits.max_age_minutes,
                        help="uploads and results older than this are deleted "
                             f"(default {Limits.max_age_minutes:g}; all of them when the app stops)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="folder for the example clips (default: a cache folder in your home)")


def run(args: argparse.Namespace) -> int:
    if args.max_seconds <= 0 or args.max_upload_mb <= 0 or args.max_queue < 1 or args.max_age_minutes <= 0:
        raise UserError("--max-seconds, --max-upload-mb, --max-queue and --max-age-minutes must be positive")
    pipeline = Pipeline.load(args.ckpt, device=args.device, vocoder=args.vocoder)
    limits = Limits(args.max_seconds, args.max_upload_mb, args.max_queue, args.max_age_minutes)
    folder = args.examples or examples_folder(pipeline.clip_seconds)
    try:
        examples = render_examples(folder, pipeline.clip_seconds)
    except (OSError, UserError) as err:
        raise UserError(f"{folder}: cannot write the example clips ({err})") from None
    with tempfile.TemporaryDirectory(prefix="avlink-app-") as work:  # results: gone when the app stops
        app = build_app(pipeline, limits=limits, examples=examples, workdir=work)
        url = launch(app, limits=limits, host=args.host, port=args.port or free_port(args.host),
                     share=args.share, allowed_paths=[folder])
        public = f" and {app.share_url}" if app.share_url else ""
        print(f"avlink app: serving on {url}{public} (Ctrl+C stops it)", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()  # gradio deletes its cache of uploads and results (delete_cache)
    return 0
