"""Greedy regeneration of the training responses by the target (ARCHITECTURE.md "Responses").

Output JSONL, one line per conversation, in input order:
``{"id": str, "prompt_ids": [int], "response_ids": [int]}``, plus ``"answer_spans": [[start, end],
...]`` for a conversation of several turns. ``response_ids`` ends with an EOS id when the target
stopped by itself and holds no padding or anything after that EOS.

Every turn: a conversation of n user turns is regenerated turn by turn, as a chat server would
serve it: the target answers turn 1, then turn 2 with its own first answer in the history, and
so on. Its row is the last turn's prompt (the whole conversation so far, rendered by the chat
template) and the last answer; ``answer_spans`` locate the earlier answers inside ``prompt_ids``,
so the loss falls on every token the target wrote.

Shards and parts: the conversations are cut into shards of ``shard_prompts`` in input order, and
each shard is generated on its own (its batches never mix with another shard's), so a shard's
bytes depend on its conversations alone. Part p of P generates shards p, p + P, ... (one part per
GPU or job: Snakemake scatters them); a rerun keeps every finished shard whose settings match
and regenerates only the missing ones; gathering the shards in order gives the same file as one
run. Backends: HF ``generate`` (left-padded lock-step batches) or vLLM's offline engine
(continuous batching; run in the vLLM environment).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from peagle.io import atomic_path, atomic_write_json, sha256_bytes, sha256_file
from peagle.target import eos_token_ids, render_prompt_ids
from peagle.target.chat import _record_field, answer_text, history_prompt_ids

# The name other modules use for "chat-template one user turn with the generation prompt".
render_prompt = render_prompt_ids

SHARD_PATTERN = "shard_{:05d}.jsonl"
SHARD_FORMAT = "peagle-responses-shard-v1"


class ResponsesError(ValueError):
    """Prompts, shards or parts that cannot make (or have not made) a consistent responses file."""


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


# --------------------------------------------------------------------------- backends

# A backend is called with (prompts [[ids]], per-prompt new-token limits, progress) and returns the
# continuations; progress(prompts done, tokens made) after each batch.
Progress = Callable[[int, int], None]


class HFGreedy:
    """Greedy continuations through HF ``generate``: prompts sorted by length, longest first (an
    out-of-memory shows at once), in left-padded lock-step batches of ``batch_size``."""

    backend = "hf"

    def __init__(self, model, tokenizer, batch_size: int, cache_implementation: str | None = "static"):
        if batch_size < 1:
            raise ValueError(f"respond.batch_size={batch_size} must be >= 1")
        self.model, self.batch_size, self.cache_implementation = model, int(batch_size), cache_implementation
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id  # many real tokenizers have none; any id works under the mask
        self.pad_id = self.eos_ids[0] if pad is None else int(pad)
        self.max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30) or (1 << 30))
        self.vocab = int(model.get_input_embeddings().weight.shape[0])

    def settings(self) -> dict[str, Any]:
        """What, besides the prompts, decides the tokens (a shard's reuse key)."""
        p = next(self.model.parameters())
        return {"backend": self.backend, "batch_size": self.batch_size, "dtype": str(p.dtype),
                "device": p.device.type, "cache_implementation": self.cache_implementation}

    def __call__(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
                 progress: Progress | None = None) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[list[int]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                outs = generate_greedy_batch(self.model, [prompts[i] for i in idx], max(limits[i] for i in idx),
                                             self.eos_ids, self.pad_id, self.cache_implementation)
                for i, o in zip(idx, outs):
                    out[i] = o[:limits[i]]
                if progress:
                    progress(len(idx), sum(len(out[i]) for i in idx))
        finally:
            self.model.train(was_training)
        return out


class VllmGreedy:
    """Greedy continuations through vLLM's offline engine, in this process (the vLLM environment).

    ``model_path``: the target's HF directory or id; ``settings``: ``cfg.vllm`` (dtype, KV cache,
    batch size). The engine's length limit is the target's ``max_position_embeddings``, as HF's is
    (``vllm.max_model_len`` sizes evaluation, not regeneration). On CPU in fp32 its tokens equal
    HF greedy (tested).
    """

    backend = "vllm"

    def __init__(self, model_path: str, tokenizer, settings: Any, device: str):
        from types import SimpleNamespace

        from transformers import AutoConfig, GenerationConfig

        from peagle.vllm_bench import _child_env, _engine_kwargs

        hf_cfg = AutoConfig.from_pretrained(model_path)
        try:
            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the model config and tokenizer say
            gen_cfg = None
        self.eos_ids = eos_token_ids(SimpleNamespace(config=hf_cfg, generation_config=gen_cfg), tokenizer)
        text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
        self.max_pos = int(text_cfg.max_position_embeddings)
        self.vocab = int(text_cfg.vocab_size)
        self._settings = {"backend": self.backend, "dtype": settings.dtype, "device": device.split(":")[0]}
        # The engine reads these at import and start-up (CPU KV cache size); set them before.
        for key, value in _child_env(settings, device).items():
            if key not in ("LD_PRELOAD", "PYTHONPATH"):  # too late for a running process; set by the rule
                os.environ.setdefault(key, value)
        from vllm import LLM

        engine = {**_engine_kwargs(settings, device), "max_model_len": self.max_pos}
        self.llm = LLM(model=model_path, distributed_executor_backend="uni", **engine)

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def __call__(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
                 progress: Progress | None = None) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=0.0, max_tokens=int(n), stop_token_ids=list(self.eos_ids)) for n in limits]
        res = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        out = [cut_at_eos(r.outputs[0].token_ids, self.eos_ids, n) for r, n in zip(res, limits)]
        if progress:
            progress(len(out), sum(len(o) for o in out))
        return out


