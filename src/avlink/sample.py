"""Sampling: the one inference path that the commands, the evaluator and the app call.

Conditions are prepared once (`AVLink.prepare`, and the prompts' keys and values: `prepare_text`); the solver
then asks for the velocity at every step. cache=False is the plain reference that recomputes all of it at every
step: the same numbers within fp32 rounding (the tests hold the two together), for measuring what the cache saves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from avlink.backbones.dit import DiT
from avlink.backbones.protocol import PreparedText, TextCond, prepare_text
from avlink.config import Task
from avlink.flow.guidance import classifier_free_guidance
from avlink.flow.path import interpolate
from avlink.flow.solvers import Velocity, solve
from avlink.fusion.linked import AVLink, Condition
from avlink.seq import matching_audio_tokens, matching_frames
from avlink.upsampler import Upsampler, flow_start, silence


def generated_shape(model: AVLink, task: Task, x_cond: Tensor) -> tuple[int, ...]:
    """Shape of the generated modality that covers the same seconds as the conditioning one."""
    clip = model.cfg.clip
    if task == "v2a":
        assert x_cond.ndim == 5, f"V2A conditions on video (B, C, T, H, W), got {tuple(x_cond.shape)}"
        tokens = matching_audio_tokens(clip.audio, clip.video, clip.video.frames_of(x_cond.shape[2]))
        return (x_cond.shape[0], tokens, clip.audio.latent_dim)
    assert x_cond.ndim == 3, f"A2V conditions on an audio latent (B, Ta, Da), got {tuple(x_cond.shape)}"
    frames = matching_frames(clip.audio, clip.video, x_cond.shape[1])
    return (x_cond.shape[0], *clip.video.flow_shape(frames))


@dataclass
class Known:
    """Part of the generated sample fixed in advance (windowed generation: the overlap with the window before).

    values has the sample's shape; mask is True where values hold. On the straight path from the initial noise
    x0 to x1 such a part moves with velocity values - x0, so every solver step keeps it at
    x0 + t * (values - x0), the noise level of the rest, and the model sees a consistent sample (replacement).

    guidance > 0 adds reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", Sec. 3.1) for the rest:
    replacement alone pins the overlap, but the model's estimate of the unknown part is not told that it must
    agree with it, so a new window can drift to another scene right after the overlap. `constrain` then steers
    the unknown part with the gradient of the known part's reconstruction error (see there); guidance = 0 is
    replacement exactly. `until`: the guidance acts while the flow time t <= until and replacement alone after
    (1: throughout), so that it settles what is decided early (the scene) and leaves the last steps, where
    details are decided, to the model (pipeline.GUIDANCE_UNTIL)."""

    values: Tensor
    mask: Tensor  # bool, broadcastable to values
    guidance: float = 0.0  # w_r of Ho et al.; 0: replacement alone
    until: float = 1.0  # the last flow time at which the guidance acts


def constrain(velocity: Velocity, x0: Tensor, known: Known | None) -> Velocity:
    """velocity with the known part held (Known). With known.guidance = w > 0, at every evaluation the clean
    estimate x1_hat = x_t + (1 - t) v(x_t, t) (t = 1 is data, flow/path.py) is compared with the known values,
    err = sum over the known positions of (x1_hat - values)^2, and the unknown positions get

        v - w * t / (2 * (1 - t)) * d err / d x_t.

    That is Ho et al.'s guided estimate x1_hat - (w * alpha_t / 2) * grad, with alpha_t = t the signal scale of
    x_t on this path, written as the velocity that reaches it: v = (x1_hat - x_t) / (1 - t). The weight is 0 at
    pure noise (t = 0, nothing to agree with yet); near t = 1 it grows as 1 / (1 - t), but there the gradient at
    an unknown position comes only through (1 - t) * dv/dx_t, so the step stays bounded. The samplers run under
    no_grad: the one gradient is taken here with grad enabled locally (one backward pass per evaluation, about
    three times a plain step's cost)."""
    if known is None:
        return velocity
    fixed = (known.values - x0).to(x0.dtype)
    mask = known.mask.to(x0.device)
    if known.guidance < 0:
        raise ValueError(f"guidance weight must be >= 0, got {known.guidance}")
    if known.guidance == 0:
        def constrained(x: Tensor, t: Tensor) -> Tensor:
            return torch.where(mask, fixed, velocity(x, t))

        return constrained
    values, weight = known.values.to(x0.device), known.guidance

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if bool((t > known.until).all()):  # past the guided interval: replacement alone, no gradient
            return torch.where(mask, fixed, velocity(x, t))
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            v = velocity(x_in, t)
            tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            x1_hat = x_in + (1 - tt) * v
            err = torch.where(mask, x1_hat.float() - values.float(), 0.0).square().sum()
            (grad,) = torch.autograd.grad(err, x_in)
        # (1 - t) floored: Heun's last evaluation sits at t = 1, where x1_hat = x_t and the gradient at an unknown
        # position is 0; the floor keeps that 0 * inf from becoming nan.
        scale = weight * tt / (2 * (1 - tt).clamp(min=1e-3))
        return torch.where(mask, fixed, v.detach() - scale * grad.to(v.dtype))

    return guided


# "upsampled": the upsampler's initial noise, a stream of its own so that it never repeats the base model's.
Stream = Literal["generated", "conditioning", "upsampled"]
STREAMS: tuple[Stream, ...] = ("generated", "conditioning", "upsampled")
Rows = Literal["clips", "candidates"]  # what the rows of a batch are: clips, or candidates of one clip (best-of-N)


def noise_generator(seed: int, clip: int = 0, window: int = 0, stream: Stream = "generated",
                    candidate: int = 0) -> np.random.Generator:
    """The noise of one (clip, window, stream) of a run seeded `seed`, as its own generator.

    numpy's SeedSequence hashes the seed and the spawn key (clip, window, stream) into a 128-bit PCG64 state, so
    no two tuples share a stream, not even shifted (seeds seed + 1 and seed + start did that: clip i's conditioning
    noise was clip i + 1's initial noise). Clips, windows and the two streams draw independent noise.
    candidate: best-of-N (pipeline.py) samples candidate k > 0 from the key (clip, window, stream, k), a key of
    another length, which no three-part key hashes like; candidate 0 keeps the three-part key, so one candidate
    is the sample without best-of-N."""
    assert clip >= 0 and window >= 0 and candidate >= 0, f"clip {clip}, window {window}, candidate {candidate} < 0"
    spawn = (clip, window, STREAMS.index(stream)) + ((candidate,) if candidate else ())
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed % 2**64, spawn_key=spawn)))


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu", *, clip: int = 0,
                  window: int = 0, stream: Stream = "generated", rows: Rows = "clips") -> Tensor:
    """x0 ~ N(0, I) of shape (B, ...), reproducible whatever the device: row b is clip `clip + b`'s own stream
    (`noise_generator`), so a clip's noise does not depend on the batch it is sampled in; rows="candidates":
    row b is candidate b of clip `clip`."""
    def generator(b: int) -> np.random.Generator:
        if rows == "candidates":
            return noise_generator(seed, clip, window, stream, candidate=b)
        return noise_generator(seed, clip + b, window, stream)

    noise = [generator(b).standard_normal(shape[1:], dtype=np.float32) for b in range(shape[0])]
    return torch.from_numpy(np.stack(noise) if noise else np.zeros(shape, np.float32)).reshape(shape).to(device)


