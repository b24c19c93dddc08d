import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.video_dit import VideoDiT
from avlink.config import get_preset
from avlink.data.prepare import shard_name, write_shard
from avlink.train.objectives import FusionObjective

from helpers import adamw_drift, assert_states_close, randomize_backbone, tiny_link

WORKER = Path(__file__).with_name("ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import ddp_worker  # noqa: E402  (its training settings)
import fusion_ddp_worker  # noqa: E402


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
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 1, dtype=torch.float64).state_dict()
    for key in one:
        assert not torch.equal(one[key], start[key])  # it trained
    assert_states_close(ddp, one, atol=adamw_drift(ddp_worker.STEPS, ddp_worker.LR), what="linear")


FUSION_WORKER = Path(__file__).with_name("fusion_ddp_worker.py")


def test_fusion_blocks_under_two_gloo_processes_match_one_process(tmp_path):
    """V2A, then joint (one direction per step, a different part of the shared set each time), through `fit` with
    a FusionObjective: two ranks of one sample each train exactly what one process trains on both."""
    torchrun = Path(sys.executable).with_name("torchrun")
    single = {"OMP_NUM_THREADS": "1"}
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(FUSION_WORKER), str(tmp_path / "ddp")],
        tmp_path, single)
    run([sys.executable, str(FUSION_WORKER), str(tmp_path / "one")], tmp_path, single)
    for task in ("v2a", "joint"):
        ddp = json.loads((tmp_path / "ddp" / f"match_{task}.json").read_text())
        one = json.loads((tmp_path / "one" / f"match_{task}.json").read_text())
        assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["steps"] == one["steps"] == 3
        assert ddp["ranks_equal"] and ddp["finite"] and one["finite"]
        assert ddp["losses"] == pytest.approx(one["losses"], rel=1e-12), task
        ddp_w = torch.load(tmp_path / "ddp" / f"match_{task}.pt")
        one_w = torch.load(tmp_path / "one" / f"match_{task}.pt")
        init = torch.load(tmp_path / "one" / f"init_{task}.pt")
        assert ddp_w.keys() == one_w.keys() == init.keys()
        drift = adamw_drift(fusion_ddp_worker.STEPS, fusion_ddp_worker.TRAIN.lr)
        assert_states_close(ddp_w, one_w, atol=drift, what=task)
        moved = sum(not torch.equal(one_w[key], init[key]) for key in one_w)
        assert moved > len(one_w) // 2, f"{task}: only {moved} of {len(one_w)} tensors trained"
    # The plain objective, joint: every rank trains the direction rank 0 drew, and the ranks stay equal.
    draws = json.loads((tmp_path / "ddp" / "joint_draws.json").read_text())
    assert draws["steps"] == 3 and draws["draws_equal"] and draws["ranks_equal"] and draws["finite"]
    assert not (tmp_path / "one" / "joint_draws.json").exists()


SMALL = {"audio.dim": 32, "audio.depth": 2, "audio.heads": 2, "audio.text_dim": 16, "video.dim": 32,
         "video.depth": 2, "video.heads": 2, "video.text_dim": 16, "fusion.dim": 32, "fusion.heads": 2,
         "fusion.num_blocks": 2, "clip.duration": 1.0}


