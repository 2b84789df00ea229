"""Acceptance-length evaluation of a trained drafter with the suite's own engine (DESIGN §6)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from peagle.config import Config
from peagle.io import read_json


class EvaluationError(ValueError):
    """The drafter and target do not fit together, or the request is impossible."""


def check_compatible(drafter_cfg: dict[str, Any], target_info: dict[str, Any], k: int, drafter_dir: Path) -> None:
    """Fail before decoding when the drafter was trained for another target or a smaller K."""
    path = drafter_dir / "config.json"
    if drafter_cfg["hidden_size"] != target_info["hidden_size"]:
        raise EvaluationError(f"{path}: hidden_size {drafter_cfg['hidden_size']} != target's {target_info['hidden_size']}")
    if list(drafter_cfg["eagle_aux_hidden_state_layer_ids"]) != list(target_info["aux_layer_ids"]):
        raise EvaluationError(f"{path}: aux layer ids {drafter_cfg['eagle_aux_hidden_state_layer_ids']} != "
                              f"target's {target_info['aux_layer_ids']}")
    k_train = drafter_cfg["peagle"].get("k_train")  # None for autoregressive drafters (any K)
    if k_train is not None and k > k_train:
        raise EvaluationError(f"{path}: K={k} exceeds the {k_train} depths this drafter was trained for; "
                              f"evaluate with k <= {k_train} or retrain with a larger train.k_train")


def training_outcome(drafter_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    """Resolve a run dir (summary.json + final/) or a checkpoint dir -> (checkpoint dir, summary).

    The summary is None for a bare checkpoint dir.
    """
    summary_path = drafter_dir / "summary.json"
    if not summary_path.exists():
        return drafter_dir, None
    summary = read_json(summary_path, EvaluationError, fix="re-run the train rule")
    if summary.get("status", "ok") == "ok" and not (drafter_dir / "final" / "config.json").exists():
        raise EvaluationError(f"{summary_path} says the run finished, but {drafter_dir / 'final'} is missing; "
                              "re-run the train rule")
    return drafter_dir / "final", summary


def run_seed(summary: dict[str, Any] | None, seed: int | None, drafter_dir: Path) -> int | None:
    """The training seed of a drafter: ``seed`` when given (checked against the recorded one), else the
    one its training summary records (None when neither says)."""
    recorded = (summary or {}).get("seed")
    if seed is not None and recorded is not None and int(recorded) != int(seed):
        raise EvaluationError(f"{drafter_dir}: trained with seed {recorded}, but evaluated as seed {seed}; "
                              "re-run the train rule for this directory")
    return seed if seed is not None else recorded


def not_trained_result(summary: dict[str, Any], drafter_dir: Path, prompts_path: str | Path, k: int) -> dict[str, Any]:
    """The evaluation record of a cell whose training ended OOM or infeasible: the measurement."""
    return {
        "status": summary["status"],
        "drafter": str(drafter_dir),
        "method": summary.get("method"),
        "ctx": summary.get("ctx"),
        "target": summary.get("target"),
        "target_name": summary.get("target_name"),
        "eval_set": Path(prompts_path).stem.removeprefix("eval_"),
        "k": k,
        "acceptance_length": None,
        "training": summary,
    }


def evaluate_drafter(
    cfg: Config,
    target_json: str | Path,
    drafter_dir: str | Path,
    prompts_path: str | Path,
    k: int,
    *,
    n_prompts: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Speculative decoding over an evaluation set; returns acceptance figures and timings.

    ``drafter_dir``: a checkpoint dir, or a training run dir (summary.json + final/). A run that
    ended OOM or infeasible gives a record with that status and the training measurement.
    ``seed``: the drafter's training seed (the DAG's ``_s<seed>``), recorded as ``seed``; it must
    agree with the seed its training recorded. None: that recorded seed (None if there is none).
    """
    from tqdm import tqdm

    from peagle.checkpoint import load_drafter, read_config
    from peagle.data.schema import read_prompts
    from peagle.spec_decode import DecodeStats, SpeculativeDecoder, TargetRunner, greedy_generate, make_proposer
    from peagle.target import load_target, render_prompt_ids
    from peagle.target.chat import answer_text, history_prompt_ids

    drafter_dir, summary = training_outcome(Path(drafter_dir))
    seed = run_seed(summary, seed, drafter_dir)
    if summary is not None and summary.get("status", "ok") != "ok":
        log(f"training ended {summary['status']}: recorded, nothing to decode")
        return {**not_trained_result(summary, drafter_dir.parent, prompts_path, k), "seed": seed}
    torch.set_num_threads(cfg.runtime.threads)
    device, dtype = torch.device(cfg.runtime.device), getattr(torch, cfg.runtime.dtype)
    model, tokenizer, info = load_target(target_json, device=device, dtype=dtype)
    check_compatible(read_config(drafter_dir), info, k, drafter_dir)
    drafter, dcfg = load_drafter(drafter_dir, device=device, dtype=dtype)
    if seed is None:
        seed = dcfg["peagle"].get("seed")

    records = read_prompts(prompts_path)
    n_prompts = n_prompts if n_prompts is not None else cfg.eval.n_prompts
    records = records[:n_prompts] if n_prompts is not None else records
    if not records:
        raise EvaluationError(f"{prompts_path}: no prompts to evaluate (eval.n_prompts={n_prompts})")
    runner = TargetRunner(model, info["aux_layer_ids"])
    engine = SpeculativeDecoder(runner, make_proposer(drafter), k=k, eos_id=info.get("eos_token_id"))
    total = DecodeStats(k)
    per_turn = [DecodeStats(k) for _ in range(cfg.eval.turns)]
    lossless = []
    t0 = time.perf_counter()
    for i, rec in enumerate(tqdm(records, desc=f"evaluate K={k}", disable=not progress, file=sys.stderr)):
        answers: list[str] = []
        # Turn t is asked after the target's own earlier answers (the engine's output is the
        # target's greedy output: it is lossless).
        for t in range(min(cfg.eval.turns, len(rec.turns))):
            prompt = (render_prompt_ids(tokenizer, rec.turns[0]) if t == 0
                      else history_prompt_ids(tokenizer, list(rec.turns[:t + 1]), answers)[0])
            out, stats = engine.generate(prompt, cfg.eval.max_new_tokens)
            total.merge(stats)
            per_turn[t].merge(stats)
            answers.append(answer_text(tokenizer, out))
            if i < cfg.eval.lossless_check_prompts:
                ref = greedy_generate(runner, prompt, cfg.eval.max_new_tokens, info.get("eos_token_id"))
                lossless.append({"id": rec.id, "turn": t + 1, "equal": out == ref,
                                 "first_difference": next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), None)})
    wall = time.perf_counter() - t0
    if not all(c["equal"] for c in lossless):
        log(f"WARNING: speculative output differs from greedy decoding on {lossless}")
    result = {
        "status": "ok",
        "drafter": str(drafter_dir),
        "method": dcfg["peagle"].get("method"),
        "ctx": dcfg["peagle"].get("ctx"),
        "seed": seed,
        "drafter_layers": drafter.spec.num_layers,
        "target": info["path"],
        "target_name": info.get("name"),
        "target_architecture": info.get("architecture"),
        "eval_set": Path(prompts_path).stem.removeprefix("eval_"),
        "k": k,
        "prompts": len(records),
        "turns": cfg.eval.turns,
        "acceptance_length": total.acceptance_length,
        # Per asked turn (turn 2 only where a conversation has one); the pooled figure above.
        "acceptance_length_per_turn": [s.acceptance_length if s.rounds else None for s in per_turn],
        "per_position_acceptance": total.per_position_acceptance(),
        "rounds": total.rounds,
        "new_tokens": total.new_tokens,
        "draft_s": total.draft_s,
        "verify_s": total.verify_s,
        "wall_s": wall,
        "output_tokens_per_s": total.new_tokens / wall if wall else None,
        "lossless_checks": lossless,
        "training": summary,
    }
    log(f"acceptance length {result['acceptance_length']:.3f} over {len(records)} prompts (K={k})")
    return result

