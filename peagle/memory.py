"""Memory budgets for training runs: a real cap, OOM caught and reported, not a crash.

``train.memory_budget_mb`` caps what one training run may hold: the drafter's weights,
gradients, optimizer moments and activations (on CPU, memory the process already held when the
cap was set -- interpreter, libraries, the loaded hidden states -- is not counted).

* CPU: ``RLIMIT_AS`` (address space) is lowered to the current virtual size plus the part of
  the budget not yet used by the weights. An allocation beyond it fails inside PyTorch's
  allocator, which raises a catchable ``RuntimeError`` ("DefaultCPUAllocator: can't allocate
  memory"); nothing is killed. RLIMIT_AS is process-wide, so set it only in a process that
  exists to train (the CLI, or a subprocess in tests and benchmarks).
* CUDA: ``torch.cuda.set_per_process_memory_fraction(budget / total)``; exceeding it raises
  ``torch.OutOfMemoryError``.

A budget below what the drafter alone needs (weights + gradients + AdamW moments) is refused up
front with :class:`MemoryBudgetError`, before any training work.

Use :func:`memory_budget` (a context manager) around a unit of work, or, inside a long function
that should not be re-indented, :func:`cap_memory` / :func:`release_cap` with the
:func:`reports_oom` decorator on the function (how ``peagle.train.train_drafter`` uses it).
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
import resource
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MemoryBudgetError",
    "BudgetExceeded",
    "MemoryCap",
    "cap_memory",
    "release_cap",
    "active_cap",
    "memory_budget",
    "reports_oom",
    "is_oom",
    "model_bytes",
    "vm_size_bytes",
    "rss_bytes",
]

MB = 2**20


class MemoryBudgetError(ValueError):
    """The configured budget cannot even hold the model's training state (an input error)."""


class BudgetExceeded(RuntimeError):
    """An allocation failed under an active memory cap (the run is out of memory)."""

    def __init__(self, budget_mb: int, device: str, error: str) -> None:
        super().__init__(f"out of memory under a budget of {budget_mb} MB on {device}: {error}")
        self.budget_mb, self.device, self.error = budget_mb, device, error

    def result(self) -> dict[str, Any]:
        """The ``{"status": "OOM", ...}`` record runs write instead of their normal result."""
        return {"status": "OOM", "budget_mb": self.budget_mb, "device": self.device, "error": self.error}


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (memory caps need Linux)")


def vm_size_bytes() -> int:
    """Current virtual address-space size of this process (what RLIMIT_AS limits)."""
    return _proc_status_kb("VmSize") * 1024


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _proc_status_kb("VmRSS") * 1024


def is_oom(err: BaseException) -> bool:
    """True for an allocation failure: CPU allocator, CUDA OOM or a Python MemoryError."""
    if isinstance(err, (MemoryError, BudgetExceeded)) or type(err).__name__ == "OutOfMemoryError":
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in msg or "out of memory" in msg.lower() or "Cannot allocate memory" in msg
    )


def model_bytes(params: Iterable[torch.nn.Parameter], moments: int = 2) -> tuple[int, int]:
    """(weights, training state) bytes: state = weights + (1 gradient + ``moments``) per trainable.

    ``moments``: optimizer tensors per trainable parameter (AdamW: 2).
    """
    weights = state = 0
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        b = p.numel() * p.element_size()
        weights += b
        state += b * ((1 + moments) if p.requires_grad else 0)
    return weights, weights + state


@dataclass
class MemoryCap:
    """An applied cap. ``limit_bytes``: RLIMIT_AS (CPU) or the allocator limit (CUDA)."""

    budget_mb: int
    device: str
    limit_bytes: int
    _previous: Any = None
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        if self.device.startswith("cuda"):
            torch.cuda.set_per_process_memory_fraction(1.0, torch.device(self.device))
        else:
            resource.setrlimit(resource.RLIMIT_AS, self._previous)
        self.released = True


_ACTIVE: list[MemoryCap] = []  # process-wide, like the limit itself