def write_inputs(root: Path) -> list[str]:
    """Two prepared shards of two random clips each (VAE latents included), and random generators: what
    `avlink train fusion` reads. Returns the command's flags that name them (and the model size)."""
    cfg = get_preset("tiny").override(**SMALL)
    clip, rng = cfg.clip, np.random.default_rng(0)
    shards = root / "shards"
    shards.mkdir()
    _, frames, height, width = clip.video_shape
    for s in range(2):
        samples = [(k, {
            "json": {"id": f"clip{k}", "caption": "a clip"},
            "mel": rng.standard_normal((clip.audio.n_mels, clip.num_mel_frames), dtype=np.float32),
            "mel_mask": np.ones(clip.num_mel_frames, dtype=bool),
            "latent": rng.standard_normal(clip.latent_shape, dtype=np.float32),
            "latent_logvar": np.zeros(clip.latent_shape, dtype=np.float32),
            "video": rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8),
            "video_mask": np.ones(frames, dtype=bool),
            "text": rng.standard_normal((3, 16), dtype=np.float32),
        }) for k in (2 * s, 2 * s + 1)]
        write_shard(shards / shard_name(s), samples)
    audio, video = AudioDiT(cfg.audio, clip.audio), VideoDiT(cfg.video, clip.video)
    randomize_backbone(audio, 0)
    randomize_backbone(video, 1)
    save_file(audio.state_dict(), str(root / "audio_dit.safetensors"))
    save_file(video.state_dict(), str(root / "video_dit.safetensors"))
    sets = [f"model.{k}={v}" for k, v in SMALL.items()]
    return ["--data", str(shards), "--audio-dit", str(root / "audio_dit.safetensors"),
            "--video-dit", str(root / "video_dit.safetensors"), "--set", *sets]


@pytest.mark.parametrize("task", ["v2a", "joint"])
def test_train_fusion_command_under_torchrun(tmp_path, task):
    """The command as users launch it: batch 1 per rank, past the second step (where DDP checks that the last
    step gave every trained weight a gradient)."""
    flags = write_inputs(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "avlink.cli", "train", "fusion",
         "--task", task, "--out", str(out), "--max-steps", "3", "--batch-size", "1", "--no-progress", *flags],
        tmp_path, {"OMP_NUM_THREADS": "1"})
    card = json.loads((out / "export" / "fusion.card.json").read_text())
    assert card["steps"] == 3 and card["world_size"] == 2
    weights = load_file(str(out / "export" / "fusion.safetensors"))
    prefix = "joint." if task == "joint" else "v2a."
    assert weights and all(k.startswith(prefix) and torch.isfinite(v).all() for k, v in weights.items())


def test_fusion_objective_trains_its_own_set_and_says_when_weights_go_unused():
    """What keeps DDP's bookkeeping right: a link holding both tasks' sets (a loaded checkpoint) trains only the
    objective's, every weight of which each step reads; a set shared by both directions is read in part."""
    model = tiny_link()
    for task in ("a2v", "v2a"):
        objective = FusionObjective(model, task)
        assert not objective.steps_leave_weights_unused
        assert all(p.requires_grad == name.startswith(f"{task}.") for name, p in model.fusion.named_parameters())
    shared = tiny_link(**{"fusion.shared": True})
    assert FusionObjective(shared, "v2a").steps_leave_weights_unused
    joint = FusionObjective(shared, "joint")
    assert joint.steps_leave_weights_unused and all(p.requires_grad for p in joint.trainable.parameters())
    assert FusionObjective(tiny_link(), "joint").steps_leave_weights_unused  # two sets, one per step
    assert joint.draw_task() in ("v2a", "a2v")  # one process: its own draw


def test_the_avlink_program_leaves_through_os_exit_only_after_joining_a_process_group(monkeypatch):
    """`avlink` (cli.console) exits with main's status; after torchrun's process group it skips the interpreter's
    shutdown (distributed.leave), which gloo can abort after the work succeeded."""
    from avlink import cli
    from avlink.train import distributed

    left = []
    monkeypatch.setattr(distributed, "leave", lambda code: left.append(code))
    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    monkeypatch.setattr(distributed, "_joined", False)
    with pytest.raises(SystemExit) as exited:
        cli.console()
    assert exited.value.code == 3 and left == []
    monkeypatch.setattr(distributed, "_joined", True)
    with pytest.raises(SystemExit):  # the stand-in for leave returns; the real one never does
        cli.console()
    assert left == [3]


def test_leave_flushes_and_exits_with_the_status(tmp_path):
    script = "import sys; from avlink.train.distributed import leave; print('kept', end=''); leave(5)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 5 and done.stdout == "kept"