@torch.no_grad()
def sample_link(
    model: AVLink, task: Task, x_cond: Tensor, *, text_gen: TextCond | None = None,
    text_cond: TextCond | None = None, steps: int = 64, method: str = "euler", cfg_scale: float = 1.0,
    link_scale: float = 1.0, t_cond: float | None = None, seed: int = 0, clip: int = 0, window: int = 0,
    audio_start: float = 0.0, progress: bool = False, known: Known | None = None, cache: bool = True,
    rows: Rows = "clips",
) -> Tensor:
    """Generate the other modality for x_cond (V2A: video (B, C, T, H, W) in [-1, 1]; A2V: latent (B, Ta, Da)).

    cfg_scale guides on the generated stream's prompt: it needs text_gen, and compares it with the null text.
    link_scale guides on the conditioning input (`link_guidance`): the linked model against its generator alone.
    Noise: row b's conditioning and initial noise are streams (seed, clip + b, window) of `initial_noise`, or
    with rows="candidates" candidate b's streams of (seed, clip, window).
    audio_start: seconds from the video's first frame to the audio's first token (a window of a long input,
    pipeline.plan_windows), which the Fusion Blocks' alignment takes. cache=False: the plain path (module docstring).
    """
    device = x_cond.device
    cond_noise = initial_noise(tuple(x_cond.shape), seed, device, clip=clip, window=window, stream="conditioning",
                               rows=rows)
    cond = model.prepare(task, x_cond, text_gen, text_cond, t_cond=t_cond, noise=cond_noise, cache=cache,
                         audio_start=audio_start)
    x0 = initial_noise(generated_shape(model, task, x_cond), seed, device, clip=clip, window=window, rows=rows)
    if cfg_scale != 1.0 and text_gen is not None:
        gen_bb, _ = model.backbones(task)
        uncond = model.with_gen_text(cond, gen_bb.null_text_cond(x_cond.shape[0]))
        velocity = classifier_free_guidance(model, cfg_scale, {"cond": cond}, {"cond": uncond})
    else:
        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return model(x, t, cond)
    velocity = link_guidance(model, cond, velocity, link_scale)
    return solve(constrain(velocity, x0, known), x0, steps=steps, method=method, progress=progress)


