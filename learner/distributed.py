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
    world = int(os.environ.get("WORLD_SIZE", "1"))
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


def wrap(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """DDP around a module whose parameters train (itself outside torchrun). Rank 0's
    parameters are broadcast to the others here, so every rank starts equal."""
    if world_size() == 1:
        return module
    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


# ---------------------------------------------------------------------------- orders


def send_order(order: Any) -> None:
    """Rank 0: what every other rank runs next (None: stop), pickled on the orders group."""
    dist.broadcast_object_list([order], src=0, group=_orders)


def receive_order() -> Any:
    """Another rank: wait for rank 0's next order."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_orders)
    return box[0]
