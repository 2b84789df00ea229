"""vLLM stage (DESIGN §6-7): serve the suite's drafters in real vLLM, measure them, cross-check the engine.

Runs in the vLLM environment, not the core one (vLLM pins its own torch/transformers stack), with
the repository on ``PYTHONPATH`` because peagle is not installed there::

    PYTHONPATH=$REPO $VLLM_PY -m peagle vllm-eval --config C --target T --drafter W --prompts P --k K --out V.json
    PYTHONPATH=$REPO $VLLM_PY -m peagle vllm-throughput --config C --target T --drafter W --prompts P --k K --out X.json

Everything that imports vllm runs in a child process of that interpreter (``sys.executable``): one
offline ``LLM`` per configuration (``python -m peagle.vllm_bench offline REQ.json RES.json``), and the
OpenAI server plus vLLM's serving benchmark for throughput. Child processes, because two engines do
not come apart cleanly inside one process, because ``LD_PRELOAD`` (Intel OpenMP) must be set before
an interpreter starts, and because an engine's log is the only place some facts show (the
parallel-drafting trap below). This module imports only the standard library and peagle at import
time, so the pre-flight checks, the cross-check and the tests of both run in the core environment.

Facts this relies on are measured and cited in docs/vllm_cpu_notes.md:

* AL = 1 + num_accepted_tokens / num_drafts from vLLM's counters (§3c); per-position acceptance =
  accepted_per_pos / num_drafts.
* A P-EAGLE export served without ``"parallel_drafting": true`` silently drafts one token at a time,
  logging only :data:`TRAP_LINE` (§3d). Offline runs therefore read the loaded proposer's state with
  ``collective_rpc`` (engine in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor).
* vLLM's scheduler trims scheduled drafts only at ``max_model_len``, never at ``max_tokens``
  (``vllm/v1/core/sched/scheduler.py``, ~line 715), and counts accepted tokens before a stop or
  ``max_tokens`` truncates them (~line 2118, before ``_update_request_with_output``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from peagle.checkpoint import CONFIG_NAME, MASK_TOKEN_KEYS, WEIGHTS_NAME, check_export
from peagle.io import atomic_write_json, read_json

if TYPE_CHECKING:
    import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAP_LINE = "mask_hidden found in weights but model is not configured for parallel drafting"
SPEC_PREFIX = "vllm:spec_decode_"
# `vllm bench serve` without the console script, which crashes in the vllm-cpu repackage (notes §1).
_BENCH_SNIPPET = ("from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
                  "from vllm.benchmarks.serve import add_cli_args, main; p = P(); add_cli_args(p); "
                  "main(p.parse_args())")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ServingError(ValueError):
    """A drafter/target pair that vLLM must not be started on (caught before it starts)."""


class VllmCheckError(RuntimeError):
    """vLLM ran, but a required property failed: lossless output, parallel drafting, accounting."""


class CrossCheckError(ValueError):
    """Two acceptance results that cannot be compared (different K, prompts, lengths)."""


# --------------------------------------------------------------------------- settings


@dataclass
class VllmSettings:
    """Knobs of the vLLM stage: the proposed ``vllm`` config section; defaults = the measured CPU setup."""

    dtype: str = "float32"          # bit-level comparability with the suite's fp32 engine
    max_model_len: int = 1024       # must hold the longest prompt + max_new_tokens + K + 1
    kv_cache_gib: int = 1           # VLLM_CPU_KVCACHE_SPACE, CPU backend only
    gpu_memory_utilization: float = 0.9  # CUDA only
    enforce_eager: bool = True      # no torch.compile / CUDA graphs: start-up dominates tiny runs
    max_num_seqs: int = 8
    seed: int = 0
    iomp_preload: bool = True       # LD_PRELOAD the venv's libiomp5.so when present (CPU; notes §1)
    startup_timeout_s: float = 900.0
    run_timeout_s: float = 1800.0
    # Serving benchmark (Table 10).
    concurrency: tuple[int, ...] = (1, 2, 4)
    n_prompts: int = 8
    output_len: int = 32
    num_warmups: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "VllmSettings":
        """From ``cfg.vllm`` (a dataclass or a dict) where the profile has that section, else defaults."""
        section = getattr(cfg, "vllm", None)
        if section is None:
            return cls()
        raw = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw.items() if k in names}
        if "concurrency" in kw:
            kw["concurrency"] = tuple(kw["concurrency"])
        return cls(**kw)


# --------------------------------------------------------------------------- pre-flight


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, ServingError)


def is_parallel(drafter_cfg: dict[str, Any]) -> bool:
    """P-EAGLE (parallel drafting) or EAGLE-3, by the rule :func:`peagle.checkpoint.check_export` uses."""
    spec = (drafter_cfg.get("peagle") or {}).get("spec") or {}
    return bool(spec.get("parallel", True)) if spec else any(k in drafter_cfg for k in MASK_TOKEN_KEYS)


def resolve_drafter(drafter: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """A training run dir (summary.json + final/) or a checkpoint dir -> (checkpoint dir, summary or None)."""
    from peagle.evaluate import EvaluationError, training_outcome

    try:
        return training_outcome(Path(drafter))
    except EvaluationError as err:
        raise ServingError(str(err)) from None


def _target_head_dim(model_dir: str) -> int | None:
    cfg_path = Path(model_dir) / CONFIG_NAME
    if not cfg_path.is_file():
        return None  # a hub id: nothing local to check
    cfg = _read_json(cfg_path)
    cfg = cfg.get("text_config", cfg)
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def check_serving(drafter_dir: str | Path, target_json: str | Path, k: int, *,
                  device: str = "cpu") -> dict[str, Any]:
    """Pre-flight before vLLM starts: is ``drafter_dir`` servable on ``target_json`` at depth ``k``?

    Checks :func:`check_export` (vLLM's config keys and tensor names/shapes; ``mask_hidden`` present
    iff P-EAGLE), then against the target: hidden size, the three aux layer ids, vocabulary, the
    P-EAGLE mask token, ``k`` >= 1 and, for a parallel drafter, ``k <= k_train`` (its mask slots
    were trained for ``k_train`` depths; an autoregressive drafter takes any K), and on CPU the
    head sizes vLLM's CPU attention supports. Raises :class:`ServingError` /
    :class:`peagle.checkpoint.CheckpointError` naming the file. Returns what the runners need:
    ``{"drafter", "target_model", "parallel", "k", "k_train", "mask_token_id", "mask_hidden_norm",
    "warnings"}``.
    """
    from peagle.target import VLLM_CPU_HEAD_SIZES, read_target_json, resolve_model_path

    drafter_dir = Path(drafter_dir)
    check_export(drafter_dir)
    cfg_path = drafter_dir / CONFIG_NAME
    dcfg = _read_json(cfg_path)
    try:
        info = read_target_json(target_json)
    except (FileNotFoundError, ValueError) as err:
        raise ServingError(str(err)) from None
    parallel = is_parallel(dcfg)
    meta = dcfg.get("peagle") or {}
    problems, warnings = [], []
    if dcfg["hidden_size"] != info["hidden_size"] or dcfg.get("target_hidden_size", dcfg["hidden_size"]) != info[
            "hidden_size"]:
        problems.append(f"hidden_size {dcfg['hidden_size']} (target_hidden_size {dcfg.get('target_hidden_size')}) "
                        f"!= the target's {info['hidden_size']} ({target_json})")
    if list(dcfg["eagle_aux_hidden_state_layer_ids"]) != list(info["aux_layer_ids"]):
        problems.append(f"eagle_aux_hidden_state_layer_ids {dcfg['eagle_aux_hidden_state_layer_ids']} != the "
                        f"target's aux_layer_ids {info['aux_layer_ids']} ({target_json}): trained for another target")
    if dcfg["vocab_size"] != info["vocab_size"]:
        problems.append(f"vocab_size {dcfg['vocab_size']} != the target's {info['vocab_size']} ({target_json})")
    if parallel and info.get("mask_token_id") is not None and dcfg["mask_token_id"] != info["mask_token_id"]:
        problems.append(f"mask_token_id {dcfg['mask_token_id']} != the target's {info['mask_token_id']} "
                        f"({target_json})")
    k_train = meta.get("k_train")
    if type(k) is not int or k < 1:
        problems.append(f"K={k!r}: need an integer >= 1")
    elif parallel and k_train is not None and k > k_train:
        problems.append(f"K={k} exceeds the {k_train} depths this P-EAGLE drafter was trained for (peagle.k_train); "
                        f"serve it with K <= {k_train} or retrain with a larger train.k_train")
    elif parallel and k_train is None:
        warnings.append(f"{cfg_path}: no peagle.k_train recorded; cannot check K={k} against the trained depths")
    target_model = resolve_model_path(target_json, info["path"])
    if not device.startswith("cuda"):
        head_dims = {"drafter": dcfg["head_dim"], "target": _target_head_dim(target_model)}
        bad = {who: hd for who, hd in head_dims.items() if hd is not None and hd not in VLLM_CPU_HEAD_SIZES}
        if bad:
            problems.append(f"head_dim {bad} not supported by vLLM's CPU attention {VLLM_CPU_HEAD_SIZES}")
    if problems:
        raise ServingError(f"{cfg_path}: " + "; ".join(problems))
    return {"drafter": str(drafter_dir.resolve()), "target_model": str(target_model), "parallel": parallel, "k": k,
            "k_train": k_train, "mask_token_id": dcfg.get("mask_token_id") if parallel else None,
            "mask_hidden_norm": _mask_hidden_norm(drafter_dir) if parallel else None, "warnings": warnings}


def _mask_hidden_norm(drafter_dir: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(drafter_dir / WEIGHTS_NAME), framework="pt") as f:
        return float(f.get_tensor("mask_hidden").float().norm())


def speculative_config(drafter_dir: str | Path, k: int) -> dict[str, Any]:
    """vLLM's ``speculative_config`` for a drafter export; ``parallel_drafting`` iff it is P-EAGLE (DESIGN §7)."""
    drafter_dir = Path(drafter_dir)
    dcfg = _read_json(drafter_dir / CONFIG_NAME)
    sc: dict[str, Any] = {"method": "eagle3", "model": str(drafter_dir.resolve()), "num_speculative_tokens": int(k)}
    if is_parallel(dcfg):
        sc["parallel_drafting"] = True
    return sc


