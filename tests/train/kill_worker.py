"""Trains the toy objective with a checkpoint every 3 steps; used by test_kill_resume.py, which SIGKILLs it.

The data comes through a shuffling DataLoader, which, as the training commands' loaders do, takes its seed and
its shuffle from torch's global RNG when its iterator is made: a resume that restores the RNG and then makes the
iterator draws differently from the uninterrupted run unless the loop keeps the data's draws apart."""

import itertools
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from avlink.train.loop import LossOutput, TrainConfig, fit


class Regression:
    def __init__(self):
        torch.manual_seed(0)
        self.trainable = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))

    def loss(self, x):
        time.sleep(0.02)  # slow enough that kills land inside steps and inside saves
        y = x.sum(1, keepdim=True).sin() + 0.05 * torch.randn(x.shape[0], 1)  # noise from the global RNG
        return LossOutput((self.trainable(x) - y).square().mean())


DATA = TensorDataset(torch.randn(96, 8, generator=torch.Generator().manual_seed(0)))


def batches(epoch, skip):
    loader = DataLoader(DATA, batch_size=16, shuffle=True, collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
    return itertools.islice(iter(loader), skip, None)


if __name__ == "__main__":
    cfg = TrainConfig(max_steps=int(sys.argv[2]), lr=3e-3, warmup_steps=2, ckpt_every=3, log_every=1, keep=2)
    fit(Regression(), batches, cfg, sys.argv[1], resume=True, progress=False)
