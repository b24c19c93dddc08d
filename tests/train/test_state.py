import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from avlink.files import TEMP_STALE_SECONDS
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


def test_a_save_removes_temp_folders_of_killed_saves_only(tmp_path):
    """A save killed by SIGKILL leaves its temp folder; the next save removes it, but never the temp folder of a
    save still running in another process, nor a hidden folder that is not a checkpoint writer's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = tmp_path / f".step_000000005.{dead.pid}-k1ll3d"
        running = tmp_path / f".step_000000005.{alive.pid}-runn1ng"
        forgotten = tmp_path / f".step_000000004.{alive.pid}-0ld"  # pid reused since: stale by its age
        other = tmp_path / ".step_notes"
        for folder in (killed, running, forgotten, other):
            folder.mkdir()
            (folder / "state.pt").write_bytes(b"half")
        old = time.time() - TEMP_STALE_SECONDS - 60
        os.utime(forgotten, (old, old))
        CheckpointManager(tmp_path).save(6, {"w": torch.ones(1)}, {}, {"step": 6}, {})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "step_000000006"])
    finally:
        alive.kill()
        alive.wait()
