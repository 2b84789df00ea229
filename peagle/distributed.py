"""Data parallelism for the trainer: processes started by ``torchrun``, one per device.

``train.grad_accum`` is the global batch: the sequences of one optimizer step, whatever the
number of processes. Each of N processes takes its contiguous share (``grad_accum / N``
sequences) of every step's batch in the seeded data order, accumulates their gradients locally,
scaled by the global batch size, and the processes sum them once per optimizer step, after the
last segment of the last sequence: one all-reduce per step, none inside sequence partitioning or
accumulation. Every process then takes the same AdamW step on the same fp32 weights, so N
processes train the drafter one process does, up to the rounding of the summation order.
The process group is NCCL on CUDA and gloo on CPU (the tests run 2 gloo processes).

``train.parallelism: fsdp`` shards the drafter instead (FSDP2, :func:`shard`): each process keeps
1/N of the fp32 weights and AdamW moments, gathers the weights at the start of a step, accumulates
whole gradients over its share and reduces them to its shard once, at the end of the step
(:func:`reduce_grads`). The arithmetic is the same as replication; checkpoints hold the gathered,
whole tensors (:func:`full_tensors`, :func:`shard_optimizer_state`), so their format is one.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from peagle.example import TrainingError

__all__ = ["World", "DistributedError", "shard", "gather_params", "reduce_grads", "full_tensors",
           "shard_optimizer_state"]


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
        """Refuse a launch the global batch cannot be split over, or a GPU this node lacks
        (``device``: this process's, :meth:`device`)."""
        if grad_accum % self.size:
            raise DistributedError(
                f"train.grad_accum={grad_accum} is not a multiple of the {self.size} training processes "
                f"(peagle train --nproc, or torchrun's --nproc_per_node x nodes): each takes grad_accum / "
                f"{self.size} sequences per optimizer step; set train.grad_accum to a multiple of {self.size} "
                f"or launch a divisor of {grad_accum}")
        if device.type != "cuda":
            return
        gpus = torch.cuda.device_count()
        if self.size > 1 and self.local_rank >= gpus:
            raise DistributedError(f"process {self.rank} wants GPU {self.local_rank}, but this node has "
                                   f"{gpus}; lower peagle train --nproc (torchrun's --nproc_per_node) to at most that")
        if self.size == 1 and (device.index or 0) >= gpus:
            have = f"GPUs 0-{gpus - 1}" if gpus else "no GPU torch can use (CUDA_VISIBLE_DEVICES, a CPU-only torch?)"
            raise DistributedError(f"runtime.device is {device}, but this node has {have}; set runtime.device to "
                                   + (f"cuda:0 .. cuda:{gpus - 1}" if gpus else "cpu"))

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


# --------------------------------------------------------------------------- FSDP2 (train.parallelism: fsdp)


def shard(drafter: torch.nn.Module) -> None:
    """Shard ``drafter`` over the processes in place (FSDP2): one parameter group per decoder layer
    and the root's (fc, embeddings, final norm, LM head, mask_hidden); each parameter becomes a
    DTensor holding this process's rows (dim 0). Build the optimizer on the sharded parameters.

    Gathered weights stay gathered from :func:`gather_params` at a step's start to
    :func:`reduce_grads` at its end: processes run different numbers of forwards and backwards
    (sequence lengths, segments, none on a short last batch), so those two must be their only
    collectives. Gradients are summed, not averaged: each loss is already scaled by the global batch.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # The drafter's device type, not FSDP's default (CUDA whenever there is a GPU, even for gloo on CPU).
    mesh = init_device_mesh(drafter.fc.weight.device.type, (torch.distributed.get_world_size(),))
    for layer in drafter.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(drafter, mesh=mesh, reshard_after_forward=False)
    register_fsdp_forward_method(drafter, "forward_hidden")  # the losses call it, not forward
    drafter.set_requires_gradient_sync(False)
    drafter.set_reshard_after_backward(False)
    drafter.set_reduce_scatter_unused_params(True)  # a parameter no sequence of this process used reduces zeros
    for module in _groups(drafter):  # these two are set per group
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def _groups(drafter: torch.nn.Module) -> list[torch.nn.Module]:
    return [drafter, *drafter.layers]


def gather_params(drafter: torch.nn.Module) -> None:
    """All-gather every group's weights (the step's first collective)."""
    for module in _groups(drafter):
        module.unshard()


def reduce_grads(drafter: torch.nn.Module) -> None:
    """Reduce the accumulated gradients to each process's shard and reshard the weights (the step's
    last collective): one backward of a zero loss on one element with synchronisation on. It adds
    exact zeros to the gradients, and a process without a sequence this step reduces zeros."""
    spec, dev = drafter.spec, drafter.fc.weight.device
    drafter.set_requires_gradient_sync(True)
    drafter.set_reshard_after_backward(True)
    try:
        zeros = torch.zeros(1, 1, dtype=torch.long, device=dev)
        out = drafter.forward_hidden(zeros, torch.zeros(1, 1, 3 * spec.hidden_size, device=dev), None, zeros)
        (out.sum() * 0).backward()
    finally:
        drafter.set_requires_gradient_sync(False)
        drafter.set_reshard_after_backward(False)


def full_tensors(tree: Any) -> Any:
    """``tree`` (a state dict, nested dicts and lists) with each DTensor gathered whole, on the CPU.
    A collective: every process calls it, in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor().cpu()
    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [full_tensors(v) for v in tree]
    return tree


def shard_optimizer_state(state: dict[str, Any], params: Sequence[torch.nn.Parameter]) -> dict[str, Any]:
    """An optimizer state dict of whole tensors (a checkpoint's) cut to the shards of ``params``
    (sharded parameters, in the optimizer's order): each process slices the copy it loaded, no
    communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def cut(p: torch.nn.Parameter, v: Any) -> Any:
        if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape:
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return v

    return {**state, "state": {i: {k: cut(params[i], v) for k, v in st.items()}
                               for i, st in state["state"].items()}}
