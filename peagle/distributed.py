"""Data parallelism for the trainer: processes started by ``torchrun``, one per device.

``train.grad_accum`` is the global batch: the sequences of one optimizer step, whatever the
number of processes. Each of N processes takes its contiguous share (``grad_accum / N``
sequences) of every step's batch in the seeded data order, accumulates their gradients locally,
scaled by the global batch size, and the processes sum them once per optimizer step, after the
last segment of the last sequence: one all-reduce per step, none inside sequence partitioning or
accumulation. Every process then takes the same AdamW step on the same fp32 weights, so N
processes train the drafter one process does, up to the rounding of the summation order.
The process group is NCCL on CUDA and gloo on CPU (the tests run 2 gloo processes).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from peagle.example import TrainingError

__all__ = ["World", "DistributedError"]


class DistributedError(TrainingError):
    """A launch that cannot train as asked (names the setting)."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (1 process without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one process)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, grad_accum: int, device: torch.device) -> None:
        """Refuse a launch the global batch cannot be split over, or a GPU this node lacks."""
        if grad_accum % self.size:
            raise DistributedError(
                f"train.grad_accum={grad_accum} is not a multiple of the {self.size} training processes "
                f"(torchrun --nproc_per_node x nodes): each takes grad_accum / {self.size} sequences per optimizer "
                f"step; set train.grad_accum to a multiple of {self.size} or launch a divisor of {grad_accum}")
        if device.type == "cuda" and self.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"process {self.rank} wants GPU {self.local_rank}, but this node has "
                                   f"{torch.cuda.device_count()}; lower --nproc_per_node to at most that")

    def device(self, device: torch.device) -> torch.device:
        """This process's device: ``cuda:<local rank>`` on CUDA, the device as given otherwise."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.size > 1 else device

    def init(self, device: torch.device) -> None:
        if self.size > 1 and not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        """Wait for every process (the end of a training run); the group stays up for the next one."""
        if self.size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    @staticmethod
    def shutdown() -> None:
        """Tear the process group down (once, when the process is done training)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def share(self, batch: Sequence[int]) -> list[int]:
        """This process's contiguous share of one step's global batch (the last, short batch of an
        epoch may leave a process with fewer sequences, or none)."""
        per = -(-len(batch) // self.size)
        return list(batch[self.rank * per:(self.rank + 1) * per])

    def sum_grads(self, params: Sequence[torch.nn.Parameter],
                  comm_ctx: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Sum every parameter's gradient over the processes, in one flat all-reduce.

        The flat buffer is ordinary memory (a memory meter counts it); ``comm_ctx`` is entered
        around the collective call alone (the trainer pauses its live-tensor accountant there).
        """
        if self.size == 1:
            return
        for p in params:  # a process without a sequence this step has no gradient yet
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        with comm_ctx():
            torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum of a few numbers over the processes (float64)."""
        return self._reduce(values, device, "SUM")

    def max(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise maximum of a few numbers over the processes (float64)."""
        return self._reduce(values, device, "MAX")

    def _reduce(self, values: Sequence[float], device: torch.device, op: str) -> list[float]:
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
        return t.tolist()