Greedy = HFGreedy | VllmGreedy


# --------------------------------------------------------------------------- conversations


def _conversations(records: Sequence[Any]) -> list[tuple[str, list[str] | None, list[int] | None]]:
    """``(id, user turns, None)`` per prompt record, or ``(id, None, prompt_ids)`` for a record
    tokenized upstream; ids unique."""
    convs, seen = [], set()
    for i, rec in enumerate(records):
        rid = _record_field(rec, "id")
        if rid is None:
            raise ResponsesError(f"prompt record #{i + 1} has no 'id' field")
        rid = str(rid)
        if rid in seen:
            raise ResponsesError(f"duplicate prompt id {rid!r} in the prompt records")
        seen.add(rid)
        given = _record_field(rec, "prompt_ids")
        if given is not None:
            convs.append((rid, None, [int(t) for t in given]))
            continue
        turns = _record_field(rec, "turns")
        if not turns:
            raise ResponsesError(f"prompt record {rid!r}: field 'turns' is empty; nothing to prompt with")
        convs.append((rid, list(turns), None))
    return convs


def _too_long(rid: str, turn: int, prompt: list[int], gen: Greedy, on_long_prompt: str) -> bool:
    """Whether turn ``turn`` (1-based) leaves no room to answer below the target's position limit:
    True to skip it (``on_long_prompt`` "skip"); raises for "fail"."""
    if len(prompt) < gen.max_pos:
        return False
    if on_long_prompt == "skip":
        return True
    raise ResponsesError(f"prompt {rid!r} turn {turn} has {len(prompt)} tokens, leaving no room below the target's "
                         f"limit of {gen.max_pos} positions; drop the conversation, or set respond.on_long_prompt: "
                         "skip (skipped turns are counted in the respond stage's summary)")


def _check_prompt(rid: str, prompt: list[int], gen: Greedy) -> None:
    if not prompt:
        raise ResponsesError(f"prompt {rid!r} renders to zero tokens")
    bad = [t for t in prompt if not 0 <= t < gen.vocab]
    if bad:
        raise ResponsesError(f"prompt {rid!r} has token ids {bad[:5]} outside the target's vocabulary [0, {gen.vocab}); "
                             "the prompts were tokenized for another target")


