"""Run under torchrun (or alone): trains a tiny audio DiT and a tiny V2A link on a global batch split across
ranks, with FSDP when distributed, in two legs (the second resumes from the first's checkpoint), and writes each
run's per-step loss averaged over ranks. Used by test_fsdp.py.

Every random draw of the flow-matching loss (t, the noise x0, the conditioning noise) comes with the batch, so a
sample's loss does not depend on which rank or batch position it lands on. Everything runs in float64, so that
the one-process and sharded runs differ by float64 rounding alone.

AVLINK_TEST_PERTURB_RANK=1 adds 1e-3 to that rank's audio latents: a run that must fail the comparison."""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from avlink.backbones.protocol import TextCond
from avlink.flow.path import flow_matching_errors
from avlink.train.distributed import full_weights, is_sharded, leave, setup, teardown
from avlink.train.loop import LossOutput, TrainConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_link  # noqa: E402

GLOBAL_BATCH, NUM_BATCHES = 4, 3
LR = 1e-3
PERTURB_RANK = int(os.environ.get("AVLINK_TEST_PERTURB_RANK", "-1"))


class Generator:
    """A text-to-audio DiT trained alone."""

    def __init__(self):
        self.trainable = tiny_link(seed=0).audio.requires_grad_(True)

    def loss(self, batch):
        text = TextCond(batch["text"], batch["text_mask"])
        per = flow_matching_errors(lambda x, t: self.trainable(x, t, text), batch["audio"], batch["t"], batch["x0"])
        return LossOutput(per.mean(), per, batch["t"])


class Fusion:
    """V2A fusion blocks between the frozen backbones of a linked model."""

    def __init__(self):
        self.model = tiny_link(seed=0)
        self.trainable = self.model.fusion

    def loss(self, batch):
        text = TextCond(batch["text"], batch["text_mask"])
        cond = self.model.prepare("v2a", batch["video"], text, text, noise=batch["cond_noise"])
        per = flow_matching_errors(lambda x, t: self.model(x, t, cond), batch["audio"], batch["t"], batch["x0"])
        return LossOutput(per.mean(), per, batch["t"])


def data(rank: int, world: int):
    cfg = tiny_link(seed=0).cfg
    g = torch.Generator().manual_seed(123)
    n = GLOBAL_BATCH * NUM_BATCHES
    audio = torch.randn(n, *cfg.clip.latent_shape, generator=g)
    full = {"audio": audio, "video": torch.randn(n, *cfg.clip.video_shape, generator=g),
            "t": torch.rand(n, generator=g), "x0": torch.randn(audio.shape, generator=g)}
    full["cond_noise"] = torch.randn(full["video"].shape, generator=g)
    # Captions of 3 tokens (one padded away): cross-attention over a single token would get no gradient.
    full["text"] = torch.randn(n, 3, cfg.audio.text_dim, generator=g)
    full["text_mask"] = torch.tensor([True, True, False]).expand(n, 3)

    def batches(epoch, skip):
        for i in range(skip, NUM_BATCHES):
            rows = slice(i * GLOBAL_BATCH + rank, (i + 1) * GLOBAL_BATCH, world)  # this rank's share
            batch = {k: v[rows] for k, v in full.items()}
            if rank == PERTURB_RANK:
                batch["audio"] = batch["audio"] + 1e-3
            yield batch

    return batches


def mean_over_ranks(losses: list[tuple[int, float]], world: int) -> list[float]:
    values = torch.tensor([loss for _, loss in losses], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(values)
    return (values / world).tolist()


def main(out: str, steps: str) -> None:
    ctx = setup("cpu")
    torch.set_default_dtype(torch.float64)  # so that the runs can be compared tightly (helpers.adamw_drift)
    legs = [int(s) for s in steps.split(",")]
    cfg = TrainConfig(lr=LR, warmup_steps=1, grad_clip=100.0, ckpt_every=100, ema_decay=0.5, log_every=1,
                      sharding="fsdp")
    result = {}
    for name, make in (("generator", Generator), ("fusion", Fusion)):
        losses = []
        for max_steps in legs:  # each leg a fresh model, resumed from the last checkpoint
            objective = make()
            run = fit(objective, data(ctx.rank, ctx.world_size), replace(cfg, max_steps=max_steps),
                      Path(out) / name, resume=True, progress=False, dist_ctx=ctx)
            losses += mean_over_ranks(run.losses, ctx.world_size)
        result[name] = losses
    # The fusion run's frozen generators: sharded when distributed, and untouched by training.
    backbone = objective.model.audio
    result["backbone_sharded"] = is_sharded(backbone)
    whole = full_weights(backbone)
    result["backbone_unchanged"] = all(torch.equal(whole[k], v) for k, v in tiny_link(seed=0).audio.state_dict().items()
                                       ) if ctx.is_main else None
    if ctx.is_main:
        (Path(out) / "losses.json").write_text(json.dumps(result))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave(0)  # not the interpreter shutdown that gloo can abort (distributed.leave)
