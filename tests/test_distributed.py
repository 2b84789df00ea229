"""Data-parallel training with torchrun on CPU (gloo): N processes train the drafter one does.

``train.grad_accum`` is the global batch, so 2 processes x 4 sequences each and 1 process x 8
sequences take the same optimizer steps on the same sequences; they differ only in the order
the eight gradients are summed (fp32 rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from peagle import checkpoint as ckpt
from peagle.train import train_drafter

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

WORKER = """
import sys
from peagle.config import load_config
from peagle.distributed import World
from peagle.train import _Killed, train_drafter

target, hidden, stop, *runs = sys.argv[1:]
for config, out in zip(runs[0::2], runs[1::2]):  # one launch trains several configs in turn
    try:
        train_drafter(load_config(config), target, hidden, "peagle", 24, out,
                      stop_after_steps=int(stop) or None, progress=False, log=lambda m: None)
    except _Killed:
        sys.exit(3)
World.shutdown()
"""

VARIANTS = {"amortized": {}, "partitions=2": {"partitions": 2, "segment_rows": None},
            "maskfree": {"mask_strategy": "maskfree"}}


def _config(tiny_config, **methods):
    peagle = replace(tiny_config.methods["peagle"], **methods)
    return replace(tiny_config, runtime=replace(tiny_config.runtime, threads=1),
                   train=replace(tiny_config.train, grad_accum=8, epochs=2, checkpoint_every=1),
                   methods={**tiny_config.methods, "peagle": peagle})


def _torchrun(runs, art, tmp: Path, nproc: int = 2, stop: int = 0) -> subprocess.CompletedProcess:
    """One torchrun launch of ``nproc`` gloo processes training each (config, out_dir) of ``runs``."""
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    args = []
    for i, (cfg, out) in enumerate(runs):
        cfg_file = tmp / f"config_{out.name}_{i}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
        args += [str(cfg_file), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(worker),
           str(art["target_json"]), str(art["hidden_dir"]), str(stop), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=180)


@pytest.fixture(scope="module")
def two_process_runs(tiny_artifacts, tiny_config, tmp_path_factory):
    """Every variant trained by 2 gloo processes, in one launch: {variant: out_dir}."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = {name: (_config(tiny_config, **m), tmp / name.replace("=", "")) for name, m in VARIANTS.items()}
    proc = _torchrun(runs.values(), tiny_artifacts, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: out for name, (_, out) in runs.items()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_drafter(out / "final")[0].state_dict()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_train_what_one_does(tiny_artifacts, tiny_config, tmp_path, two_process_runs, variant):
    cfg = _config(tiny_config, **VARIANTS[variant])
    one, two = tmp_path / "one", two_process_runs[variant]
    train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 24, one,
                  progress=False, log=lambda m: None)
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 4  # 12 sequences, 8 per step, 2 epochs
    for a, b in zip(m1, m2):
        assert (a["supervised"], a["elements"], a["tokens"]) == (b["supervised"], b["elements"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-6)
    w1, w2 = _weights(one), _weights(two)
    for name in w1:
        assert float((w1[name] - w2[name]).abs().max()) <= 1e-6, name
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(tiny_artifacts, tiny_config, tmp_path,
                                                                       two_process_runs):
    cfg, killed = _config(tiny_config), tmp_path / "killed"
    assert _torchrun([(cfg, killed)], tiny_artifacts, tmp_path, stop=2).returncode != 0
    assert [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")][-1] == "step_0000002"
    assert not (killed / "final").exists()
    proc = _torchrun([(cfg, killed)], tiny_artifacts, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = two_process_runs["amortized"]
    a, b = _weights(straight), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in _metrics(straight)] == [m["loss"] for m in _metrics(killed)]


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tiny_artifacts, tiny_config, tmp_path):
    cfg = _config(tiny_config)
    cfg = replace(cfg, train=replace(cfg.train, grad_accum=3))
    proc = _torchrun([(cfg, tmp_path / "odd")], tiny_artifacts, tmp_path)
    assert proc.returncode != 0 and "train.grad_accum=3 is not a multiple of the 2 training processes" in proc.stderr
