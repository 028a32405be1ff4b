"""The learner under `torchrun`: one process per device, rank 0 the only one that talks to
the outside world.

    torchrun --nproc_per_node N -m instructloop.cli learn ...

`init_from_env` starts the process group from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) when WORLD_SIZE > 1: gloo on CPU, NCCL on CUDA (each rank on
cuda:LOCAL_RANK). Without torchrun (WORLD_SIZE unset or 1) nothing is started and every
helper here is the identity: one process trains exactly as it did before.

Who does what (main.py, rounds.py):
  - rank 0 consumes the Redis streams, holds the lease, runs the rounds, measures quality,
    runs the gate, saves every checkpoint and publishes every version;
  - the other ranks own nothing: they wait for rank 0's orders (`send_order` /
    `receive_order`: the trainer to run and its arguments, the round's data included,
    pickled over a gloo group) and train their shard of every global batch.

The trainers (sft.py, reward.py, ppo.py) ask `rank()` / `world_size()` and shard their
global batches themselves; DDP averages the gradients over ranks. A loss that is a mean
(over tokens, over prompts) is summed on each rank and divided by `mean_denominator`, the
global count over the world size, so that DDP's average is the mean over the GLOBAL batch:
a per-rank mean averaged over ranks is not, when ranks hold unequal counts.

With `learn --sharding fsdp` the reward model's training and PPO's four models are
sharded with FSDP2 instead (`wrap` -> `shard_model`: `fully_shard` per decoder layer, then
the root): each rank holds 1/N of every weight, a forward gathers one layer at a time, and
the reduce-scatter AVERAGES gradients over ranks as DDP does, so `mean_denominator`
normalises the same way. Every forward is then a collective: every rank must run the same
ones (HF generate with synced_gpus; the RM's bias and held-out scoring on every rank), and
the full weights are gathered to rank 0's host to be saved (`full_state_dict`). SFT stays
on DDP; LoRA rounds are refused under FSDP.

Orders travel on a second, gloo-only group with a long timeout: the workers wait there
between rounds (hours), which NCCL's watchdog would not allow; the training collectives
keep the default group and its default timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long a worker waits for rank 0's next order (between rounds) before it fails.
ORDER_TIMEOUT = datetime.timedelta(days=7)
_orders: dist.ProcessGroup | None = None  # the gloo group orders travel on


def init_from_env(device: str) -> str:
    """Join torchrun's process group when WORLD_SIZE > 1; returns the device this rank
    trains on (cuda:LOCAL_RANK for a CUDA device, `device` otherwise)."""
    global _orders
    world = launched_world_size()
    if world <= 1 or dist.is_initialized():
        return device
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    _orders = dist.new_group(backend="gloo", timeout=ORDER_TIMEOUT)
    log.info("rank %d of %d (%s, %s)", dist.get_rank(), world, dist.get_backend(), device)
    return device


def close() -> None:
    global _orders
    if dist.is_initialized():
        dist.destroy_process_group()
    _orders = None


def launched_world_size() -> int:
    """The ranks torchrun launched (WORLD_SIZE; 1 without torchrun), before or without
    the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of a global batch: every world_size-th item from its rank on."""
    return items[rank() :: world_size()]


def all_sum(x: torch.Tensor | float) -> torch.Tensor:
    """Sum over ranks, as a new float32 tensor (x's value in one process)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float32).clone()
    else:  # NCCL reduces CUDA tensors only
        on_nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        t = torch.tensor(float(x), device="cuda" if on_nccl else "cpu")
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_denominator(count: torch.Tensor | float) -> torch.Tensor:
    """Divide a rank's SUM by this and DDP's gradient average is the GLOBAL mean.

    count: this rank's number of items (valid tokens, prompts). Returns the global count
    over the world size (the count itself in one process), at least 1 / world size so an
    empty global batch divides by a positive number.
    """
    world = world_size()
    return (all_sum(count) / world).clamp(min=1.0 / world)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: a stop that every rank obeys at once."""
    if world_size() == 1:
        return flag
    return bool(all_sum(1.0 if flag else 0.0).item() > 0)


SHARDINGS = ("ddp", "fsdp")


def load_device(device: str | torch.device, sharding: str = "ddp") -> str | torch.device:
    """Where a trainer loads a model that `wrap` then places: under FSDP (torchrun) the
    host, so that no device ever holds more than one layer's full weights (fully_shard
    moves each layer to `device` as it shards it); otherwise `device` itself."""
    return "cpu" if sharding == "fsdp" and world_size() > 1 else device


def wrap(
    module: torch.nn.Module, device: str | torch.device, sharding: str = "ddp"
) -> torch.nn.Module:
    """What a trainer calls its model through under torchrun (the module itself outside).

    sharding "ddp": DDP around a module whose parameters train (a frozen one is returned
    as it is: every rank holds all of it); rank 0's parameters are broadcast first.
    sharding "fsdp": the module, sharded IN PLACE with FSDP2 (`fully_shard`), trained or
    frozen: see `shard_model`. Call it through its own forward, never a submodule's (the root
    group's weights are gathered by the root's forward).
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, not {sharding!r}")
    if world_size() == 1:
        return module
    if sharding == "fsdp":
        return shard_model(module, device)
    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def shard_model(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """FSDP2 over all ranks: `fully_shard` each decoder layer, then the root (the rest:
    embeddings, final norm, heads). The layers are the modules whose class an HF model
    names in `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...), so any architecture
    works. Each rank keeps 1/world of every parameter (DTensors); a forward all-gathers
    one layer at a time, backward reduce-scatters the gradients AVERAGED over ranks, as
    DDP does, so `mean_denominator` normalises the same way. Rank 0's weights are
    broadcast first (on the host, over the gloo orders group when the module is there),
    so every rank starts equal, as under DDP. Every rank must run the same forwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer_names: set[str] = set()
    for m in module.modules():
        layer_names.update(getattr(m, "_no_split_modules", None) or ())
    # Children before parents (reversed pre-order): a nested layer is sharded first.
    layers = [m for m in reversed(list(module.modules())) if type(m).__name__ in layer_names]
    layers = [m for m in layers if m is not module]
    if not layers:
        raise ValueError(
            f"FSDP: no decoder layers found in {type(module).__name__} "
            "(no module class listed in an HF model's _no_split_modules)"
        )
    group = _orders if next(module.parameters()).device.type == "cpu" else None
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0, group=group)
    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    """True for a module `shard_model` sharded: its forwards are collectives (HF generate must
    then run with synced_gpus, so that a rank whose samples ended keeps forwarding)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded module's full state dict, gathered on rank 0's host (every rank must
    call it: it is a collective); None for a module that is not sharded (save it as is).
    On the other ranks the dict is empty."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


# ---------------------------------------------------------------------------- orders


def send_order(order: Any) -> None:
    """Rank 0: what every other rank runs next (None: stop), pickled on the orders group."""
    dist.broadcast_object_list([order], src=0, group=_orders)


def receive_order() -> Any:
    """Another rank: wait for rank 0's next order."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_orders)
    return box[0]
