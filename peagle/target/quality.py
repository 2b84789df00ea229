"""Does each target write text like its training data? Greedy responses to held-out prompts.

For every target and evaluation set (one role each: chat, code, math), the target greedily
answers the set's first prompts; the answers' repetition and cap rate are set beside the same
statistics of the set's reference texts (:mod:`peagle.textstats`), together with the target's
held-out next-token accuracy from pretraining (tiny targets) and its teacher-forced accuracy on
the reference tokens that copy a number of the prompt. One row per (target, set).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peagle.textstats import compare_to_reference, copy_accuracy, response_stats

__all__ = ["target_quality_rows", "number_token_ids"]

_NUMBER = re.compile(r"\s?\d+")


def number_token_ids(tok, ids: Sequence[int]) -> set[int]:
    """The ids among ``ids`` whose token is a number (digits, optionally after one space)."""
    return {i for i in set(ids) if _NUMBER.fullmatch(tok.decode([i]))}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _copy_pairs(model, tok, recs) -> list[tuple[list[int], list[int], set[int]]]:
    """Teacher-forced ``(argmax, reference tokens, the prompt's number tokens)`` per record."""
    from peagle.target.pretrain import teacher_forced

    return [(logits.argmax(-1).tolist(), response, number_token_ids(tok, prompt))
            for prompt, response, logits in teacher_forced(model, tok, recs)]


def target_quality_rows(target_json: str | Path, data_dir: str | Path, sets: Sequence[str], *, n_prompts: int,
                        max_new_tokens: int, batch_size: int, device: str = "cpu", dtype: str = "float32",
                        log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Rows of repetition / cap statistics of one target on ``eval_<set>.jsonl`` of ``data_dir``.

    Reference texts are tokenized by the target's tokenizer; records without a reference give
    generated statistics only. ``max_new_tokens`` is the cap (the respond stage's).
    """
    from peagle.data.schema import read_prompts
    from peagle.generate import eos_token_ids, generate_greedy_batch
    from peagle.target.chat import render_prompt_ids
    from peagle.target import load_target

    model, tok, info = load_target(target_json, device=device, dtype=dtype)
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    metrics_path = Path(target_json).parent / "pretrain_metrics.json"
    pretrain = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    rows = []
    for name in sets:
        recs = read_prompts(Path(data_dir) / f"eval_{name}.jsonl")[:n_prompts]
        prompts = [render_prompt_ids(tok, r.turns[0]) for r in recs]
        outs: list[list[int]] = []
        for b in range(0, len(prompts), batch_size):
            outs += [o[:max_new_tokens] for o in
                     generate_greedy_batch(model, prompts[b:b + batch_size], max_new_tokens, eos, pad, "static")]
        gen = response_stats(outs, eos_ids=eos, cap=max_new_tokens)
        refs = [tok(r.reference, add_special_tokens=False)["input_ids"] for r in recs if r.reference]
        row: dict[str, Any] = {
            "target": info.get("name"), "eval_set": name, "prompts": len(recs),
            "repetition": gen["repetition"], "cap_rate": gen["cap_rate"], "mean_len": gen["mean_len"],
            "p90_len": gen["p90_len"],
            "heldout_next_token_accuracy": pretrain.get("heldout_next_token_accuracy"),
        }
        if refs:
            ref = response_stats(refs)
            verdict = compare_to_reference(gen, ref)
            row.update(reference_repetition=ref["repetition"], reference_mean_len=ref["mean_len"],
                       repetition_ratio=verdict["repetition_ratio"], repetition_ok=verdict["repetition_ok"],
                       cap_ok=verdict["cap_ok"])
            copying = copy_accuracy(_copy_pairs(model, tok, [r for r in recs if r.reference]))
            row.update(copy_accuracy=copying["copy_accuracy"], other_accuracy=copying["other_accuracy"])
        log(f"{row['target']} {name}: repetition {gen['repetition']:.3f} (reference "
            f"{row.get('reference_repetition', float('nan')):.3f}), cap rate {gen['cap_rate']:.2f}, "
            f"copy accuracy {_fmt(row.get('copy_accuracy'))}")
        rows.append(row)
    return rows
