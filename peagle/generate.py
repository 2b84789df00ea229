"""Greedy regeneration of training responses by the target (ARCHITECTURE.md "Responses").

Output JSONL, one line per prompt, in input order:
``{"id": str, "prompt_ids": [int], "response_ids": [int]}``; ``response_ids`` ends with an EOS id
when the target stopped by itself and holds no padding or anything after that EOS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from peagle.io import atomic_path
from peagle.target import eos_token_ids, render_prompt_ids
from peagle.target.chat import _record_field

# The name other modules use for "chat-template one user turn with the generation prompt".
render_prompt = render_prompt_ids


def _prompt_ids_of(tokenizer, record: Any, index: int) -> tuple[str, list[int]]:
    rid = _record_field(record, "id")
    if rid is None:
        raise ValueError(f"prompt record #{index} has no 'id' field")
    given = _record_field(record, "prompt_ids")
    if given is not None:  # already tokenized upstream
        return str(rid), [int(t) for t in given]
    turns = _record_field(record, "turns")
    if not turns:
        raise ValueError(f"prompt record {rid!r}: field 'turns' is empty; nothing to prompt with")
    return str(rid), render_prompt_ids(tokenizer, turns[0])


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int], limit: int | None = None) -> list[int]:
    """Tokens up to and including the first EOS (then stop), truncated to ``limit`` tokens."""
    eos = set(int(e) for e in eos_ids)
    out: list[int] = []
    for t in tokens:
        if limit is not None and len(out) >= limit:
            break
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def generate_greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                          eos_ids: Sequence[int], pad_id: int,
                          cache_implementation: str | None = "static") -> list[list[int]]:
    """Greedy continuations of ``prompts`` in one left-padded HF ``generate`` call.

    Input ``[B, P]`` (left padding, attention mask 0 on pads) -> per prompt the new tokens cut
    after the first EOS. Left padding keeps every prompt's last token in the final column, so all
    rows decode in lock-step; the mask (and the position ids generate derives from it) makes the
    result equal to unpadded batch-1 decoding up to float rounding. ``cache_implementation``
    "static" preallocates the KV cache (about 1.6-2x faster on CPU than the default dynamic cache,
    which re-concatenates every step); None uses the model's default.
    """
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=int(max_new_tokens),
                          eos_token_id=list(eos_ids), pad_token_id=int(pad_id),
                          temperature=None, top_p=None, top_k=None)
    if cache_implementation:
        gc.cache_implementation = cache_implementation
    # With a static cache on GPU, transformers would torch.compile the forward and recompile for
    # every new batch shape (prompt widths vary): keep generation eager and predictable.
    gc.disable_compile = True
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=gc)
    new = out[:, width:].tolist()
    return [cut_at_eos(row, eos_ids) for row in new]


def regenerate_responses(model, tokenizer, records: Sequence[Any], max_new_tokens: int,
                         batch_size: int, out_path: str | Path, *,
                         cache_implementation: str | None = "static",
                         progress: bool = True) -> dict[str, Any]:
    """Greedily regenerate a response for every record and write the responses JSONL atomically.

    ``records``: prompt records (``id`` + ``turns``; ``turns[0]`` is rendered with the chat
    template) or dicts with ``id`` + ``prompt_ids``. Prompts are batched by length (longest first,
    so an out-of-memory shows up at once) and written back in input order. Responses never run
    past the model's ``max_position_embeddings``. Returns stats (counts, tokens/s).
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"regenerate_responses: batch_size={batch_size} and "
                         f"max_new_tokens={max_new_tokens} must be >= 1")
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # many real tokenizers have none; any id works under the attention mask
        pad_id = eos_ids[0]
    max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30) or (1 << 30))
    items = [_prompt_ids_of(tokenizer, r, i) for i, r in enumerate(records)]
    seen: set[str] = set()
    for rid, p in items:
        if rid in seen:
            raise ValueError(f"duplicate prompt id {rid!r} in the prompt records")
        seen.add(rid)
        if not p:
            raise ValueError(f"prompt {rid!r} renders to zero tokens")
        if len(p) >= max_pos:
            raise ValueError(f"prompt {rid!r} has {len(p)} tokens, not below the target's "
                             f"max_position_embeddings={max_pos}; shorten or drop it")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    for rid, p in items:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {rid!r} has token ids {bad[:5]} outside the target's vocabulary "
                             f"[0, {vocab}); the prompts were tokenized for another target")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][1]), i))
    responses: list[list[int] | None] = [None] * len(items)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    n_new = 0
    bar = tqdm(total=len(items), desc="regenerate responses", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            prompts = [items[i][1] for i in idx]
            limits = [min(max_new_tokens, max_pos - len(p)) for p in prompts]
            outs = generate_greedy_batch(model, prompts, max(limits), eos_ids, pad_id,
                                         cache_implementation)
            for i, o, lim in zip(idx, outs, limits):
                responses[i] = o[:lim]
                n_new += len(responses[i])
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{n_new / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        bar.close()
        model.train(was_training)
    wall = time.perf_counter() - t0
    eos_set = set(eos_ids)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for (rid, p), r in zip(items, responses):
                fh.write(json.dumps({"id": rid, "prompt_ids": p, "response_ids": r}) + "\n")
    stopped = sum(1 for r in responses if r and r[-1] in eos_set)
    lens = [len(r) for r in responses]
    return {"num_prompts": len(items), "num_stopped_at_eos": stopped,
            "num_hit_max_new_tokens": len(items) - stopped, "response_tokens": n_new,
            "mean_response_len": (sum(lens) / len(lens)) if lens else 0.0,
            "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "cache_implementation": cache_implementation, "wall_s": wall,
            "tokens_per_s": n_new / max(wall, 1e-9), "threads": torch.get_num_threads(),
            "out_path": str(out_path)}


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """Read a responses JSONL, checking each line's fields (error names file and line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run the `respond` stage first")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e}); re-run the `respond` stage") from e
            for k in ("id", "prompt_ids", "response_ids"):
                if k not in row:
                    raise ValueError(f"{path}:{n}: missing field '{k}'; re-run the `respond` stage")
            rows.append(row)
    return rows
