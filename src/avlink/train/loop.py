"""The training loop every part shares: build, loop, validate with EMA weights, checkpoint, resume.

What is trained is an `Objective`: the module whose weights are trained (and saved) and a loss over a batch. The
loop does not know whether it trains a VAE, a generator or Fusion Blocks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from avlink.files import atomic_write
from avlink.train import distributed
from avlink.train.distributed import Dist
from avlink.train.ema import EMA
from avlink.train.state import CheckpointManager, rng_state, set_rng_state


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    lr: float = 3e-4  # the paper's base-model rate; its fusion runs use 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "fp32"  # "bf16": autocast on CUDA or on a CPU with bf16 matmul; never fp16 on CPU
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    sharding: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (sharded per block, distributed.py)
    log_every: int = 10
    ckpt_every: int = 200
    keep: int = 3
    seed: int = 0


@dataclass
class LossOutput:
    loss: Tensor  # scalar that is optimised
    per_sample: Tensor | None = None  # (B,) for binning
    t: Tensor | None = None  # (B,) flow time of each sample, for the loss-by-t curve
    scalars: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    trainable: nn.Module  # the weights this run trains, saves and averages

    def loss(self, batch: Any) -> LossOutput: ...


Batches = Callable[[int, int], Iterator[Any]]  # (epoch, batches to skip) -> batches of that epoch, in order


def lr_lambda(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}: fp32 or bf16 (fp16 is never used on CPU)")


class Logger:
    """Scalars to a JSON-lines file, and to TensorBoard when the package is installed.

    resumed_step: the step a resumed run continues from (0 when it found no checkpoint). The rows a killed run
    logged past it are dropped, since those steps run again, and TensorBoard is told to purge them (`purge_step`),
    so that every step has one value.
    """

    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        self.path = run_dir / "scalars.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None and self.path.is_file():
            self._drop_rows_after(resumed_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_step is None else resumed_step + 1
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        except ImportError:
            self.tb = None

    def _drop_rows_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if row.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(self.path, lambda temp: Path(temp).write_text("".join(kept)))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def data_stream(batches: Batches, seed: int, epoch: int, skip: int) -> Iterator[Any]:
    """The batches of `epoch` from `skip` on, with every torch draw that the data makes (a DataLoader's base seed
    and shuffle, a data set's own draws) taken from an RNG of its own, seeded by (seed, epoch).

    The training RNG, which checkpoints restore, never feeds the data: a resumed run then replays the epoch's data
    draws up to `skip` exactly as the uninterrupted run made them, and its training draws (noise, t, dropout) are
    the uninterrupted run's too, bit for bit. (A DataLoader created after the RNG was restored used to take its
    seed from the training RNG and shift every later draw.)"""
    entropy = np.random.SeedSequence([seed % 2**63, epoch]).generate_state(2, np.uint32)
    state = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1])).get_state()
    data = None
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            if data is None:
                data = batches(epoch, skip)
            try:
                batch = next(data)
            except StopIteration:
                return
            state = torch.get_rng_state()
        yield batch


def bin_by_t(per_sample: Tensor, t: Tensor, bins: int = 4) -> dict[str, float]:
    """Mean loss of the samples in each quarter of flow time (what a t-sampler change would move)."""
    idx = (t.detach().float().clamp(0, 1 - 1e-6) * bins).long()
    out = {}
    for b in range(bins):
        sel = per_sample.detach()[idx == b]
        if sel.numel():
            out[f"loss_t/{b / bins:.2f}-{(b + 1) / bins:.2f}"] = sel.float().mean().item()
    return out


@dataclass
class RunResult:
    step: int
    losses: list[tuple[int, float]]  # (step, loss) of every step this process ran
    wall_s: float


def fit(
    objective: Objective, batches: Batches, cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False,
    device: torch.device | str = "cpu", run_config: dict[str, Any] | None = None,
    validate: Callable[[int], dict[str, float]] | None = None, val_every: int = 0, progress: bool = True,
    dist_ctx: Dist | None = None,
) -> RunResult:
    """Train objective.trainable for cfg.max_steps steps; resume=True continues from the last checkpoint.

    Under torchrun (dist_ctx.enabled) the loss goes through DDP (or FSDP, cfg.sharding), which averages gradients
    across ranks; rank 0 alone logs and writes checkpoints, and every rank resumes from them.
    """
    run_dir, device = Path(run_dir), torch.device(device)
    ctx = dist_ctx or Dist(device=device)
    wrapped = distributed.wrap(objective, ctx, cfg.sharding)
    module = objective.trainable
    if validate is not None and cfg.sharding == "fsdp" and ctx.enabled:
        raise ValueError("validation runs on rank 0 alone, which sharded weights do not allow")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps))
    ema = EMA(module, cfg.ema_decay)
    manager = CheckpointManager(run_dir / "checkpoints", keep=cfg.keep)
    config = {"train": asdict(cfg), **(run_config or {})}

    step, epoch, consumed = 0, 0, 0
    torch.manual_seed(cfg.seed + ctx.rank)
    latest = manager.latest_intact() if resume else None
    if latest is not None:
        _, state, weights = latest
        distributed.load_weights(module, weights)
        ema.load_state_dict({**state["ema"], "shadow": distributed.shard_like(state["ema"]["shadow"], module)})
        distributed.load_optimizer_state(module, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        set_rng_state(state["rng"])
        if ctx.rank:  # the checkpoint holds rank 0's RNG; the others continue on their own streams
            torch.manual_seed(cfg.seed + ctx.rank + 1_000_003 * step)
    logger = Logger(run_dir, resumed_step=step if resume else None) if ctx.is_main else None

    def save() -> None:
        # Every rank calls this: sharded weights are gathered by all ranks together; rank 0 writes.
        weights = distributed.full_weights(module)
        ema_weights = distributed.full_tensors({name: ema.shadow[name] for name in ema.names})
        optimizer = distributed.full_optimizer_state(module, opt)
        if not ctx.is_main:
            return
        manager.save(step, weights, {**weights, **ema_weights}, {
            "step": step, "epoch": epoch, "consumed": consumed, "rng": rng_state(),
            "optimizer": optimizer, "scheduler": sched.state_dict(),
            "ema": {**ema.state_dict(), "shadow": ema_weights},
        }, config)

    losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    data_seed = cfg.seed * 1_000_003 + ctx.rank
    data = data_stream(batches, data_seed, epoch, consumed)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    module.train()
    while step < cfg.max_steps:
        try:
            batch = next(data)
        except StopIteration:
            epoch, consumed = epoch + 1, 0
            data = data_stream(batches, data_seed, epoch, 0)
            continue
        consumed += 1
        with autocast(cfg.precision, device):
            if wrapped is None:
                out = objective.loss(batch)
            else:
                wrapped(batch)
                out = distributed.loss_output(wrapped)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"loss is {out.loss.item()} at step {step}; last checkpoint kept")
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(module)
        step += 1
        loss = out.loss.item()
        losses.append((step, loss))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if logger is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
            scalars = {"loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), **out.scalars}
            if out.per_sample is not None and out.t is not None:
                scalars.update(bin_by_t(out.per_sample, out.t))
            logger.log(step, scalars)
        if logger is not None and validate is not None and val_every and step % val_every == 0:
            module.eval()
            with ema.swapped_in(module), torch.no_grad():
                metrics = validate(step)
            if metrics:  # a failed validation printed why and has nothing to log
                logger.log(step, {f"val/{k}": v for k, v in metrics.items()})
            module.train()
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save()
    bar.close()
    if logger is not None:
        logger.close()
    return RunResult(step, losses, time.perf_counter() - started)


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return math.ceil(num_items / batch_size)
