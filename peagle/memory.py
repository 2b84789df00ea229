"""Memory budgets for training runs: a deterministic measure, OOM caught and reported, not a crash.

``train.memory_budget_mb`` budgets what one training run may hold: the drafter's weights, the
target's LM head, gradients, optimizer moments, activations and the step's copy of its data.
Whether a cell of Table 1 fits must not flip with library versions, threads or allocator state,
so the memory behind a cell is *counted*, not read off the process:

* CPU: a :class:`LiveTensorAccountant` (a ``TorchDispatchMode``) counts the bytes of every tensor
  storage created while it is active and subtracts them when the storage dies, plus
  ``resident_bytes`` (weights, LM head) held before it started. ``memory_measure`` =
  ``"live-tensor accountant"``. The same ops on the same shapes give the same bytes on every
  machine. A step whose live bytes pass the budget raises :class:`BudgetExceeded` right after
  the op whose output pushed them over (the output already exists; it is freed on unwinding).
* CUDA: the caching allocator's own statistics: ``set_per_process_memory_fraction`` caps the
  device memory (exceeding it raises ``torch.OutOfMemoryError``), ``max_memory_allocated`` is the
  peak. ``memory_measure`` = ``"cuda allocator"``. The allocator sees what the accountant cannot
  (kernel workspaces, cuBLAS/flash buffers) and its cap is what really fails on a GPU, so it, not
  a count that could pass a run the device cannot hold, decides there.

Sharded training (FSDP): the accountant counts a DTensor by its local shard (ops inside DTensor
ops are not seen), and FSDP's gathered weights -- storages it resizes in place -- as bytes the
trainer declares with :meth:`MemoryMeter.hold`.

Every metered run records ``peak_mem_mb``, ``budget_mb``, ``memory_measure`` and
``budget_margin`` = peak / budget - 1 (:func:`budget_record`); Table 1 flags cells within 10%.

A budget below what the drafter alone needs (weights + gradients + AdamW moments) is refused up
front with :class:`MemoryBudgetError`, before any training work.

Training uses :func:`start_meter` / :func:`stop_meter` with the :func:`reports_oom` decorator
(how ``peagle.train.train_drafter`` uses it), or :func:`metered` (a context manager) around a
unit of work (the memory-scaling benchmark). :func:`cap_memory` / :func:`memory_budget` remain a
hard cap (RLIMIT_AS address space on CPU, the allocator fraction on CUDA) for processes that only
need a safety limit (``peagle.bench.attention``, ``peagle.bench.cuda_checks``); they do not measure.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
import re
import resource
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = [
    "MemoryBudgetError",
    "BudgetExceeded",
    "LiveTensorAccountant",
    "MemoryMeter",
    "start_meter",
    "stop_meter",
    "active_meter",
    "metered",
    "budget_record",
    "reports_oom",
    "MemoryCap",
    "cap_memory",
    "release_cap",
    "active_cap",
    "memory_budget",
    "is_oom",
    "model_bytes",
    "tensor_bytes",
    "vm_size_bytes",
    "rss_bytes",
]

MB = 2**20
ACCOUNTANT = "live-tensor accountant"
CUDA_ALLOCATOR = "cuda allocator"


class MemoryBudgetError(ValueError):
    """The configured budget cannot even hold the model's training state (an input error)."""


def budget_record(peak_bytes: int | None, budget_mb: int | None, measure: str) -> dict[str, Any]:
    """The memory fields of a run's summary: peak and budget in MiB, the measure, the margin.

    ``budget_margin`` = peak / budget - 1 (negative: under budget); None without a budget or peak.
    """
    peak_mb = None if peak_bytes is None else peak_bytes / MB
    margin = None if peak_mb is None or not budget_mb else peak_mb / budget_mb - 1.0
    return {"peak_mem_mb": peak_mb, "budget_mb": budget_mb, "memory_measure": measure, "budget_margin": margin}


