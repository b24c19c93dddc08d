"""`avlink v2a` / `avlink a2v`: sound for a user's video, a video for a user's sound.

    avlink v2a VIDEO|FOLDER|LIST [-p PROMPT] [-o OUT] [--steps 64] [--seed N] [--cfg S] [--ckpt DIR]
               [--device cpu|cuda] [--precision fp32|bf16] [--method euler] [--vocoder hifigan] [--no-fusion]
               [--fast] [--candidates N] [--continuation replace|guided] [--guidance W] [--overwrite]
    avlink a2v AUDIO|FOLDER|LIST [-p PROMPT] [-o OUT.mp4] [--upscale K] [--no-upsample] [--upsample-steps N]
               [...the same options]

Both commands load the checkpoint once (`Pipeline`, the one inference path) and run it on every input, with the
same seed for every file, so a result does not depend on what else is in the batch.

V2A reads the whole video at the model's fps and size for conditioning, whatever the file's own; the wave is
generated at the model's sample rate for all of it and cut to the video stream's exact duration. It is written
as a 16-bit wav and muxed into a copy of the user's video: the video stream is copied packet for packet (no
re-encode) and the sound is AAC of exactly the video's length; the input's own audio and other streams are
left out. A video codec that the container cannot hold (a GIF into mp4) is re-encoded as H.264 instead.

A2V reads the sound, downmixed to mono, and generates frames at the model's fps and size for all of it: the
conditioning is padded with silence to the end of the frame in which the sound ends, so no sound is cut. The
frames go through the checkpoint's video upsampler where the folder holds one (system.UPSAMPLER_FILE; 4x the
frame rate and size, conditioned on the sound; --no-upsample keeps the base frames), are upscaled by --upscale
(nearest neighbour; default: to VIEW_SCALE times the base frames' size; a size is rounded up to even, which
H.264 needs) and written as H.264 with the user's sound as mono AAC at the file's own sample rate (the model's
rate where AAC has no such rate), padded with silence to the end of the last frame.

Output names. One input file: V2A `-o OUT.wav` or `-o OUT.mp4` (or .mov, .mkv, .m4v) names one output and the
other gets the same name with the other suffix; `-o FOLDER` (an existing one) puts `<stem>.v2a.wav` and
`<stem>.v2a.mp4` there; without -o they go next to the input. A2V: `-o OUT.mp4`, `-o FOLDER` for
`<stem>.a2v.mp4`, or that name next to the input. An output that exists (either of V2A's two) is refused in
one line unless --overwrite is given.

Best-of-N. `--candidates N` (N > 1) samples every window N times, scores each candidate against the input
alone (rank.py: the checkpoint's learned sync scorer, sync.safetensors, where it has one; AV-Align otherwise;
the sidecar's "score" says which) and keeps the best (pipeline.py). Every candidate's score goes to a third output, the
mp4's name with .json (`<stem>.v2a.json`, `OUT.json`): per window the scores in candidate order and the one
kept. N = 1, the default, is generation without best-of-N, bit for bit, and writes no such file.

Batches. A folder gives its files (not subfolders') with a video suffix (V2A) or an audio suffix (A2V), leaving
out hidden files and our own outputs (`*.v2a.*`, `*.a2v.*`). A list file (.txt or .list) gives one path per
line, relative to the list's folder; blank lines and lines starting with '#' are ignored. -o is then a folder
(made if missing); without it the outputs go next to each input. An input whose outputs all exist is skipped,
so an interrupted batch goes on where it stopped (`--overwrite` redoes them). A file that cannot be used is
left out and named with the reason in one line at the end, and the rest go on; the exit status is then 3, else
0. So is a folder entry with an input's suffix that is no regular file (a broken or looping link, a folder, a
pipe: never opened). An input whose outputs cannot all be written (a full disk, a file-size limit) is left out
the same way, with the outputs it did write removed. A single bad input is refused in one line with status 2,
as every command does.

Writes are atomic (the media writers write a temp file beside the output and rename it), so an interrupted run
leaves no half-written output for the next run to take as done; the temps of a killed run are removed by the
next run that writes into their folder (`remove_killed_temps`).

Options passed through to the pipeline: --method, the ODE solver (euler, midpoint, heun); --vocoder (V2A),
hifigan (the universal HiFi-GAN shipped in a package), griffinlim (no weights, fast, rough) or the path of a
HiFi-GAN checkpoint for the model's mel analysis; --no-fusion, the frozen text-to-audio / text-to-video
generator alone with the same prompt, seed and length (the baseline: it ignores the input's content);
--precision, fp32 (default) or bf16: the network evaluations under bf16 autocast, allowed on CUDA and on CPUs
with bf16 matrix instructions and refused in one line elsewhere (see pipeline.py); --fast (V2A), the
checkpoint's fast set (fusion-fast.safetensors: Fusion Blocks without reinjection, whose video stream runs once
per window) at 8 steps (pipeline.FAST_STEPS) unless --steps says otherwise, refused in one line before any input
where the folder has no such set.
--continuation replace|guided (--guidance W for guided): how each window of a long input continues the one
before (pipeline.py; default guided for A2V, replace for V2A); a weight with replace, or a weight that is not a
positive number, is refused in one line before any input.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import stat
import sys
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from avlink.config import Task
from avlink.errors import UserError
from avlink.flow.solvers import SOLVERS

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv",
                            ".wmv", ".ogv", ".3gp"})
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff",
                            ".wma"})
LIST_SUFFIXES = frozenset({".txt", ".list"})
CONTAINER_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")  # what the media writers can write video into
VIEW_SCALE = 8  # A2V frames are written at this many times the base frames' size unless --upscale says otherwise
INPUT_SUFFIXES: dict[str, frozenset[str]] = {"v2a": VIDEO_SUFFIXES, "a2v": AUDIO_SUFFIXES}
# Sample rates the AAC encoder takes; another rate is resampled to the model's.
AAC_RATES = frozenset({7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000})
EXIT_BAD_INPUT = 3


@dataclass(frozen=True)
class Job:
    """One input and the files made from it."""

    source: Path
    video: Path  # the mp4 (V2A: the user's video with the generated sound; A2V: the generated video)
    wave: Path | None = None  # V2A: the generated sound alone
    scores: Path | None = None  # best-of-N: every candidate's score (JSON)

    @property
    def outputs(self) -> tuple[Path, ...]:
        return tuple(path for path in (self.video, self.wave, self.scores) if path is not None)

    def done(self) -> bool:
        return all(path.is_file() for path in self.outputs)


@dataclass(frozen=True)
class Settings:
    """What the user chose for the generation; the same for every file."""

    prompt: str | None
    steps: int | None  # None: the pipeline's default (64, or 16 with fast)
    seed: int
    cfg_scale: float
    method: str
    fusion: bool
    upscale: int | None  # None: 8x the base frames' size
    fast: bool = False  # V2A: the checkpoint's fast set (pipeline.py)
    candidates: int = 1  # best-of-N per window (pipeline.py)
    upsample: bool = True  # through the checkpoint's upsampler, where it has one
    upsample_steps: int | None = None  # None: the upsampler's own default
    continuation: str | None = None  # how a window continues the one before; None: the task's default (pipeline.py)
    guidance: float | None = None  # reconstruction-guidance weight of "guided"; None: pipeline.GUIDANCE_WEIGHT
    link_scale: float | None = None  # guidance on the input (sample.link_guidance); None: pipeline.LINK_SCALE


# --- inputs and output names --------------------------------------------------------------------------------


def is_batch(source: Path) -> bool:
    return source.is_dir() or source.suffix.lower() in LIST_SUFFIXES


def is_own_output(path: Path) -> bool:
    """`clip.v2a.mp4`, `clip.a2v.mp4`: made by these commands, never an input of a folder run."""
    return Path(path.stem).suffix in (".v2a", ".a2v")


def read_list(path: Path) -> list[Path]:
    """The paths of a list file: one a line, relative to the list's folder; '#' starts a comment line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as err:
        raise UserError(f"{path}: cannot read the list ({err.__class__.__name__})") from None
    entries = [line.strip() for line in lines]
    return [path.parent / entry for entry in entries if entry and not entry.startswith("#")]


