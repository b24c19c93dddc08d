import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from avlink.errors import UserError
from avlink.train.loop import LossOutput, TrainConfig, fit


class Regression:
    """A toy objective: fit y = x @ w_true with noise drawn from the global RNG (like flow-matching noise)."""

    def __init__(self):
        torch.manual_seed(123)
        self.trainable = nn.Linear(4, 1)
        self.w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def loss(self, batch):
        x = batch
        y = x @ self.w_true.T + 0.01 * torch.randn(x.shape[0], 1)
        per = (self.trainable(x) - y).square().mean(1)
        return LossOutput(per.mean(), per, torch.rand(x.shape[0]))


def batches(epoch, skip):
    g = torch.Generator().manual_seed(1000 + epoch)  # the order of an epoch depends on the epoch alone
    data = torch.randn(40, 4, generator=g)
    for i in range(skip, 5):
        yield data[i * 8:(i + 1) * 8]


CFG = TrainConfig(max_steps=23, lr=0.1, warmup_steps=3, grad_clip=100.0, ckpt_every=5, log_every=1, keep=2)


def test_loss_goes_down_and_logs(tmp_path):
    result = fit(Regression(), batches, CFG, tmp_path, progress=False)
    assert result.step == 23
    assert result.losses[-1][1] < 0.2 * result.losses[0][1]
    lines = [json.loads(x) for x in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 23 and any(k.startswith("loss_t/") for k in lines[-1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step_000000020", "step_000000023"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [7, 12])
def test_resume_matches_an_uninterrupted_run(tmp_path, kill_at):
    full = fit(Regression(), batches, CFG, tmp_path / "full", progress=False)

    def dying(epoch, skip):
        for i, b in enumerate(batches(epoch, skip)):
            if epoch * 5 + skip + i == kill_at:
                raise Killed
            yield b

    with pytest.raises(Killed):
        fit(Regression(), dying, CFG, tmp_path / "cut", progress=False)
    resumed = fit(Regression(), batches, CFG, tmp_path / "cut", resume=True, progress=False)
    first = resumed.losses[0][0]
    assert first == (kill_at // 5) * 5 + 1  # continues right after the last checkpoint
    expected = dict(full.losses)
    for step, loss in resumed.losses:
        assert loss == expected[step], f"step {step}"  # bit for bit
    # One scalar row per step, in TensorBoard too: the killed run's rows past the checkpoint are gone.
    rows = [json.loads(x)["step"] for x in (tmp_path / "cut" / "scalars.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 24))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "cut" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 24))


def test_validation_sees_the_ema_weights(tmp_path):
    seen = []
    objective = Regression()

    def validate(step):
        seen.append(objective.trainable.weight.detach().clone())
        return {"score": 1.0}

    fit(objective, batches, TrainConfig(max_steps=4, lr=0.1, ckpt_every=100, ema_decay=0.99), tmp_path,
        validate=validate, val_every=2, progress=False)
    assert len(seen) == 2
    assert not torch.equal(seen[-1], objective.trainable.weight.detach())  # EMA, not the live weights


def test_resume_passes_over_a_damaged_checkpoint_to_the_one_before(tmp_path, capsys):
    full = dict(fit(Regression(), batches, CFG, tmp_path / "full", progress=False).losses)
    cut = tmp_path / "cut"
    fit(Regression(), batches, replace(CFG, max_steps=12), cut, progress=False)  # checkpoints 10 and 12
    (cut / "checkpoints" / "step_000000012" / "state.pt").write_bytes(b"\0" * 100)  # a damaged disk block
    resumed = fit(Regression(), batches, CFG, cut, resume=True, progress=False)
    assert "step_000000012: damaged" in capsys.readouterr().err
    assert resumed.losses[0][0] == 11 and all(loss == full[step] for step, loss in resumed.losses)
    for ckpt in (cut / "checkpoints").iterdir():  # now every checkpoint is damaged: one clear error
        (ckpt / "weights.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="no checkpoint reads back whole"):
        fit(Regression(), batches, CFG, cut, resume=True, progress=False)
