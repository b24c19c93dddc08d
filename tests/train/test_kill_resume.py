import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avlink.train.state import CheckpointManager

WORKER = Path(__file__).with_name("kill_worker.py")


def start(run_dir, steps):
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), str(steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def losses(run_dir):
    """Loss per step; after a resume, the steps since the last checkpoint run again and the last record wins."""
    out = {}
    for line in (Path(run_dir) / "scalars.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def logged(run_dir):
    path = Path(run_dir) / "scalars.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def run_with_kills(run_dir, steps, kills, rng):
    for _ in range(kills):
        proc = start(run_dir, steps)
        target = logged(run_dir) + rng.randint(1, 7)  # a few steps into this run, then anywhere within a step
        while logged(run_dir) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
        for ckpt in CheckpointManager(Path(run_dir) / "checkpoints").list():  # never an unreadable one
            assert ckpt.state()["step"] == ckpt.step
            ckpt.weights()
    proc = start(run_dir, steps)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


def check(tmp_path, steps, kills, seed):
    full = tmp_path / "full"
    proc = start(full, steps)
    assert proc.wait(timeout=300) == 0
    cut = tmp_path / "cut"
    run_with_kills(cut, steps, kills, random.Random(seed))
    expected, got = losses(full), losses(cut)
    assert sorted(got) == list(range(1, steps + 1))
    for step in expected:  # bit for bit: the same batches, the same noise, the same arithmetic
        assert got[step] == expected[step], f"step {step}: {got[step]!r} after kills, {expected[step]!r} without"
    return cut


def test_resume_after_sigkill(tmp_path):
    cut = check(tmp_path, steps=40, kills=2, seed=1)
    rows = [json.loads(line)["step"] for line in (cut / "scalars.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 41)), "a resumed run keeps one scalar row per step"
    assert not list(cut.rglob(".*")), "a killed write's temp file or folder outlives the run after it"


def test_resume_right_after_a_checkpoint_repeats_every_later_loss_bit_for_bit(tmp_path):
    """Stopped the moment checkpoint 3 (step 9) is written, then resumed: steps 10-20 as if never stopped."""
    assert start(tmp_path / "full", 20).wait(timeout=300) == 0
    for steps in (9, 20):
        proc = start(tmp_path / "cut", steps)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    expected, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(got) == sorted(expected) == list(range(1, 21))
    assert [got[s] for s in range(10, 21)] == [expected[s] for s in range(10, 21)]


@pytest.mark.slow
def test_resume_after_many_sigkills(tmp_path):
    check(tmp_path, steps=90, kills=6, seed=2)