# --------------------------------------------------------------------------- counters and checks


def acceptance_from_counters(metrics: dict[str, Any]) -> dict[str, Any]:
    """vLLM's spec-decode counters -> acceptance figures.

    ``metrics``: ``{"vllm:spec_decode_num_drafts": int, "..._num_draft_tokens": int,
    "..._num_accepted_tokens": int, "..._num_accepted_tokens_per_pos": [K ints]}``. AL = 1 +
    accepted / drafts (the bonus token of every verification step included, ceiling K+1).
    """
    drafts = int(metrics[SPEC_PREFIX + "num_drafts"])
    accepted = int(metrics[SPEC_PREFIX + "num_accepted_tokens"])
    per_pos = [int(v) for v in metrics[SPEC_PREFIX + "num_accepted_tokens_per_pos"]]
    nan = float("nan")
    return {"acceptance_length": 1 + accepted / drafts if drafts else nan,
            "per_position_acceptance": [a / drafts if drafts else nan for a in per_pos],
            "num_drafts": drafts, "num_draft_tokens": int(metrics[SPEC_PREFIX + "num_draft_tokens"]),
            "num_accepted_tokens": accepted, "accepted_per_pos": per_pos}


def drafting_problems(state: dict[str, Any] | None, log_text: str, serving: dict[str, Any]) -> list[str]:
    """Why this run did not draft the way the export asks (empty list: it did).

    ``state``: the loaded proposer as read by ``collective_rpc`` (None in server mode, where only
    the log is available). P-EAGLE must draft in parallel with the export's mask token and its
    trained ``mask_hidden`` (not zeros); EAGLE-3 must not. The trap line is an error either way.
    """
    problems = []
    if TRAP_LINE in log_text:
        problems.append(f"vLLM logged '{TRAP_LINE}': the P-EAGLE export ran as a one-token-at-a-time drafter")
    if state is None:
        if serving["parallel"] and "'parallel_drafting': True" not in log_text:
            problems.append("the server log does not show parallel_drafting=True among the engine args")
        return problems
    if bool(state.get("parallel_drafting")) != serving["parallel"]:
        problems.append(f"vLLM's proposer has parallel_drafting={state.get('parallel_drafting')}, the export is "
                        f"{'P-EAGLE' if serving['parallel'] else 'EAGLE-3'}")
    if serving["parallel"]:
        if state.get("parallel_drafting_token_id") != serving["mask_token_id"]:
            problems.append(f"vLLM drafts with mask token {state.get('parallel_drafting_token_id')}, the export's is "
                            f"{serving['mask_token_id']}")
        got, want = state.get("mask_hidden_norm"), serving["mask_hidden_norm"]
        # bf16 serving rounds the stored vector; 1% on its norm still tells loaded weights from zeros.
        if got is None or abs(got - want) > 1e-2 * max(want, 1e-12):
            problems.append(f"vLLM's mask_hidden has norm {got}, the export's {want:.6g}: not loaded")
    return problems