def respond_conversations(gen: Greedy, tokenizer, convs: Sequence[tuple[str, list[str] | None, list[int] | None]],
                          max_new_tokens: int, max_turns: int | None = None, on_long_prompt: str = "fail",
                          progress: Progress | None = None) -> tuple[list[dict[str, Any]], int]:
    """The response rows of ``convs`` (see the module doc), every turn answered in order, and the
    number of turns skipped as too long.

    Round r asks turn r+1 of every conversation that has one (at most ``max_turns``; None: all),
    with the conversation so far as its prompt. A prompt that leaves no room below the target's
    position limit fails, or with ``on_long_prompt`` "skip" ends its conversation at the turn
    before (a first turn that long: no row).
    """
    if max_new_tokens < 1:
        raise ResponsesError(f"respond.max_new_tokens={max_new_tokens} must be >= 1")
    rows: list[dict[str, Any]] = [{} for _ in convs]
    answers: list[list[str]] = [[] for _ in convs]
    ended = [False] * len(convs)
    rnd = skipped = 0
    while True:
        asked, prompts, spans = [], [], []
        for c, (rid, turns, given) in enumerate(convs):
            if ended[c] or rnd >= (1 if turns is None else len(turns)) or (max_turns is not None and rnd >= max_turns):
                continue
            if rnd == 0:
                prompt, span = (given if turns is None else render_prompt_ids(tokenizer, turns[0])), []
                _check_prompt(rid, prompt, gen)
            else:
                prompt, span = history_prompt_ids(tokenizer, turns[:rnd + 1], answers[c])
            if _too_long(rid, rnd + 1, prompt, gen, on_long_prompt):
                ended[c] = True
                skipped += 1
                continue
            asked.append(c)
            prompts.append(prompt)
            spans.append(span)
        if not asked:
            return [r for r in rows if r], skipped
        limits = [min(max_new_tokens, gen.max_pos - len(p)) for p in prompts]
        outs = gen(prompts, limits, progress)
        for c, prompt, span, out in zip(asked, prompts, spans, outs):
            row = {"id": convs[c][0], "prompt_ids": prompt, "response_ids": out}
            if rnd:
                row.update(answer_spans=[list(s) for s in span], turns=rnd + 1)
            rows[c] = row
            if convs[c][1] is not None and rnd + 1 < len(convs[c][1]):
                answers[c].append(answer_text(tokenizer, out))
        rnd += 1


# --------------------------------------------------------------------------- shards and parts


def shard_ranges(n: int, shard_prompts: int | None) -> list[range]:
    """Conversation index ranges of the shards (one shard when ``shard_prompts`` is None)."""
    size = n if shard_prompts is None else int(shard_prompts)
    if size < 1:
        raise ResponsesError(f"respond.shard_prompts={shard_prompts} must be >= 1 (or null: one shard)")
    return [range(a, min(a + size, n)) for a in range(0, n, size)] or [range(0, 0)]


def part_shards(num_shards: int, part: int, parts: int) -> list[int]:
    """The shards part ``part`` of ``parts`` generates: part, part + parts, ..."""
    if not 0 <= part < parts:
        raise ResponsesError(f"part {part} of {parts}: need 0 <= part < respond.parts")
    return list(range(part, num_shards, parts))


def _shard_key(records: Sequence[Any], settings: dict[str, Any]) -> str:
    def plain(r):
        return r.to_dict() if hasattr(r, "to_dict") else dict(r)

    return sha256_bytes(json.dumps({"records": [plain(r) for r in records], **settings}, sort_keys=True,
                                   separators=(",", ":")).encode())


