"""Data-parallel meta-training over torch.distributed: the processes torchrun (or `launch`) starts.

Every rank draws the same meta-batch from the same seeded sampler and keeps its own share of the tasks
(`World.share`: tasks rank, rank + size, ...). Each rank's meta-gradient is the mean over its share; the
all-reduce sums the shares weighted by their task counts, so every rank holds the mean over the whole
meta-batch, as one process running all of it would. The optimizer then takes the same step everywhere.
Rank 0 alone validates, checkpoints, logs and saves; the others follow its decisions (`broadcast`).

gloo on CPU, NCCL on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the meta-training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates, writes and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def device(self, resolved: torch.device) -> torch.device:
        """The device of this rank: its own GPU (the local rank's) when training on CUDA."""
        if self.active and resolved.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return resolved

    def share(self, tasks: Sequence[T]) -> list[T]:
        """This rank's tasks of a meta-batch every rank drew alike."""
        return list(tasks[self.rank::self.size])

    def check_meta_batch(self, tasks_per_step: int) -> None:
        if self.active and tasks_per_step < self.size:
            raise ValueError(f"train.tasks_per_step is {tasks_per_step} but {self.size} processes take part: "
                             f"each needs at least one task of every meta-batch; set tasks_per_step >= {self.size}")

    def all_reduce_gradients(self, parameters: list[torch.nn.Parameter], my_tasks: int, all_tasks: int) -> None:
        """Replace each `.grad` (this rank's mean over its tasks) by the mean over the whole meta-batch."""
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]) * (my_tasks / all_tasks)
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sums of these numbers over the ranks (for the loss and accuracy shown of a meta-batch)."""
        if not self.active:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (a decision: stop, the loop's state)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_weights(self, module: torch.nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out = [None] * self.size if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def current_world() -> World:
    """The world this process joined (see `joined`), or a world of one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def joined(device: str = "auto") -> Iterator[World]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...):
    NCCL when training on CUDA, gloo otherwise; left when the block ends. Without torchrun: a world of one."""
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        yield current_world()
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield current_world()
    finally:
        dist.destroy_process_group()


def launch(processes: int, function: Callable[[], T]) -> T:
    """Run `function()` (picklable: a module-level function or a partial of one) in `processes` local processes
    joined into one world (torchrun's own launcher, standalone rendezvous on 127.0.0.1) and return rank 0's
    result. A failed rank fails the launch."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    return elastic_launch(config, _in_world)(function)[0]


def _in_world(function: Callable[[], T]) -> T:
    with joined():
        return function()
