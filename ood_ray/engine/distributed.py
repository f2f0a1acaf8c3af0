"""What the ranks of one run agree on: averaged values, rank 0's buffers, when to stop a skipping epoch.

Every function is a no-op for one worker (or without an initialised process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..checkpoint import unwrap


def all_reduce_mean(values: list[float], world: int, device=None) -> list[float]:
    """``values`` averaged over the ranks (``device``: where NCCL needs the tensor)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        t = t.to(device if device is not None else torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
        t = t.cpu() / world
    return t.tolist()


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Each rank's last training step updated its running statistics from its own batch, so without
    this the ranks would evaluate slightly different models, none of them the checkpointed one.
    """
    if world > 1 and dist.is_initialized():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def batches_in_step(batches, world: int, device, enabled: bool):
    """With ``skip_bad_samples`` a rank may run out of batches early: stop every rank together.

    Each step the ranks agree (one tiny all-reduce) whether all of them still have a batch, so DDP
    never waits for a rank that has finished. Without skipping every rank has the same planned count.
    """
    if not enabled or world == 1 or not dist.is_initialized():
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield batch
