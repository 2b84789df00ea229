"""Memory budgets: a real cap whose overflow is caught and reported as OOM.

Every capped run happens in a subprocess: RLIMIT_AS is process-wide and must never cap pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peagle import memory

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, timeout: int = 240) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_is_oom_classifies_allocation_failures():
    assert memory.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                      "allocate memory: you tried to allocate 4 bytes"))
    assert memory.is_oom(MemoryError())
    assert memory.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not memory.is_oom(RuntimeError("shape mismatch"))
    assert not memory.is_oom(ValueError("can't allocate memory"))


def test_model_bytes_counts_training_state():
    lin = torch.nn.Linear(10, 10, bias=False)  # 100 fp32 weights, trainable
    frozen = torch.nn.Parameter(torch.zeros(50), requires_grad=False)
    weights, needed = memory.model_bytes([lin.weight, frozen, lin.weight])  # tied weight counted once
    assert weights == 600 and needed == 600 + 400 * 3


def test_budget_below_the_model_is_refused_up_front():
    with pytest.raises(memory.MemoryBudgetError, match="below .* the drafter alone needs"):
        memory.cap_memory(1, "cpu", required_bytes=5 * memory.MB)
    assert memory.active_cap() is None  # nothing was capped
    assert memory.cap_memory(None, "cpu") is None


def test_cap_turns_allocation_failure_into_budget_exceeded():
    out = _run("""
        import json, resource, torch
        from peagle import memory
        res = {}
        before = resource.getrlimit(resource.RLIMIT_AS)
        with memory.memory_budget(128, "cpu") as cap:
            x = torch.ones(16 * 2**20, dtype=torch.uint8)  # 16 MB fits
            res["small_ok"] = bool(x.all())
            res["limited"] = resource.getrlimit(resource.RLIMIT_AS)[0] == cap.limit_bytes
        try:
            with memory.memory_budget(128, "cpu"):
                torch.empty(512 * 2**20, dtype=torch.uint8)
        except memory.BudgetExceeded as err:
            res["oom"] = err.result()
        res["restored"] = resource.getrlimit(resource.RLIMIT_AS) == before
        res["after"] = bool(torch.ones(512 * 2**20, dtype=torch.uint8).all())  # cap lifted
        print(json.dumps(res))
    """)
    assert out["small_ok"] and out["limited"] and out["restored"] and out["after"]
    assert out["oom"]["status"] == "OOM" and out["oom"]["budget_mb"] == 128
    assert "allocate" in out["oom"]["error"]


def test_training_under_budget_reports_oom_or_succeeds(tiny_artifacts, tmp_path):
    """A long sequence whose attention does not fit 48 MB reports OOM; a short run with 4 GB trains."""
    from peagle.hidden import extract_hidden_states
    from peagle.target import load_target

    # Hidden states of one long sequence (1200 tokens) from the session's tiny target.
    model, _, _ = load_target(tiny_artifacts["target_json"], device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    responses = tmp_path / "long.jsonl"
    ids = torch.randint(10, 290, (1200,), generator=g).tolist()
    responses.write_text(json.dumps({"id": "long", "prompt_ids": ids[:8], "response_ids": ids[8:]}) + "\n")
    extract_hidden_states(model, responses, [1, 2, 3], tmp_path / "hidden_long", shard_tokens=10_000,
                          dtype="float32", target_name="tiny-test", progress=False)
    out = _run(f"""
        import json
        from peagle.config import config_from_dict, read_config_files
        from peagle.train import train_drafter
        raw = read_config_files("config/tiny.yaml")
        raw["drafter"].update(num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=96)
        raw["train"].update(k_train=4, epochs=1, grad_accum=1, max_mask_len=2048, checkpoint_every=100)
        quiet = dict(progress=False, log=lambda m: None)
        res = {{}}
        raw["train"]["memory_budget_mb"] = 48
        res["long"] = train_drafter(config_from_dict(raw), {str(tiny_artifacts["target_json"])!r},
                                    {str(tmp_path / "hidden_long")!r}, "peagle", 1200, {str(tmp_path / "long")!r},
                                    **quiet)
        raw["train"]["memory_budget_mb"] = 4096
        res["short"] = train_drafter(config_from_dict(raw), {str(tiny_artifacts["target_json"])!r},
                                     {str(tiny_artifacts["hidden_dir"])!r}, "peagle", 32, {str(tmp_path / "short")!r},
                                     **quiet)
        print(json.dumps(res))
    """)
    long, short = out["long"], out["short"]
    assert long["status"] == "OOM" and long["budget_mb"] == 48 and long["completed_steps"] == 0
    assert "allocate" in long["error"]
    assert json.loads((tmp_path / "long" / "summary.json").read_text())["status"] == "OOM"
    assert not (tmp_path / "long" / "final").exists()
    assert short["status"] == "ok" and short["budget_mb"] == 4096
    assert (tmp_path / "short" / "final" / "model.safetensors").exists()


def test_budget_below_model_fails_training_up_front(tiny_artifacts, tiny_config, tmp_path):
    """No cap is ever applied here (the check comes first), so this runs in-process."""
    import dataclasses

    from peagle.train import train_drafter

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, memory_budget_mb=1))
    with pytest.raises(memory.MemoryBudgetError, match="train.memory_budget_mb"):
        train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 32,
                      tmp_path / "run", progress=False, log=lambda m: None)
    assert memory.active_cap() is None