def active_cap() -> MemoryCap | None:
    """The cap currently applied in this process, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def cap_memory(budget_mb: int | None, device: torch.device | str, *, resident_bytes: int = 0,
               required_bytes: int = 0) -> MemoryCap | None:
    """Apply a budget of ``budget_mb`` MiB to this process; None (no budget) does nothing.

    resident_bytes: budgeted memory already allocated (e.g. the model's weights): on CPU it is
    already inside the current address space, so only ``budget - resident`` is added to it.
    required_bytes: the least the run needs (weights + training state); a smaller budget raises
    :class:`MemoryBudgetError` before anything is capped.
    """
    if budget_mb is None:
        return None
    if active_cap() is not None:
        raise RuntimeError("a memory cap is already active in this process; release it first")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # the allocator's limit is per device index
        dev = torch.device("cuda", torch.cuda.current_device())
    budget = int(budget_mb) * MB
    if budget < required_bytes:
        raise MemoryBudgetError(
            f"memory budget of {budget_mb} MB (train.memory_budget_mb) is below the "
            f"{required_bytes / MB:.1f} MB the drafter alone needs (weights, gradients and optimizer "
            f"moments); raise it or set it to null"
        )
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        if budget > total:
            raise MemoryBudgetError(f"memory budget of {budget_mb} MB exceeds the {total / MB:.0f} MB of {dev}")
        torch.cuda.set_per_process_memory_fraction(budget / total, dev)
        cap = MemoryCap(int(budget_mb), str(dev), budget)
    elif dev.type == "cpu":
        # Start the intra-op thread pool now: threads created later need address space for
        # their stacks, and a failed thread start is not a clean allocation error.
        torch.ones(1 << 20).sum()
        previous = resource.getrlimit(resource.RLIMIT_AS)
        limit = vm_size_bytes() + budget - resident_bytes
        if previous[1] != resource.RLIM_INFINITY:
            limit = min(limit, previous[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, previous[1]))
        cap = MemoryCap(int(budget_mb), "cpu", limit, previous)
    else:
        raise MemoryBudgetError(f"memory budgets support cpu and cuda devices, not {dev}")
    _ACTIVE.append(cap)
    return cap


def release_cap() -> None:
    """Lift the active cap (no-op without one)."""
    while _ACTIVE:
        _ACTIVE.pop().release()


@contextmanager
def memory_budget(budget_mb: int | None, device: torch.device | str, *, resident_bytes: int = 0,
                  required_bytes: int = 0) -> Iterator[MemoryCap | None]:
    """Run the block under :func:`cap_memory`; an allocation failure inside it is re-raised as
    :class:`BudgetExceeded` once the cap is lifted. Without a budget the block runs uncapped."""
    cap = cap_memory(budget_mb, device, resident_bytes=resident_bytes, required_bytes=required_bytes)
    try:
        yield cap
    except BaseException as err:
        if cap is None or not is_oom(err):
            raise
        release_cap()
        raise _exceeded(cap, err) from None
    finally:
        release_cap()


def _exceeded(cap: MemoryCap, err: BaseException) -> BudgetExceeded:
    msg = err.error if isinstance(err, BudgetExceeded) else str(err).strip().splitlines()[-1][:400]
    # Drop the failed frames (and the activations they hold) before anything else allocates.
    err.__traceback__ = None
    gc.collect()
    return BudgetExceeded(cap.budget_mb, cap.device, msg)


def reports_oom(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Decorate a training function with an ``out_dir`` argument that calls :func:`cap_memory`.

    An out-of-memory error raised while its cap is active is turned into
    ``out_dir/summary.json = {"status": "OOM", "budget_mb": ..., "error": ..., ...}`` (plus the
    number of optimizer steps completed, from ``out_dir/metrics.jsonl``), which is also returned.
    Other errors propagate unchanged; the cap is always lifted on return.
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return fn(*args, **kwargs)
        except BaseException as err:
            cap = active_cap()
            if cap is None or not is_oom(err):
                raise
            release_cap()
            exc = _exceeded(cap, err)
            out = Path(sig.bind(*args, **kwargs).arguments["out_dir"])
            metrics = out / "metrics.jsonl"
            steps = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.exists() else 0
            summary = {**exc.result(), "completed_steps": steps}
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, out / "summary.json")
            return summary
        finally:
            release_cap()

    return wrapper