# --------------------------------------------------------------------------- child processes


def _child_env(settings: VllmSettings, device: str) -> dict[str, str]:
    env = dict(os.environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *rest])
    if not device.startswith("cuda"):
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if settings.iomp_preload and iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    return env


def _engine_kwargs(settings: VllmSettings, device: str) -> dict[str, Any]:
    kw = {"dtype": settings.dtype, "max_model_len": settings.max_model_len, "seed": settings.seed,
          "enforce_eager": settings.enforce_eager, "max_num_seqs": settings.max_num_seqs}
    if device.startswith("cuda"):
        kw["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return kw


def _drafter_state(worker) -> dict[str, Any]:
    """Runs inside the engine (collective_rpc): what the loaded proposer will actually do."""
    d = worker.model_runner.drafter
    mh = getattr(getattr(d, "model", None), "mask_hidden", None)
    tok = getattr(d, "parallel_drafting_token_id", None)
    return {"proposer": type(d).__name__, "parallel_drafting": bool(getattr(d, "parallel_drafting", False)),
            "parallel_drafting_token_id": None if tok is None else int(tok),
            "mask_hidden_norm": None if mh is None else float(mh.float().norm()),
            "num_speculative_tokens": getattr(d, "num_speculative_tokens", None)}


def _vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def offline_worker(req: dict[str, Any]) -> dict[str, Any]:
    """One offline vLLM engine (child process): greedy generation over token-id prompts.

    ``req``: target_model, prompts [[ids]], max_new_tokens, ignore_eos, stop_token_ids, engine
    (LLM kwargs), speculative_config or None. Returns outputs [[ids]], the spec-decode counters, the
    loaded proposer's state (None without speculation) and timings (s).
    """
    # Engine core in this process, single-process executor: collective_rpc then reaches the worker.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=req["target_model"], disable_log_stats=False, distributed_executor_backend="uni", **req["engine"])
    if req.get("speculative_config"):
        kw["speculative_config"] = req["speculative_config"]
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"], ignore_eos=req["ignore_eos"],
                        stop_token_ids=req.get("stop_token_ids") or None)
    t0 = time.perf_counter()
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], sp, use_tqdm=False)
    generate_s = time.perf_counter() - t0
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith(SPEC_PREFIX):
            metrics[m.name] = list(m.values) if hasattr(m, "values") else m.value
    state = llm.collective_rpc(_drafter_state)[0] if req.get("speculative_config") else None
    return {"outputs": [list(r.outputs[0].token_ids) for r in res], "metrics": metrics, "drafter_state": state,
            "load_s": load_s, "generate_s": generate_s, "vllm_version": _vllm_version()}


