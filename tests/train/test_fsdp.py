"""FSDP per block under torchrun: the same training as one process, checkpoints whole, resume across legs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avlink.cli import UserError
from avlink.train.distributed import Dist, block_units, check_sharding, frozen_modules, wrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_link  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run(args, tmp_path):
    # Loopback only: gloo otherwise picks an interface from the host name.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def test_two_fsdp_processes_match_one_process_and_save_whole_checkpoints(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    # Sharded: 2 steps, then a fresh process group member resumes to 4; one process: 4 steps straight.
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "fsdp"), "2,4"],
        tmp_path)
    run([sys.executable, str(WORKER), str(tmp_path / "one"), "4"], tmp_path)
    fsdp = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    assert fsdp["backbone_sharded"] and not one["backbone_sharded"]
    assert fsdp["backbone_unchanged"] and one["backbone_unchanged"]
    fresh = tiny_link(seed=0)
    for name, module in (("generator", fresh.audio), ("fusion", fresh.fusion)):
        assert len(fsdp[name]) == len(one[name]) == 4
        assert fsdp[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
        sharded, single = final_checkpoint(tmp_path / "fsdp" / name), final_checkpoint(tmp_path / "one" / name)
        assert sharded.name == single.name == "step_000000004"
        for file in ("weights.safetensors", "ema.safetensors"):
            a, b = load_file(str(sharded / file)), load_file(str(single / file))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=f"{name} {file} {key}")
        # Whole tensors: the checkpoint loads into a plain module, strictly, and it trained.
        init = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(load_file(str(sharded / "weights.safetensors")))
        moved = [k for k, v in module.state_dict().items() if not torch.equal(v, init[k])]
        assert len(moved) > len(init) // 3, f"{name}: only {len(moved)} of {len(init)} tensors trained"
        # The optimizer state is keyed as a single process keys it (by parameter index), with whole tensors.
        opt_a = torch.load(sharded / "state.pt", weights_only=True)["optimizer"]
        opt_b = torch.load(single / "state.pt", weights_only=True)["optimizer"]
        assert opt_a["param_groups"][0]["params"] == opt_b["param_groups"][0]["params"]
        assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
        for index, entry in opt_b["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(opt_a["state"][index][key], value, rtol=1e-5, atol=1e-6)

def test_block_units_are_every_block_of_backbones_and_fusion_sets():
    model = tiny_link(seed=0)
    units = block_units(model)
    expected = [*model.audio.blocks, *model.video.blocks, *model.fusion["v2a"].blocks, *model.fusion["a2v"].blocks]
    assert {id(u) for u in units} == {id(u) for u in expected} and len(units) == len(expected)


def test_concat_to_text_blocks_shard_per_direction():
    model = tiny_link(seed=0, **{"fusion.injection": "text_concat"})
    units = block_units(model.fusion)
    assert units and all(type(u).__name__ == "TextConcat" for u in units)
    assert len(units) == 2 * model.cfg.fusion.num_blocks  # one per block of each task's set


class FusionLike:
    def __init__(self):
        self.model = tiny_link(seed=0)
        self.trainable = self.model.fusion


def test_frozen_modules_are_the_generators_and_one_process_is_left_alone():
    objective = FusionLike()
    assert frozen_modules(objective) == [objective.model.audio, objective.model.video]
    assert wrap(objective, Dist(), "fsdp") is None  # one process: nothing to shard
    with pytest.raises(UserError, match="sharding 'zero3'"):
        check_sharding("zero3")
