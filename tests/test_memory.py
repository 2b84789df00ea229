"""Memory budgets: the live-tensor accountant's count, and a run past its budget recorded as OOM.

Training is metered in-process (the accountant is a dispatch mode of this thread, nothing
process-wide); only the RLIMIT_AS safety cap (``memory_budget``) is tested in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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


def _quiet() -> dict:
    return {"progress": False, "log": lambda m: None}


def test_is_oom_classifies_allocation_failures():
    assert memory.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                      "allocate memory: you tried to allocate 4 bytes"))
    assert memory.is_oom(MemoryError())
    assert memory.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.is_oom(memory.BudgetExceeded(1, "cpu", "over"))
    assert not memory.is_oom(RuntimeError("shape mismatch"))
    assert not memory.is_oom(ValueError("can't allocate memory"))
    assert memory._requested_bytes("CUDA out of memory. Tried to allocate 2.50 MiB. GPU 0 has") == int(2.5 * 2**20)


def test_model_bytes_counts_training_state():
    lin = torch.nn.Linear(10, 10, bias=False)  # 100 fp32 weights, trainable
    frozen = torch.nn.Parameter(torch.zeros(50), requires_grad=False)
    weights, needed = memory.model_bytes([lin.weight, frozen, lin.weight])  # tied weight counted once
    assert weights == 600 and needed == 600 + 400 * 3
    assert memory.tensor_bytes([lin.weight, lin.weight.t(), frozen]) == 600  # a view counts once


def test_accountant_matches_a_hand_count():
    """Every number below is counted by hand (fp32: 4 bytes an element)."""
    w = torch.ones(4, 8, requires_grad=True)  # 128 B, held before: resident
    x = torch.ones(16, 4)  # data from before the accountant: never counted
    opt = torch.optim.AdamW([w], lr=0.1)
    acct = memory.LiveTensorAccountant(resident_bytes=128)
    with acct:
        h = x @ w  # new [16, 8]: 512
        assert (acct.live_bytes, acct.peak_bytes) == (640, 640)
        v = h.view(-1)  # a view: the same storage, counted once
        h.relu_()  # in place: no new storage
        assert (acct.live_bytes, acct.peak_bytes) == (640, 640)
        tmp = h + h  # a 512 B temporary ...
        del tmp  # ... subtracted when it dies
        assert (acct.live_bytes, acct.peak_bytes) == (640, 1152)
        loss = h.sum()  # 4
        acct.reset_peak()
        loss.backward()
        # Peak at the mm of MmBackward: w 128 + h 512 + loss 4 + its ones grad 4 (held by
        # torch.autograd.backward until it returns) + ReluBackward's grad of h 512 + grad of w 128.
        # After: the grad of h and the ones are gone, w.grad (128) stays.
        assert (acct.live_bytes, acct.peak_bytes) == (128 + 512 + 4 + 128, 1288)
        del h, v, loss  # the graph was freed by backward; h (512) and loss (4) go now
        assert acct.live_bytes == 128 + 128
        acct.reset_peak()
        opt.step()
        # AdamW state: step 4 (a torch.tensor constant) + exp_avg 128 + exp_avg_sq 128; its update
        # holds sqrt(exp_avg_sq) and its quotient (128 each) for a moment.
        assert (acct.live_bytes, acct.peak_bytes) == (256 + 260, 256 + 260 + 256)
        opt.zero_grad(set_to_none=True)  # the .grad storage dies
        assert acct.live_bytes == 128 + 260
    state = opt.state[w]
    assert memory.tensor_bytes([state["exp_avg"], state["exp_avg_sq"], state["step"]]) == 260


def test_accountant_raises_past_its_budget_also_in_backward():
    a = torch.randn(10, 10, requires_grad=True)
    acct = memory.LiveTensorAccountant(budget_bytes=2000)
    with pytest.raises(memory.BudgetExceeded) as info, acct:
        b = (a * 2).sum()  # the product dies at once: 4 B live
        keep = torch.ones(450)  # 1800
        b.backward()  # the grad of a (400) crosses 2000
    del keep
    rec = info.value.result()
    assert rec["status"] == "OOM" and rec["memory_measure"] == memory.ACCOUNTANT
    assert rec["peak_mem_mb"] * memory.MB == 4 + 1800 + 4 + 400  # loss, keep, ones grad, grad of a
    assert acct.exceeded is info.value


def _tiny_step(threads: int) -> tuple[int, int]:
    """Peak and final live bytes of one training step of a small fresh drafter."""
    from peagle.cod import cod_sample
    from peagle.drafters import DrafterSpec, build_drafter
    from peagle.example import MaskBuilder, build_example
    from peagle.losses import example_loss

    spec = DrafterSpec(hidden_size=32, vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                       intermediate_size=48, mask_token_id=49, aux_layer_ids=[1, 2, 3], max_position_embeddings=64,
                       parallel=True)
    drafter = build_drafter(spec, seed=0)
    head = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    n = 20
    rows = {"input_ids": torch.randint(0, 49, (n,), generator=g), "aux_hidden": torch.randn(n, 96, generator=g),
            "target_hidden": torch.randn(n, 32, generator=g), "loss_mask": torch.ones(n, dtype=torch.uint8)}
    layout = cod_sample(n, 4, 0.8, generator=g)
    masks = MaskBuilder("amortized", 32, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with memory.LiveTensorAccountant(resident_bytes=memory.tensor_bytes([*drafter.parameters(), head])) as acct:
            ex = build_example(rows, layout, spec.mask_token_id)
            loss, _ = example_loss(drafter, head, ex, masks(layout, n), "kl", 4)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, ex
    finally:
        torch.set_num_threads(before)
    return acct.peak_bytes, acct.live_bytes


def test_accountant_is_deterministic():
    first = _tiny_step(threads=1)
    assert first[0] > first[1] > 0
    assert _tiny_step(threads=1) == first
    assert _tiny_step(threads=2) == first  # intra-op threads change nothing that is counted


def test_budget_below_the_model_is_refused_up_front():
    with pytest.raises(memory.MemoryBudgetError, match="below .* the drafter alone needs"):
        memory.start_meter(1, "cpu", required_bytes=5 * memory.MB)
    with pytest.raises(memory.MemoryBudgetError, match="below .* the drafter alone needs"):
        memory.cap_memory(1, "cpu", required_bytes=5 * memory.MB)
    assert memory.active_meter() is None and memory.active_cap() is None  # nothing was started
    assert memory.cap_memory(None, "cpu") is None


def test_metered_block_turns_overflow_into_budget_exceeded():
    with memory.metered(4, "cpu", resident_bytes=memory.MB) as meter:
        x = torch.ones(2**20, dtype=torch.uint8)  # 1 MiB: 2 MiB live
        del x
    assert meter.peak_bytes() == 2 * memory.MB and meter.record(meter.peak_bytes())["budget_margin"] == -0.5
    with pytest.raises(memory.BudgetExceeded) as info:
        with memory.metered(4, "cpu", resident_bytes=memory.MB):
            torch.empty(4 * 2**20, dtype=torch.uint8)
    assert info.value.result()["peak_mem_mb"] == 5.0 and info.value.budget_mb == 4
    assert memory.active_meter() is None
    torch.empty(64 * 2**20, dtype=torch.uint8)  # nothing counts any more


def test_address_space_cap_turns_allocation_failure_into_budget_exceeded():
    """The RLIMIT_AS safety cap (benchmarks), in a subprocess: it is process-wide."""
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


def _budget_cells(cfg, artifacts, tmp_path: Path, measure: str) -> None:
    """A budget well above the peak trains ok with its peak recorded; one between the static need
    and that peak ends as an OOM cell whose recorded peak is past the budget.

    On CUDA the allocator's cap acts on reserved segments (allocated bytes rounded up to 2 or 20
    MiB blocks, plus fragmentation), so it may stop a run earlier, with the allocated bytes plus the
    failed request still under the budget: there only the outcome and the stop are asserted."""
    from peagle.train import train_drafter

    def run(budget_mb: int, name: str) -> dict:
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory_budget_mb=budget_mb))
        return train_drafter(c, artifacts["target_json"], artifacts["hidden_dir"], "pard", 32, tmp_path / name,
                             **_quiet())

    ok = run(4096, "ok")
    assert ok["status"] == "ok" and ok["budget_mb"] == 4096 and ok["memory_measure"] == measure
    rows = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert ok["peak_mem_mb"] == max(r["peak_mem_mb"] for r in rows)
    assert ok["budget_margin"] == pytest.approx(ok["peak_mem_mb"] / 4096 - 1)
    # The static need (weights + gradients + moments + target head), as the refusal of a 1 MB budget says it.
    with pytest.raises(memory.MemoryBudgetError) as refused:
        run(1, "refused")
    static = float(re.search(r"below the ([0-9.]+) MB", str(refused.value)).group(1))
    assert static < ok["peak_mem_mb"] - 1, (static, ok["peak_mem_mb"])
    budget = math.ceil((static + ok["peak_mem_mb"]) / 2)
    assert static <= budget < ok["peak_mem_mb"]
    oom = run(budget, "oom")
    assert oom["status"] == "OOM" and oom["budget_mb"] == budget and oom["memory_measure"] == measure
    first_over = next(i for i, r in enumerate(rows) if r["peak_mem_mb"] > budget)
    if measure == memory.ACCOUNTANT:
        assert oom["peak_mem_mb"] > budget and oom["budget_margin"] > 0
        # Deterministic: the run stops at the first step whose peak the unbudgeted run measured past it.
        assert oom["completed_steps"] == first_over
    else:
        assert oom["peak_mem_mb"] > 0 and oom["completed_steps"] <= first_over
    assert not (tmp_path / "oom" / "final").exists()
    assert json.loads((tmp_path / "oom" / "summary.json").read_text())["peak_mem_mb"] == oom["peak_mem_mb"]
    assert memory.active_meter() is None


def _small(cfg, device: str = "cpu"):
    """tiny_config cut to one epoch: four optimizer steps of three sequences."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, grad_accum=3),
                               runtime=dataclasses.replace(cfg.runtime, device=device))


