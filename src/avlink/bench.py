"""`avlink bench`: how fast the linked model samples and trains on this machine, against the matmul peak
measured in the same run.

    avlink bench [--presets tiny small paper] [--tasks v2a a2v] [--device cpu|cuda] [--precision fp32|bf16]
                 [--batch N] [--steps 64] [--repeats 3] [--out bench.json] [--max-batch-search]
                 [--time-budget SECONDS] [--windows 1 2 4] [--windows-presets tiny]

What is measured, per preset and task (models of random weights; text states are random tokens of the
preset's text width, `--text-tokens` of them, so no text encoder runs; guidance scale 1, one network
evaluation per step):
- prepare: `AVLink.prepare`, once per clip (the conditioning stream up to the first fusion point, both
  prompts' projections and text keys and values);
- step: one velocity evaluation, `AVLink.forward` with the prepared condition (batch 1);
- step (plain): the same velocity from `AVLink.prepare(..., cache=False)`, which recomputes at every step what
  prepare caches. It is timed in alternation with the cached step (pairs back to back, `measure_pair`), and
  its row holds the measured speed-up of the cache (the median over the pairs of plain / cached) beside the one
  the skipped FLOPs predict (`LinkFlops.step_uncached / step`) and their ratio (measured / predicted);
- prepare, step and step (plain) again "(static)": the same weights with no reinjection (fusion.injection
  static), where the whole conditioning stream runs once per clip;
- clip: a whole clip of `--steps` Euler steps through `sample.sample_link`, the path every command uses
  (batch 1), timed once after the step timings warmed everything up; it should take prepare + steps x step;
- upsample (A2V, presets with an upsampler): the video upsampler on one clip of base frames at its own Euler
  steps (`sample.sample_upsampler`), and its time as a ratio to the base A2V clip above;
- train: one fusion training step as the training loop takes it: loss, backward, gradient clipping, AdamW
  update of the task's fusion set, at `--batch` clips; with `--max-batch-search` (CUDA) at batch 1, 2, 4, ...
  until the device runs out of memory, `--max-batch` or `--time-budget`.
- windows (presets in `--windows-presets`, V2A): `Pipeline.video_to_audio` (no prompt, no guidance) on
  random frames of 1x and each `--windows` multiple of the clip length, `--steps` steps per window, from a
  random checkpoint folder written to a temporary directory (Griffin-Lim vocoder, the pipeline's default
  precision), timed like the rest (the warm-up calls at 1x only): seconds, windows (`pipeline.plan_windows`),
  seconds per window and per second of video, and the ratios to 1x. VAE decoding and the vocoder are
  included. Windows overlap, so a long video costs one window per hop: linear in its length, at a slope a
  little above 1x's cost per second.
On a CPU the paper preset gets prepare, one step and one training step at batch 1, each timed once: a whole
clip at that size is not a CPU job.

`avlink bench --end-to-end [--presets small] [--seconds 8] [--peer PATH]`: speed where users feel it. Per preset
(default small), `avlink v2a` on a synthetic --seconds video (a SyncBench clip, 256x144 at 24 fps, H.264), from
the file to the muxed mp4 and the wav (`Pipeline.video_file_to_audio`, the command's own per-file path: decoding
and resizing the frames, every window's sampling, VAE decoding, the vocoder, muxing), no prompt, in two
settings: default (the full Fusion Blocks, --steps Euler steps) and fast (`--fast`: the no-reinjection set,
--fast-steps, default pipeline.FAST_STEPS). The checkpoint folder is written with random weights (both fusion
sets); the vocoder is `avlink v2a`'s default, the universal HiFi-GAN, where it fits the preset's mel analysis, and
elsewhere a HiFi-GAN V1 of random weights built for that analysis (same network, upsampling by the preset's hop);
--vocoder picks another as `avlink v2a --vocoder` does.
Loading is not timed; before the timed clips each setting runs once, untimed, on one window at one step (warms
up the kernels and loads the fast set) unless --warmup 0. --repeats (default 1 here) clips are timed per setting.

`--peer PATH` adds a row measured in the same run: MMAudio's network (Cheng et al., CVPR 2025; the MMAudio-S
configuration, `--peer-model small_16k`) from a checkout of its public code at PATH, which the bench imports
(`mmaudio.model.networks.get_my_mmaudio`; the checkout's own requirements, einops among them, must be installed,
else one line says what failed), builds with random weights (nothing is downloaded) at its 8 s sequence lengths
and samples as its own `eval_utils.generate` does: `preprocess_conditions` and `get_empty_conditions` once, then
--peer-steps (25) Euler steps of `ode_wrapper` with guidance --peer-cfg (4.5), two network evaluations per step,
on random features of the shapes it expects. The peer row is its network alone (no CLIP / Synchformer features,
no VAE decoding, no vocoder, no file), so it favours the peer; without --peer there is no such row.

Timing: `--warmup` untimed calls, then the median of `--repeats` timed calls, the device synchronised after
each. bf16 runs under torch.autocast with fp32 weights, as training does. Peak memory is the high-water mark
over the timed calls, weights and runtime included: on CUDA `torch.cuda.max_memory_allocated` after resetting
it; on a Linux CPU the process's peak resident set (VmHWM), reset before each measurement through
/proc/self/clear_refs; where that is refused, ru_maxrss, the process's peak since it started (the JSON says
which). The matmul peak is the median time of an n x n x n product (`--matmul-size`: 2048 on CPU, 8192 on
CUDA) in fp32 and in bf16; utilisation is achieved FLOP/s over the peak of the run's precision.

Analytic FLOPs (`link_flops`), counted from the model's shapes for one clip (all scale with the batch):
- Only matrix products count, 2 FLOPs per multiply-add. A linear layer on R rows: 2 R d_in d_out. Attention
  of Nq queries over Nk keys at width D (all heads): 2 Nq Nk D for the scores and as much for the weighted
  sum. Norms, RoPE, activations, softmax, modulation and the optimiser's update are elementwise: left out.
- A DiT block over N tokens, L text tokens, width D, MLP width H = mlp_ratio D: adaLN 2 D 6D (once per
  forward, not per token); self-attention 2 N D 3D + 4 N^2 D + 2 N D D; text cross-attention 2 N D D +
  4 N L D + 2 N D D, and its text keys and values 2 L D 2D; MLP 2 N D H + 2 N H D. Embedding: token
  projection, timestep MLP (256 -> D -> D). Text: projection (Dt -> D -> D on L tokens). Head: adaLN 2 D 2D
  and the output projection.
- A Fusion Block over Na audio and Nv video tokens at width Df (MLP width Hf): per stream the projection in
  (d -> Df), adaLN (Df -> 5 Df + d) and the MLP (Df -> Hf -> d); one joint self-attention over Na + Nv
  tokens. A fusion set's two flow-time embedders (256 -> Df -> Df) run once per forward.
- One sampling step (`AVLink.forward`) runs the generated stream's embedding, all its blocks and its head, the
  conditioning stream's blocks from the first to the last fusion point, and every fusion block. Once per
  clip, in `prepare`: the conditioning stream's embedding and its blocks before the first fusion point, and
  both prompts: each one's projection and the text keys and values of every block that runs (the generated
  stream's blocks, the conditioning stream's up to the last fusion point); the blocks then take those keys and
  values. With no reinjection ("static", `LinkFlops` of a config with that injection) the conditioning
  stream's blocks up to the last fusion point all run in `prepare`. A clip of S steps is prepare + S step;
  without the cache every step would pay prepare too (`LinkFlops.step_uncached`, the plain path's step).
- A training step is prepare + one forward + its backward. Backward counts the products autograd needs, no
  more: for Y = X W, dX = dY W^T (as much as the forward) when X depends on a trainable weight, and
  dW = X^T dY (as much again) when W is trainable; attention likewise per operand (scores: dQ, dK; weighted
  sum: dP, dV). So a trainable fusion block costs 2x its forward in backward, except the first block's input
  projections (1x: their inputs come from frozen blocks that need no gradient) and the last block's
  conditioning-stream MLP (nothing: its output reaches no loss); with no reinjection every block's
  conditioning-stream input projection is 1x and its MLP has no backward. A frozen block on a path to the
  loss (the generated stream after the first fusion point, the conditioning stream between fusion points,
  which with no reinjection is none) costs 1x for its projections (activation gradients only), 2x for its
  self-attention core, 1x for its text cross-attention core, nothing for its adaLN and text keys and values.
  Nothing before the first fusion point has a backward. (Training prepares no prompts: their projections and
  keys and values run inside its forward, with no backward, so the total is the same.)
  Recomputation (activation checkpointing, fused attention kernels that recompute the scores) is not counted:
  these are model FLOPs, the usual basis of utilisation. Under PyTorch's math attention backend,
  `torch.utils.flop_counter.FlopCounterMode` counts the same numbers (the tests check that).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avlink.backbones.protocol import TextCond
from avlink.config import PRESETS, DiTConfig, FusionConfig, ModelConfig, Task, get_preset
from avlink.errors import UserError
from avlink.fusion.linked import TASKS, AVLink, fusion_points
from avlink.params import count
from avlink.sample import generated_shape, initial_noise, sample_link, sample_upsampler
from avlink.system import build_model
from avlink.train.loop import autocast
from avlink.upsampler import ENVELOPE_CHANNELS, Upsampler

TIMESTEP_FEATURES = 256  # the sinusoid width of nn.layers.TimestepEmbedder


# --- analytic FLOPs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    forward: int
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, k: int) -> Flops:
        return Flops(self.forward * k, self.backward * k)

    def no_backward(self) -> Flops:
        return Flops(self.forward)


def linear(rows: int, d_in: int, d_out: int, *, weight_grad: bool = False, input_grad: bool = False) -> Flops:
    """A linear layer on `rows` rows; backward: dW if the weight trains, dX if the input needs a gradient."""
    f = 2 * rows * d_in * d_out
    return Flops(f, f * (int(weight_grad) + int(input_grad)))


def attention(n_q: int, n_k: int, dim: int, *, q_grad: bool, kv_grad: bool) -> Flops:
    """Scores and weighted sum of n_q queries over n_k keys at width dim (all heads together)."""
    half = 2 * n_q * n_k * dim
    scores = half * (int(q_grad) + int(kv_grad))  # dQ, dK
    weighted = half * (int(q_grad or kv_grad) + int(kv_grad))  # dP (the scores depend on Q, K), dV
    return Flops(2 * half, scores + weighted)


def dit_embed(cfg: DiTConfig, token_dim: int, n: int) -> Flops:
    """Token projection and timestep MLP: frozen, on inputs that never need a gradient."""
    d = cfg.dim
    return linear(n, token_dim, d) + linear(1, TIMESTEP_FEATURES, d) + linear(1, d, d)


def dit_text(cfg: DiTConfig, text_tokens: int, blocks: int) -> Flops:
    """A prompt for `blocks` blocks: its projection (Dt -> D -> D) and each block's text keys and values. Frozen
    weights on a frozen encoder's states: never a gradient."""
    d = cfg.dim
    projection = linear(text_tokens, cfg.text_dim, d) + linear(text_tokens, d, d)
    return projection + linear(text_tokens, d, 2 * d) * blocks


