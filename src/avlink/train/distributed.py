"""torchrun support: one process per device, each rank reading its own shards; the trained weights either
replicated (DDP, the default) or sharded per block (FSDP, `--set train.sharding=fsdp`).

Launch the same command under `torchrun --nproc_per_node N avlink train ...`; torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and everything else follows from them. Nothing here is needed for one process.

FSDP (PyTorch's `fully_shard`) is for backbones that do not fit one device: every transformer block becomes
its own unit, gathered just before it runs and freed after, so a device holds one whole block at a time plus
its shard of the rest. In a fusion run the frozen generators are sharded the same way, block by block, beside
the fusion blocks being trained. Checkpoints stay whole: rank 0 writes the gathered (unsharded) tensors, in the
layout a single process writes, so they load without the training code and a run may resume under either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from avlink.errors import UserError

SHARDINGS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA); else a single process."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    global _joined
    _joined = True
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if want_cuda else "cpu"))


_joined = False  # whether setup() joined a process group in this process


def joined() -> bool:
    """Whether this process joined a torchrun process group (it then ends through `leave`)."""
    return _joined


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a process that trained under torchrun with exit status `code`, skipping the interpreter's shutdown.

    Once DistributedDataParallel has wrapped a module, its gloo process group outlives destroy_process_group
    (PyTorch 2.13: its worker threads are still running after it, whatever Python still holds), and at interpreter
    shutdown such a thread now and then aborts the process ("terminate called without an active exception")
    after all the work succeeded, which torchrun reports as a failed run. By the time a command returns, all it
    wrote is on disk (checkpoints and exports are written atomically, the TensorBoard writer is closed), so the
    process flushes its output and exits at once."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            stream.flush()
    logging.shutdown()
    os._exit(code)


class LossModule(nn.Module):
    """Wraps an objective so that DDP or FSDP sees one module whose forward is the loss: DDP then averages the
    gradients of the trainable weights across ranks during backward; FSDP gathers the weights it holds (those
    outside any block) for the whole step and reduce-scatters their gradients.

    `frozen` are modules the loss runs but does not train (a fusion run's generators): registered here only so
    that FSDP shards them under the same root."""

    def __init__(self, objective, frozen: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.objective = objective
        self.trainable = objective.trainable
        if frozen:
            self.frozen = nn.ModuleList(frozen)

    def forward(self, batch):
        out = self.objective.loss(batch)
        self.last = out
        return out.loss


def check_sharding(sharding: str) -> None:
    if sharding not in SHARDINGS:
        raise UserError(f"train.sharding {sharding!r}: choose {' or '.join(SHARDINGS)}")


def wrap(objective, ctx: Dist, sharding: str = "ddp") -> nn.Module | None:
    """A DDP-wrapped or FSDP-sharded LossModule when running distributed, else None (the plain objective is used).

    FSDP changes the objective's modules in place: their parameters become shards (DTensors) of this rank."""
    check_sharding(sharding)
    if not ctx.enabled:
        return None
    if sharding == "fsdp":
        return shard(LossModule(objective, frozen_modules(objective)), ctx)
    module = LossModule(objective)
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    # DDP expects a gradient for every trained weight at every step. Weights that no step reads are not built
    # (fusion/linked.py), so only an objective whose steps each read a part (a fusion set shared by both
    # directions, trained one direction per step) needs DDP's search for unused ones, a walk of the autograd
    # graph after every forward.
    unused = bool(getattr(objective, "steps_leave_weights_unused", False))
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused)


def loss_output(wrapped: nn.Module):
    """The LossOutput of the wrapped module's last forward."""
    inner = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    return inner.last


# --- FSDP ---------------------------------------------------------------------------------------------------


def frozen_modules(objective) -> list[nn.Module]:
    """The parts of the objective's model (`objective.model`, a linked model) that hold weights but none that
    train: the frozen generators of a fusion run."""
    model = getattr(objective, "model", None)
    if not isinstance(model, nn.Module):
        return []
    trainable = objective.trainable
    return [m for m in model.children()
            if m is not trainable and any(True for _ in m.parameters())
            and not any(p.requires_grad for p in m.parameters())]


def block_units(root: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: each element of every `blocks` list under root (DiT blocks, fusion
    blocks). A block that is a dict of modules (concat-to-text, one per direction) gives each module, as the
    model calls those, not the dict."""
    units: list[nn.Module] = []
    for module in root.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                units.extend(block.values() if isinstance(block, nn.ModuleDict) else [block])
    return units


def shard(module: LossModule, ctx: Dist) -> nn.Module:
    """fully_shard every block, then the root (which holds the rest: embedders, heads, timestep MLPs).

    Ranks start from rank 0's trainable weights, as under DDP (FSDP itself does not broadcast)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in [*module.trainable.parameters(), *module.trainable.buffers()]:
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for unit in reversed(block_units(module)):  # inner units before the ones holding them
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor  # imported when used: it takes a while

    return any(isinstance(p, DTensor) for p in module.parameters())


def _full_options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the trained parameters, in the order the optimizer holds them."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def full_weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict as whole tensors. Sharded: every rank must call it (a collective); rank 0 gets
    the tensors on CPU, the others an empty dict."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options(cpu_offload=True))


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Shards (DTensors) gathered into whole CPU tensors, one at a time, kept on rank 0 only (a collective when
    any is sharded); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            whole = tensor.full_tensor()
            if dist.get_rank() == 0:
                out[name] = whole.cpu()
        else:
            out[name] = tensor
    return out


def full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with whole tensors, keyed by parameter index as `Optimizer.state_dict()` keys
    it, so a checkpoint reads the same whether it was written sharded or not. Sharded: a collective; ranks
    other than 0 get an empty dict."""
    if not is_sharded(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, opt, options=_full_options(cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(module))}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]]}


def load_weights(module: nn.Module, weights: dict[str, Tensor]) -> None:
    """Whole tensors (a checkpoint) into the module; sharded, each rank keeps its shard. Missing keys are
    allowed (strict=False), as a fresh run's module may hold more than the checkpoint."""
    if not is_sharded(module):
        module.load_state_dict(weights, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, weights, options=_full_options(strict=False))


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """An index-keyed optimizer state dict of whole tensors (see full_optimizer_state) into the optimizer."""
    if not is_sharded(module):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = trainable_names(module)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    # strict=False: parameters that never got a gradient (a direction a joint run has not drawn yet, a set the
    # loss leaves unused) have no state.
    set_optimizer_state_dict(module, opt, by_name, options=_full_options(strict=False))
    # Loading first initialises every parameter's state; those the checkpoint had none for start afresh, as
    # they would after Optimizer.load_state_dict (else their step count would be one ahead).
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        if index not in state["state"]:
            opt.state.pop(param, None)


def shard_like(tensors: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """Whole tensors named like module's parameters, each sharded as that parameter is (a collective when the
    module is sharded); unchanged when it is not."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(module.named_parameters())
    out = {}
    for name, tensor in tensors.items():
        param = params.get(name)
        if isinstance(param, DTensor):
            tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
        out[name] = tensor
    return out