def _finished_shard(shard_dir: Path, index: int, key: str) -> dict[str, Any] | None:
    """The sidecar of shard ``index`` when that shard was finished with these settings (bytes checked)."""
    data, side = shard_dir / SHARD_PATTERN.format(index), shard_dir / (SHARD_PATTERN.format(index) + ".json")
    if not (data.exists() and side.exists()):
        return None
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("format") != SHARD_FORMAT or meta.get("key") != key or meta.get("sha256") != sha256_file(data):
        return None
    return meta


def regenerate_part(gen: Greedy, tokenizer, records: Sequence[Any], shard_dir: str | Path, *, max_new_tokens: int,
                    shard_prompts: int | None = None, part: int = 0, parts: int = 1, max_turns: int | None = None,
                    on_long_prompt: str = "fail", target_sha256: str | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Generate part ``part`` of ``parts``: its shards of ``records``, each written to ``shard_dir``
    (``shard_NNNNN.jsonl`` and its ``.json`` sidecar, both atomic) unless already finished there
    with the same conversations and settings. Returns the part's summary: its shards (file,
    sha256, counts) and statistics; pass the summaries of all parts to :func:`gather_parts`.
    """
    import torch
    from tqdm.auto import tqdm

    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    convs = _conversations(records)
    ranges = shard_ranges(len(convs), shard_prompts)
    settings = {**gen.settings(), "max_new_tokens": int(max_new_tokens), "max_turns": max_turns,
                "on_long_prompt": on_long_prompt, "target_sha256": target_sha256}
    mine = part_shards(len(ranges), part, parts)
    entries, reused = [], 0
    n_new, t0 = 0, time.perf_counter()
    bar = tqdm(total=sum(len(ranges[i]) for i in mine), desc=f"regenerate responses (part {part + 1}/{parts})",
               unit="prompt", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def advance(n_prompts: int, n_tokens: int) -> None:
        nonlocal n_new
        n_new += n_tokens
        bar.set_postfix(tok_s=f"{n_new / max(time.perf_counter() - t0, 1e-9):.0f}")

    try:
        for i in mine:
            key = _shard_key([records[j] for j in ranges[i]], settings)
            meta = _finished_shard(shard_dir, i, key)
            if meta is None:
                rows, skipped = respond_conversations(gen, tokenizer, [convs[j] for j in ranges[i]], max_new_tokens,
                                                      max_turns, on_long_prompt, advance)
                meta = _write_shard(shard_dir, i, key, rows, skipped, gen.eos_ids)
            else:
                reused += 1
            entries.append(meta)
            bar.update(len(ranges[i]))
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    stats = _sum_stats(entries)
    return {"part": part, "parts": parts, "num_shards": len(ranges), "shard_prompts": shard_prompts,
            "shard_dir": str(shard_dir), "shards": entries, "shards_reused": reused, **stats,
            "max_new_tokens": max_new_tokens, "max_turns": max_turns, "settings": settings, "wall_s": wall,
            "tokens_per_s": n_new / max(wall, 1e-9), "generated_tokens": n_new,
            "threads": torch.get_num_threads()}


def _write_shard(shard_dir: Path, index: int, key: str, rows: list[dict[str, Any]], skipped: int,
                 eos_ids: Sequence[int]) -> dict[str, Any]:
    name = SHARD_PATTERN.format(index)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with atomic_path(shard_dir / name) as tmp:
        tmp.write_bytes(data)
    eos = set(int(e) for e in eos_ids)
    resp = [r["response_ids"] for r in rows]
    meta = {"format": SHARD_FORMAT, "index": index, "file": name, "key": key, "sha256": sha256_bytes(data),
            "num_prompts": len(rows), "num_stopped_at_eos": sum(1 for r in resp if r and r[-1] in eos),
            "response_tokens": sum(len(r) for r in resp),
            "earlier_answer_tokens": sum(e - s for r in rows for s, e in r.get("answer_spans", [])),
            "turns": sum(r.get("turns", 1) for r in rows), "turns_skipped_too_long": skipped}
    atomic_write_json(shard_dir / (name + ".json"), meta)  # last: the shard counts as finished from here
    return meta


def _sum_stats(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = sum(e["num_prompts"] for e in entries)
    stopped = sum(e["num_stopped_at_eos"] for e in entries)
    tokens = sum(e["response_tokens"] for e in entries)
    return {"num_prompts": n, "num_stopped_at_eos": stopped, "num_hit_max_new_tokens": n - stopped,
            "response_tokens": tokens, "mean_response_len": tokens / n if n else 0.0,
            "turns": sum(e["turns"] for e in entries),
            "turns_skipped_too_long": sum(e["turns_skipped_too_long"] for e in entries),
            "earlier_answer_tokens": sum(e["earlier_answer_tokens"] for e in entries)}


def gather_parts(parts: Sequence[dict[str, Any]], out_path: str | Path) -> dict[str, Any]:
    """Concatenate the shards that the part summaries list, in shard order, into ``out_path``
    (atomic). Every shard must be there exactly once with the bytes its part recorded."""
    if not parts:
        raise ResponsesError("gather: no part summaries given")
    num_shards, n_parts = parts[0]["num_shards"], parts[0]["parts"]
    entries = {}
    for p in parts:
        if (p["num_shards"], p["parts"]) != (num_shards, n_parts):
            raise ResponsesError(f"gather: part {p['part']} was made for {p['num_shards']} shards in {p['parts']} "
                                 f"parts, part {parts[0]['part']} for {num_shards} in {n_parts}; re-run the respond stage")
        for e in p["shards"]:
            entries[int(e["index"])] = (Path(p["shard_dir"]), e)
    missing = sorted(set(range(num_shards)) - set(entries))
    if missing:
        raise ResponsesError(f"gather: shards {missing[:8]} of {num_shards} are in no part summary; give all "
                             f"{n_parts} parts (respond.parts)")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        for i in range(num_shards):
            shard_dir, e = entries[i]
            data = (shard_dir / e["file"]).read_bytes()
            if sha256_bytes(data) != e["sha256"]:
                raise ResponsesError(f"{shard_dir / e['file']}: bytes differ from what part {i % n_parts} recorded; "
                                     "re-run the respond stage")
            fh.write(data)
    return {"num_shards": num_shards, "parts": n_parts, **_sum_stats([entries[i][1] for i in range(num_shards)]),
            "out_path": str(out_path), "sha256": sha256_file(out_path)}


def regenerate_responses(model, tokenizer, records: Sequence[Any], max_new_tokens: int, batch_size: int,
                         out_path: str | Path, *, cache_implementation: str | None = "static",
                         shard_prompts: int | None = None, max_turns: int | None = None,
                         on_long_prompt: str = "fail", progress: bool = True) -> dict[str, Any]:
    """All shards through HF ``generate`` in this process, gathered into ``out_path`` (the shards
    kept in ``<out_path>.shards/`` so that a rerun resumes). Returns the statistics."""
    out_path = Path(out_path)
    gen = HFGreedy(model, tokenizer, batch_size, cache_implementation)
    part = regenerate_part(gen, tokenizer, records, out_path.with_name(out_path.name + ".shards"),
                           max_new_tokens=max_new_tokens, shard_prompts=shard_prompts, max_turns=max_turns,
                           on_long_prompt=on_long_prompt, progress=progress)
    return {**part, **gather_parts([part], out_path), "batch_size": batch_size,
            "cache_implementation": cache_implementation}


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
            for s, e in row.get("answer_spans", []):
                if not 0 <= s < e <= len(row["prompt_ids"]):
                    raise ValueError(f"{path}:{n}: answer span [{s}, {e}) is not inside the prompt's "
                                     f"{len(row['prompt_ids'])} tokens; re-run the `respond` stage")
            rows.append(row)
    return rows
