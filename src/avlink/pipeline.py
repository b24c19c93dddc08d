"""Generation for users: a checkpoint folder loaded once, then V2A / A2V (or the frozen generators alone, the
no-fusion baseline) on whole videos and audio files of any length. `avlink v2a` / `a2v`, `avlink demo` and
`avlink app` all come through here, and here through `sample.py`.

Long inputs: the model sees one window of `clip.duration` seconds. A longer input is cut into windows that overlap
by at least a quarter of a window; each window after the first is generated with its overlap fixed to what the
window before generated (`sample.Known`: those tokens follow the straight path to the known values, so the model
continues them instead of starting afresh); V2A fixes the first half of the overlap only and cross-fades the two
windows' latents over the second (FADE_SHARE). The windows are written into one latent (V2A) or one frame sequence
(A2V), and the audio codec runs over it one window of tokens at a time with a context margin (codecs/audio.py), so
the sound has no seam of its own. Cost grows linearly with length: one window's sampling per hop. V2A takes its
frames as they decode (`stream_video`, `frame_windows`): it holds one window and a hop of frames, not the video. A
window starts its audio at a whole token, less than a token off its first frame (`plan_windows`); the offset goes
into the Fusion Blocks' alignment, which sees every token where it sits. A2V encodes each window's audio clip alone,
as training and evaluation encode each clip. Window i samples noise stream i of the seed (`sample.initial_noise`),
drawn apart from every other window's and stream's.

Continuation (`continuation=`, `--continuation`): "replace" pins the overlap alone (above); "guided" adds
reconstruction guidance of weight `guidance` (sample.constrain: the rest of the window is steered by the
gradient of the overlap's reconstruction error, so that the model's estimate of the whole window agrees with
what the window before made, not just the pinned part), for A2V over the first half of the flow only
(GUIDANCE_UNTIL), where the scene is decided, not where the cues are drawn. It costs a backward pass per guided
step on every window after the first. Defaults (DEFAULT_CONTINUATION, as measured): guided for A2V, whose
video otherwise drifts to another scene after a boundary, replace for V2A. A2V through a causal latent codec
(no pinned frames, below) has no overlap to guide with: there the default falls back to replace and an explicit
"guided" is refused.

Fast V2A (`fast=True`, `avlink v2a --fast`): the checkpoint's second V2A set, Fusion Blocks without symmetric
reinjection (checkpoint.py FAST_OVERRIDES, loaded by System.fast_link on the same frozen generators), and
FAST_STEPS sampling steps instead of DEFAULT_STEPS. Without reinjection the video stream never takes a fused
feature back, so `AVLink.prepare` runs it once per window and a step runs the audio stream and the Fusion Blocks
alone. Euler stays the solver: at 16 network evaluations midpoint and Heun (8 steps each) scored the same as 16
Euler steps within noise on an earlier tiny checkpoint (docs/performance.md: V2A onset accuracy 0.894 and 0.899
against Euler's 0.897), so a second-order solver buys nothing at this cost; --method still picks another.

`video_file_to_audio` is `avlink v2a` on one file (read, generate, mux), which `avlink bench --end-to-end` times.

Best-of-N (`candidates=N`): each window is sampled N times in one batch, candidate k from its own noise streams
(`sample.noise_generator`'s candidate k of the window; candidate 0 is the stream that N = 1 samples, so N = 1
is generation without best-of-N, bit for bit). Each candidate is decoded alone and scored against the window's
conditioning input, and only that (rank.py: by the checkpoint's learned sync scorer where it has one, by
AV-Align otherwise); the best is kept, and the next window continues from it. Cost: N
times the sampling, and a decode and a score per candidate and window.

Precision: "fp32" (the default) or "bf16", where the linked model's network evaluations run under
torch.autocast(bfloat16) with the fp32 weights. Only the sampling runs so; the solver's state stays fp32 (an
fp32 x plus a bf16 velocity step is fp32) and the VAE, the vocoder and the text encoder, which run once per
clip, stay fp32, so outputs are fp32 whatever the precision. bf16 is allowed on CUDA devices that support it
and on CPUs with native bf16 matrix products (`bf16_matmul`); elsewhere it is refused, not replaced by fp32:
a result labelled bf16 must have been made in bf16. fp16 is never used (DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avlink.backbones.protocol import TextCond
from avlink.codecs.pixels import frames_to_pixels, pixels_to_frames
from avlink.config import Task
from avlink.errors import UserError
from avlink.fusion.linked import AVLink
from avlink.rank import Ranking, best, score_name, sync_scores
from avlink.sample import Known, sample_backbone, sample_link, sample_upsampler
from avlink.seq import ClipGeometry
from avlink.system import FAST_FUSION, System, load_system
from avlink.upsampler import Upsampler, audio_envelope

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
DEFAULT_STEPS = 64
# The fast set at 8 Euler steps matched the full set at 64 on the shipped tiny checkpoint's test split (V2A onset
# accuracy 0.822 prompt-free, 0.842 with captions, against 0.793 and 0.839; README "Fast V2A"), and at 16 it did
# no better (0.832, 0.850): 8 is the cheapest setting measured that keeps alignment.
FAST_STEPS = 8
MIN_OVERLAP = 0.25  # of a window
CONTINUATIONS = ("replace", "guided")
# Measured on the shipped tiny checkpoint, 24 SyncBench test clips of 8 s (3 windows), 16 Euler steps (README
# "Long inputs: continuation"): guided A2V at w = 3 cut the video's seam ratio from 3.41 to 1.29 and raised event
# F1 from 0.720 to 0.746 (at 64 steps: 3.23 -> 1.24, F1 0.718 -> 0.752). Guided V2A lowered
# the audio's seam ratio (1.84 -> 1.76 at w = 3, 1.46 at 10, against the true clips' 1.17) at a cost in onset
# accuracy (0.728 -> 0.712, 0.723) and, at w = 10, event F1 (0.638 -> 0.595), so V2A keeps replacement.
DEFAULT_CONTINUATION: dict[Task, str] = {"v2a": "replace", "a2v": "guided"}
# w_r of reconstruction guidance (sample.constrain), and the last flow time at which it acts (sample.Known.until).
# Guided throughout, of w = 3, 10 and 30, w = 3 met the target (seam ratio <= 1.5) with the best event F1; w = 10
# smoothed seams further (0.93) at lower F1 (0.724), w = 30 broke timing (0.596). Guided throughout, A2V's later
# windows drew cues the sound does not have (precision 0.710 against 0.764 for the same clips' single windows, 72
# test clips of 8 s): the guidance kept steering the frames in the last steps, where the cues are drawn. Guided up
# to t = 0.5 only (the scene is decided early), A2V on 24 val clips of 8 s (README "Long inputs: continuation";
# event F1 / seam ratio): throughout at w = 3 0.745 / 1.20, up to 0.5 at w = 10 0.766 / 1.51, at w = 30 0.768 /
# 1.35, the one that meets the seam target; the stronger weight early keeps the scene that the late steps no
# longer hold to. The error is a sum over the overlap's elements (Ho et al.'s squared norm), so another preset's
# overlap size and latent scale may want another weight: these are measured on tiny alone. V2A keeps what it was
# measured with (it continues by replacement unless asked).
GUIDANCE_WEIGHT: dict[Task, float] = {"v2a": 3.0, "a2v": 30.0}
GUIDANCE_UNTIL: dict[Task, float] = {"v2a": 1.0, "a2v": 0.5}
# V2A sound across a boundary: a window pins the first (1 - FADE_SHARE) of its overlap to the window before and
# generates the rest of it freely; there the two windows' latents are cross-faded, linearly, before the codec
# decodes the whole. Pinning the whole overlap left the new window's free tokens starting next to pinned ones
# they did not quite continue, and the decoded sound had an onset there: on 24 test clips of 8 s, 12 of the 16
# onsets matching no true event fell within 1/3 s after an overlap's end. With the last half faded 1 of 6 did,
# and event F1 rose from 0.743 to 0.766 (onset AP 0.933 -> 0.971; 24 val clips of 8 s: 0.741 -> 0.789; README
# "Long inputs: continuation"). A2V keeps pinning whole overlaps: its false events did not gather at the
# boundaries, pinning half lowered its event F1 (0.753 -> 0.734), and frames cross-faded would show two scenes.
FADE_SHARE = 0.5
# Guidance on the input (sample.link_guidance): the scale of the linked model against its generator alone, per
# task. Measured on the shipped tiny checkpoint, 100 SyncBench test clips, 64 Euler steps (README "Guidance on the
# input"): prompt-free V2A onset accuracy 0.793 / 0.846 / 0.879 at 1 / 3 / 6 (class accuracy 0.30 / 0.43 / 0.50);
# prompt-free A2V event F1 0.766 / 0.813 at 1 / 3 (class accuracy 0.22 / 0.43). The fast V2A set keeps 1 unless
# asked (its point is speed, and its steps were chosen without guidance).
LINK_SCALE: dict[Task, float] = {"v2a": 6.0, "a2v": 3.0}
PRECISIONS = ("fp32", "bf16")
# cpuinfo's names (torch.cpu.get_capabilities) of native bf16 products: x86 AVX512-BF16 and AMX-BF16, Arm BF16.
CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def bf16_matmul(device: torch.device | str) -> bool:
    """Whether the device multiplies bf16 matrices natively.

    A CPU without such instructions still runs bf16 through oneDNN by converting every operand to fp32 (or a
    reference kernel): slower than fp32 and no more accurate, so it does not count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capabilities = torch.cpu.get_capabilities()
    return any(bool(capabilities.get(name, False)) for name in CPU_BF16_FEATURES)


