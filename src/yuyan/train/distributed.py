"""Parallelism applied from outside the model: torchrun detection, DDP or FSDP2 wrapping, rank-0 I/O.

`init()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, set by
`torchrun --nproc_per_node=N` and its multi-node rendezvous flags) and starts a process group: gloo on CPU,
nccl on CUDA. `wrap()` returns the module to train: the model itself, `DistributedDataParallel(model)`, or
the model with FSDP2's `fully_shard` applied to every block and then the root. Checkpoints always hold the
full, unwrapped state dict (gathered to rank 0 on CPU for FSDP), so they load at any world size and in any
mode. The model code never imports torch.distributed; only this file does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from yuyan.errors import UserError

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp, resolved
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA (this rank's GPU) when present, else CPU."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("train.device is cuda but no CUDA device is visible; pass --train.device cpu")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device(pref)


def init(strategy: str = "auto", device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; resolve the strategy and this rank's device."""
    if strategy not in STRATEGIES:
        raise UserError(f"distributed = {strategy!r} is not known; choose one of {', '.join(STRATEGIES)}")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    dev = pick_device(device, local_rank)
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise UserError(f"launched with {world} processes but distributed = none; use ddp or fsdp")
    if strategy == "fsdp" and not launched:
        # FSDP needs a process group even for one process: make a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", YUYAN_SOLO_GROUP="1")
        launched = True
    if launched and strategy != "none" and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, strategy, dev)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """The module the loop trains: plain, DDP, or FSDP2 (each transformer block sharded, then the root)."""
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def set_grad_sync(model: nn.Module, info: DistInfo, sync: bool):
    """Context for a micro-step: skip the gradient all-reduce on all but the last micro-step."""
    import contextlib

    if info.strategy == "ddp" and not sync:
        return model.no_sync()
    if info.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state dict on CPU (collective under FSDP: every rank must call it)."""
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = _inner(model)
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Optimizer state keyed by parameter name, full (unsharded) and on CPU: loadable at any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if info.strategy == "fsdp":
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=opts)
    return _named_optim_state(_inner(model), optimizer)


def load_optim_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo
) -> list[str]:
    """A saved optimizer state into `optimizer`; the moments are the checkpoint's, the hyperparameters
    (betas, weight decay, Muon's lr scale...) this run's. Returns the hyperparameters that changed."""
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_optimizer_state_dict(model, optimizer, state, options=opts)
        return []
    inner = _inner(model)
    sd = optimizer.state_dict()
    saved, now = (sorted({g.get("optimizer", "adamw") for g in s["param_groups"]}) for s in (state, sd))
    if saved != now:  # train.optimizer changed: the state would land in the wrong optimizer
        raise UserError(
            f"the checkpoint was trained with train.optimizer {'+'.join(saved)}, this run uses "
            f"{'+'.join(now)}: resume with the same optimizer, or start a new run"
        )
    idx = {n: i for i, n in enumerate(_param_order(inner, optimizer))}
    missing = sorted(set(idx) - set(state["state"]))
    if missing and state["state"]:
        raise UserError(
            f"the optimizer state in the checkpoint lacks {missing[:4]}: it was saved for another model"
        )
    sd["state"] = {idx[n]: v for n, v in state["state"].items() if n in idx}
    changed = []  # this run's settings apply (as its lr does, through the schedule); the caller says which
    for g_new, g_old in zip(sd["param_groups"], state["param_groups"], strict=False):
        for k, v in g_old.items():
            if k not in ("params", "lr") and k in g_new and g_new[k] != v:
                changed.append(f"{g_new.get('optimizer', 'adamw')} {k} {v} -> {g_new[k]}")
    optimizer.load_state_dict(sd)
    return changed


def _inner(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def _param_order(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _named_optim_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with parameter names instead of positions (the same layout as the DCP API)."""
    order = _param_order(module, optimizer)
    sd = optimizer.state_dict()
    state = {
        order[i]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
        for g in sd["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active and info.world_size > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object on every rank (e.g. a refitted step count)."""
    if info.active and info.world_size > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier(info: DistInfo) -> None:
    if info.active and info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.active:
        dist.destroy_process_group()
    if os.environ.pop("YUYAN_SOLO_GROUP", None):  # undo the world of one made for FSDP in init()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            os.environ.pop(k, None)