def dit_block(cfg: DiTConfig, n: int, text_tokens: int, grad: bool = False, text_kv: bool = True) -> Flops:
    """One frozen DiT block; grad: its input depends on trainable weights (it sits after a fusion point);
    text_kv: it projects its own text keys and values (False: they were prepared once per clip, `dit_text`)."""
    d, h = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    keys_values = linear(text_tokens, d, 2 * d) if text_kv else Flops(0)  # no gradient either way
    return (
        linear(1, d, 6 * d)  # adaLN from the backbone's own timestep embedding: no gradient needed
        + linear(n, d, 3 * d, input_grad=grad) + attention(n, n, d, q_grad=grad, kv_grad=grad)
        + linear(n, d, d, input_grad=grad)
        + linear(n, d, d, input_grad=grad) + keys_values
        + attention(n, text_tokens, d, q_grad=grad, kv_grad=False) + linear(n, d, d, input_grad=grad)
        + linear(n, d, h, input_grad=grad) + linear(n, h, d, input_grad=grad)
    )


def dit_head(cfg: DiTConfig, token_dim: int, n: int, grad: bool = False) -> Flops:
    return linear(1, cfg.dim, 2 * cfg.dim) + linear(n, cfg.dim, token_dim, input_grad=grad)


def fusion_conditioning(cfg: FusionConfig) -> Flops:
    """The two flow-time embedders of a fusion set (trainable; the sinusoid needs no gradient)."""
    d = cfg.dim
    first = linear(1, TIMESTEP_FEATURES, d, weight_grad=True)
    return (first + linear(1, d, d, weight_grad=True, input_grad=True)) * 2


def fusion_block(
    cfg: FusionConfig, n_a: int, n_v: int, dim_a: int, dim_v: int, *, inputs_grad: tuple[bool, bool],
    used: tuple[bool, bool] = (True, True),
) -> Flops:
    """One trainable Fusion Block. inputs_grad: whether its (audio, video) input depends on trainable weights
    (neither for the first block; never the conditioning stream's without reinjection); used: whether the
    (audio, video) output reaches the loss (a stream's MLP is built only then, fusion/block.py FusionStream)."""
    d, h = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    n = n_a + n_v
    both = {"weight_grad": True, "input_grad": True}
    total = linear(n, d, 3 * d, **both) + attention(n, n, d, q_grad=True, kv_grad=True)
    total += linear(n, d, d, **both)
    streams = ((n_a, dim_a, inputs_grad[0], used[0]), (n_v, dim_v, inputs_grad[1], used[1]))
    for tokens, width, input_grad, reaches_loss in streams:
        total += linear(tokens, width, d, weight_grad=True, input_grad=input_grad)
        if not reaches_loss:  # only the attention input's shift and scale
            total += linear(1, d, 2 * d, **both)
            continue
        total += linear(1, d, 5 * d + width, **both)
        total += linear(tokens, d, h, **both) + linear(tokens, h, width, **both)
    return total


