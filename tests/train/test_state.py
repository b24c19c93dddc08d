import random

import numpy as np
import pytest
import torch

from avlink.train.ema import EMA
from avlink.train.state import CheckpointManager, rng_state, set_rng_state


def test_ema_tracks_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert ema.names == ["weight"]
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay warm-up: min(0.5, 1/10) = 0.1
    before = model.weight.detach().clone()
    with ema.swapped_in(model):
        assert not torch.equal(model.weight, before)
        torch.testing.assert_close(model.weight, before - 0.1)
    assert torch.equal(model.weight, before)
    state = ema.state_dict()
    other = EMA(model)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt = manager.save(5, {"w": torch.ones(2)}, {"w": torch.zeros(2)}, {"rng": rng_state(), "step": 5}, {"a": 1})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(ckpt.state()["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(ckpt.weights()["w"], torch.zeros(2)) and torch.equal(ckpt.weights(ema=False)["w"], torch.ones(2))
    assert ckpt.config() == {"a": 1}


def test_rotation_keeps_the_newest_and_ignores_unfinished(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save(step, {"w": torch.full((1,), step)}, {}, {"step": step}, {})
    assert [c.step for c in manager.list()] == [20, 30]
    (tmp_path / ".step_000000040.abc").mkdir()  # a save killed half-way
    (tmp_path / "step_000000050").mkdir()  # a folder without its state: not a checkpoint
    assert manager.latest().step == 30


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"w": torch.ones(1)}, {}, {"step": 1}, {})
    with pytest.raises(TypeError):
        manager.save(2, {"w": torch.ones(1)}, {}, {"step": 2}, {"bad": object()})
    assert [c.step for c in manager.list()] == [1]
    assert not list(tmp_path.glob(".step_*"))
