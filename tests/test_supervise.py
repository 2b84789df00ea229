"""``peagle train`` supervises its training process: a death for memory is an OOM cell, not a failed job.

The faults are injected into the child (``--in-process``) by a ``sitecustomize`` on PYTHONPATH:
``kill`` SIGKILLs it right after its step-2 checkpoint (what the kernel's OOM killer does),
``alloc`` fails an allocation before the memory meter starts (the C++ allocator's error), ``bug``
raises an error that is not about memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from peagle.evaluate import not_trained_result

ROOT = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """
import os, signal, sys

fault = os.environ.get("PEAGLE_TEST_FAULT")
if fault and "--in-process" in sys.argv:
    from peagle import checkpoint, memory

    if fault == "kill":
        save = checkpoint.save_drafter

        def save_and_die(directory, *args, **kwargs):
            out = save(directory, *args, **kwargs)
            if str(directory).endswith("step_0000002"):
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        checkpoint.save_drafter = save_and_die
    else:
        def fail(*args, **kwargs):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 "
                               "bytes. Error code 12 (Cannot allocate memory)" if fault == "alloc" else "a bug")

        memory.start_meter = fail
"""


def _train(tiny_config, art, tmp: Path, out: Path, fault: str | None = None,
           nproc: int = 1) -> subprocess.CompletedProcess:
    cfg = replace(tiny_config, runtime=replace(tiny_config.runtime, threads=1),
                  train=replace(tiny_config.train, epochs=1, checkpoint_every=1, grad_accum=3 if nproc == 1 else 2))
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)])}
    env.pop("PEAGLE_TEST_FAULT", None)
    if fault:
        env["PEAGLE_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "peagle", "train", "--config", str(tmp / "config.yaml"), "--target",
           str(art["target_json"]), "--hidden", str(art["hidden_dir"]), "--method", "peagle", "--ctx", "24",
           "--out-dir", str(out), "--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_run_killed_for_memory_is_an_oom_cell_and_resumes_when_rerun(tiny_artifacts, tiny_config, tmp_path):
    out = tmp_path / "run"
    proc = _train(tiny_config, tiny_artifacts, tmp_path, out, fault="kill")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(out)
    assert s["status"] == "OOM" and s["device"] == "host" and s["completed_steps"] == 2, s
    assert s["error"].startswith("host memory: training process killed by signal 9 (SIGKILL)"), s
    assert s["peak_rss_mb"] > 0 and (s["method"], s["ctx"], s["seed"]) == ("peagle", 24, 0)
    assert "OUT OF MEMORY: host memory" in proc.stderr
    # The cell reads OOM, the cause travels with it into the tables' provenance (``training``).
    cell = not_trained_result(s, out, "prompts.jsonl", 3)
    assert cell["status"] == "OOM" and cell["training"]["error"] == s["error"]

    proc = _train(tiny_config, tiny_artifacts, tmp_path, out)  # rerun: resumes, does not stop at the OOM
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step_0000002'} at optimizer step 2/4" in proc.stderr
    assert _summary(out)["status"] == "ok" and (out / "final" / "config.json").exists()


@pytest.mark.slow
def test_a_process_of_several_killed_for_memory_is_an_oom_cell(tiny_artifacts, tiny_config, tmp_path):
    """Under torchrun (--nproc 2): process 0 is killed, process 1 then fails on its lost peer."""
    out = tmp_path / "run"
    proc = _train(tiny_config, tiny_artifacts, tmp_path, out, fault="kill", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(out)
    assert s["status"] == "OOM" and s["completed_steps"] == 2 and "killed by signal 9" in s["error"], s


def test_an_allocation_failure_outside_the_meter_is_an_oom_cell(tiny_artifacts, tiny_config, tmp_path):
    out = tmp_path / "run"
    proc = _train(tiny_config, tiny_artifacts, tmp_path, out, fault="alloc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(out)
    assert s["status"] == "OOM" and s["device"] == "host" and s["completed_steps"] == 0, s
    assert s["error"].startswith("host memory, outside the memory meter: RuntimeError: DefaultCPUAllocator: "
                                 "can't allocate memory"), s
    assert "Traceback" in proc.stderr and "OUT OF MEMORY outside the memory meter" in proc.stderr


def test_a_failure_that_is_not_memory_fails_the_command_with_its_traceback(tiny_artifacts, tiny_config, tmp_path):
    out = tmp_path / "run"
    proc = _train(tiny_config, tiny_artifacts, tmp_path, out, fault="bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
    assert not (out / "summary.json").exists()