@dataclass(frozen=True)
class LinkFlops:
    """Analytic FLOPs of one task for one clip (batch 1)."""

    prepare: int  # once per clip: the conditioning stream's embedding and blocks before the first fusion point
    #                (no reinjection: before the last), both prompts' projections and text keys and values
    step: int  # one velocity evaluation with the prepared condition
    train: Flops  # prepare + forward, and backward, of one training clip

    def clip(self, steps: int) -> int:
        return self.prepare + steps * self.step

    @property
    def step_uncached(self) -> int:
        """A step of the plain path, which recomputes what `prepare` caches: every step pays prepare too."""
        return self.prepare + self.step

    @property
    def predicted_speedup(self) -> float:
        """What the cache saves per step, as the ratio the skipped FLOPs predict."""
        return self.step_uncached / self.step


def link_flops(cfg: ModelConfig, task: Task, text_tokens: int) -> LinkFlops:
    """Walk the fusion points as `AVLink.prepare` and `AVLink.forward` do, counting (module docstring).
    Injection "fusion" (symmetric reinjection) or "static" (none)."""
    if cfg.fusion.injection not in ("fusion", "static"):
        raise ValueError(f"FLOPs are counted for injection 'fusion' and 'static' only, not {cfg.fusion.injection!r}")
    reinject = cfg.fusion.injection == "fusion"
    clip, fcfg, L = cfg.clip, cfg.fusion, text_tokens
    n_a, n_v = clip.num_audio_tokens, clip.num_video_tokens
    streams = {"a": (cfg.audio, clip.audio.latent_dim, n_a), "v": (cfg.video, clip.video.patch_dim, n_v)}
    gen = "a" if task == "v2a" else "v"
    (g_cfg, g_tok, g_n), (c_cfg, c_tok, c_n) = streams[gen], streams["v" if gen == "a" else "a"]
    points = fusion_points(fcfg, cfg.audio.depth, cfg.video.depth)  # (audio block, video block)
    points = points if task == "v2a" else [(v, a) for a, v in points]  # (generated, conditioning)
    first, last = points[0][1], points[-1][1]

    cached_blocks = first if reinject else last  # conditioning blocks that run once per clip
    prepare = (dit_embed(c_cfg, c_tok, c_n) + dit_text(c_cfg, L, last) + dit_text(g_cfg, L, g_cfg.depth)
               + dit_block(c_cfg, c_n, L, text_kv=False) * cached_blocks)
    fwd = dit_embed(g_cfg, g_tok, g_n) + fusion_conditioning(fcfg)
    g_at, c_at = 0, first
    for i, (g_point, c_point) in enumerate(points):
        grad = i > 0  # before the first fusion block nothing depends on a trainable weight
        fwd += dit_block(g_cfg, g_n, L, grad, text_kv=False) * (g_point - g_at)
        if reinject:
            fwd += dit_block(c_cfg, c_n, L, grad, text_kv=False) * (c_point - c_at)
        # The conditioning stream's fused output runs no further after the last point, nor ever without
        # reinjection; its next input then comes from the cached, frozen stream.
        cond_used = reinject and i < len(points) - 1
        used = (True, cond_used) if gen == "a" else (cond_used, True)
        inputs_grad = (grad, grad and reinject) if gen == "a" else (grad and reinject, grad)
        fwd += fusion_block(fcfg, n_a, n_v, cfg.audio.dim, cfg.video.dim, inputs_grad=inputs_grad, used=used)
        g_at, c_at = g_point, c_point
    fwd += dit_block(g_cfg, g_n, L, True, text_kv=False) * (g_cfg.depth - g_at) + dit_head(g_cfg, g_tok, g_n, True)
    return LinkFlops(prepare=prepare.forward, step=fwd.forward, train=prepare.no_backward() + fwd)


# --- measuring ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak memory over a measurement (module docstring says what each device reports)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated, reset before each measurement"
        elif self._reset_rss():
            self.method = "peak resident set of the process (VmHWM), reset before each measurement"
        else:
            self.method = "ru_maxrss: the process's peak resident set since it started (never reset)"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_rss()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method.startswith("peak resident"):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        import resource  # Unix only

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB elsewhere


@dataclass
class Timing:
    times: list[float]
    peak_bytes: int

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def measure(fn: Callable[[], Any], device: torch.device, memory: Memory, warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()
    synchronize(device)
    memory.reset()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times, memory.peak_bytes())


def measure_pair(
    first: Callable[[], Any], second: Callable[[], Any], device: torch.device, memory: Memory, warmup: int,
    repeats: int,
) -> tuple[Timing, Timing, float]:
    """Two calls timed in alternation, `repeats` pairs after `warmup` pairs: (first, second, median of the
    per-pair ratios second / first). A ratio of neighbours in time does not drift with the machine's speed
    (other load, clocks) the way two medians taken minutes apart can."""
    for _ in range(warmup):
        first(), second()
    synchronize(device)
    memory.reset()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    peak = memory.peak_bytes()
    ratio = statistics.median(b / a for a, b in zip(*times, strict=True))
    return Timing(times[0], peak), Timing(times[1], peak), ratio


def matmul_peak(
    size: int, dtype: torch.dtype, device: torch.device, memory: Memory, repeats: int,
) -> dict[str, Any]:
    """FLOP/s of one size x size x size product, median of `repeats` after two warm-ups."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    timing = measure(lambda: a @ b, device, memory, warmup=2, repeats=repeats)
    flops = 2 * size**3
    return {"size": size, "seconds": timing.seconds, "times": timing.times, "flops": flops,
            "flops_per_s": flops / timing.seconds}


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


# --- what one preset runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    warmup: int
    repeats: int
    clip: bool  # time a whole clip of `steps` steps
    train_batch: int


def plan_for(name: str, device: torch.device, args: argparse.Namespace) -> Plan:
    if name == "paper" and device.type == "cpu":  # one of each, at batch 1
        return Plan(warmup=0, repeats=1, clip=False, train_batch=1)
    batch = args.batch if args.batch is not None else (4 if device.type == "cpu" else 1)
    return Plan(warmup=args.warmup, repeats=args.repeats, clip=True, train_batch=batch)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight matrix drawn afresh on the model's device, so that no zero-initialised layer is left (a
    product with zeros can run faster than one with real data); biases and norm scales stay as built."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)


def build_random(cfg: ModelConfig, device: torch.device) -> AVLink:
    model = build_model(cfg, device)
    randomize(model)
    return model


def with_injection(model: AVLink, injection: str) -> AVLink:
    """The same weights linked with another injection ("fusion" and "static" share every parameter)."""
    tasks = tuple(k for k in model.fusion if k != "joint") or TASKS
    # built on the meta device: its own parameters are replaced at once, never allocated
    other = build_model(model.cfg.override(**{"fusion.injection": injection}), "meta", tasks)
    other.audio, other.video, other.fusion = model.audio, model.video, model.fusion
    return other.eval()


def speedups(measured: float, flops: LinkFlops) -> dict[str, float]:
    """The cache's speed-up per step, measured (plain / cached time) and predicted by the skipped FLOPs."""
    return {"speedup_measured": measured, "speedup_predicted": flops.predicted_speedup,
            "speedup_ratio": measured / flops.predicted_speedup}


# The VAE of a random checkpoint: the width and depth of the shipped tiny one, so decoding costs what it does.
RANDOM_VAE = {"hidden": 128, "depth": 2}