def unusable_entry(path: Path) -> str | None:
    """Why a folder entry with an input suffix cannot be an input, or None when it is a regular file.

    Decided from the entry's metadata alone: a FIFO or device is never opened (that could block)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if path.is_symlink():
            return "a symbolic link that loops" if err.errno == errno.ELOOP else "a broken symbolic link"
        return f"cannot be read ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    return "not a regular file (a pipe, socket or device)"


def batch_inputs(task: Task, source: Path) -> tuple[list[Path], list[str]]:
    """The inputs of a folder or a list file, in a fixed order, and one line per folder entry that looks like
    an input but cannot be one (a broken or looping link, a folder named like a file, a pipe)."""
    bad = []
    if source.is_dir():
        inputs = []
        for path in sorted(source.iterdir()):
            if path.suffix.lower() not in INPUT_SUFFIXES[task] or path.name.startswith(".") or is_own_output(path):
                continue
            reason = unusable_entry(path)
            if reason is None:
                inputs.append(path)
            else:
                bad.append(f"{path}: {reason}")
    else:
        inputs = read_list(source)
    if not inputs and not bad:
        kind = "video" if task == "v2a" else "audio"
        raise UserError(f"{source}: no {kind} files to read (suffixes: {', '.join(sorted(INPUT_SUFFIXES[task]))})"
                        if source.is_dir() else f"{source}: the list names no files")
    return inputs, bad


def named_job(task: Task, source: Path, folder: Path) -> Job:
    """The outputs of `source` by the naming rule: <stem>.v2a.wav + <stem>.v2a.mp4, or <stem>.a2v.mp4."""
    base = f"{source.stem}.{task}"
    return Job(source, folder / f"{base}.mp4", folder / f"{base}.wav" if task == "v2a" else None)


def single_job(task: Task, source: Path, out: Path | None) -> Job:
    """The outputs of one input file from -o (a file name, a folder, or nothing)."""
    if out is None or out.is_dir():
        job = named_job(task, source, source.parent if out is None else out)
    elif out.suffix.lower() in CONTAINER_SUFFIXES:
        job = Job(source, out, out.with_suffix(".wav") if task == "v2a" else None)
    elif task == "v2a" and out.suffix.lower() == ".wav":
        job = Job(source, out.with_suffix(".mp4"), out)
    else:
        names = (".wav, " if task == "v2a" else "") + ", ".join(CONTAINER_SUFFIXES)
        raise UserError(f"{out}: -o takes a {names} file or an existing folder")
    if not job.video.parent.is_dir():
        raise UserError(f"{job.video.parent}: folder does not exist (-o)")
    if any(path.resolve() == source.resolve() for path in job.outputs):
        raise UserError(f"{source}: -o would overwrite the input")
    return job


def ranked_job(job: Job, settings: Settings) -> Job:
    """With best-of-N the candidates' scores are an output too: the mp4's name with .json."""
    return replace(job, scores=job.video.with_suffix(".json")) if settings.candidates > 1 else job


def batch_jobs(task: Task, inputs: list[Path], out: Path | None) -> tuple[list[Job], list[str]]:
    """Jobs for a batch, and one line per input that cannot have its own outputs (two inputs, one name)."""
    jobs, bad, taken = [], [], {}
    for source in inputs:
        job = named_job(task, source, source.parent if out is None else out)
        first = taken.setdefault(job.video.resolve(), source)
        if first is not source:
            bad.append(f"{source}: its output {job.video.name} is also the output of {first}; rename one")
            continue
        jobs.append(job)
    return jobs, bad


# --- generation ---------------------------------------------------------------------------------------------


def write_ranking(job: Job, task: Task, settings: Settings, ranking: list) -> None:
    """The best-of-N sidecar: per window every candidate's score (null where undefined) and the one kept."""
    from avlink.files import atomic_write

    windows = [{"window": r.window, "scores": [s if math.isfinite(s) else None for s in r.scores], "kept": r.kept}
               for r in ranking]
    score = ranking[0].score if ranking else "av_align"
    text = json.dumps({"input": str(job.source), "task": task, "score": score, "candidates": settings.candidates,
                       "seed": settings.seed, "windows": windows}, indent=2)
    atomic_write(job.scores, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def make_v2a(pipe, job: Job, settings: Settings, progress: bool) -> None:
    ranking: list = []
    pipe.video_file_to_audio(job.source, job.video, job.wave, prompt=settings.prompt, steps=settings.steps,
                             seed=settings.seed, cfg_scale=settings.cfg_scale, method=settings.method,
                             fusion=settings.fusion, fast=settings.fast, progress=progress,
                             candidates=settings.candidates, ranking=ranking,
                             continuation=settings.continuation, guidance=settings.guidance,
                             link_scale=settings.link_scale)
    if job.scores is not None:
        write_ranking(job, "v2a", settings, ranking)


def sound_to_keep(path: Path, model_wave: np.ndarray, model_rate: int) -> tuple[np.ndarray, int]:
    """The user's sound as it goes into the A2V mp4: mono at the file's own rate where AAC takes it (the model's
    wave itself when that is the model's rate: one copy of a long sound, not two)."""
    from avlink.data import media

    rate = media.audio_rate(path)
    if rate not in AAC_RATES or rate == model_rate:
        return model_wave, model_rate
    return media.read_audio(path, rate).samples, rate


def make_a2v(pipe, job: Job, settings: Settings, progress: bool) -> None:
    from avlink.data import media
    from avlink.pipeline import fit_length

    wave = pipe.read_audio(job.source)  # (N,) at the model's rate
    sound, rate = sound_to_keep(job.source, wave, pipe.sample_rate)
    # The frame in which the sound ends is generated too: pad the conditioning with silence to its end.
    n_frames = math.ceil(wave.shape[0] / pipe.sample_rate * pipe.fps - 1e-6)
    wave = fit_length(wave, max(wave.shape[0], round(n_frames / pipe.fps * pipe.sample_rate)))
    ranking: list = []
    frames = pipe.audio_to_video(wave, prompt=settings.prompt, steps=settings.steps, seed=settings.seed,
                                 cfg_scale=settings.cfg_scale, method=settings.method, fusion=settings.fusion,
                                 progress=progress, candidates=settings.candidates, ranking=ranking,
                                 continuation=settings.continuation, guidance=settings.guidance,
                                 link_scale=settings.link_scale)  # (n_frames, H, W, 3)
    assert frames.shape[0] == n_frames, f"the pipeline gave {frames.shape[0]} frames for {n_frames}"
    fps, factor = pipe.fps, 1
    if settings.upsample and pipe.upsampler is not None:  # upsampled one window at a time as it is written
        chunks = pipe.upsampled(frames, wave, steps=settings.upsample_steps, seed=settings.seed,
                                method=settings.method, progress=progress)
        frames = media.FrameChunks(pipe.upsampled_shape(frames), chunks)
        fps, factor = pipe.upsampled_fps, pipe.upsampler.cfg.scale[1]
    scale = settings.upscale if settings.upscale is not None else max(1, VIEW_SCALE // factor)
    media.write_video(job.video, frames, fps, audio=sound, sample_rate=rate, scale=scale)
    if job.scores is not None:
        write_ranking(job, "a2v", settings, ranking)


MAKERS = {"v2a": make_v2a, "a2v": make_a2v}


class LazyPipeline:
    """Loads the checkpoint on first use: a batch whose outputs all exist loads nothing."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.pipe = args, None

    def get(self):
        if self.pipe is None:
            from avlink.pipeline import Pipeline

            # A2V never turns a mel into sound: the weight-free vocoder saves loading HiFi-GAN.
            vocoder = self.args.vocoder if self.args.task == "v2a" else "griffinlim"
            self.pipe = Pipeline.load(self.args.ckpt, device=self.args.device, vocoder=vocoder,
                                      precision=self.args.precision)
            if getattr(self.args, "fast", False):  # before any input: a batch stops at once
                self.pipe.check_fast()
            elif self.args.fusion:
                self.pipe.check_task(self.args.task)
        return self.pipe


def one_line(source: Path, err: Exception) -> str:
    """'<input>: <reason>', whichever file the error named (the input, or an output that failed to write)."""
    text = " ".join(str(err).split())
    return text if text.startswith(str(source)) else f"{source}: {text}"


def make(pipe, task: Task, job: Job, settings: Settings, progress: bool) -> None:
    """Make a job's outputs, all or none: when one fails (a full disk, a file-size limit, a stream the container
    cannot hold), the outputs this attempt already wrote are removed, so no input is left half done."""
    before = {path: stamp(path) for path in job.outputs}
    try:
        MAKERS[task](pipe, job, settings, progress)
    except BaseException:
        for path, old in before.items():
            if stamp(path) != old:
                path.unlink(missing_ok=True)
        raise


def stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def remove_killed_temps(folders: set[Path]) -> None:
    """Remove the temps that killed runs left in `folders` beside outputs of these commands, for any input
    (`.<name>.<pid>-<random>.tmp<suffix>`, see avlink.files): a write removes those of its own name, but an
    input that was since moved away is never written again. The rule is `remove_stale_temps`'s: the writer's
    process is gone from this machine or the temp was not touched for an hour, so a running writer keeps its."""
    from avlink.files import remove_stale_temps

    for folder in folders:
        with suppress(OSError):
            names = {entry.name[1:].rpartition(".tmp")[0].rpartition(".")[0] for entry in folder.iterdir()
                     if entry.name.startswith(".") and ".tmp" in entry.name}
            for name in names:
                if name and is_own_output(Path(name)):
                    remove_stale_temps(folder / name)  # checks the exact temp pattern


def existing_outputs(job: Job) -> list[Path]:
    return [path for path in job.outputs if path.exists()]


def run_single(args: argparse.Namespace, settings: Settings) -> int:
    job = ranked_job(single_job(args.task, args.input, args.out), settings)
    taken = existing_outputs(job)
    if taken and not args.overwrite:
        names = " and ".join(str(path) for path in taken)
        raise UserError(f"{names}: {'exist' if len(taken) > 1 else 'exists'} (outputs of {args.input}); "
                        f"--overwrite replaces {'them' if len(taken) > 1 else 'it'}")
    remove_killed_temps({job.video.parent})
    pipe = LazyPipeline(args).get()
    make(pipe, args.task, job, settings, progress=sys.stderr.isatty())
    print(f"wrote {', '.join(str(path) for path in job.outputs)}")
    return 0


def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise UserError(f"{args.out}: is a file; with a folder or list of inputs, -o is a folder")
        args.out.mkdir(parents=True, exist_ok=True)
    inputs, bad = batch_inputs(args.task, args.input)
    jobs, clashes = batch_jobs(args.task, inputs, args.out)
    jobs = [ranked_job(job, settings) for job in jobs]
    bad += clashes
    remove_killed_temps({job.video.parent for job in jobs})
    pipe, written, skipped = LazyPipeline(args), 0, 0
    for job in tqdm(jobs, desc=f"avlink {args.task}", unit="file", disable=None):
        if job.done() and not args.overwrite:
            skipped += 1
            continue
        pipeline = pipe.get()  # outside the try: a checkpoint that does not load stops the batch
        try:
            make(pipeline, args.task, job, settings, progress=False)
        except UserError as err:
            bad.append(one_line(job.source, err))
            continue
        written += 1
    print(f"avlink {args.task}: {written} written, {skipped} already done, {len(bad)} left out")
    for line in bad:
        print(line, file=sys.stderr)
    return EXIT_BAD_INPUT if bad else 0


# --- command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One module serves both commands; the CLI names the parser after the command ("avlink v2a").
    task = parser.prog.split()[-1]
    assert task in MAKERS, f"generate serves v2a and a2v, not {parser.prog!r}"
    parser.set_defaults(task=task)
    kind = "a video" if task == "v2a" else "an audio"
    parser.add_argument("input", type=Path, metavar=kind.split()[-1].upper(),
                        help=f"{kind} file, a folder of them, or a list file (.txt: one path a line)")
    parser.add_argument("-p", "--prompt", help="text prompt (optional; guided by --cfg)")
    parser.add_argument("-o", "--out", type=Path,
                        help="output file or folder (default: next to the input; see the naming rule)")
    from avlink.pipeline import (
        CONTINUATIONS,
        DEFAULT_CONTINUATION,
        DEFAULT_STEPS,
        FAST_STEPS,
        GUIDANCE_WEIGHT,
        LINK_SCALE,
    )

    fast = f"; {FAST_STEPS} with --fast" if task == "v2a" else ""
    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {DEFAULT_STEPS}{fast})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, the same for every file (default 0)")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="classifier-free guidance scale for the prompt (default 1: none; without a prompt "
                             "there is nothing to guide and it is not run)")
    parser.add_argument("--link-cfg", type=float, default=None, metavar="S", dest="link_scale",
                        help=f"guidance scale on the input: the linked model against its generator alone, so the "
                             f"output follows the input more closely; each step runs the generator a second time "
                             f"unless S is 1 (default {LINK_SCALE[task]:g}" + (", 1 with --fast)" if task == "v2a"
                                                                              else ")"))
    parser.add_argument("--ckpt", type=Path, help="checkpoint folder (default: the shipped checkpoints/tiny)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--method", choices=tuple(SOLVERS), default="euler", help="ODE solver (default euler)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default) or bf16 autocast of the network (CUDA, or a CPU with bf16 matmul)")
    if task == "v2a":
        parser.add_argument("--vocoder", default="hifigan",
                            help="hifigan (universal, shipped), griffinlim, or a HiFi-GAN checkpoint path")
        parser.add_argument("--fast", action="store_true",
                            help=f"the checkpoint's fast set (fusion-fast.safetensors: no reinjection, the video "
                                 f"stream once per window) at {FAST_STEPS} steps unless --steps is given")
    else:
        parser.add_argument("--upscale", type=int, default=None,
                            help=f"nearest-neighbour upscaling of the written frames for viewing (default: to "
                                 f"{VIEW_SCALE}x the base frames' size)")
        parser.add_argument("--no-upsample", dest="upsample", action="store_false",
                            help="write the base model's frames even where the checkpoint has an upsampler")
        parser.add_argument("--upsample-steps", type=int, metavar="N",
                            help="Euler steps of the upsampler (default: its own, 16 for the presets)")
    parser.add_argument("--no-fusion", dest="fusion", action="store_false",
                        help="baseline: the frozen generator alone, ignoring the input")
    parser.add_argument("--candidates", type=int, default=1, metavar="N",
                        help="best-of-N: sample N candidates per window, keep the one whose timing agrees best "
                             "with the input (the checkpoint's learned sync scorer where it has one, else AV-Align); "
                             "their scores go to the mp4's name with .json (default 1)")
    parser.add_argument("--continuation", choices=CONTINUATIONS, default=None,
                        help="how each window of a long input continues the one before: replace (pin the "
                             "overlap) or guided (also steer the rest of the window to agree with it, "
                             "reconstruction guidance; about 2-3x the sampling time of every window after the first) "
                             f"(default {DEFAULT_CONTINUATION[task]})")
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help=f"weight of --continuation guided (default {GUIDANCE_WEIGHT[task]:g})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that exist (default: a batch skips such inputs, one file is refused)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    fast = getattr(args, "fast", False)
    if fast and not args.fusion:
        raise UserError("--fast and --no-fusion: the fast set is Fusion Blocks; the baseline has none")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    upscale = getattr(args, "upscale", 1)
    if upscale is not None and upscale < 1:
        raise UserError(f"--upscale must be at least 1, got {upscale}")
    upsample_steps = getattr(args, "upsample_steps", None)
    if upsample_steps is not None and upsample_steps < 1:
        raise UserError(f"--upsample-steps must be at least 1, got {upsample_steps}")
    if not math.isfinite(args.cfg):
        raise UserError(f"--cfg must be a number, got {args.cfg}")
    if args.link_scale is not None and not (math.isfinite(args.link_scale) and args.link_scale >= 0):
        raise UserError(f"--link-cfg must be a number >= 0, got {args.link_scale}")
    if args.link_scale is not None and not args.fusion:
        raise UserError("--link-cfg and --no-fusion: guidance on the input needs the Fusion Blocks")
    if args.candidates < 1:
        raise UserError(f"--candidates must be at least 1, got {args.candidates}")
    from avlink.pipeline import continuation_weight

    continuation_weight(args.task, args.continuation, args.guidance)  # refused before any input is read
    return Settings(prompt=args.prompt or None, steps=args.steps, seed=args.seed, cfg_scale=args.cfg,
                    method=args.method, fusion=args.fusion, upscale=upscale, fast=fast, candidates=args.candidates,
                    upsample=getattr(args, "upsample", True), upsample_steps=upsample_steps,
                    continuation=args.continuation, guidance=args.guidance, link_scale=args.link_scale)


def run(args: argparse.Namespace) -> int:
    from avlink.pipeline import check_precision

    settings = settings_from_args(args)
    check_precision(args.precision, args.device)  # before any input is read
    if not args.input.exists():
        raise UserError(f"{args.input}: no such file or folder")
    if is_batch(args.input):
        return run_batch(args, settings)
    return run_single(args, settings)