def link_guidance(model: AVLink, cond: Condition, linked: Velocity, scale: float) -> Velocity:
    """Guidance on the conditioning input: v = v_alone + scale * (v_linked - v_alone), where v_alone is the
    generated stream's frozen generator without the Fusion Blocks, under the same prompt. The linked model
    estimates the flow of p(x | input), the frozen generator that of p(x), so scale > 1 samples nearer
    p(x | input) p(input | x)^(scale - 1): classifier-free guidance whose unconditional branch needs no
    training, since the generator alone is that model (MMAudio's guidance likewise drops the video's features
    with the prompt: get_empty_conditions in its mmaudio/model/networks.py). With cfg_scale as well, `linked` is
    the prompt-guided velocity. 1: none; each guided step runs the generator a second time. 0: the generator
    alone, and the linked model, whose term has weight 0, is not run."""
    if scale == 1.0:
        return linked
    gen_bb, _ = model.backbones(cond.task)
    if scale == 0.0:
        return lambda x, t: gen_bb(x, t, cond.text_gen)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_alone = gen_bb(x, t, cond.text_gen)
        return v_alone + scale * (linked(x, t) - v_alone)

    return guided


@torch.no_grad()
def sample_backbone(
    backbone: DiT, shape: tuple[int, ...], *, text: TextCond | None = None, steps: int = 64,
    method: str = "euler", cfg_scale: float = 1.0, seed: int = 0, clip: int = 0, window: int = 0,
    progress: bool = False, known: Known | None = None, cache: bool = True, rows: Rows = "clips",
) -> Tensor:
    """A generator alone (T2A / T2V): noise of `shape` to data, row b's from stream (seed, clip + b, window) of
    `initial_noise` (rows as sample_link's). cache=False: the plain path (module docstring)."""
    b = shape[0]
    x0 = initial_noise(shape, seed, next(backbone.parameters()).device, clip=clip, window=window, rows=rows)

    def once(prompt: TextCond | None) -> TextCond | PreparedText | None:
        return prepare_text(backbone, prompt, b) if cache else prompt

    if cfg_scale != 1.0 and text is not None:
        velocity = classifier_free_guidance(
            backbone, cfg_scale, {"text": once(text)}, {"text": once(backbone.null_text_cond(b))})
    else:
        prepared = once(text)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return backbone(x, t, prepared)
    return solve(constrain(velocity, x0, known), x0, steps=steps, method=method, progress=progress)