def write_random_checkpoint(cfg: ModelConfig, folder: Path, fast: bool = False) -> Path:
    """A complete checkpoint folder of random weights (linked model and audio VAE), for timing generation; fast:
    with a fast V2A set (checkpoint.FAST_FUSION) of random weights too."""
    from safetensors.torch import save_file

    from avlink.checkpoint import FAST_OVERRIDES, save_fast_fusion, save_link
    from avlink.codecs.vae import AudioVAE

    model = build_random(cfg, torch.device("cpu"))
    save_link(folder, model)
    if fast:
        static = AVLink(cfg.override(**FAST_OVERRIDES), model.audio, model.video, tasks=("v2a",))
        randomize(static.fusion, seed=1)
        save_fast_fusion(folder, static.fusion.state_dict(), {"part": "fusion", "task": "v2a", "weights": "random"})
    torch.manual_seed(0)
    vae = AudioVAE(cfg.clip.audio, **RANDOM_VAE)
    save_file(vae.state_dict(), str(folder / "vae.safetensors"),
              metadata={k: str(v) for k, v in RANDOM_VAE.items()})
    return folder


def v2a_windows(pipe: Any, total_frames: int) -> list[Any]:
    """The windows `Pipeline.video_to_audio` samples for a video of total_frames frames."""
    from avlink.pipeline import plan_windows

    clip = pipe.clip
    frames = max(total_frames, clip.num_frames)  # a short video is held on its last frame to one window
    tokens = max(clip.audio.num_tokens(frames / pipe.fps), clip.num_audio_tokens)
    return plan_windows(frames, clip.num_frames, tokens, clip.num_audio_tokens, pipe.fps, clip.audio.eta)


@dataclass
class Inputs:
    audio: torch.Tensor  # (B, Ta, Da) latent
    video: torch.Tensor  # (B, C, T, H, W) in [-1, 1]
    text_a: TextCond
    text_v: TextCond

    def for_task(self, task: Task) -> tuple[torch.Tensor, TextCond, TextCond]:
        """(x_cond, text_gen, text_cond)."""
        if task == "v2a":
            return self.video, self.text_a, self.text_v
        return self.audio, self.text_v, self.text_a


def random_inputs(
    cfg: ModelConfig, batch: int, text_tokens: int, device: torch.device, seed: int = 0,
) -> Inputs:
    g = torch.Generator().manual_seed(seed)

    def text(width: int) -> TextCond:
        tokens = torch.randn(batch, text_tokens, width, generator=g)
        return TextCond(tokens.to(device), torch.ones(batch, text_tokens, dtype=torch.bool, device=device))

    audio = torch.randn(batch, *cfg.clip.latent_shape, generator=g)
    video = torch.rand(batch, *cfg.clip.video_shape, generator=g) * 2 - 1
    return Inputs(audio.to(device), video.to(device), text(cfg.audio.text_dim), text(cfg.video.text_dim))


class Deadline:
    def __init__(self, budget: float | None):
        self.start = time.perf_counter()
        self.budget = budget

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - (time.perf_counter() - self.start)