def continuation_weight(task: Task, continuation: str | None = None, guidance: float | None = None) -> float:
    """The reconstruction-guidance weight that `sample.Known` takes for a continuation (None: the task's
    DEFAULT_CONTINUATION): 0 for "replace" (a weight is refused there), `guidance` (default the task's
    GUIDANCE_WEIGHT) for "guided"."""
    continuation = DEFAULT_CONTINUATION[task] if continuation is None else continuation
    if continuation not in CONTINUATIONS:
        raise UserError(f"--continuation {continuation}: choose one of {', '.join(CONTINUATIONS)}")
    if continuation == "replace":
        if guidance is not None:
            raise UserError("--guidance applies to --continuation guided only (the default for A2V)")
        return 0.0
    weight = GUIDANCE_WEIGHT[task] if guidance is None else guidance
    if not (math.isfinite(weight) and weight > 0):
        raise UserError(f"--guidance must be a positive number, got {weight}")
    return weight


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse, in one line, a precision this device cannot sample in (module docstring says why not fall back)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose {' or '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_matmul(device):
        kind = torch.device(device).type
        what = {"cpu": "this CPU has no bf16 matrix instructions (AVX512-BF16, AMX-BF16 or Arm BF16)",
                "cuda": "this CUDA device does not support bf16" if torch.cuda.is_available() else "no CUDA device"
                }.get(kind, f"not supported on {kind}")
        raise UserError(f"--precision bf16: {what}; use --precision fp32")


def sampling_precision(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context the network evaluations run in: autocast to bf16 (fp32 weights), or nothing for fp32."""
    check_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class Window:
    frame: int  # first video frame of the window
    token: int  # first audio latent token of the window
    offset: float = 0.0  # seconds from the first frame to the first audio token, less than a token either way


def plan_windows(total_frames: int, window_frames: int, total_tokens: int, window_tokens: int,
                 fps: float, eta_a: float) -> list[Window]:
    """Window starts covering [0, total_frames) frames and [0, total_tokens) audio tokens with at least
    MIN_OVERLAP overlap, the last one ending at the last frame.

    The hop (in frames) is the longest one that keeps the overlap and lands within a tenth of a token of a
    whole number of audio tokens, so that audio and video windows start at nearly the same instant; what is left
    (under half a token, or under one at the last window, which must reach the last token) is the window's
    offset, which the Fusion Blocks' alignment takes (`sample_link(audio_start=)`)."""
    if total_frames <= window_frames:
        return [Window(0, 0)]
    hop = window_hop(window_frames, fps, eta_a)
    starts = list(range(0, total_frames - window_frames, hop))
    last = window_at(total_frames - window_frames, fps, eta_a, least=total_tokens - window_tokens)
    return [window_at(frame, fps, eta_a) for frame in starts] + [last]


def window_at(frame: int, fps: float, eta_a: float, least: int = 0) -> Window:
    """The window whose video starts at `frame`: its audio starts at the nearest token, or at `least` if later (the
    last window ends at the input's last token), and the offset between the two."""
    token = max(round(frame / fps * eta_a), least)
    return Window(frame, token, token / eta_a - frame / fps)


def window_hop(window_frames: int, fps: float, eta_a: float) -> int:
    """Frames from one window's start to the next (plan_windows)."""
    longest = max(1, int(window_frames * (1 - MIN_OVERLAP)))
    return max(range(1, longest + 1), key=lambda h: (_misfit(h, fps, eta_a) < 0.1, h))


def _misfit(hop: int, fps: float, eta_a: float) -> float:
    tokens = hop / fps * eta_a
    return abs(tokens - round(tokens))


@dataclass(frozen=True)
class FrameWindow:
    frame: int  # first video frame of the window
    frames: np.ndarray  # (window_frames, H, W, 3) uint8
    total: int | None  # frames in the whole input, given with the last window (known once the input ends)


def frame_windows(frames: Iterable[np.ndarray], window_frames: int, hop: int) -> Iterator[FrameWindow]:
    """plan_windows' windows of a stream of frames, each cut as soon as it is known: a window is not the last
    once the frame after its end has come, and the last one ends where the frames end. At most window_frames +
    hop frames are held. A stream shorter than a window is one window that holds its last frame to the end."""
    held: list[np.ndarray] = []  # the frames from `first` on
    first = start = total = 0
    for frame in frames:
        held.append(frame)
        total += 1
        if total > start + window_frames:
            yield FrameWindow(start, np.stack(held[start - first:start - first + window_frames]), None)
            start += hop
            drop = min(start, total - window_frames) - first  # the last window may start before `start`
            del held[:drop]
            first += drop
    assert total > 0, "no frames"
    last = held[max(0, total - window_frames) - first:]
    last += [last[-1]] * (window_frames - len(last))
    yield FrameWindow(max(0, total - window_frames), np.stack(last), total)


class Pipeline:
    """A loaded system (system.py: the linked model, its codecs, a text encoder) used for generation: inputs of
    any length are cut into model windows here. Tests build a small random checkpoint with tests/helpers.py
    random_checkpoint."""

    def __init__(self, system: System, precision: str = "fp32"):
        check_precision(precision, system.device)
        self.system, self.precision = system, precision

    @classmethod
    def load(cls, ckpt: str | Path | None = None, device: str = "cpu", vocoder: str = "hifigan",
             precision: str = "fp32") -> Pipeline:
        check_precision(precision, device)  # before anything is read
        folder = Path(ckpt) if ckpt is not None else DEFAULT_CHECKPOINT
        hint = " (make them with `make checkpoints`)" if folder == DEFAULT_CHECKPOINT else ""
        return cls(load_system(folder, device, vocoder, hint), precision)

    @property
    def model(self) -> AVLink:
        return self.system.model

    @property
    def device(self) -> torch.device:
        return self.system.device

    @property
    def folder(self) -> Path | None:
        return self.system.folder

    def check_task(self, task: str) -> None:
        self.system.check_task(task)

    @property
    def has_fast(self) -> bool:
        """Whether the checkpoint folder holds a fast V2A set (fusion-fast.safetensors)."""
        return self.folder is not None and (self.folder / FAST_FUSION).is_file()

    def check_fast(self) -> None:
        """Load the fast V2A set now, or refuse in one line (the folder has none): before any input is read."""
        self.system.fast_link()

    # -- geometry -------------------------------------------------------------------------------------------
    @property
    def clip(self) -> ClipGeometry:
        return self.model.cfg.clip

    @property
    def fps(self) -> float:
        return self.clip.video.fps

    @property
    def size(self) -> tuple[int, int]:
        return self.clip.video.height, self.clip.video.width

    @property
    def sample_rate(self) -> int:
        return self.clip.audio.sample_rate

    @property
    def clip_seconds(self) -> float:
        return self.clip.num_frames / self.fps

    # -- media ----------------------------------------------------------------------------------------------
    def read_video(self, path: str | Path, max_seconds: float | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 frames of the whole file at the model's fps and size; max_seconds as in
        stream_video."""
        return np.stack(list(self.stream_video(path, max_seconds)))

    def stream_video(self, path: str | Path, max_seconds: float | None = None) -> Iterator[np.ndarray]:
        """read_video's frames one at a time as they decode (video_to_audio takes them so). max_seconds:
        decoding stops at the first frame past it and the file is refused, whatever its header says."""
        from avlink.data import media

        height, width = self.size
        limit = math.inf if max_seconds is None else math.ceil(max_seconds * self.fps - 1e-6)
        count = 0
        for frame in media.stream_video(path, self.fps, size=(width, height)):
            count += 1
            if count > limit:
                raise media.MediaError(f"{path}: longer than the {max_seconds:g} s limit (counted by decoding it)")
            yield frame
        if count == 0:
            raise media.MediaError(f"{path}: no video frames")

    def read_audio(self, path: str | Path, max_seconds: float | None = None) -> np.ndarray:
        """(N,) float32 mono samples of the whole file at the model's rate; max_seconds as in read_video."""
        from avlink.data import media

        limit = None if max_seconds is None else max_seconds + 0.05
        clip = media.read_audio(path, self.sample_rate, duration=limit)
        samples = clip.samples if clip.mask.all() else clip.samples[clip.mask]
        if samples.shape[0] < self.clip.audio.hop_length * self.clip.audio.latent_downsample:
            raise media.MediaError(f"{path}: audio too short")
        if max_seconds is not None and samples.shape[0] > round(max_seconds * self.sample_rate):
            raise media.MediaError(f"{path}: longer than the {max_seconds:g} s limit (counted by decoding it)")
        if not np.isfinite(samples).all():  # a float file can hold them; the model would spread them
            raise media.MediaError(f"{path}: audio contains NaN or infinite samples")
        return samples.astype(np.float32, copy=False)

    # -- text -----------------------------------------------------------------------------------------------
    def _text(self, prompt: str | None, modality: str, rows: int = 1) -> TextCond | None:
        """The prompt's text condition for a batch of `rows`; None without a prompt: the backbones take their
        learned null text then, and guidance, which compares the generated stream's prompt with the null text, is
        not run (it would compare the null text with itself: twice the network evaluations for the same
        velocity)."""
        return self.system.text(prompt, modality, rows) if prompt else None

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def video_to_audio(self, frames: Iterable[np.ndarray], *, prompt: str | None = None, steps: int | None = None,
                       seed: int = 0, cfg_scale: float = 1.0, method: str = "euler", fusion: bool = True,
                       fast: bool = False, progress: bool = False, candidates: int = 1,
                       ranking: list[Ranking] | None = None, continuation: str | None = None,
                       guidance: float | None = None, link_scale: float | None = None) -> np.ndarray:
        """frames (T, H, W, 3) uint8 at fps/size, an array or frames as they come (stream_video) -> (round(T / fps
        * sample_rate),) float32 wave in [-1, 1]. A stream is taken one window at a time (frame_windows).

        steps: None for DEFAULT_STEPS, or FAST_STEPS with fast. fast: the fast V2A set (module docstring).
        fusion=False: the frozen T2A generator alone with the same prompt, seed and length. candidates: best-of-N
        (module docstring); a `ranking` list receives each window's Ranking when N > 1. continuation and
        guidance: how a window continues the one before (module docstring, continuation_weight). link_scale:
        guidance on the input (sample.link_guidance; 1: none; None: LINK_SCALE, or 1 with fast)."""
        assert candidates >= 1, f"candidates must be >= 1, got {candidates}"
        weight = continuation_weight("v2a", continuation, guidance)
        if link_scale is None:
            link_scale = 1.0 if fast else LINK_SCALE["v2a"]
        if fast and not fusion:
            raise UserError("--fast and --no-fusion: the fast set is Fusion Blocks; the baseline has none")
        if steps is None:
            steps = FAST_STEPS if fast else DEFAULT_STEPS
        if fast:
            model = self.system.fast_link()
        elif fusion:
            self.check_task("v2a")
            model = self.model
        clip, audio = self.clip, self.clip.audio
        win_frames, win_tokens = clip.num_frames, clip.num_audio_tokens
        text_a, text_v = self._text(prompt, "audio", candidates), self._text(prompt, "video", candidates)
        latent = torch.zeros(1, 0, audio.latent_dim, device=self.device)  # grows with the windows
        done = torch.zeros(0, dtype=torch.bool, device=self.device)
        windows = frame_windows(frames, win_frames, window_hop(win_frames, self.fps, audio.eta))
        for i, w in enumerate(self._progress(windows, progress, "v2a windows")):
            assert w.frames.shape[1:] == (*self.size, 3) and w.frames.dtype == np.uint8, (
                f"frames must be uint8 (T, {self.size[0]}, {self.size[1]}, 3), got {w.frames.dtype} {w.frames.shape}")
            start = self._window_start(w)
            span = slice(start.token, start.token + win_tokens)
            if span.stop > latent.shape[1]:
                grow = span.stop - latent.shape[1]
                latent = torch.cat([latent, latent.new_zeros(1, grow, audio.latent_dim)], 1)
                done = torch.cat([done, done.new_zeros(grow)])
            overlap = int(done[span].sum())  # the window's first tokens, made by the window before
            fade = int(overlap * FADE_SHARE)
            pinned = done[span].clone()
            pinned[overlap - fade:overlap] = False
            before = latent[:, span].clone()
            known = Known(before, pinned[None, :, None], weight, GUIDANCE_UNTIL["v2a"]) if pinned.any() else None
            x_cond = self.system.encode("video", w.frames)  # (1, C, T, H, W)
            with sampling_precision(self.precision, self.device):  # z: (N, Ta, Da), one row per candidate
                if fusion:
                    z = sample_link(model, "v2a", _repeat(x_cond, candidates), text_gen=text_a,
                                    text_cond=text_v, steps=steps, method=method, cfg_scale=cfg_scale, seed=seed,
                                    window=i, audio_start=start.offset, known=known, rows="candidates",
                                    link_scale=link_scale)
                else:
                    z = sample_backbone(self.model.audio, (candidates, win_tokens, audio.latent_dim), text=text_a,
                                        steps=steps, method=method, cfg_scale=cfg_scale, seed=seed, window=i,
                                        known=known, rows="candidates")
            if candidates > 1:
                # each candidate's window alone, one at a time: Griffin-Lim draws its first phase per batch row,
                # so only a candidate decoded on its own is scored as it will sound
                waves = [self.system.decode("audio", z[k:k + 1].float())[0] for k in range(candidates)]
                kept = self._keep_best("v2a", i, w.frames, waves, start.offset, ranking)
                z = z[kept:kept + 1]
            latent[:, span] = cross_fade(before, z.float(), overlap - fade, overlap)
            done[span] = True
        n_samples = round(w.total / self.fps * self.sample_rate)
        wave = self.system.decode("audio", latent)[0]
        wave = wave[:n_samples] if wave.shape[0] >= n_samples else np.pad(wave, (0, n_samples - wave.shape[0]))
        return np.clip(wave, -1.0, 1.0, out=wave)

    def video_file_to_audio(self, source: str | Path, video_out: str | Path, wave_out: str | Path,
                            **options) -> None:
        """`avlink v2a` on one file (generate.py says what is written): the video read as it decodes, sound
        generated for all of it (video_to_audio's options), cut to the video stream's duration, muxed into a copy
        of the file (video_out) and written alone as a wav (wave_out)."""
        from avlink.data import media

        seconds = media.video_duration(source)  # before generating: a file without a video stream fails now
        frames = self.stream_video(source)  # T frames as they decode, at the model's fps and size; T / fps >= seconds
        wave = self.video_to_audio(frames, **options)  # (round(T / fps * sample_rate),)
        wave = fit_length(wave, round(seconds * self.sample_rate))
        media.mux_audio(source, wave, self.sample_rate, video_out)
        media.write_audio(wave_out, wave, self.sample_rate)

    def _window_start(self, w: FrameWindow) -> Window:
        """plan_windows' window of a window of frames: before the last one it depends on its first frame alone,
        not on frames still to come; the last one reaches the input's last audio token."""
        clip, audio = self.clip, self.clip.audio
        if w.total is None:
            return window_at(w.frame, self.fps, audio.eta)
        total_tokens = max(audio.num_tokens(max(w.total, clip.num_frames) / self.fps), clip.num_audio_tokens)
        return window_at(w.frame, self.fps, audio.eta, least=total_tokens - clip.num_audio_tokens)

    @torch.no_grad()
    def audio_to_video(self, wave: np.ndarray, *, prompt: str | None = None, steps: int | None = None,
                       seed: int = 0, cfg_scale: float = 1.0, method: str = "euler", fusion: bool = True,
                       progress: bool = False, candidates: int = 1,
                       ranking: list[Ranking] | None = None, continuation: str | None = None,
                       guidance: float | None = None, link_scale: float | None = None) -> np.ndarray:
        """wave (N,) float32 mono at sample_rate -> (round(N / sample_rate * fps), H, W, 3) uint8 frames.

        steps: None for DEFAULT_STEPS. fusion=False: the frozen T2V generator alone with the same prompt, seed
        and length. candidates, ranking, continuation, guidance and link_scale: as video_to_audio's."""
        assert candidates >= 1, f"candidates must be >= 1, got {candidates}"
        weight = continuation_weight("a2v", continuation, guidance)
        link_scale = LINK_SCALE["a2v"] if link_scale is None else link_scale
        steps = DEFAULT_STEPS if steps is None else steps
        if fusion:
            self.check_task("a2v")
        assert wave.ndim == 1, f"wave must be mono (N,), got {wave.shape}"
        clip, audio, v = self.clip, self.clip.audio, self.clip.video
        n_frames = max(1, round(wave.shape[0] / self.sample_rate * self.fps))
        win_frames, win_tokens = clip.num_frames, clip.num_audio_tokens
        frames_used = max(n_frames, win_frames)
        seconds = frames_used / self.fps
        total_tokens = max(audio.num_tokens(seconds), win_tokens)
        windows = plan_windows(frames_used, win_frames, total_tokens, win_tokens, self.fps, audio.eta)
        text_a, text_v = self._text(prompt, "audio", candidates), self._text(prompt, "video", candidates)
        # A codec that keeps frames (pixels) lets each window continue the last: the overlap's frames are pinned
        # (Known) in the flow's space and all is decoded at the end. A causal latent codec (Wan's VAE: one latent
        # frame per 4 frames, the first alone) has no latent frame of its own for a window's overlap, so there each
        # window is sampled alone, decoded, and its frames fill what the windows before left.
        per_frame = v.codec_stride[0] == 1
        if weight and not per_frame and continuation is None:
            weight = 0.0  # the default, where there is no overlap to guide: windows sampled alone (below)
        elif weight and not per_frame:
            raise UserError("--continuation guided: this checkpoint's video codec is causal (no frame of its own "
                            "for a window's overlap), so A2V windows are sampled alone; use replace")
        channels, _, height, width = v.flow_shape(win_frames) if per_frame else (v.channels, 0, v.height, v.width)
        video = torch.zeros(1, channels, frames_used, height, width, device=self.device)
        done = torch.zeros(frames_used, dtype=torch.bool, device=self.device)
        for i, w in enumerate(self._progress(windows, progress, "a2v windows")):
            span = slice(w.frame, w.frame + win_frames)
            pinned = per_frame and bool(done[span].any())
            known = (Known(video[:, :, span], done[span][None, None, :, None, None], weight, GUIDANCE_UNTIL["a2v"])
                     if pinned else None)
            sound = self.window_wave(wave, w)
            x_cond = self.system.encode("audio", sound, win_tokens) if fusion else None
            with sampling_precision(self.precision, self.device):  # x: (N, C, T, H, W), one row per candidate
                if fusion:
                    x = sample_link(self.model, "a2v", _repeat(x_cond, candidates), text_gen=text_v,
                                    text_cond=text_a, steps=steps, method=method, cfg_scale=cfg_scale, seed=seed,
                                    window=i, audio_start=w.offset, known=known, rows="candidates",
                                    link_scale=link_scale)
                else:
                    x = sample_backbone(self.model.video, (candidates, *v.flow_shape(win_frames)), text=text_v,
                                        steps=steps, method=method, cfg_scale=cfg_scale, seed=seed, window=i,
                                        known=known, rows="candidates")
            pixels = None if per_frame else self.system.codec("video").decode(x.float())[:, :, :win_frames]
            if candidates > 1:
                shown = (self.system.decode("video", x[:, :, :win_frames]) if per_frame
                         else pixels_to_frames(pixels.clamp(-1, 1)).cpu().numpy())  # (N, T, H, W, 3)
                kept = self._keep_best("a2v", i, sound, shown, w.offset, ranking)
                x, pixels = x[kept:kept + 1], None if per_frame else pixels[kept:kept + 1]
            if per_frame:
                video[:, :, span] = x[:, :, :win_frames].float()
            else:  # pixels: (1, 3, T, H, W)
                new = ~done[span]
                video[:, :, span][:, :, new] = pixels[:, :, new.cpu()].to(video)
            done[span] = True
        if per_frame:
            return self.system.decode("video", video[:, :, :n_frames])[0]
        return pixels_to_frames(video[:, :, :n_frames].clamp(-1, 1)).cpu().numpy()[0]

    def _keep_best(self, task: Task, window: int, conditioning: np.ndarray, candidates: Sequence[np.ndarray],
                   audio_start: float, ranking: list[Ranking] | None) -> int:
        """Which of a window's decoded candidates to keep: scored against the window's conditioning input alone
        (rank.py), the ranking recorded where the caller asked for it."""
        scorer = self.system.sync
        scores = sync_scores(task, conditioning, list(candidates), self.fps, self.sample_rate, audio_start, scorer)
        kept = best(scores)
        if ranking is not None:
            ranking.append(Ranking(window, tuple(scores), kept, score_name(scorer)))
        return kept

    # -- the second video stage -----------------------------------------------------------------------------
    @property
    def upsampler(self) -> Upsampler | None:
        """The checkpoint's video upsampler (system.UPSAMPLER_FILE), None where the folder has none."""
        return self.system.upsampler

    @property
    def upsampled_fps(self) -> float:
        assert self.upsampler is not None, f"{self.folder}: no upsampler"
        return self.fps * self.upsampler.cfg.scale[0]

    def upsample(self, frames: np.ndarray, wave: np.ndarray | None = None, *, steps: int | None = None,
                 seed: int = 0, method: str = "euler", progress: bool = False) -> np.ndarray:
        """Base frames (T, H, W, 3) uint8 at fps and size -> (T * st, H * ss, W * ss, 3) uint8 through the
        checkpoint's upsampler (sample.sample_upsampler), conditioned on the sound's envelope at the output rate
        (wave (N,) at sample_rate, from the first frame; None: silence). The chunks of `upsampled`, joined."""
        return np.concatenate(list(self.upsampled(frames, wave, steps=steps, seed=seed, method=method,
                                                  progress=progress)))

    def upsampled_shape(self, frames: np.ndarray) -> tuple[int, int, int, int]:
        """The shape of `upsample(frames)`."""
        assert self.upsampler is not None, f"{self.folder}: no upsampler"
        st, ss = self.upsampler.cfg.scale
        return frames.shape[0] * st, frames.shape[1] * ss, frames.shape[2] * ss, 3

    @torch.no_grad()
    def upsampled(self, frames: np.ndarray, wave: np.ndarray | None = None, *, steps: int | None = None,
                  seed: int = 0, method: str = "euler", progress: bool = False) -> Iterator[np.ndarray]:
        """`upsample` one chunk at a time, for a writer that takes them as they come (media.FrameChunks).

        Chunks of the model window's base frames, each sampled with `upsample_margin` base frames of the clip on
        either side as context that it then drops, so memory follows the chunk, not the clip (one pass over
        10 min of tiny A2V peaked at 4.85 GiB). The margin is the network's reach in time, so a chunk sees all
        the frames that one pass would let reach its output; what still differs from one pass is the
        GroupNorm statistics, taken over the chunk and its margins rather than the whole clip: nearer training,
        which normalises over crops of `UpsamplerConfig.crop` frames. A clip of one window is one chunk."""
        up = self.upsampler
        assert up is not None, f"{self.folder}: no upsampler"
        st = up.cfg.scale[0]
        total = frames.shape[0]
        envelope = None
        if wave is not None and up.cfg.audio:
            wave_t = torch.as_tensor(np.asarray(wave, dtype=np.float32))[None]
            envelope = audio_envelope(wave_t, self.sample_rate, self.upsampled_fps, total * st)
        chunk, margin = self.clip.num_frames, upsample_margin(up)
        starts = list(range(0, total, chunk))
        for i, start in enumerate(self._progress(starts, progress, "upsample")):
            stop, lo = min(start + chunk, total), max(0, start - margin)
            hi = min(total, stop + margin)
            low = frames_to_pixels(torch.as_tensor(frames[lo:hi])[None]).to(self.device)
            env = None if envelope is None else envelope[..., lo * st:hi * st].to(self.device)
            with sampling_precision(self.precision, self.device):
                x = sample_upsampler(up, low, env, steps=steps, method=method, seed=seed, window=i,
                                     progress=progress and len(starts) == 1)
            kept = x[:, :, (start - lo) * st:(stop - lo) * st].clamp(-1, 1)
            yield pixels_to_frames(kept).cpu().numpy()[0]

    def window_wave(self, wave: np.ndarray, w: Window) -> np.ndarray:
        """The clip of wave that a window conditions on, encoded alone as training encodes each clip: the clip's
        samples from the window's first audio token on, silence past the wave's end (as a short clip is padded)."""
        audio, n = self.clip.audio, self.clip.num_samples
        first = w.token * audio.hop_length * audio.latent_downsample  # the token's time, in samples
        part = wave[first:first + n]
        return np.pad(part, (0, n - part.shape[0]))

    @staticmethod
    def _progress(windows: Iterable, enabled: bool, desc: str):
        if not enabled or (isinstance(windows, list) and len(windows) == 1):
            return windows
        from tqdm.auto import tqdm

        return tqdm(windows, desc=desc, unit="window")


def upsample_margin(up: Upsampler) -> int:
    """Base frames on either side of an upsampling chunk that can reach its output: each residual block's two
    3x3x3 convolutions reach one packed block each (the in and out projections are 1x1x1); with the base frames
    inside the blocks (cycle spinning, upsampler.py) a block spans two base intervals, and an interval's
    interpolated frames read the base frames at both its ends: two more."""
    return 2 * up.cfg.depth + 2


def cross_fade(before: torch.Tensor, after: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Latents (1, T, D) of one span from two windows -> `after`, with tokens [start, stop) blended linearly from
    `before` to `after` (weights (k + 1) / (n + 1) of `after`, so neither end is one window alone) and tokens
    before `start` taken from `before`."""
    out = after.clone()
    out[:, :start] = before[:, :start]
    n = stop - start
    if n > 0:
        share = torch.arange(1, n + 1, dtype=after.dtype, device=after.device)[None, :, None] / (n + 1)
        out[:, start:stop] = (1 - share) * before[:, start:stop] + share * after[:, start:stop]
    return out


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad a wave to exactly `length` samples."""
    return np.pad(wave, (0, max(0, length - wave.shape[0])))[:length]


def _repeat(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A batch of one (1, ...) as `rows` rows of the same values (the condition of every candidate)."""
    assert x.shape[0] == 1, f"one condition expected, got a batch of {x.shape[0]}"
    return x.expand(rows, *x.shape[1:])


def windows_for(seconds: float, pipeline: Pipeline) -> int:
    """How many model windows a clip of `seconds` takes (for progress and cost estimates)."""
    clip = pipeline.clip
    frames = max(clip.num_frames, math.ceil(seconds * pipeline.fps))
    return len(plan_windows(frames, clip.num_frames, clip.audio.num_tokens(frames / pipeline.fps),
                            clip.num_audio_tokens, pipeline.fps, clip.audio.eta))