@torch.no_grad()
def sample_upsampler(
    upsampler: Upsampler, low: Tensor, envelope: Tensor | None = None, *, steps: int | None = None,
    method: str = "euler", cond_t: float | None = None, seed: int = 0, clip: int = 0, window: int = 0,
    progress: bool = False, cond_scale: float | None = None,
) -> Tensor:
    """Base frames low (B, C, T, H, W) in [-1, 1] -> the upsampled clip (B, C, T * st, H * ss, W * ss), fp32.
    The base frames are noised to cond_t (default the config's, what training saw near its top) with the
    conditioning stream's noise, and the flow starts from them interpolated plus the "upsampled" stream's noise
    (`initial_noise`, upsampler.flow_start), so a clip's result depends on (seed, clip, window) alone. envelope
    (B, 2, T * st): upsampler.audio_envelope of the sound (None: silence), guided on with scale cond_scale
    (default the config's audio_guidance; 1: none, one network evaluation per step instead of two). The network
    is convolutional: the whole clip, of any length, in one piece."""
    cfg = upsampler.cfg
    st, ss = cfg.scale
    b, c, t, h, w = low.shape
    device = low.device
    level = torch.full((b,), cfg.cond_t if cond_t is None else cond_t, device=device)
    noise = initial_noise(tuple(low.shape), seed, device, clip=clip, window=window, stream="conditioning")
    cond = interpolate(noise, low.float(), level)
    noise = None if cfg.start_noise == 0 else initial_noise((b, c, t * st, h * ss, w * ss), seed, device,
                                                            clip=clip, window=window, stream="upsampled")
    x0 = flow_start(cond, cfg.scale, noise, cfg.start_noise)
    scale = cfg.audio_guidance if cond_scale is None else cond_scale
    heard = {"low": cond, "cond_t": level, "envelope": envelope}
    if envelope is None or not cfg.audio:
        scale, silent = 1.0, heard  # no sound to guide on
    else:  # guidance on the sound (UpsamplerConfig.audio_guidance) against silence, both in one batch
        silent = {**heard, "envelope": silence(b, envelope.shape[-1], device)}
    velocity = classifier_free_guidance(upsampler, scale, heard, silent)
    return solve(velocity, x0, steps=steps or cfg.steps, method=method, progress=progress).float()


def sample_batches(
    model: AVLink, task: Task, x_conds: Sequence[Tensor], *, batch: int, seed: int = 0, first: int = 0,
    text: TextCond | None = None, alone: bool = False,
    autocast: Callable[[], AbstractContextManager] = nullcontext, **options: Any,
) -> Iterator[tuple[int, Tensor]]:
    """Many clips, `batch` at a time, as the evaluation samples them: yields (start, x) with x (B, ...) in fp32 for
    clips start .. start + B - 1 of x_conds ((1, ...) each, one shape).

    Clip i's noise is its own (`initial_noise`'s streams of clip first + i), so a clip's sample depends neither
    on the batch size (beyond the rounding of batched products) nor on anything else that runs; `first` numbers
    x_conds[0] in a run cut into parts. text holds every clip's prompt (each batch takes its rows) and serves both
    streams. alone: the generated stream's generator alone (T2A / T2V; x_cond only sets the shape), the baseline
    of the scorecard.
    autocast: the context of the network evaluations (pipeline.sampling_precision). options: steps, method,
    cfg_scale, and t_cond for the linked model."""
    assert batch > 0, f"batch must be > 0, got {batch}"
    for start in range(0, len(x_conds), batch):
        x_cond = torch.cat(list(x_conds[start:start + batch]))
        rows = None if text is None else text.rows(start, x_cond.shape[0])
        with autocast():
            if alone:
                x = sample_backbone(model.backbones(task)[0], generated_shape(model, task, x_cond), text=rows,
                                    seed=seed, clip=first + start, **options)
            else:
                x = sample_link(model, task, x_cond, text_gen=rows, text_cond=rows, seed=seed, clip=first + start,
                                **options)
        yield start, x.float()