def _run_child(args: list[str], env: dict[str, str], log_path: Path, timeout: float, log: Log) -> str:
    """Run ``python ARGS`` with output to ``log_path``; echo the log to ``log``; return its text."""
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            proc = None
    text = log_path.read_text(errors="replace")
    log(text.rstrip())
    if proc is None:
        raise VllmCheckError(f"vLLM child process timed out after {timeout:.0f} s (log: {log_path})")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise VllmCheckError(f"vLLM child process failed with status {proc.returncode} (log: {log_path}):\n{tail}")
    return text


def _run_offline(req: dict[str, Any], work: Path, name: str, settings: VllmSettings, device: str,
                 log: Log) -> tuple[dict[str, Any], str]:
    req_path, res_path = work / f"{name}.request.json", work / f"{name}.result.json"
    atomic_write_json(req_path, req)
    log(f"vLLM offline run '{name}' ({len(req['prompts'])} prompts x {req['max_new_tokens']} tokens)")
    text = _run_child(["-m", "peagle.vllm_bench", "offline", str(req_path), str(res_path)],
                      _child_env(settings, device), work / f"{name}.log", settings.run_timeout_s, log)
    return json.loads(res_path.read_text()), text


# --------------------------------------------------------------------------- offline evaluation


def _prompt_ids(target_model: str, prompts_path: str | Path, n: int | None) -> tuple[list[Any], list[list[int]]]:
    from transformers import AutoTokenizer

    from peagle.data.schema import read_prompts
    from peagle.target import render_prompt_ids

    records = read_prompts(prompts_path)
    records = records[:n] if n else records
    tok = AutoTokenizer.from_pretrained(target_model)
    return records, [render_prompt_ids(tok, r.turns[0]) for r in records]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def vllm_eval(cfg: Any, target_json: str | Path, drafter: str | Path | None, prompts_path: str | Path, k: int, *,
              baseline: str | Path | None = None, engine_result: str | Path | None = None,
              work_dir: str | Path | None = None, settings: VllmSettings | None = None,
              log: Log = _stderr) -> dict[str, Any]:
    """Acceptance of one drafter in vLLM's offline engine, checked; or, with ``drafter`` None, the baseline.

    The first ``eval.n_prompts`` prompts of ``prompts_path`` (chat template as in the suite's engine),
    greedy, ``eval.max_new_tokens`` tokens, EOS = the target's ``eos_token_id`` (as the engine stops).
    Checks, each a :class:`VllmCheckError`: output equals the no-speculation run (``baseline``, a
    previous baseline JSON for the same target, prompts and length, else run here), the proposer
    drafts as the export asks (:func:`drafting_problems`), ``num_draft_tokens == K * num_drafts``.
    With ``engine_result`` (the evaluate stage's JSON) the :func:`cross_check` is stored under
    ``cross_check`` and a disagreement beyond its tolerance is an error too. ``settings`` overrides
    ``cfg.vllm``. Returns the result record (``acceptance_length``, ``per_position_acceptance``,
    vLLM's raw counters, ``outputs`` [[ids]], the proposer state, timings in s).
    """
    from peagle.target import read_target_json, resolve_model_path

    settings, device = settings or VllmSettings.from_config(cfg), cfg.runtime.device
    max_new, n_prompts = cfg.eval.max_new_tokens, cfg.eval.n_prompts
    if cfg.eval.turns != 1:
        # Its figures are checked against the engine's evaluation of the same cell, turn for turn.
        raise ServingError(f"eval.turns={cfg.eval.turns}: the vLLM stage asks each conversation's first turn only, "
                           "as vLLM's serving benchmark does, so its cross-check with the engine needs eval.turns: 1")
    info = read_target_json(target_json)
    summary, serving = None, None
    if drafter is not None:
        ckpt, summary = resolve_drafter(drafter)
        if summary is not None and summary.get("status", "ok") != "ok":
            from peagle.evaluate import not_trained_result

            log(f"training ended {summary['status']}: recorded, nothing to serve")
            return {**not_trained_result(summary, ckpt.parent, prompts_path, k), "engine": "vllm"}
        serving = check_serving(ckpt, target_json, k, device=device)
        for w in serving["warnings"]:
            log(f"WARNING: {w}")
    target_model = serving["target_model"] if serving else resolve_model_path(target_json, info["path"])
    records, prompts = _prompt_ids(target_model, prompts_path, n_prompts)
    need = max(len(p) for p in prompts) + max_new + (k if drafter is not None else 0) + 1
    if need > settings.max_model_len:
        # Past max_model_len vLLM schedules fewer drafts than K: its counters would no longer match the engine's.
        raise ServingError(f"vllm.max_model_len={settings.max_model_len} < longest prompt + eval.max_new_tokens + K "
                           f"+ 1 = {need} for {prompts_path}; raise vllm.max_model_len")
    eos = info.get("eos_token_id")
    req = {"target_model": target_model, "prompts": prompts, "max_new_tokens": max_new, "ignore_eos": False,
           "stop_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
           "engine": _engine_kwargs(settings, device), "speculative_config": None}
    key = _digest({k_: req[k_] for k_ in ("target_model", "prompts", "max_new_tokens", "stop_token_ids")} |
                  {"dtype": settings.dtype})
    common = {"engine": "vllm", "target": info["path"], "target_model": target_model, "target_name": info.get("name"),
              "eval_set": Path(prompts_path).stem.removeprefix("eval_"), "prompts": len(records),
              "max_new_tokens": max_new, "requests_digest": key, "settings": dataclasses.asdict(settings),
              "device": device}
    with tempfile.TemporaryDirectory(prefix="peagle-vllm-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = None
        if baseline is not None:
            base = json.loads(Path(baseline).read_text())
            if base.get("requests_digest") != key:
                raise VllmCheckError(f"{baseline}: a baseline for other requests (target, prompts, length or dtype "
                                     f"differ); re-run the baseline")
        if base is None:
            res, _ = _run_offline(req, work, "baseline", settings, device, log)
            base = {**common, "status": "ok", "method": None, "k": 0, "outputs": res["outputs"],
                    "new_tokens": sum(map(len, res["outputs"])), "load_s": res["load_s"],
                    "generate_s": res["generate_s"], "vllm_version": res["vllm_version"]}
        if drafter is None:
            return base
        sc = speculative_config(serving["drafter"], k)
        res, text = _run_offline({**req, "speculative_config": sc}, work, "speculative", settings, device, log)
    acc = acceptance_from_counters(res["metrics"])
    problems = drafting_problems(res["drafter_state"], text, serving)
    if acc["num_draft_tokens"] != k * acc["num_drafts"]:
        problems.append(f"num_draft_tokens {acc['num_draft_tokens']} != K * num_drafts = {k * acc['num_drafts']} "
                        f"(vLLM shortened drafts: max_model_len too small?)")
    mismatched = [i for i, (a, b) in enumerate(zip(res["outputs"], base["outputs"])) if a != b]
    if mismatched or len(res["outputs"]) != len(base["outputs"]):
        problems.append(f"speculative output differs from the no-speculation output on prompts {mismatched}")
    dcfg = _read_json(Path(serving["drafter"]) / CONFIG_NAME)
    meta = dcfg.get("peagle") or {}
    new_tokens = sum(map(len, res["outputs"]))
    result = {**common, "status": "ok", "drafter": serving["drafter"], "method": meta.get("method"),
              "ctx": meta.get("ctx"), "drafter_layers": dcfg.get("num_hidden_layers"), "k": k,
              "k_train": serving["k_train"], "parallel": serving["parallel"],
              **acc, "rounds": acc["num_drafts"], "new_tokens": new_tokens, "lossless": not mismatched,
              "drafter_state": res["drafter_state"], "speculative_config": sc, "load_s": res["load_s"],
              "generate_s": res["generate_s"],
              "output_tokens_per_s": new_tokens / res["generate_s"] if res["generate_s"] else None,
              "baseline": str(baseline) if baseline else "run here", "vllm_version": res["vllm_version"],
              "outputs": res["outputs"], "training": summary}
    if problems:
        raise VllmCheckError(f"vLLM run of {serving['drafter']} at K={k}: " + "; ".join(problems))
    if engine_result is not None:
        result["cross_check"] = cross_check(json.loads(Path(engine_result).read_text()), result)
        result["cross_check"]["engine_result"] = str(engine_result)
        if not result["cross_check"]["within_tolerance"]:
            raise VllmCheckError(f"engine vs vLLM acceptance disagree: {result['cross_check']['summary']}")
    log(f"vLLM acceptance length {acc['acceptance_length']:.3f} over {len(records)} prompts (K={k}); lossless, "
        f"parallel_drafting={res['drafter_state']['parallel_drafting']}")
    return result


# --------------------------------------------------------------------------- cross-check


def cross_check(engine: dict[str, Any], vllm: dict[str, Any], rel_tol: float = 0.02) -> dict[str, Any]:
    """Compare the suite engine's acceptance (:func:`peagle.evaluate.evaluate_drafter` JSON) with vLLM's.

    Accounting: the two count the same things. The engine's AL is committed / rounds with committed =
    accepted drafts + one bonus token per round; vLLM's is 1 + accepted / num_drafts, one "draft" per
    verification step: the same bonus token. Both stop a request the same way: the engine finishes
    its last round in full, counts every token of it (``committed += m + 1``) and only then trims to
    ``max_new_tokens`` or the first EOS; vLLM also counts the accepted tokens of the round a stop or
    ``max_tokens`` cuts short (it counts before truncating), and never shortens a draft because the
    request is about to end (only at ``max_model_len``, which :func:`vllm_eval` keeps out of reach).
    So on the same token streams rounds == num_drafts, accepted == num_accepted_tokens, exactly;
    measured in the all-accept case (8 prompts x 64 tokens, K=3: 128 rounds, 384 accepted in both,
    AL 4.0) and on context-dependent drafters (156/156 rounds with identical drafts; notes §3c, §4).

    Tolerance: ``|AL_engine - AL_vllm| <= max(rel_tol * AL_engine, K / rounds)``. Exactness needs
    identical floating point, which two implementations do not give: vLLM's CPU kernels and PyTorch's
    fp32 math can flip an argmax at a near-tie, in the drafter (one round's acceptance changes, by at
    most K tokens: K / rounds on AL) or in the target (both engines stay lossless w.r.t. their own
    target numerics but continue different texts from there). 2% admits a few such flips on a few
    thousand rounds; a convention bug (mask slot position, mask token, pre-/post-norm feedback) changes
    the drafts of most rounds (negative controls, notes §4.4: 0-19 of 156 rounds equal) and moves AL
    by far more whenever the drafter has learned anything. With AL near 1 on both sides the check
    cannot discriminate; ``informative`` says so.

    Raises :class:`CrossCheckError` when the results do not describe the same measurement (drafter,
    K, eval set, number of prompts, or more engine tokens than vLLM's prompts x max_new_tokens).
    Different totals below that mean the texts hit EOS at different places (a target-side flip):
    compared anyway, flagged by ``same_length``. Returns the comparison (counts, ALs, per-position
    rates, ``diff``, ``tolerance``, ``within_tolerance``, ``exact``, ``summary``).
    """
    paths = [Path(r["drafter"]).resolve() for r in (engine, vllm) if r.get("drafter")]
    if len(paths) == 2 and all(p.exists() for p in paths) and paths[0] != paths[1]:
        raise CrossCheckError(f"not the same drafter: {paths[0]} (engine) vs {paths[1]} (vLLM)")
    for key in ("k", "eval_set", "prompts"):
        if engine.get(key) != vllm.get(key):
            raise CrossCheckError(f"not the same measurement: {key} is {engine.get(key)!r} (engine) vs "
                                  f"{vllm.get(key)!r} (vLLM)")
    if engine.get("status", "ok") != "ok" or vllm.get("status", "ok") != "ok":
        raise CrossCheckError(f"status {engine.get('status')!r} (engine) / {vllm.get('status')!r} (vLLM): "
                              "nothing to compare")
    cap = vllm["prompts"] * vllm["max_new_tokens"] if vllm.get("max_new_tokens") else None
    if cap is not None and engine.get("new_tokens", 0) > cap:
        raise CrossCheckError(f"the engine generated {engine['new_tokens']} tokens, more than vLLM's "
                              f"{vllm['prompts']} prompts x {vllm['max_new_tokens']}: a longer eval.max_new_tokens")
    k, rounds = int(engine["k"]), int(engine["rounds"])
    al_e, al_v = float(engine["acceptance_length"]), float(vllm["acceptance_length"])
    # The engine stores rates; its integer counts are recovered exactly (committed, accepted_at are ints).
    e_accepted = round(al_e * rounds) - rounds
    e_per_pos = [round(p * rounds) for p in engine["per_position_acceptance"]]
    tol = max(rel_tol * al_e, k / rounds if rounds else float("inf"))
    diff = al_v - al_e
    exact = (rounds == vllm["num_drafts"] and e_accepted == vllm["num_accepted_tokens"]
             and e_per_pos == list(vllm["accepted_per_pos"]))
    within = abs(diff) <= tol
    informative = min(al_e, al_v) > 1.05
    out = {"k": k, "engine_acceptance_length": al_e, "vllm_acceptance_length": al_v, "diff": diff,
           "tolerance": tol, "rel_tol": rel_tol, "within_tolerance": within, "exact": exact,
           "informative": informative, "engine_rounds": rounds, "vllm_num_drafts": vllm["num_drafts"],
           "engine_accepted": e_accepted, "vllm_accepted": vllm["num_accepted_tokens"],
           "engine_per_position": engine["per_position_acceptance"],
           "vllm_per_position": vllm["per_position_acceptance"]}
    out["same_length"] = engine.get("new_tokens") == vllm.get("new_tokens")
    out["summary"] = (f"AL engine {al_e:.4f} vs vLLM {al_v:.4f} (diff {diff:+.4f}, tolerance {tol:.4f}): "
                      f"{'exact' if exact else 'within tolerance' if within else 'DISAGREE'}"
                      f"{'' if informative else '; AL ~ 1 on both sides, not informative'}"
                      f"{'' if out['same_length'] else '; outputs end at different EOS positions (texts differ)'}")
    return out


CROSSCHECK_COLUMNS = ["target_name", "eval_set", "method", "k", "status", "engine_al", "vllm_al", "diff", "tolerance",
                      "exact", "within_tolerance", "informative", "lossless", "parallel_drafting", "rounds"]


def write_crosscheck(results: list[str | Path], out: str | Path) -> "pd.DataFrame":
    """One row per ``vllm-eval`` result (run with ``--engine-result``): engine vs vLLM AL, CSV + provenance.

    A result without a cross-check (an untrained cell: its status) gets empty comparison fields.
    """
    import pandas as pd


    rows, cells = [], {}
    for path in results:
        res = json.loads(Path(path).read_text())
        cc = res.get("cross_check") or {}
        rows.append({"target_name": res.get("target_name"), "eval_set": res.get("eval_set"),
                     "method": res.get("method"), "k": res.get("k"), "status": res.get("status", "ok"),
                     "engine_al": cc.get("engine_acceptance_length"), "vllm_al": res.get("acceptance_length"),
                     "diff": cc.get("diff"), "tolerance": cc.get("tolerance"), "exact": cc.get("exact"),
                     "within_tolerance": cc.get("within_tolerance"), "informative": cc.get("informative"),
                     "lossless": res.get("lossless"),
                     "parallel_drafting": (res.get("drafter_state") or {}).get("parallel_drafting"),
                     "rounds": res.get("rounds")})
        cells[str(path)] = {k: res.get(k) for k in ("drafter", "cross_check", "speculative_config", "drafter_state",
                                                      "settings", "vllm_version", "requests_digest", "baseline")}
    df = pd.DataFrame(rows, columns=CROSSCHECK_COLUMNS)
    from peagle.provenance import write_table

    write_table(df, out, table="vllm_crosscheck", cells=cells,
                what="acceptance length of the suite's engine vs vLLM for the same drafter, target, prompts and K "
                     "(peagle.vllm_bench.cross_check: tolerance max(rel_tol * AL, K / rounds))")
    return df


# --------------------------------------------------------------------------- serving benchmark


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log_path: Path) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise VllmCheckError(f"vLLM server exited with status {proc.returncode} (log: {log_path}):\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(1.0)
    raise VllmCheckError(f"vLLM server not healthy after {timeout:.0f} s (log: {log_path})")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own session: the API process and its engine-core child)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def bench_record(raw: dict[str, Any], concurrency: int, k: int | None) -> dict[str, Any]:
    """One concurrency level from vLLM's serving-benchmark result JSON (rates in [0, 1], times in ms).

    The per-position rates are already fractions there (``delta_pos / delta_drafts``,
    ``vllm/benchmarks/serve.py`` ~line 1118); only the printed report shows them in %.
    """
    spec = k is not None
    rates = raw.get("spec_decode_per_position_acceptance_rates") if spec else None
    return {"concurrency": concurrency, "output_tokens_per_s": raw["output_throughput"],
            "mean_tpot_ms": raw.get("mean_tpot_ms"), "median_tpot_ms": raw.get("median_tpot_ms"),
            "mean_ttft_ms": raw.get("mean_ttft_ms"), "duration_s": raw.get("duration"),
            "completed": raw.get("completed"), "failed": raw.get("failed"),
            "total_output_tokens": raw.get("total_output_tokens"),
            "acceptance_length": raw.get("spec_decode_acceptance_length") if spec else None,
            "per_position_acceptance": None if rates is None else [float(r) for r in rates],
            "num_drafts": raw.get("spec_decode_num_drafts") if spec else None,
            "num_draft_tokens": raw.get("spec_decode_draft_tokens") if spec else None,
            "num_accepted_tokens": raw.get("spec_decode_accepted_tokens") if spec else None}


