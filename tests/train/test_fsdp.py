"""FSDP per block under torchrun: the same training as one process, checkpoints whole, resume across legs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avlink.errors import UserError
from avlink.train.distributed import Dist, block_units, check_sharding, frozen_modules, wrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import FLOAT32_ULP, GRAD_ROUNDING_F64, adamw_drift, assert_states_close, tiny_link  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_worker.py")
sys.path.insert(0, str(WORKER.parent))
from fsdp_worker import LR  # noqa: E402  (its learning rate)

STEPS = 4


def run(args, cwd, **env_extra):
    # Loopback only: gloo otherwise picks an interface from the host name.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **env_extra}
    done = subprocess.run(args, env=env, cwd=cwd, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def sharded_run(out: Path, **env_extra) -> Path:
    """Sharded: 2 steps, then a fresh process group resumes to STEPS."""
    torchrun = Path(sys.executable).with_name("torchrun")
    run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out), f"2,{STEPS}"], out.parent,
        **env_extra)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "one"
    run([sys.executable, str(WORKER), str(out), str(STEPS)], out.parent)
    return out


def losses(run_dir: Path) -> dict:
    return json.loads((run_dir / "losses.json").read_text())


def assert_same_training(sharded: Path, single: Path, name: str) -> None:
    """What the arithmetic guarantees. The workers train in float64 (helpers.adamw_drift says why): losses agree to
    float64 rounding at every step, weights within the AdamW drift bound, the float32 EMA within one float32
    rounding per update on top of it, the optimizer's moments within the gradients' rounding."""
    assert losses(sharded)[name] == pytest.approx(losses(single)[name], rel=1e-12), f"{name} losses"
    a_dir, b_dir = final_checkpoint(sharded / name), final_checkpoint(single / name)
    assert a_dir.name == b_dir.name == f"step_{STEPS:09d}"
    for file, rtol in (("weights.safetensors", 0.0), ("ema.safetensors", STEPS * FLOAT32_ULP)):
        a, b = load_file(str(a_dir / file)), load_file(str(b_dir / file))
        assert_states_close(a, b, atol=adamw_drift(STEPS, LR), rtol=rtol, what=f"{name} {file}")
    # The optimizer state is keyed as a single process keys it (by parameter index), with whole tensors.
    opt_a = torch.load(a_dir / "state.pt", weights_only=True)["optimizer"]
    opt_b = torch.load(b_dir / "state.pt", weights_only=True)["optimizer"]
    assert opt_a["param_groups"][0]["params"] == opt_b["param_groups"][0]["params"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, entry in opt_b["state"].items():
        assert_states_close(opt_a["state"][index], entry, atol=GRAD_ROUNDING_F64, rtol=1e-9,
                            what=f"{name} optimizer state {index}")


def test_two_fsdp_processes_match_one_process_and_save_whole_checkpoints(tmp_path, one_process):
    fsdp = sharded_run(tmp_path / "fsdp")
    assert losses(fsdp)["backbone_sharded"] and not losses(one_process)["backbone_sharded"]
    assert losses(fsdp)["backbone_unchanged"] and losses(one_process)["backbone_unchanged"]
    fresh = tiny_link(seed=0)
    for name, module in (("generator", fresh.audio), ("fusion", fresh.fusion)):
        assert len(losses(fsdp)[name]) == len(losses(one_process)[name]) == STEPS
        assert_same_training(fsdp, one_process, name)
        sharded = final_checkpoint(fsdp / name)
        # Whole tensors: the checkpoint loads into a plain module, strictly, and it trained.
        init = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(load_file(str(sharded / "weights.safetensors")))
        moved = [k for k, v in module.state_dict().items() if not torch.equal(v, init[k])]
        assert len(moved) > len(init) // 3, f"{name}: only {len(moved)} of {len(init)} tensors trained"


def test_the_comparison_catches_a_sharded_run_that_trained_on_other_data(tmp_path, one_process):
    """The bounds are tight enough to fail when one rank's batch is off by 1e-3, in the losses and in the weights."""
    fsdp = sharded_run(tmp_path / "fsdp", AVLINK_TEST_PERTURB_RANK="1")
    for name in ("generator", "fusion"):
        with pytest.raises(AssertionError, match=f"{name} losses"):
            assert_same_training(fsdp, one_process, name)
        a = load_file(str(final_checkpoint(fsdp / name) / "weights.safetensors"))
        b = load_file(str(final_checkpoint(one_process / name) / "weights.safetensors"))
        with pytest.raises(AssertionError, match=r"differ beyond .* the largest excess is \S+\[\d"):
            assert_states_close(a, b, atol=adamw_drift(STEPS, LR), what=name)


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