class Bench:
    """Runs the measurements, keeps every result, and rewrites the JSON after each one."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.memory = Memory(device)
        self.deadline = Deadline(args.time_budget)
        self.out = Path(args.out)
        self.result: dict[str, Any] = {
            "machine": machine(device),
            "settings": {k: getattr(args, k) for k in (
                "presets", "tasks", "precision", "batch", "steps", "repeats", "warmup", "text_tokens",
                "matmul_size", "max_batch_search", "max_batch", "time_budget", "windows", "windows_presets",
                "end_to_end", "seconds", "vocoder", "fast_steps", "peer", "peer_model", "peer_steps", "peer_cfg")},
            "memory_method": self.memory.method,
            "peak": {},
            "presets": {},
            "rows": [],
        }

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        os.replace(tmp, self.out)

    @property
    def peak_flops(self) -> float | None:
        peak = self.result["peak"].get(self.args.precision)
        return peak["flops_per_s"] if peak else None

    def row(self, preset: str, task: str, what: str, batch: int, timing: Timing, flops: int | None,
            **extra: Any) -> dict[str, Any]:
        """flops None: a measurement that is more than the model (windowed generation decodes and vocodes)."""
        achieved = None if flops is None else flops / timing.seconds
        peak = self.peak_flops
        row = {"preset": preset, "task": task, "what": what, "batch": batch, "seconds": timing.seconds,
               "times": timing.times, "flops": flops, "flops_per_s": achieved,
               "utilisation": achieved / peak if peak and achieved is not None else None,
               "peak_bytes": timing.peak_bytes, **extra}
        self.result["rows"].append(row)
        self.save()
        return row

    def note(self, preset: str, task: str, what: str, batch: int, key: str, text: str) -> None:
        """A measurement that gave no time: key "skipped" (time budget, out of memory) or "error"."""
        self.result["rows"].append({"preset": preset, "task": task, "what": what, "batch": batch, key: text})
        self.save()

    def timed(self, fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
        return measure(fn, self.device, self.memory, warmup, repeats)

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.args.end_to_end:  # files in, files out: no matmul peak, no FLOPs
            # The peer first: a checkout that does not import is refused before anything is timed.
            peer = None if self.args.peer is None else load_peer(Path(self.args.peer), self.args.peer_model)
            for name in self.args.presets:
                self.end_to_end(name)
            if peer is not None:
                self.peer(*peer)
            return self.result
        size = self.args.matmul_size
        repeats = max(5, self.args.repeats)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            self.result["peak"][precision] = matmul_peak(size, dtype, self.device, self.memory, repeats)
            self.save()
        for name in self.args.presets:
            self.preset(name)
        return self.result

    def preset(self, name: str) -> None:
        cfg = get_preset(name)
        plan = plan_for(name, self.device, self.args)
        flops = {task: link_flops(cfg, task, self.args.text_tokens) for task in self.args.tasks}
        static_cfg = cfg.override(**{"fusion.injection": "static"})
        static = {task: link_flops(static_cfg, task, self.args.text_tokens) for task in self.args.tasks}
        self.result["presets"][name] = {
            "tokens": {"audio": cfg.clip.num_audio_tokens, "video": cfg.clip.num_video_tokens,
                       "text": self.args.text_tokens},
            "plan": asdict(plan) | {"steps": self.args.steps},
            "flops": {task: self._flops_entry(f) | {"train_forward": f.train.forward,
                                                    "train_backward": f.train.backward}
                      for task, f in flops.items()},
            # No reinjection (fusion.injection static): the whole conditioning stream once per clip.
            "flops_static": {task: self._flops_entry(f) for task, f in static.items()},
        }
        model = self.guarded(name, "-", "build", 0, 0.0, lambda: build_random(cfg, self.device))
        if model is None:
            return
        self.result["presets"][name]["params"] = {"total": count(model), "trainable": count(model, True)}
        self.save()
        try:
            for task in self.args.tasks:
                self.sampling(name, model, task, flops[task], plan)
                self.static_sampling(name, model, task, static[task], plan)
                if self.args.max_batch_search:
                    self.batch_search(name, model, task, flops[task], plan)
                else:
                    self.training(name, model, task, flops[task], plan)
        finally:
            del model
            release(self.device)
        if name in self.args.windows_presets and self.args.windows:
            self.windowed(name, cfg, plan)

    def _flops_entry(self, f: LinkFlops) -> dict[str, Any]:
        return {"prepare": f.prepare, "step": f.step, "step_uncached": f.step_uncached,
                "predicted_speedup": f.predicted_speedup, "clip": f.clip(self.args.steps)}

    def guarded(self, preset: str, task: str, what: str, batch: int, predicted_s: float,
                fn: Callable[[], Any]) -> Any:
        """fn(), unless the time budget would be overrun; a failure (out of memory too) is recorded, not
        raised, so that one failed measurement loses none of the others."""
        if predicted_s > self.deadline.left() or self.deadline.left() <= 0:
            self.note(preset, task, what, batch, "skipped", "time budget")
            return None
        try:
            return fn()
        except Exception as err:  # recorded in the JSON and the table; the exit status says so
            text = describe(err)
        release(self.device)  # (the failed call's tensors are free only once the exception is gone)
        self.note(preset, task, what, batch, "error", text)
        return None

    def autocast(self) -> Any:
        return autocast(self.args.precision, self.device)

    def sampling(self, name: str, model: AVLink, task: Task, flops: LinkFlops, plan: Plan) -> None:
        """prepare, step, the plain step and a whole clip."""
        measured = self.prepare_and_step(name, model, task, flops, plan, variant=None)
        if measured is None or not plan.clip:
            return
        prep, step_t, (x_cond, text_gen, text_cond) = measured
        steps = self.args.steps

        def clip() -> Any:
            with self.autocast():
                return sample_link(model, task, x_cond, text_gen=text_gen, text_cond=text_cond, steps=steps)

        expected = prep.seconds + steps * step_t.seconds
        clip_t = self.guarded(name, task, "clip", 1, expected, lambda: self.timed(clip, 0, 1))
        if clip_t is not None:
            self.row(name, task, "clip", 1, clip_t, flops.clip(steps), steps=steps, expected_seconds=expected,
                     ratio_to_expected=clip_t.seconds / expected)
            if task == "a2v" and model.cfg.upsampler is not None:
                self.upsampling(name, model.cfg, clip_t)

    def upsampling(self, name: str, cfg: ModelConfig, base: Timing) -> None:
        """Row "upsample": the video upsampler (random weights) on one clip of base frames at its default Euler
        steps, `sample.sample_upsampler` as `avlink a2v` runs it, beside the base A2V clip just timed (its
        ratio_to_base_clip: what the second stage adds to sampling, the base model's decoding aside)."""
        up = Upsampler(cfg.upsampler, cfg.clip.video)
        randomize(up)
        up = up.to(self.device).eval()
        video, (st, _) = cfg.clip.video, cfg.upsampler.scale
        gen = torch.Generator().manual_seed(0)
        low = (torch.rand(1, video.channels, cfg.clip.num_frames, video.height, video.width, generator=gen) * 2 - 1)
        env = torch.rand(1, ENVELOPE_CHANNELS, cfg.clip.num_frames * st, generator=gen) * 2 - 1
        low, env = low.to(self.device), env.to(self.device)

        def clip() -> Any:
            with torch.no_grad(), self.autocast():
                return sample_upsampler(up, low, env)

        timing = self.guarded(name, "a2v", "upsample", 1, base.seconds, lambda: self.timed(clip, 1, 1))
        if timing is not None:
            self.row(name, "a2v", "upsample", 1, timing, None, steps=cfg.upsampler.steps,
                     params=count(up), ratio_to_base_clip=timing.seconds / base.seconds)

    def static_sampling(self, name: str, model: AVLink, task: Task, flops: LinkFlops, plan: Plan) -> None:
        """prepare, step and the plain step with no reinjection, on the same weights."""
        self.prepare_and_step(name, with_injection(model, "static"), task, flops, plan, variant="static")

    def prepare_and_step(self, name: str, model: AVLink, task: Task, flops: LinkFlops, plan: Plan,
                         variant: str | None) -> tuple[Timing, Timing, tuple] | None:
        """Rows "prepare", "step" and "step (plain)" (with the variant in the brackets: "step (static, plain)").
        Returns the prepare and step timings and the inputs, or None when a measurement gave no time."""
        def what(row: str) -> str:
            return row if variant is None else f"{row} ({variant})"

        model.eval()
        inputs = random_inputs(model.cfg, 1, self.args.text_tokens, self.device)
        x_cond, text_gen, text_cond = inputs.for_task(task)

        def prepare() -> Any:
            with torch.no_grad(), self.autocast():
                return model.prepare(task, x_cond, text_gen, text_cond)

        prep = self.guarded(name, task, what("prepare"), 1, 0.0,
                            lambda: self.timed(prepare, plan.warmup, plan.repeats))
        if prep is None:
            return None
        self.row(name, task, what("prepare"), 1, prep, flops.prepare)
        cond = prepare()
        x = initial_noise(generated_shape(model, task, x_cond), 0, self.device)
        t = torch.full((1,), 0.5, device=self.device)

        def step() -> Any:
            with torch.no_grad(), self.autocast():
                return model(x, t, cond)

        step_t = self.guarded(name, task, what("step"), 1, 0.0, lambda: self.timed(step, plan.warmup, plan.repeats))
        if step_t is None:
            return None
        # Random weights could overflow in a deep stack, and non-finite arithmetic can run at another speed.
        self.row(name, task, what("step"), 1, step_t, flops.step, finite=bool(torch.isfinite(step()).all()))
        plain = "step (plain)" if variant is None else f"step ({variant}, plain)"
        self.plain_step(name, model, task, plain, step, step_t, flops, plan)
        return prep, step_t, (x_cond, text_gen, text_cond)

    def plain_step(self, name: str, model: AVLink, task: Task, what: str, cached_step: Callable[[], Any],
                   cached: Timing, flops: LinkFlops, plan: Plan) -> None:
        """The plain path's step (`prepare(..., cache=False)`: everything recomputed) on the same inputs as the
        cached step, timed in alternation with it (`measure_pair`), and the speed-up measured beside the one the
        skipped FLOPs predict."""
        inputs = random_inputs(model.cfg, 1, self.args.text_tokens, self.device)
        x_cond, text_gen, text_cond = inputs.for_task(task)
        with torch.no_grad():
            cond = model.prepare(task, x_cond, text_gen, text_cond, cache=False)
        x = initial_noise(generated_shape(model, task, x_cond), 0, self.device)
        t = torch.full((1,), 0.5, device=self.device)

        def step() -> Any:
            with torch.no_grad(), self.autocast():
                return model(x, t, cond)

        predicted = cached.seconds * (1 + flops.predicted_speedup) * (plan.warmup + plan.repeats)
        pair = self.guarded(name, task, what, 1, predicted, lambda: measure_pair(
            cached_step, step, self.device, self.memory, plan.warmup, plan.repeats))
        if pair is not None:
            cached_again, plain, measured = pair
            self.row(name, task, what, 1, plain, flops.step_uncached, cached_times=cached_again.times,
                     **speedups(measured, flops))

    def windowed(self, name: str, cfg: ModelConfig, plan: Plan) -> None:
        """V2A through the user-facing pipeline on 1x, 2x, 4x ... the clip length (module docstring)."""
        from avlink.pipeline import Pipeline

        steps, multiples = self.args.steps, sorted(set(self.args.windows) | {1})
        with tempfile.TemporaryDirectory() as tmp:
            def load() -> Pipeline:
                folder = write_random_checkpoint(cfg, Path(tmp) / name)
                return Pipeline.load(folder, device=self.device.type, vocoder="griffinlim")

            pipe = self.guarded(name, "v2a", "windows", 1, 0.0, load)
            if pipe is None:
                return
            rng = np.random.default_rng(0)
            base: dict[str, Any] | None = None
            for multiple in multiples:
                frames = rng.integers(0, 256, (multiple * cfg.clip.num_frames, *pipe.size, 3), dtype=np.uint8)
                n_windows = len(v2a_windows(pipe, frames.shape[0]))
                what = f"windows {multiple}x"
                expected = 0.0 if base is None else base["seconds_per_window"] * n_windows * plan.repeats
                warmup = plan.warmup if base is None else 0  # one-off costs are paid by the first length
                timing = self.guarded(name, "v2a", what, 1, expected, lambda f=frames, w=warmup: self.timed(
                    lambda: pipe.video_to_audio(f, steps=steps, link_scale=1.0), w, plan.repeats))
                if timing is None:
                    continue
                row = {"multiple": multiple, "windows": n_windows, "video_seconds": frames.shape[0] / pipe.fps,
                       "steps": steps, "seconds_per_window": timing.seconds / n_windows,
                       "seconds_per_video_second": timing.seconds / (frames.shape[0] / pipe.fps)}
                base = base or {**row, "seconds": timing.seconds}
                row |= {"ratio_to_1x": timing.seconds / base["seconds"],
                        "windows_ratio_to_1x": n_windows / base["windows"],
                        "seconds_per_window_ratio_to_1x": row["seconds_per_window"] / base["seconds_per_window"]}
                self.row(name, "v2a", what, 1, timing, None, **row)

    def end_to_end(self, name: str) -> None:
        """`avlink v2a` on a --seconds video, file to mp4, default and fast (module docstring)."""
        from avlink.pipeline import FAST_STEPS, Pipeline, windows_for

        cfg, args = get_preset(name), self.args
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)

            def load() -> Pipeline:
                folder = write_random_checkpoint(cfg, work / name, fast=True)
                vocoder = bench_vocoder(cfg.clip.audio, work / "vocoder", args.vocoder)
                return Pipeline.load(folder, device=self.device.type, vocoder=vocoder, precision=args.precision)

            pipe = self.guarded(name, "v2a", "end-to-end", 1, 0.0, load)
            if pipe is None:
                return
            source = synthetic_video(work / "input.mp4", args.seconds)
            one_window = synthetic_video(work / "warmup.mp4", pipe.clip_seconds)
            windows = windows_for(args.seconds, pipe)
            summary = self.result["presets"].setdefault(name, {}).setdefault("end_to_end", {})
            for setting, fast, steps in (("default", False, args.steps),
                                         ("fast", True, args.fast_steps or FAST_STEPS)):
                def clip(video: Path = source, steps: int = steps, fast: bool = fast, out: str = setting) -> None:
                    pipe.video_file_to_audio(video, work / f"{out}.mp4", work / f"{out}.wav", steps=steps,
                                             fast=fast)

                def timed(clip=clip) -> Timing:
                    if args.warmup:
                        clip(one_window, 1, out="warmup")
                    return self.timed(clip, 0, args.repeats)

                timing = self.guarded(name, "v2a", f"end-to-end ({setting})", 1, 0.0, timed)
                if timing is None:
                    continue
                summary[setting] = timing.seconds
                self.row(name, "v2a", f"end-to-end ({setting})", 1, timing, None, end_to_end=True,
                         video_seconds=args.seconds, windows=windows, steps=steps, method="euler",
                         seconds_per_video_second=timing.seconds / args.seconds)
            if "default" in summary and "fast" in summary:
                summary["fast_speedup"] = summary["default"] / summary["fast"]

    def peer(self, net: torch.nn.Module, seconds: float) -> None:
        """The peer's network (load_peer) on one clip of `seconds` (module docstring): conditions once, then
        --peer-steps guided Euler steps."""
        args = self.args
        net = net.to(self.device)
        inputs = PeerInputs.of(net, self.device)
        params = sum(p.numel() for p in net.parameters())
        evals = args.peer_steps * (2 if args.peer_cfg >= 1 else 1)  # ode_wrapper: one evaluation below 1

        def timed() -> Timing:
            if args.warmup:
                peer_clip(net, inputs, 1, args.peer_cfg)
            return self.timed(lambda: peer_clip(net, inputs, args.peer_steps, args.peer_cfg), 0, args.repeats)

        what = f"peer: MMAudio {args.peer_model} network"
        timing = self.guarded("mmaudio", "v2a", what, 1, 0.0, timed)
        if timing is not None:
            self.row("mmaudio", "v2a", what, 1, timing, None, peer=str(args.peer), peer_model=args.peer_model,
                     params=params, peer_steps=args.peer_steps, peer_cfg=args.peer_cfg, network_evaluations=evals,
                     seconds_per_evaluation=timing.seconds / evals, video_seconds=seconds)
            self.result["peer"] = {"model": args.peer_model, "seconds": timing.seconds, "params": params}

    def train_timing(self, model: AVLink, task: Task, batch: int, plan: Plan) -> Timing:
        """Training steps as the training loop takes them (less its EMA and learning-rate schedule)."""
        model.train()
        inputs = random_inputs(model.cfg, batch, self.args.text_tokens, self.device, seed=1)
        params = [p for p in model.fusion_set(task).parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            with self.autocast():
                loss = model.loss(task, inputs.audio, inputs.video, inputs.text_a, inputs.text_v)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            return self.timed(step, plan.warmup, plan.repeats)
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    def training(self, name: str, model: AVLink, task: Task, flops: LinkFlops, plan: Plan) -> None:
        batch = plan.train_batch
        timing = self.guarded(name, task, "train", batch, 0.0,
                              lambda: self.train_timing(model, task, batch, plan))
        if timing is not None:
            self.train_row(name, task, batch, timing, flops)

    def train_row(self, name: str, task: Task, batch: int, timing: Timing, flops: LinkFlops) -> None:
        self.row(name, task, "train", batch, timing, flops.train.total * batch,
                 clips_per_s=batch / timing.seconds)

    def batch_search(self, name: str, model: AVLink, task: Task, flops: LinkFlops, plan: Plan) -> None:
        """Training at batch 1, 2, 4, ... until out of memory, --max-batch or the time budget."""
        search: dict[str, Any] = {"largest_batch": None, "stopped": "max batch"}
        self.result["presets"][name].setdefault("batch_search", {})[task] = search
        batch, last_seconds = 1, 0.0
        while batch <= self.args.max_batch:
            # A step at twice the batch takes about twice as long; warm-up and repeats each take one.
            left = self.deadline.left()
            if left <= 0 or 2 * last_seconds * (plan.warmup + plan.repeats) > left:
                search["stopped"] = "time budget"
                self.note(name, task, "train", batch, "skipped", "time budget")
                break
            try:
                timing = self.train_timing(model, task, batch, plan)
            except Exception as err:  # out of memory ends the search, and so does anything else
                oom, text = is_oom(err), describe(err)
                timing = None
            if timing is None:  # (the failed step's tensors are free only once the exception is gone)
                release(self.device)
                search["stopped"] = "out of memory" if oom else "error"
                if oom:
                    self.note(name, task, "train", batch, "skipped", "out of memory")
                else:
                    self.note(name, task, "train", batch, "error", text)
                break
            self.train_row(name, task, batch, timing, flops)
            search["largest_batch"] = batch
            last_seconds = timing.seconds
            batch *= 2
        self.save()


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- end to end: `avlink v2a` on a file, and the peer's network ----------------------------------------------

SYNTHETIC_SEED = 2_000_100  # a SyncBench test-split seed: the input video of the end-to-end rows
PEER_MODULE = "mmaudio.model.networks"
PEER_SEQUENCES = "mmaudio.model.sequence_config"  # its clip frame rate: the seconds its sequence lengths hold


def synthetic_video(path: Path, seconds: float) -> Path:
    """A SyncBench clip of `seconds` as a silent H.264 mp4 at SyncBench's own size and rate (256x144, 24 fps):
    the model reads it as it reads a user's video, decoding and resizing every frame."""
    from avlink.data import media
    from avlink.data.syncbench import render_clip

    clip = render_clip(SYNTHETIC_SEED, seconds)
    media.write_video(path, clip.frames, clip.fps)
    return path


def upsample_rates(hop: int, stages: int = 4) -> tuple[int, ...]:
    """HiFi-GAN upsampling rates whose product is `hop`: its prime factors, largest first, each multiplied into
    the smallest stage so far (256 -> 4, 4, 4, 4; 160 -> 5, 4, 4, 2)."""
    factors, n, p = [], hop, 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    rates = [1] * stages
    for f in sorted(factors, reverse=True):
        rates[rates.index(min(rates))] *= f
    return tuple(sorted(rates, reverse=True))


def bench_vocoder(geometry: Any, folder: Path, name: str = "hifigan") -> str:
    """The vocoder `name` (as `avlink v2a --vocoder` takes it); for "hifigan", `avlink v2a`'s default, the
    universal HiFi-GAN where it fits the mel analysis, elsewhere a HiFi-GAN V1 of random weights for that analysis,
    written to folder (module docstring). Returns the --vocoder value to load."""
    from safetensors.torch import save_file

    from avlink.codecs.vocoder import HiFiGAN, HiFiGANConfig

    if name != "hifigan" or not HiFiGANConfig().mismatch(geometry):
        return name
    rates = upsample_rates(geometry.hop_length)
    # Kernel 2r (2r + 1 for an odd r) with padding (k - r) // 2 makes each stage exactly r times longer.
    config = HiFiGANConfig(upsample_rates=rates, upsample_kernel_sizes=tuple(2 * r + r % 2 for r in rates),
                           num_mels=geometry.n_mels, sampling_rate=geometry.sample_rate, n_fft=geometry.n_fft,
                           hop_size=geometry.hop_length, win_size=geometry.win_length, fmin=geometry.f_min,
                           fmax=geometry.f_max)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file(HiFiGAN(config).state_dict(), str(folder / "generator.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(config)))
    return str(folder / "generator.safetensors")


def load_peer(path: Path, model: str) -> tuple[torch.nn.Module, float]:
    """MMAudio's network `model` (get_my_mmaudio's names: small_16k, small_44k, ...) from the checkout at path,
    with random weights, in eval mode, and the seconds of video its sequence lengths hold (its CLIP features come
    at SequenceConfig.clip_frame_rate); one line naming the flag where it cannot be had."""
    networks = path / "mmaudio" / "model" / "networks.py"
    if not networks.is_file():
        raise UserError(f"--peer {path}: not an MMAudio checkout (no mmaudio/model/networks.py in it)")
    for name in [m for m in sys.modules if m == "mmaudio" or m.startswith("mmaudio.")]:
        del sys.modules[name]  # another checkout's, imported before: this one's files count
    sys.path.insert(0, str(path))
    try:
        build = importlib.import_module(PEER_MODULE).get_my_mmaudio
        clip_rate = importlib.import_module(PEER_SEQUENCES).SequenceConfig.clip_frame_rate
    except Exception as err:  # a missing requirement of the checkout, most often
        raise UserError(f"--peer {path}: cannot import MMAudio's network from it ({describe(err)}); install "
                        f"the checkout's own requirements in this environment") from None
    try:
        net = build(model)
    except Exception as err:
        raise UserError(f"--peer-model {model}: {PEER_MODULE} cannot build it ({describe(err)})") from None
    randomize(net)
    return net.eval(), net.clip_seq_len / clip_rate


@dataclass
class PeerInputs:
    """Random inputs of the shapes MMAudio's network takes for one clip (its own sequence lengths)."""

    clip_f: torch.Tensor  # (1, clip_seq_len, clip_dim): CLIP features at 8 fps
    sync_f: torch.Tensor  # (1, sync_seq_len, sync_dim): Synchformer features at 24 fps
    text_f: torch.Tensor  # (1, text_seq_len, text_dim): CLIP text states
    x0: torch.Tensor  # (1, latent_seq_len, latent_dim): the initial noise

    @classmethod
    def of(cls, net: Any, device: torch.device) -> PeerInputs:
        g = torch.Generator().manual_seed(0)
        shapes = ((net.clip_seq_len, net.empty_clip_feat.shape[-1]), (net.sync_seq_len, net.empty_sync_feat.shape[-1]),
                  tuple(net.empty_string_feat.shape), (net.latent_seq_len, net.latent_dim))
        return cls(*(torch.randn(1, *shape, generator=g).to(device) for shape in shapes))


def peer_clip(net: Any, inputs: PeerInputs, steps: int, cfg: float) -> torch.Tensor:
    """One clip of MMAudio's sampling, network only, as its eval_utils.generate runs it: conditions once, then
    Euler steps of its guided velocity (`ode_wrapper`: two network evaluations per step when cfg >= 1) from t 0
    to 1, as its FlowMatching.to_data (min_sigma 0)."""
    with torch.no_grad():
        conditions = net.preprocess_conditions(inputs.clip_f, inputs.sync_f, inputs.text_f)
        empty = net.get_empty_conditions(1)
        ts = torch.linspace(0, 1, steps + 1)
        x = inputs.x0
        for i in range(steps):
            x = x + (ts[i + 1] - ts[i]) * net.ode_wrapper(ts[i], x, conditions, empty, cfg)
        return x


# --- the table ---------------------------------------------------------------------------------------------


def _seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _note(r: dict[str, Any]) -> str:
    if "end_to_end" in r:
        return (f"{r['video_seconds']:g} s video to mp4, {r['windows']} window{'s' if r['windows'] != 1 else ''}, "
                f"{r['steps']} {r['method']} steps each; {r['seconds_per_video_second']:.2f} s per video second")
    if "peer" in r:
        return (f"{r['params'] / 1e6:.0f}M params, {r['video_seconds']:g} s clip, {r['peer_steps']} Euler steps "
                f"with guidance {r['peer_cfg']:g}: {r['network_evaluations']} evaluations of "
                f"{_seconds(r['seconds_per_evaluation'])}; network only")
    if "clips_per_s" in r:
        return f"{r['clips_per_s']:.2f} clips/s"
    if "ratio_to_expected" in r:
        return f"{r['ratio_to_expected']:.2f} x (prepare + steps x step)"
    if "ratio_to_base_clip" in r:
        return (f"{r['params'] / 1e6:.2f}M params, {r['steps']} Euler steps: {r['ratio_to_base_clip']:.2f} x the "
                f"base A2V clip")
    if "speedup_measured" in r:
        return (f"cache speed-up {r['speedup_measured']:.2f}x measured, {r['speedup_predicted']:.2f}x by FLOPs:"
                f" {r['speedup_ratio']:.2f}")
    if "windows" in r:
        windows = f"{r['windows']} window" + ("s" if r["windows"] != 1 else "")
        return (f"{windows}, {_seconds(r['seconds_per_window'])}/window, "
                f"{_seconds(r['seconds_per_video_second'])}/s of video; vs 1x: {r['ratio_to_1x']:.2f}x time, "
                f"{r['windows_ratio_to_1x']:.2f}x windows")
    return ""


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    device = m["device"] + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else "")
    lines = [f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads),"
             f" torch {m['torch']}, device {device}, precision {result['settings']['precision']}"]
    for precision, peak in result["peak"].items():
        lines.append(f"matmul peak {precision}: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
                     f"({peak['size']}^3 in {_seconds(peak['seconds'])})")
    lines.append(f"peak memory: {result['memory_method']}")
    header = ["preset", "task", "what", "batch", "time", "GFLOP", "GFLOP/s", "util", "peak mem", "note"]
    table = [header]
    for r in result["rows"]:
        what = r["what"] + (f" ({r['steps']} steps)" if "steps" in r else "")
        if "seconds" not in r:
            note = r.get("skipped") or r.get("error", "")
            table.append([r["preset"], r["task"], what, str(r["batch"]), "-", "-", "-", "-", "-", note])
            continue
        util = "-" if r["utilisation"] is None else f"{100 * r['utilisation']:.1f}%"
        gflop = "-" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"
        gflops = "-" if r["flops_per_s"] is None else f"{r['flops_per_s'] / 1e9:.1f}"
        table.append([r["preset"], r["task"], what, str(r["batch"]), _seconds(r["seconds"]), gflop, gflops, util,
                      _bytes(r["peak_bytes"]), _note(r)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    for j, row in enumerate(table):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines + end_to_end_summary(result))


def end_to_end_summary(result: dict[str, Any]) -> list[str]:
    """One line per preset timed end to end: the clip's seconds in each setting, against each other and the peer."""
    peer = result.get("peer")
    lines = []
    for name, preset in result["presets"].items():
        timed = preset.get("end_to_end", {})
        parts = [f"{setting} {_seconds(timed[setting])}" for setting in ("default", "fast") if setting in timed]
        if not parts:
            continue
        if "fast_speedup" in timed:
            parts.append(f"fast {timed['fast_speedup']:.2f}x faster than default")
        if peer is not None:
            parts += [f"{setting} / peer network {timed[setting] / peer['seconds']:.2f}"
                      for setting in ("default", "fast") if setting in timed]
        lines.append(f"{name} end to end per clip: " + ", ".join(parts))
    return [""] + lines if lines else []


# --- the command -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=None, choices=sorted(PRESETS),
                        help="presets to measure (default: tiny small paper; with --end-to-end: small)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="default: v2a a2v")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per training step (default: 4 on CPU, 1 on CUDA; 1 for paper on CPU)")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps of one clip (default: 64)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement, the median counts (default: 3; 1 with --end-to-end)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument("--text-tokens", type=int, default=16,
                        help="random text tokens per prompt (default: 16)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n x n peak product (default: 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--max-batch-search", action="store_true",
                        help="training at batch 1, 2, 4, ... until out of memory (for a GPU)")
    parser.add_argument("--max-batch", type=int, default=1024, help="upper end of --max-batch-search")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: skip measurements that would end later (the batch search stops)")
    parser.add_argument("--windows", nargs="*", type=int, default=[1, 2, 4], metavar="K",
                        help="windowed V2A on K x the clip length (1x always runs; default: 1 2 4; none: off)")
    parser.add_argument("--windows-presets", nargs="*", default=["tiny"], choices=sorted(PRESETS), metavar="NAME",
                        help="presets whose windowed generation is timed, if also in --presets (default: tiny)")
    e2e = parser.add_argument_group("end to end: `avlink v2a` on a video file, and a peer's network")
    e2e.add_argument("--end-to-end", action="store_true",
                     help="time `avlink v2a` from a synthetic video file to the muxed mp4, default and --fast")
    e2e.add_argument("--seconds", type=float, default=8.0, help="length of the input video (default: 8)")
    e2e.add_argument("--vocoder", default="hifigan",
                     help="as avlink v2a's (default hifigan: the universal one where the preset's mel analysis "
                          "fits it, else a HiFi-GAN V1 of random weights for that analysis)")
    e2e.add_argument("--fast-steps", type=int, default=None,
                     help="steps of the fast setting (default: avlink v2a --fast's, 16); --steps: the default's")
    e2e.add_argument("--peer", default=None, metavar="PATH",
                     help="a checkout of MMAudio's public code: time its network in the same run (random weights)")
    e2e.add_argument("--peer-model", default="small_16k",
                     help="its network configuration (get_my_mmaudio's names; default small_16k: MMAudio-S)")
    e2e.add_argument("--peer-steps", type=int, default=25, help="its Euler steps (default: 25, its own)")
    e2e.add_argument("--peer-cfg", type=float, default=4.5, help="its guidance strength (default: 4.5, its own)")
    parser.add_argument("--out", default="bench.json", help="JSON with every number (default: bench.json)")


def check_args(args: argparse.Namespace) -> torch.device:
    if args.presets is None:
        args.presets = ["small"] if args.end_to_end else ["tiny", "small", "paper"]
    if args.repeats is None:
        args.repeats = 1 if args.end_to_end else 3
    if args.peer is not None and not args.end_to_end:
        raise UserError("--peer: needs --end-to-end (the peer's row sits beside the end-to-end clips)")
    if not args.seconds > 0:
        raise UserError(f"--seconds {args.seconds}: need a positive length")
    for flag in ("fast_steps", "peer_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: need at least 1")
    for flag in ("steps", "repeats", "text_tokens", "max_batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: need at least 1")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: need 0 or more")
    for multiple in args.windows:
        if multiple < 1:
            raise UserError(f"--windows {multiple}: need whole multiples of the clip length, at least 1")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch {args.batch}: need at least 1")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"--time-budget {args.time_budget}: need a positive number of seconds")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this torch")
    if args.max_batch_search and args.device != "cuda":
        raise UserError("--max-batch-search: needs --device cuda (a CPU raises no out-of-memory error)")
    if Path(args.out).is_dir():
        raise UserError(f"{args.out}: is a folder; --out names the JSON file")
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device == "cuda" else 2048
    if args.matmul_size < 1:
        raise UserError(f"--matmul-size {args.matmul_size}: need at least 1")
    return torch.device(args.device)


def run(args: argparse.Namespace) -> int:
    device = check_args(args)
    bench = Bench(args, device)
    result = bench.run()
    print(format_table(result))
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in result["rows"]) else 0