class BudgetExceeded(RuntimeError):
    """A run went past its memory budget (it is out of memory).

    ``peak_bytes``: the bytes the run held (or tried to hold) when it went over -- the accountant's
    live bytes including the op output that crossed the budget, or on CUDA the allocated bytes
    plus the failed request. None when unknown (a plain :func:`memory_budget` cap).
    """

    def __init__(self, budget_mb: int | None, device: str, error: str, *, peak_bytes: int | None = None,
                 measure: str | None = None) -> None:
        under = "without a budget" if budget_mb is None else f"under a budget of {budget_mb} MB"
        super().__init__(f"out of memory {under} on {device}: {error}")
        self.budget_mb, self.device, self.error = budget_mb, device, error
        self.peak_bytes, self.measure = peak_bytes, measure

    def result(self) -> dict[str, Any]:
        """The ``{"status": "OOM", ...}`` record runs write instead of their normal result."""
        out: dict[str, Any] = {"status": "OOM", "budget_mb": self.budget_mb, "device": self.device,
                               "error": self.error}
        if self.measure is not None:
            out.update(budget_record(self.peak_bytes, self.budget_mb, self.measure))
        return out


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


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``t``: a DTensor's local shard (FSDP), any other tensor itself."""
    return getattr(t, "_local_tensor", t)


def model_bytes(params: Iterable[torch.nn.Parameter], moments: int = 2) -> tuple[int, int]:
    """(weights, training state) bytes: state = weights + (1 gradient + ``moments``) per trainable.

    ``moments``: optimizer tensors per trainable parameter (AdamW: 2). A sharded (DTensor)
    parameter counts its local shard.
    """
    weights = state = 0
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        b = _local(p).numel() * p.element_size()
        weights += b
        state += b * ((1 + moments) if p.requires_grad else 0)
    return weights, weights + state


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats count once; a DTensor
    its local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = _local(t).untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------- live-tensor accountant

_FRESH, _ALIAS, _RESIZE, _ADOPT = 0, 1, 2, 3
_OP_KIND: dict[Any, int] = {}  # OpOverload -> kind; the schema is read once per op


def _op_kind(func: Any) -> int:
    """How an op's outputs relate to storage: new (_FRESH), aliases of its inputs (_ALIAS: views,
    in-place), possibly resized aliases (_RESIZE: out= and resize_), or a storage made outside the
    dispatcher that the op hands in (_ADOPT: ``lift_fresh`` after ``torch.tensor(data)``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("lift_fresh") and "copy" not in name:
        return _ADOPT
    try:
        returns = [r for r in func._schema.returns if "Tensor" in str(r.type)]
    except AttributeError:
        return _FRESH
    if not returns:
        return _ALIAS  # no tensor out (sizes, .item()): nothing to count
    if any(r.alias_info is None for r in returns):
        return _FRESH
    if name.startswith(("resize", "set_")) or getattr(func, "_overloadname", "").startswith("out"):
        return _RESIZE
    return _ALIAS


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors of an op's output: a tensor, or a (nested) tuple/list of them. A DTensor is its
    local shard: its wrapper's storage has the global size, and the ops inside it are not seen."""
    if isinstance(out, torch.Tensor):
        yield out if type(out) is torch.Tensor else _local(out)
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


