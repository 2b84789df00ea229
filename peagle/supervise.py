"""``peagle train`` trains in child processes, so that a run that dies for memory is an OOM cell.

A run over ``train.memory_budget_mb`` ends with ``summary.json`` status ``OOM`` from inside the
training loop (:mod:`peagle.memory`). Two deaths for memory happen outside it: the kernel's OOM
killer ends a process with SIGKILL (nothing in it runs again), and an allocation fails where no
meter is active (loading, building the drafter: ``MemoryError``, "can't allocate memory", CUDA
out of memory). Both become the same result: status ``OOM``, the cause in ``error``, and the
command succeeds, so that the DAG goes on and the table shows the cell as OOM. Any other failure
fails the command, with the child's traceback in the log.

This process (the supervisor) starts ``python -m peagle train --in-process ...``, or with
``--nproc N`` > 1 torchrun's launcher with N of them. A child whose allocation fails records
the OOM itself and exits ``EXIT_OOM`` (torchrun then stops its peers); for a killed child this
process records it. Checkpoints stay: the run, rerun (e.g. ``--forcerun train`` on a larger
machine), resumes from its last one.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["EXIT_OOM", "supervise", "record_oom"]

EXIT_OOM = 75  # a child recorded an out-of-memory result (sysexits' EX_TEMPFAIL: retry with more memory)


def supervise(argv: list[str], nproc: int, cfg: Any, target_json: str, method: str, ctx: int,
              out_dir: str | Path, log: Any) -> int:
    """Run ``peagle <argv> --in-process`` in ``nproc`` child processes; the command's exit status."""
    child = [*argv, "--in-process"]
    # Exit statuses of the failed processes, the first first: the peers of a process that died fail
    # too (a collective lost its peer), and may be seen in the same instant.
    codes = _torchrun(nproc, child) if nproc > 1 else [_run([sys.executable, "-m", "peagle", *child])]
    codes = [c for c in codes if c != 0]
    if not codes:
        return 0
    if EXIT_OOM in codes:
        log(f"OUT OF MEMORY outside the memory meter (recorded in {Path(out_dir) / 'summary.json'})")
        return 0
    if -signal.SIGKILL not in codes:
        return codes[0] if codes[0] > 0 else 128 - codes[0]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    limit = host_memory_limit()
    cause = (f"host memory: training process killed by signal 9 (SIGKILL), the kernel OOM killer's signal; "
             f"peak RSS {peak_mb:.0f} MiB" + (f", limit {limit[0] / 2**20:.0f} MiB ({limit[1]})" if limit else ""))
    record_oom(cfg, target_json, method, ctx, out_dir, cause, device="host", peak_rss_mb=peak_mb,
               host_limit_mb=None if limit is None else limit[0] / 2**20)
    log(f"OUT OF MEMORY: {cause} (recorded in {Path(out_dir) / 'summary.json'}; a rerun resumes from its "
        f"last checkpoint)")
    return 0


def record_oom(cfg: Any, target_json: str, method: str, ctx: int, out_dir: str | Path, cause: str, *,
               device: str, **extra: Any) -> dict[str, Any]:
    """Write ``out_dir/summary.json`` = an OOM result with ``cause`` (the shape of a run over its budget)."""
    from peagle.train import record_failure

    metrics = Path(out_dir) / "metrics.jsonl"
    steps = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.exists() else 0
    return record_failure(cfg, target_json, method, ctx, out_dir,
                          {"status": "OOM", "budget_mb": cfg.train.memory_budget_mb, "device": device,
                           "error": cause, **extra, "completed_steps": steps})


def host_memory_limit() -> tuple[int, str] | None:
    """The host memory this process may use, if capped: (bytes, what caps it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        return soft, "RLIMIT_AS"
    try:  # cgroup v2 (SLURM's --mem, containers): the group's memory.max
        group = Path("/proc/self/cgroup").read_text().splitlines()[0].split("::", 1)[1]
        value = (Path("/sys/fs/cgroup") / group.lstrip("/") / "memory.max").read_text().strip()
    except (OSError, IndexError):
        return None
    return (int(value), "cgroup memory.max") if value.isdigit() else None


def _run(cmd: list[str]) -> int:
    """Run ``cmd``; its exit status (-N: killed by signal N). A SIGTERM to this process ends it too."""
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _torchrun(nproc: int, child: list[str]) -> list[int]:
    """torchrun --standalone --nproc_per_node ``nproc`` -m peagle ``child``; the exit statuses of
    the processes that failed, the first first (torchrun stops the others after it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "peagle"])
    args.training_script_args = child  # not parsed by torchrun: its options would claim prefixes (--nproc)
    try:
        run(args)
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        return [first.exitcode] + [f.exitcode for r, f in err.failures.items() if r != rank]
    return []
