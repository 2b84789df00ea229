"""Data-parallel training with torchrun on CPU (gloo): N processes train the drafter one does.

``train.grad_accum`` is the global batch, so 2 processes x 4 sequences each and 1 process x 8
sequences take the same optimizer steps on the same sequences; they differ only in the order
the eight gradients are summed (fp32 rounding). The same holds with the drafter sharded
(``train.parallelism: fsdp``, FSDP2).
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
from peagle.config import load_config
from peagle.distributed import DistributedError, World
from peagle.train import train_drafter

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

WORKER = """
import sys
from peagle.config import load_config
from peagle.distributed import World
from peagle.train import _Killed, train_drafter

target, hidden, stop, *runs = sys.argv[1:]
share, killed = World.share, False
for config, method, out in zip(runs[0::3], runs[1::3], runs[2::3]):  # one launch trains several runs in turn
    # "empty1": process 0 takes every sequence, process 1 none (a short last batch, every step).
    World.share = (lambda self, batch: list(batch) if self.rank == 0 else []) if out.endswith("empty1") else share
    try:
        train_drafter(load_config(config), target, hidden, method, 24, out,
                      stop_after_steps=int(stop) or None, progress=False, log=lambda m: None)
    except _Killed:
        killed = True
World.shutdown()
sys.exit(3 if killed else 0)
"""

VARIANTS = {"amortized": {}, "partitions=2": {"partitions": 2, "segment_rows": None},
            "maskfree": {"mask_strategy": "maskfree"}}
# Sharded runs: (method, method settings); each is compared with one process (and DDP where it ran).
FSDP_VARIANTS = {"fsdp": ("peagle", {}), "fsdp partitions=2": ("peagle", VARIANTS["partitions=2"]),
                 "fsdp eagle3": ("eagle3", {}), "fsdp empty1": ("peagle", {})}


def _config(tiny_config, method="peagle", parallelism="ddp", **methods):
    m = replace(tiny_config.methods[method], **methods)
    return replace(tiny_config, runtime=replace(tiny_config.runtime, threads=1),
                   train=replace(tiny_config.train, grad_accum=8, epochs=2, checkpoint_every=1,
                                 parallelism=parallelism),
                   methods={**tiny_config.methods, method: m})


def _fsdp_config(tiny_config, variant):
    method, m = FSDP_VARIANTS[variant]
    return _config(tiny_config, method, "fsdp", **m)


def _torchrun(runs, art, tmp: Path, nproc: int = 2, stop: int = 0) -> subprocess.CompletedProcess:
    """One torchrun launch of ``nproc`` gloo processes training each (config, out_dir[, method]) of
    ``runs`` (method: peagle)."""
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    args = []
    for i, (cfg, out, *method) in enumerate(runs):
        cfg_file = tmp / f"config_{out.name}_{i}.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
        args += [str(cfg_file), method[0] if method else "peagle", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(worker),
           str(art["target_json"]), str(art["hidden_dir"]), str(stop), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=180)


@pytest.fixture(scope="module")
def two_process_runs(tiny_artifacts, tiny_config, tmp_path_factory):
    """Every variant, replicated and sharded, trained by 2 gloo processes in one launch: {variant: out_dir}."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = {name: (_config(tiny_config, **m), tmp / name.replace("=", "")) for name, m in VARIANTS.items()}
    runs.update({name: (_fsdp_config(tiny_config, name), tmp / name.replace("=", "").replace(" ", "_"),
                        FSDP_VARIANTS[name][0]) for name in FSDP_VARIANTS})
    proc = _torchrun(runs.values(), tiny_artifacts, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: run[1] for name, run in runs.items()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights_of(directory: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_drafter(directory)[0].state_dict()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return _weights_of(out / "final")


def _same_training(one: Path, two: Path) -> None:
    """The same steps on the same sequences, losses, gradient norms and weights (atol 1e-6)."""
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 4  # 12 sequences, 8 per step, 2 epochs
    for a, b in zip(m1, m2):
        assert (a["supervised"], a["elements"], a["tokens"]) == (b["supervised"], b["elements"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-6)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        assert float((w1[name] - w2[name]).abs().max()) <= 1e-6, name


def _train_one(cfg, art, out: Path, method: str = "peagle") -> Path:
    train_drafter(cfg, art["target_json"], art["hidden_dir"], method, 24, out, progress=False, log=lambda m: None)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_train_what_one_does(tiny_artifacts, tiny_config, tmp_path, two_process_runs, variant):
    two = two_process_runs[variant]
    _same_training(_train_one(_config(tiny_config, **VARIANTS[variant]), tiny_artifacts, tmp_path / "one"), two)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("variant", list(FSDP_VARIANTS))
def test_two_sharded_processes_train_what_one_does(tiny_artifacts, tiny_config, tmp_path, two_process_runs, variant):
    """FSDP2 over 2 processes == 1 process (and == 2 replicating processes): partitioned sequences
    (several backwards per sequence), EAGLE-3 (several forwards per backward) and a process
    without sequences included."""
    method, _ = FSDP_VARIANTS[variant]
    sharded = two_process_runs[variant]
    _same_training(_train_one(_fsdp_config(tiny_config, variant), tiny_artifacts, tmp_path / "one", method), sharded)
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallelism"] == "fsdp"
    if variant == "fsdp":
        _same_training(two_process_runs["amortized"], sharded)
    ckpt.check_export(sharded / "final")  # the whole drafter, as vLLM reads it


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(tiny_artifacts, tiny_config, tmp_path,
                                                                       two_process_runs):
    """Replicated and sharded; a sharded run's checkpoint is the whole drafter and optimizer, in the
    replicated run's format."""
    runs = {"amortized": (_config(tiny_config), tmp_path / "killed"),
            "fsdp": (_fsdp_config(tiny_config, "fsdp"), tmp_path / "killed_fsdp")}
    assert _torchrun(runs.values(), tiny_artifacts, tmp_path, stop=2).returncode != 0  # the worker exits 3
    step2 = {}
    for name, (_, killed) in runs.items():
        assert [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")][-1] == "step_0000002"
        assert not (killed / "final").exists()
        step2[name] = killed / "checkpoints" / "step_0000002"
    states = [ckpt.load_trainer_state(d)["optimizer"] for d in step2.values()]
    for a, b in zip(*(s["state"].items() for s in states)):  # same keys, whole tensors of the same shapes
        assert a[0] == b[0] and {k: v.shape for k, v in a[1].items()} == {k: v.shape for k, v in b[1].items()}
    assert states[0]["param_groups"] == states[1]["param_groups"]
    assert ({k: v.shape for k, v in _weights_of(step2["amortized"]).items()}
            == {k: v.shape for k, v in _weights_of(step2["fsdp"]).items()})
    proc = _torchrun(runs.values(), tiny_artifacts, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (_, killed) in runs.items():
        straight = two_process_runs[name]
        a, b = _weights(straight), _weights(killed)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert [m["loss"] for m in _metrics(straight)] == [m["loss"] for m in _metrics(killed)], name


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tiny_artifacts, tiny_config, tmp_path):
    cfg = _config(tiny_config)
    cfg = replace(cfg, train=replace(cfg.train, grad_accum=3))
    proc = _torchrun([(cfg, tmp_path / "odd")], tiny_artifacts, tmp_path)
    assert proc.returncode != 0 and "train.grad_accum=3 is not a multiple of the 2 training processes" in proc.stderr


def test_the_parallelism_setting_leaves_the_recorded_digest():
    # Recorded baselines (results/recorded/tiny) were made before train.parallelism existed.
    cfg = load_config(ROOT / "config" / "tiny.yaml", ROOT / "config" / "tiny-seeds.yaml")
    assert cfg.train.parallelism == "ddp" and cfg.digest() == "bb0ddc81e5d6f9d2"
    assert replace(cfg, train=replace(cfg.train, parallelism="fsdp")).digest() != cfg.digest()


def test_a_gpu_the_node_lacks_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DistributedError, match=r"runtime.device is cuda:2, but this node has GPUs 0-1; "
                                               r"set runtime.device to cuda:0 .. cuda:1"):
        World().check(8, torch.device("cuda", 2))
    with pytest.raises(DistributedError, match="process 2 wants GPU 2, but this node has 2; lower peagle train --nproc"):
        World(rank=2, size=4, local_rank=2).check(8, torch.device("cuda", 2))
    World(rank=1, size=2, local_rank=1).check(8, torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DistributedError, match="runtime.device is cuda, but this node has no GPU torch can use"):
        World().check(8, torch.device("cuda"))
