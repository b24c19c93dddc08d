"""Run under torchrun (or alone): trains tiny Fusion Blocks through `fit` with a FusionObjective on a global batch
split across ranks, and writes what test_distributed.py compares to OUT/<name>.json and OUT/<name>.pt.

Two runs, each of a link built as `avlink train fusion` builds it (only the trained task's set; "joint": one
shared set):
- "match" (v2a, then joint): FusionObjective with every random draw keyed by the sample (and joint's direction by
  the global batch), so a sample's loss does not depend on which rank or batch position it lands on; two ranks
  must then train exactly what one process trains on the same global batches.
- "joint_draws" (torchrun only): the plain FusionObjective, task "joint", whose ranks must draw the same
  direction at every step and end with the same weights.
Float64 throughout, so that the one-process and two-process runs differ by float64 rounding alone
(helpers.adamw_drift).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.video_dit import VideoDiT
from avlink.fusion.linked import AVLink
from avlink.train.distributed import Dist, leave, setup, teardown
from avlink.train.loop import LossOutput, TrainConfig, fit
from avlink.train.objectives import FusionObjective

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import randomize_backbone, tiny_config  # noqa: E402

GLOBAL_BATCH, NUM_BATCHES, STEPS = 2, 3, 3
TRAIN = TrainConfig(max_steps=STEPS, lr=1e-2, warmup_steps=1, grad_clip=100.0, ckpt_every=100, log_every=1)


def link(task: str) -> AVLink:
    cfg = tiny_config(**({"fusion.shared": True} if task == "joint" else {}))
    torch.manual_seed(0)  # the same fusion init on every rank (DDP broadcasts rank 0's anyway)
    audio, video = AudioDiT(cfg.audio, cfg.clip.audio), VideoDiT(cfg.video, cfg.clip.video)
    randomize_backbone(audio, 0)
    randomize_backbone(video, 1)
    return AVLink(cfg, audio, video, tasks=("v2a", "a2v") if task == "joint" else (task,))


class SampleSeeded(FusionObjective):
    """The real objective, run one sample at a time with the global RNG seeded by the sample's key."""

    def draw_task(self) -> str:
        return self.batch_task

    def loss(self, batch):
        self.batch_task = batch.get("task")
        outs = []
        for i, key in enumerate(batch["key"].tolist()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                outs.append(super().loss({k: v[i:i + 1] for k, v in batch.items() if torch.is_tensor(v)}))
        per = torch.cat([o.per_sample for o in outs])
        return LossOutput(per.mean(), per, torch.cat([o.t for o in outs]))


def global_batches(model: AVLink, ctx: Dist, joint: bool):
    cfg = model.cfg
    g = torch.Generator().manual_seed(123)
    n = GLOBAL_BATCH * NUM_BATCHES
    full = {
        "latent": torch.randn(n, *cfg.clip.latent_shape, generator=g),
        "video": torch.rand(n, *cfg.clip.video_shape, generator=g) * 2 - 1,
        "text": torch.randn(n, 3, cfg.audio.text_dim, generator=g),
        "text_mask": torch.ones(n, 3, dtype=torch.bool),
        "key": torch.arange(n) + 1000,
    }

    def batches(epoch, skip):
        for i in range(skip, NUM_BATCHES):
            rows = slice(i * GLOBAL_BATCH + ctx.rank, (i + 1) * GLOBAL_BATCH, ctx.world_size)  # this rank's share
            batch = {k: v[rows] for k, v in full.items()}
            if joint:  # one direction per global batch, alternating
                batch["task"] = ("v2a", "a2v")[(epoch * NUM_BATCHES + i) % 2]
            yield batch

    return batches


def gathered(values: torch.Tensor, ctx: Dist) -> list[torch.Tensor]:
    if not ctx.enabled:
        return [values]
    out = [torch.empty_like(values) for _ in range(ctx.world_size)]
    dist.all_gather(out, values)
    return out


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def finish(name: str, out: Path, objective: FusionObjective, losses: list[tuple[int, float]], ctx: Dist,
           **extra) -> None:
    weights = gathered(flat(objective.trainable), ctx)
    mean_losses = torch.stack(gathered(torch.tensor([loss for _, loss in losses], dtype=torch.float64), ctx))
    if not ctx.is_main:
        return
    torch.save(objective.trainable.state_dict(), out / f"{name}.pt")
    result = {"losses": mean_losses.mean(0).tolist(), "steps": len(losses), "world_size": ctx.world_size,
              "ranks_equal": all(torch.equal(w, weights[0]) for w in weights),
              "finite": bool(torch.isfinite(weights[0]).all()), **extra}
    (out / f"{name}.json").write_text(json.dumps(result))


def main(out_dir: str) -> None:
    ctx = setup("cpu")
    torch.set_default_dtype(torch.float64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in ("v2a", "joint"):
        model = link(task)
        objective = SampleSeeded(model, task)
        if ctx.is_main:
            torch.save({k: v.clone() for k, v in objective.trainable.state_dict().items()}, out / f"init_{task}.pt")
        run = fit(objective, global_batches(model, ctx, task == "joint"), TRAIN, out / f"run_{task}",
                  progress=False, dist_ctx=ctx)
        finish(f"match_{task}", out, objective, run.losses, ctx)
    if ctx.enabled:
        model = link("joint")
        objective = FusionObjective(model, "joint")
        draws = []
        draw = objective.draw_task
        objective.draw_task = lambda: draws.append(draw()) or draws[-1]
        batches = global_batches(model, ctx, joint=False)
        run = fit(objective, batches, TRAIN, out / "run_draws", progress=False, dist_ctx=ctx)
        codes = torch.tensor([("v2a", "a2v").index(d) for d in draws])
        finish("joint_draws", out, objective, run.losses, ctx,
               draws_equal=all(torch.equal(c, codes) for c in gathered(codes, ctx)), draws=draws)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
    leave(0)  # not the interpreter shutdown that gloo can abort (distributed.leave)
