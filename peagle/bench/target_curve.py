"""The tiny target's text against its pretraining length: where to put ``target.pretrain.steps``.

For every step count, a profile target is pretrained afresh (its own warm-up and cosine decay
over that many steps, exactly as ``peagle target`` would with ``target.pretrain.steps`` set to
it) and judged as ``peagle target-quality`` judges the recorded one: greedy answers to held-out
prompts, their 4-gram repetition beside the references' (pass: ratio <= 1.5), cap rate (pass:
<= 10%), held-out next-token accuracy, and teacher-forced accuracy on the reference tokens that
copy a number of the prompt (:func:`peagle.textstats.copy_accuracy`). One row per
(target, steps, evaluation set), with the pretraining's wall time and tokens. The CSV is
rewritten after every point, so a killed sweep keeps what it measured.

    python -m peagle.bench.target_curve --config config/tiny.yaml --data-dir results/tiny/data \\
        --steps 400 1200 2400 --targets tiny-llama --out results/benchmarks/target_curve/llama_steps.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# No torch or transformers at module level: they load inside the run.


def run(config_files: list[str], data_dir: str | Path, steps: list[int], out: str | Path, *,
        targets: list[str] | None = None, n_prompts: int | None = None,
        keep_dir: str | Path | None = None) -> list[dict]:
    """Pretrain and judge every target of ``targets`` (default: the profile's) at every step count;
    ``keep_dir``: keep each pretrained target there (``<name>_<steps>/``) instead of deleting it."""
    import pandas as pd
    import torch

    from peagle.config import load_config
    from peagle.provenance import write_table
    from peagle.target.quality import target_quality_rows
    from peagle.target.tiny import pretrain_configured_target

    cfg = load_config(*config_files)
    torch.set_num_threads(cfg.runtime.threads)
    chosen = [cfg.target_named(n) for n in targets] if targets else list(cfg.targets)
    if any(tc.kind != "tiny" for tc in chosen):
        raise SystemExit("target_curve: only tiny targets are pretrained here; name them with --targets")
    rows: list[dict] = []
    for tc in chosen:
        for n in steps:
            print(f"[target_curve] {tc.name}: {n} steps", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix=f"target_curve_{tc.name}_") as scratch:
                where = Path(keep_dir) / f"{tc.name}_{n}" if keep_dir else Path(scratch)
                info = pretrain_configured_target(tc, cfg.seed, data_dir, where, heldout_sets=cfg.eval.sets,
                                                  num_threads=cfg.runtime.threads, steps=n)
                quality = target_quality_rows(where / "target.json", data_dir, list(cfg.eval.sets),
                                              n_prompts=n_prompts or cfg.eval.n_prompts,
                                              max_new_tokens=cfg.respond.max_new_tokens,
                                              batch_size=cfg.respond.batch_size, device=cfg.runtime.device,
                                              dtype=cfg.runtime.dtype,
                                              log=lambda m: print(f"[target_curve] {m}", file=sys.stderr))
            pre = info["pretrain"]
            for q in quality:
                rows.append({"target": tc.name, "steps": n, "tokens_seen": pre["tokens_seen"],
                             "pretrain_min": pre["wall_s"] / 60, "train_loss_last": pre["train_loss_last"],
                             **{k: v for k, v in q.items() if k != "target"}})
            write_table(pd.DataFrame(rows), out, table="target_curve", cfg=cfg, config_files=config_files,
                        what="tiny targets pretrained for each step count (own cosine schedule), judged as "
                             "peagle target-quality judges the recorded ones",
                        steps=steps, targets=[tc.name for tc in chosen], threads=cfg.runtime.threads)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peagle.bench.target_curve", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="profile YAML (repeat for overlays)")
    p.add_argument("--data-dir", required=True, help="the data stage's directory (train.jsonl, eval_*.jsonl)")
    p.add_argument("--steps", nargs="+", type=int, required=True, help="pretraining step counts")
    p.add_argument("--targets", nargs="+", help="target names (default: every target of the profile)")
    p.add_argument("--n-prompts", type=int, help="held-out prompts per set (default eval.n_prompts)")
    p.add_argument("--out", required=True, help="CSV path (a provenance sidecar is written beside it)")
    p.add_argument("--keep-dir", help="keep each pretrained target under this directory (<name>_<steps>/)")
    a = p.parse_args(argv)
    if any(n < 1 for n in a.steps):
        p.error("--steps: every step count must be >= 1")
    run(a.config, a.data_dir, list(dict.fromkeys(a.steps)), a.out, targets=a.targets, n_prompts=a.n_prompts,
        keep_dir=a.keep_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