def vllm_throughput(cfg: Any, target_json: str | Path, drafter: str | Path | None, prompts_path: str | Path,
                    k: int | None, *, work_dir: str | Path | None = None, settings: VllmSettings | None = None,
                    log: Log = _stderr) -> dict[str, Any]:
    """Output tokens/s, TPOT and AL of one drafter at K (or no speculation) at each ``vllm.concurrency``.

    One OpenAI server (``vllm.entrypoints.openai.api_server``) for the configuration, then vLLM's
    serving benchmark once per concurrency on the first ``vllm.n_prompts`` prompts of the set
    (chat template applied by the benchmark), ``vllm.output_len`` tokens each (``--ignore-eos``:
    equal work per configuration), temperature 0, after ``vllm.num_warmups`` warm-up requests. AL
    comes from the server's counters (the benchmark scrapes ``/metrics`` before and after, so the
    server must serve nothing else). Checked: every request completed, drafts have K tokens, and
    for P-EAGLE the server log shows parallel drafting requested and not the trap line (parallel
    drafting itself is proven by :func:`vllm_eval`'s ``collective_rpc`` read of the same export).
    ``settings`` overrides ``cfg.vllm``. Returns ``{..., "concurrency": [one :func:`bench_record`
    per level]}``.
    """
    from peagle.data.schema import read_prompts
    from peagle.target import read_target_json, resolve_model_path

    settings, device = settings or VllmSettings.from_config(cfg), cfg.runtime.device
    info = read_target_json(target_json)
    summary, serving, sc = None, None, None
    if drafter is not None:
        ckpt, summary = resolve_drafter(drafter)
        if summary is not None and summary.get("status", "ok") != "ok":
            from peagle.evaluate import not_trained_result

            log(f"training ended {summary['status']}: recorded, nothing to serve")
            return {**not_trained_result(summary, ckpt.parent, prompts_path, k), "engine": "vllm", "concurrency": []}
        serving = check_serving(ckpt, target_json, k, device=device)
        sc = speculative_config(serving["drafter"], k)
    target_model = serving["target_model"] if serving else resolve_model_path(target_json, info["path"])
    records = read_prompts(prompts_path)[:settings.n_prompts]
    env = _child_env(settings, device)
    levels = []
    with tempfile.TemporaryDirectory(prefix="peagle-vllm-serve-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prompts_jsonl = work / "prompts.jsonl"
        prompts_jsonl.write_text("".join(json.dumps({"prompt": r.turns[0]}) + "\n" for r in records))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        eng = _engine_kwargs(settings, device)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target_model,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", eng["dtype"],
               "--max-model-len", str(eng["max_model_len"]), "--seed", str(eng["seed"]),
               "--max-num-seqs", str(eng["max_num_seqs"])]
        cmd += ["--enforce-eager"] if eng["enforce_eager"] else []
        if "gpu_memory_utilization" in eng:
            cmd += ["--gpu-memory-utilization", str(eng["gpu_memory_utilization"])]
        cmd += ["--speculative-config", json.dumps(sc)] if sc else []
        server_log = work / "server.log"
        log(f"starting vLLM server on {url}: {' '.join(cmd[1:])}")
        with open(server_log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=REPO_ROOT)
        try:
            startup_s = _wait_healthy(proc, url, settings.startup_timeout_s, server_log)
            log(f"server healthy after {startup_s:.1f} s")
            for c in settings.concurrency:
                name = f"bench_c{c}"
                args = ["-c", _BENCH_SNIPPET, "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
                        "--model", target_model, "--dataset-name", "custom", "--dataset-path", str(prompts_jsonl),
                        "--num-prompts", str(len(records)), "--custom-output-len", str(settings.output_len),
                        "--max-concurrency", str(c), "--ignore-eos", "--temperature", "0", "--seed", str(settings.seed),
                        "--num-warmups", str(settings.num_warmups), "--disable-tqdm", "--save-result",
                        "--result-dir", str(work), "--result-filename", f"{name}.json"]
                _run_child(args, env, work / f"{name}.log", settings.run_timeout_s, log)
                levels.append(bench_record(json.loads((work / f"{name}.json").read_text()), c, k if sc else None))
        finally:
            _stop(proc)
            server_text = server_log.read_text(errors="replace")
            log(server_text.rstrip())
    problems = drafting_problems(None, server_text, serving) if serving else []
    for lv in levels:
        if lv["completed"] != len(records) or lv["failed"]:
            problems.append(f"concurrency {lv['concurrency']}: {lv['completed']} of {len(records)} requests completed")
        if sc and (not lv["num_drafts"] or lv["num_draft_tokens"] != k * lv["num_drafts"]):
            problems.append(f"concurrency {lv['concurrency']}: {lv['num_draft_tokens']} draft tokens for "
                            f"{lv['num_drafts']} drafts at K={k}")
    if problems:
        raise VllmCheckError(f"vLLM serving benchmark of {serving['drafter'] if serving else target_model}: "
                             + "; ".join(problems))
    meta = (_read_json(Path(serving["drafter"]) / CONFIG_NAME).get("peagle") or {}) if serving else {}
    result = {"status": "ok", "engine": "vllm", "target": info["path"], "target_model": target_model,
              "target_name": info.get("name"),
              "eval_set": Path(prompts_path).stem.removeprefix("eval_"), "method": meta.get("method"),
              "ctx": meta.get("ctx"), "k": k if sc else None, "drafter": serving["drafter"] if serving else None,
              "parallel": serving["parallel"] if serving else None, "speculative_config": sc,
              "prompts": len(records), "output_len": settings.output_len, "server_startup_s": startup_s,
              "concurrency": levels, "settings": dataclasses.asdict(settings), "device": device,
              "vllm_version": _vllm_version(), "training": summary}
    log("; ".join(f"c={lv['concurrency']}: {lv['output_tokens_per_s']:.1f} tok/s, TPOT {lv['mean_tpot_ms']:.1f} ms"
                  + (f", AL {lv['acceptance_length']:.2f}" if lv["acceptance_length"] is not None else "")
                  for lv in levels))
    return result


if __name__ == "__main__":
    # Child-process entry point (vLLM starts helper processes with spawn: keep work under this guard).
    if len(sys.argv) != 4 or sys.argv[1] != "offline":
        sys.exit("usage: python -m peagle.vllm_bench offline REQUEST.json RESULT.json")
    atomic_write_json(sys.argv[3], offline_worker(json.loads(Path(sys.argv[2]).read_text())))
