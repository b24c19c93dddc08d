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
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"


def test_resume_after_sigkill(tmp_path):
    check(tmp_path, steps=40, kills=2, seed=1)


@pytest.mark.slow
def test_resume_after_many_sigkills(tmp_path):
    check(tmp_path, steps=90, kills=6, seed=2)
