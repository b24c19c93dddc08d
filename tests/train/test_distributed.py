import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(args, tmp_path, env_extra=None):
    # Loopback only: gloo otherwise picks an interface from the host name.
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), "GLOO_SOCKET_IFNAME": "lo", **(env_extra or {})}
    done = subprocess.run(args, env=env, cwd=tmp_path, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "ddp.pt"),
         str(tmp_path / "ddp_run")], tmp_path)
    run([sys.executable, str(WORKER), str(tmp_path / "one.pt"), str(tmp_path / "one_run")], tmp_path)
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    start = torch.nn.Linear(4, 1)
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 1).state_dict()
    for key in one:
        assert not torch.equal(one[key], start[key])  # it trained
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)