def test_training_past_its_budget_is_an_oom_cell(tiny_artifacts, tiny_config, tmp_path):
    _budget_cells(_small(tiny_config), tiny_artifacts, tmp_path, memory.ACCOUNTANT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_past_its_budget_is_an_oom_cell_on_cuda(tiny_artifacts, tiny_config, tmp_path):
    _budget_cells(_small(tiny_config, "cuda"), tiny_artifacts, tmp_path, memory.CUDA_ALLOCATOR)


def test_budget_below_model_fails_training_up_front(tiny_artifacts, tiny_config, tmp_path):
    from peagle.train import train_drafter

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, memory_budget_mb=1))
    with pytest.raises(memory.MemoryBudgetError, match="train.memory_budget_mb"):
        train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 32,
                      tmp_path / "run", **_quiet())
    assert memory.active_meter() is None


def test_a_resumed_run_records_the_peaks_of_an_uninterrupted_one(tiny_artifacts, tiny_config, tmp_path):
    """The optimizer state a resume loads counts as resident: the per-step peaks do not change."""
    from peagle.train import _Killed, train_drafter

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, memory_budget_mb=4096))
    args = (cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "pard", 32)
    straight = train_drafter(*args, tmp_path / "straight", **_quiet())
    with pytest.raises(_Killed):
        train_drafter(*args, tmp_path / "resumed", stop_after_steps=2, **_quiet())
    resumed = train_drafter(*args, tmp_path / "resumed", **_quiet())

    def peaks(name: str) -> list[float]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["peak_mem_mb"] for line in lines]

    assert peaks("resumed") == peaks("straight") and len(peaks("straight")) == 8
    assert resumed["peak_mem_mb"] == straight["peak_mem_mb"]
