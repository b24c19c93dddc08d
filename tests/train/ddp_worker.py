"""Run under torchrun (or alone): trains the toy objective on a global batch split across ranks and writes the
final weights. Used by test_distributed.py. Float64, so that the runs differ by float64 rounding alone
(helpers.adamw_drift)."""

import sys

import torch
from torch import nn

from avlink.train.distributed import leave, setup, teardown
from avlink.train.loop import LossOutput, TrainConfig, fit

STEPS, LR = 7, 0.05


class Regression:
    def __init__(self):
        torch.manual_seed(0)  # same init on every rank (DDP also broadcasts rank 0's)
        self.trainable = nn.Linear(4, 1)
        self.w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def loss(self, x):
        per = (self.trainable(x) - x @ self.w_true.T).square().mean(1)
        return LossOutput(per.mean())


def main(out: str, run_dir: str) -> None:
    ctx = setup("cpu")
    torch.set_default_dtype(torch.float64)

    def batches(epoch, skip):
        g = torch.Generator().manual_seed(epoch)
        data = torch.randn(5, 8, 4, generator=g)  # 5 global batches of 8
        for i in range(skip, 5):
            yield data[i][ctx.rank::ctx.world_size]  # this rank's share of the global batch

    objective = Regression()
    cfg = TrainConfig(max_steps=STEPS, lr=LR, warmup_steps=1, grad_clip=100.0, ckpt_every=100)
    fit(objective, batches, cfg, run_dir, progress=False, dist_ctx=ctx)
    if ctx.is_main:
        torch.save(objective.trainable.state_dict(), out)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave(0)  # not the interpreter shutdown that gloo can abort (distributed.leave)
