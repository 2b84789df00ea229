"""Drafting and verification time per round vs K (the CPU counterpart of the paper's Table 10).

For each drafter and each K the suite's own engine decodes the first prompts of an evaluation set
at concurrency 1 (one request at a time, greedy) and records the time spent drafting and
verifying per round and the end-to-end output tokens/s. An autoregressive drafter (EAGLE-3) runs
K drafter passes per round, so its drafting time grows with K; P-EAGLE drafts all K tokens in one
pass, so its drafting time stays nearly flat.

Each (drafter, K) first decodes one untimed warm-up request (allocator, kernel selection), then the
timed prompts. Timings are wall-clock ``time.perf_counter`` intervals around the proposer and the
target's verification pass; both end in a host-side ``.tolist()`` of their argmax, which waits for
the device, so the intervals hold the device work on GPUs too.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from peagle.config import Config

COLUMNS = ["target_name", "method", "drafter_layers", "k", "prompts", "rounds", "draft_ms_per_round",
           "verify_ms_per_round", "acceptance_length", "new_tokens", "wall_s", "output_tokens_per_s",
           "eval_set", "k_train", "drafter"]


def _layers(drafter, dcfg: dict[str, Any]) -> int | None:
    spec = getattr(drafter, "spec", None)
    if spec is not None and getattr(spec, "num_layers", None) is not None:
        return int(spec.num_layers)
    return dcfg.get("num_hidden_layers")


def drafting_cost(
    cfg: Config,
    target_json: str | Path,
    drafter_dirs: list[str | Path],
    prompts_path: str | Path,
    ks: list[int],
    n_prompts: int,
    max_new_tokens: int,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> pd.DataFrame:
    """One row per drafter x K: drafting/verification ms per round, AL and output tokens/s."""
    from tqdm import tqdm

    from peagle.checkpoint import load_drafter, read_config
    from peagle.data.schema import read_prompts
    from peagle.evaluate import check_compatible, training_outcome
    from peagle.spec_decode import DecodeStats, SpeculativeDecoder, TargetRunner, make_proposer
    from peagle.target import load_target, render_prompt_ids

    if not drafter_dirs:
        raise ValueError("drafting-cost: no drafter directories given")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"drafting-cost: every K must be >= 1, got {ks}")
    if n_prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"drafting-cost: n_prompts ({n_prompts}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    torch.set_num_threads(cfg.runtime.threads)
    device, dtype = torch.device(cfg.runtime.device), getattr(torch, cfg.runtime.dtype)
    model, tokenizer, info = load_target(target_json, device=device, dtype=dtype)
    target_name = info.get("name") or Path(target_json).parent.name
    records = read_prompts(prompts_path)[:n_prompts]
    if not records:
        raise ValueError(f"{prompts_path}: no prompts")
    prompts = [render_prompt_ids(tokenizer, rec.turns[0]) for rec in records]
    eval_set = Path(prompts_path).stem.removeprefix("eval_")
    runner = TargetRunner(model, info["aux_layer_ids"])
    eos = info.get("eos_token_id")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for given in drafter_dirs:
        # A checkpoint dir, or a training run dir (summary.json + final/) as the evaluate rule takes.
        ddir, summary = training_outcome(Path(given))
        if summary is not None and summary.get("status", "ok") != "ok":
            skipped[str(given)] = str(summary["status"])
            log(f"{given}: training ended {summary['status']}; nothing to time")
            continue
        dcfg = read_config(ddir)
        k_train = dcfg["peagle"].get("k_train")
        # Shapes must fit the target; K beyond k_train is timed anyway (flagged by the k_train column).
        check_compatible(dcfg, info, min(ks) if k_train is None else min(min(ks), k_train), ddir)
        drafter, dcfg = load_drafter(ddir, device=device, dtype=dtype)
        method = dcfg["peagle"].get("method")
        layers = _layers(drafter, dcfg)
        for k in ks:
            k = int(k)
            if k_train is not None and k > k_train:
                log(f"note: {ddir} was trained for K<={k_train}; timing K={k} anyway (its AL there is not "
                    f"meaningful)")
            engine = SpeculativeDecoder(runner, make_proposer(drafter), k=k, eos_id=eos)
            engine.generate(prompts[0], max_new_tokens)  # untimed warm-up
            total = DecodeStats(k)
            t0 = time.perf_counter()
            for prompt in tqdm(prompts, desc=f"{method} K={k}", disable=not progress, file=sys.stderr):
                _, stats = engine.generate(prompt, max_new_tokens)
                total.merge(stats)
            wall = time.perf_counter() - t0
            r = total.rounds
            rows.append({
                "target_name": target_name, "method": method, "drafter_layers": layers, "k": k,
                "prompts": len(prompts), "rounds": r,
                "draft_ms_per_round": round(1000 * total.draft_s / r, 4) if r else None,
                "verify_ms_per_round": round(1000 * total.verify_s / r, 4) if r else None,
                "acceptance_length": round(total.acceptance_length, 4) if r else None,
                "new_tokens": total.new_tokens, "wall_s": round(wall, 4),
                "output_tokens_per_s": round(total.new_tokens / wall, 3) if wall else None,
                "eval_set": eval_set, "k_train": k_train, "drafter": str(ddir),
            })
            row = rows[-1]
            log(f"{target_name} {method} ({layers} layers) K={k}: draft {row['draft_ms_per_round']} ms/round, "
                f"verify {row['verify_ms_per_round']} ms/round, AL {row['acceptance_length']}, "
                f"{row['output_tokens_per_s']} tok/s")
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("drafter_layers", "k_train"):  # None (EAGLE-3's k_train) must not turn 5 into 5.0
        df[col] = df[col].astype("Int64")
    df.attrs["skipped"] = skipped
    return df


def write_drafting_cost(
    cfg: Config,
    target_json: str | Path,
    drafter_dirs: list[str | Path],
    prompts_path: str | Path,
    ks: list[int],
    n_prompts: int,
    max_new_tokens: int,
    out: str | Path,
    config_files: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> pd.DataFrame:
    """Run :func:`drafting_cost`; write ``out`` (CSV) and ``out``'s ``.provenance.json`` atomically."""
    from peagle.provenance import write_table
    from peagle.target import read_target_json

    df = drafting_cost(cfg, target_json, drafter_dirs, prompts_path, ks, n_prompts, max_new_tokens,
                       progress=progress, log=log)
    info = read_target_json(target_json)
    write_table(
        df, out, table="drafting_cost", cfg=cfg, config_files=config_files,
        what="engine drafting and verification time per round and output tokens/s at concurrency 1, "
             "per drafter and K (CPU counterpart of the paper's Table 10)",
        method="one untimed warm-up request per (drafter, K), then the first n_prompts prompts one at a "
               "time; draft/verify times are perf_counter intervals around the proposer and the "
               "target's verification pass (DecodeStats.draft_s / verify_s), per round",
        setting={"ks": [int(k) for k in ks], "n_prompts": n_prompts, "max_new_tokens": max_new_tokens,
                 "prompts": str(prompts_path), "concurrency": 1, "temperature": 0},
        target={"json": str(target_json), **{k: info.get(k) for k in (
            "path", "kind", "name", "architecture", "num_layers", "hidden_size", "vocab_size", "aux_layer_ids")}},
        drafters=[str(d) for d in drafter_dirs],
        drafter_seed={"seed": cfg.train.seed, "note": "one drafter per method: the DAG passes those of the first "
                      "of train.seeds (directories ..._s<seed>); no seed spread, timing noise not estimated"},
        drafters_skipped=df.attrs.get("skipped", {}),
        runtime={"device": cfg.runtime.device, "dtype": cfg.runtime.dtype, "torch_threads": torch.get_num_threads()},
    )
    return df