class LiveTensorAccountant(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while active: a deterministic memory peak.

    Every op dispatched while the mode is active (forward, autograd backward, optimizer steps,
    ``torch.tensor`` constants) is inspected after it runs: each output storage that is new -- not
    a view or in-place result, not the storage of one of its inputs -- adds ``nbytes`` to
    ``live_bytes``, keyed by the storage so that views and aliases count once; a weak reference
    on the storage subtracts them exactly when it dies. ``live_bytes`` = ``resident_bytes`` (memory
    the budget covers but that exists already: weights, the target LM head) + counted storages;
    ``peak_bytes`` is its maximum since construction or :meth:`reset_peak`.

    With ``budget_bytes``, the op whose output takes ``live_bytes`` past it raises
    :class:`BudgetExceeded` *after* it ran (its output exists for that moment and is freed as the
    exception unwinds); ``peak_bytes`` then includes that output.

    Deterministic: bytes depend only on which ops run on which shapes and dtypes, never on threads,
    allocator caching or address space. Not seen: workspaces internal to one kernel (e.g. the
    scores inside one fused SDPA call, BLAS packing buffers), allocator rounding and caching,
    tensors created before it was entered (unless passed as ``resident_bytes``; their storages
    are recognised as existing when they flow through ops), storages made outside the dispatcher
    (``torch.frombuffer``, ``torch.from_numpy``, safetensors loading) and growth of a
    pre-existing storage by an ``out=`` op.
    """

    def __init__(self, budget_bytes: int | None = None, resident_bytes: int = 0, device: str = "cpu") -> None:
        super().__init__()
        self.budget_bytes, self.resident_bytes, self.device = budget_bytes, int(resident_bytes), device
        self.counted_bytes = 0
        self.peak_bytes = self.resident_bytes
        self.exceeded: BudgetExceeded | None = None  # the first overflow, kept for the OOM record
        self.enforcing = True  # False: count, never raise (MemoryMeter.deferred)
        self._live: dict[int, _StorageRef] = {}  # storage _cdata -> its weak reference
        self._freed = self._on_free  # one bound method for every reference, not one per storage

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no torch.compile under this mode; skipping the wrapper saves ~0.4 us per op

    @property
    def live_bytes(self) -> int:
        return self.resident_bytes + self.counted_bytes

    def reset_peak(self) -> None:
        """Start a new peak (e.g. per optimizer step) at the current live bytes."""
        self.peak_bytes = self.live_bytes

    # Runs once per dispatched op (thousands per training step): kept flat, every call counts.
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func._op(*args, **kwargs) if kwargs else func._op(*args)
        kind = _OP_KIND.get(func)
        if kind is None:
            kind = _OP_KIND[func] = _op_kind(func)
        if kind == _ALIAS:
            return out
        if type(out) is torch.Tensor:
            grew = self._track(out.untyped_storage(), kind, args, kwargs)
        else:
            grew = False
            for t in _tensors(out):
                grew = self._track(t.untyped_storage(), kind, args, kwargs) or grew
        if grew:
            live = self.resident_bytes + self.counted_bytes
            if live > self.peak_bytes:
                self.peak_bytes = live
            if self.budget_bytes is not None and live > self.budget_bytes and self.enforcing:
                self._over(func, live)
        return out

    def _track(self, st: torch.UntypedStorage, kind: int, args: Any, kwargs: Any) -> bool:
        """Count ``st`` if it is new; True if live bytes grew."""
        key = st._cdata
        ref = self._live.get(key)
        if ref is not None and ref() is st:  # already counted (an alias of an earlier output)
            if kind != _RESIZE:
                return False
            grow = st.nbytes() - ref.nbytes
            ref.nbytes += grow
            self.counted_bytes += grow
            return grow > 0
        if kind == _RESIZE:
            return False  # out= into a storage from before the mode: not ours to count
        if kind == _FRESH and _storage_use_count(key) > _FRESH_USES and _is_input_storage(key, (args, kwargs)):
            return False  # an unannotated alias of an input (e.g. _unsafe_view of a weight)
        ref = _StorageRef(st, self._freed)
        ref.key, ref.nbytes = key, st.nbytes()
        self._live[key] = ref
        self.counted_bytes += ref.nbytes
        return ref.nbytes > 0

    def _on_free(self, ref: _StorageRef) -> None:
        if self._live.get(ref.key) is ref:
            del self._live[ref.key]
            self.counted_bytes -= ref.nbytes

    def _over(self, func: Any, live: int) -> None:
        budget = int(self.budget_bytes or 0)
        err = BudgetExceeded(
            budget // MB, self.device,
            f"{func} took live tensors to {live / MB:.2f} MB, over the budget of {budget / MB:.2f} MB",
            peak_bytes=live, measure=ACCOUNTANT)
        if self.exceeded is None:
            self.exceeded = err
        raise err


class _StorageRef(weakref.ref):
    """A weak reference to a counted storage that remembers its key and bytes."""

    __slots__ = ("key", "nbytes")


_storage_use_count = torch._C._storage_Use_Count


def _fresh_uses() -> int:
    t = torch.empty(1)
    st = t.untyped_storage()  # held, as in _track: the Python storage object is one of the uses
    return int(_storage_use_count(st._cdata))


_FRESH_USES = _fresh_uses()  # uses of a storage held by one new tensor (and its Python object)


def _is_input_storage(key: int, args: Any) -> bool:
    """True if a tensor in ``args`` (nested tuples, lists and dict values) uses storage ``key``."""
    for a in args.values() if isinstance(args, dict) else args:
        if isinstance(a, torch.Tensor):
            if a.untyped_storage()._cdata == key:
                return True
        elif isinstance(a, (tuple, list, dict)) and _is_input_storage(key, a):
            return True
    return False


# --------------------------------------------------------------------------- meters


@dataclass
class MemoryMeter:
    """Measures (and with ``budget_mb`` enforces) one run's memory; see the module doc.

    CPU: a :class:`LiveTensorAccountant` (entered by :func:`start_meter`); CUDA: the allocator's
    peak statistics under a :class:`MemoryCap`.
    """

    budget_mb: int | None
    device: torch.device
    measure: str
    accountant: LiveTensorAccountant | None = None
    cap: MemoryCap | None = None
    stopped: bool = False

    def reset_peak(self) -> None:
        if self.accountant is not None:
            self.accountant.reset_peak()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        """Peak since the last :meth:`reset_peak` (for CUDA: all allocated bytes on the device)."""
        if self.accountant is not None:
            return self.accountant.peak_bytes
        return torch.cuda.max_memory_allocated(self.device)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's tensors uncounted (work that is not the run's, e.g. checkpoint copies).
        Storages it creates stay uncounted for life; on CUDA the allocator counts them anyway."""
        if self.accountant is None or self.stopped:
            yield
            return
        with _disable_current_modes():
            yield

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Count the block's tensors but raise no :class:`BudgetExceeded` inside it: collectives every
        process must finish (FSDP's gradient reduction). Past the budget, the next op that allocates
        raises. On CUDA the allocator's cap cannot wait: an allocation past it fails there."""
        acct = self.accountant
        if acct is None or self.stopped:
            yield
            return
        acct.enforcing = False
        try:
            yield
        finally:
            acct.enforcing = True

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` more (negative: fewer) that exist outside the accountant's view: FSDP's
        gathered parameters, whose storages it resizes in place. The allocator sees them (CUDA): no-op."""
        acct = self.accountant
        if acct is None or self.stopped:
            return
        acct.resident_bytes += nbytes
        acct.peak_bytes = max(acct.peak_bytes, acct.live_bytes)

    def record(self, peak_bytes: int | None) -> dict[str, Any]:
        return budget_record(peak_bytes, self.budget_mb, self.measure)

    def exceeded(self, err: BaseException) -> BudgetExceeded:
        """``err`` (an OOM) as a :class:`BudgetExceeded` carrying the bytes that went over."""
        if isinstance(err, BudgetExceeded) and err.measure is not None:
            return err
        if self.accountant is not None and self.accountant.exceeded is not None:
            return self.accountant.exceeded
        msg = str(err).strip().splitlines()[-1][:400] if str(err).strip() else type(err).__name__
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.memory_allocated(self.device) + _requested_bytes(str(err))
        return BudgetExceeded(self.budget_mb, str(self.device), msg, peak_bytes=peak, measure=self.measure)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.accountant is not None:
            self.accountant.__exit__(None, None, None)
        if self.cap is not None:
            self.cap.release()
            if self.cap in _ACTIVE:
                _ACTIVE.remove(self.cap)


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _requested_bytes(msg: str) -> int:
    """The request of a CUDA OOM message ("Tried to allocate 2.00 GiB"), 0 if absent."""
    m = re.search(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)", msg)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


_METERS: list[MemoryMeter] = []


def active_meter() -> MemoryMeter | None:
    """The meter started by :func:`start_meter` and not yet stopped, if any."""
    return _METERS[-1] if _METERS else None


def start_meter(budget_mb: int | None, device: torch.device | str, *, resident_bytes: int = 0,
                required_bytes: int = 0) -> MemoryMeter:
    """Measure from now on -- this thread's tensors (CPU), the device's allocations (CUDA) --
    under ``budget_mb`` MiB (None: measure only).

    resident_bytes: budgeted memory that already exists (weights, the target LM head): added to
    the accountant's count on CPU; already in the allocator's count on CUDA.
    required_bytes: the least the run needs (weights + training state); a smaller budget raises
    :class:`MemoryBudgetError` before anything starts.
    """
    if active_meter() is not None:
        raise RuntimeError("a memory meter is already active; stop it first")
    dev = torch.device(device)
    if budget_mb is not None and int(budget_mb) * MB < required_bytes:
        raise MemoryBudgetError(
            f"memory budget of {budget_mb} MB (train.memory_budget_mb) is below the "
            f"{required_bytes / MB:.1f} MB the drafter alone needs (weights, gradients and optimizer "
            f"moments); raise it or set it to null"
        )
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        cap = cap_memory(budget_mb, dev)
        torch.cuda.reset_peak_memory_stats(dev)
        meter = MemoryMeter(budget_mb, dev, CUDA_ALLOCATOR, cap=cap)
    elif dev.type == "cpu":
        budget = None if budget_mb is None else int(budget_mb) * MB
        acct = LiveTensorAccountant(budget, resident_bytes, str(dev))
        acct.__enter__()
        meter = MemoryMeter(budget_mb, dev, ACCOUNTANT, accountant=acct)
    else:
        raise MemoryBudgetError(f"memory budgets support cpu and cuda devices, not {dev}")
    _METERS.append(meter)
    return meter


def stop_meter() -> None:
    """Stop the active meter (no-op without one); its last peak stays readable."""
    while _METERS:
        _METERS.pop().stop()


@contextmanager
def metered(budget_mb: int | None, device: torch.device | str, *, resident_bytes: int = 0,
            required_bytes: int = 0) -> Iterator[MemoryMeter]:
    """Run the block under :func:`start_meter`; an OOM inside it is re-raised, once the meter is
    stopped, as :class:`BudgetExceeded` with the bytes that went over."""
    meter = start_meter(budget_mb, device, resident_bytes=resident_bytes, required_bytes=required_bytes)
    try:
        yield meter
    except BaseException as err:
        if not is_oom(err):
            raise
        stop_meter()
        exc = meter.exceeded(err)
        _drop(err)
        raise exc from None
    finally:
        stop_meter()


def _drop(err: BaseException) -> None:
    # Drop the failed frames (and the activations they hold) before anything else allocates.
    err.__traceback__ = None
    gc.collect()


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
    _drop(err)
    return BudgetExceeded(cap.budget_mb, cap.device, msg)


def reports_oom(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Decorate a training function with an ``out_dir`` argument that calls :func:`start_meter`.

    An out-of-memory error raised while its meter is active (:class:`BudgetExceeded` from the
    accountant, a CUDA OOM) is turned into ``out_dir/summary.json = {"status": "OOM",
    "budget_mb": ..., "peak_mem_mb": ..., "memory_measure": ..., "budget_margin": ...,
    "error": ..., ...}`` (plus the number of optimizer steps completed, from
    ``out_dir/metrics.jsonl``), which is also returned. Other errors propagate unchanged; the
    meter is always stopped on return.
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return fn(*args, **kwargs)
        except BaseException as err:
            meter = active_meter()
            if meter is None or not is_oom(err):
                raise
            stop_meter()
            exc = meter.exceeded(err)
            _drop(err)
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
            stop_meter()

    return wrapper
