"""The frozen target LM: a tiny one built, tokenized and pretrained here, or a Hugging Face model.

Public API
----------
- ``train_tokenizer(texts, vocab_size, out_dir)``: byte-level BPE + chat template, HF-wrapped.
- ``TinyTargetConfig`` / ``build_tiny_target(cfg, tokenizer)``: random-init HF ``*ForCausalLM``.
- ``pretrain_tiny_target(...)``: packed next-token pretraining, saves ``out_dir/model``.
- ``default_aux_layer_ids(L)`` / ``validate_aux_layer_ids(ids, L)``.
- ``write_target_json(...)`` / ``load_target(target_json)`` / ``resolve_hf_target(hf_id, ...)``.
- ``make_tiny_target(out_dir, train_records, eval_records, arch, ...)``: the whole tiny stage.
- ``render_prompt_ids(tokenizer, text)`` / ``render_training_example(tokenizer, record)``: the one
  place where prompts become token ids (chat template with generation prompt).

Heavy libraries (torch, transformers, tokenizers) are imported inside functions so that importing
this module (e.g. for the CLI's ``--help``) stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from peagle.io import atomic_dir, atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

TARGET_JSON_FORMAT = "peagle-target-v1"

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, MASK_TOKEN]

# Rendered text of one user turn + generation prompt:
#   "<|bos|><|user|>\n{content}\n<|assistant|>\n"
# An assistant turn in the history is closed by EOS, which is also where generation stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unsupported role ' + message['role'] + '; use user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# vLLM's CPU attention backend supports these head sizes (DESIGN §7).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


# --------------------------------------------------------------------------- small helpers


def _parse_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16}
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[key]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    *, model_max_length: int = 2048, min_frequency: int = 2):
    """Train a deterministic byte-level BPE tokenizer and wrap it as ``PreTrainedTokenizerFast``.

    Special tokens get ids 0..5 in the order pad, bos, eos, user, assistant, mask; the mask token
    (P-EAGLE's MTP slot token) is the tokenizer's ``mask_token``. The wrapper carries
    ``CHAT_TEMPLATE`` so ``apply_chat_template([...], add_generation_prompt=True)`` works as for
    real chat models. If ``out_dir`` is given the tokenizer is saved there (atomically).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no training texts given")
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below the byte alphabet plus "
                         f"special tokens ({min_vocab}); raise target.pretrain.tokenizer_vocab_size")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN, extra_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
        model_max_length=model_max_length)
    tok.chat_template = CHAT_TEMPLATE
    for name, want in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        got = tok.convert_tokens_to_ids(name)
        if got != want:  # pragma: no cover - tokenizers contract
            raise RuntimeError(f"special token {name} got id {got}, expected {want}")
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            save_tokenizer(tok, tmp)
    return tok


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """``save_pretrained`` plus a tokenizer_config.json that transformers 4.x (vLLM envs) reads too."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes tokenizer_class "TokenizersBackend" and a list-valued
    # extra_special_tokens, both of which transformers 4.x rejects; the 4.x spellings load in 5.x.
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        cfg.pop("extra_special_tokens")
        cfg["additional_special_tokens"] = extra
    if getattr(tokenizer, "chat_template", None) and "chat_template" not in cfg:
        cfg["chat_template"] = tokenizer.chat_template  # older readers ignore chat_template.jinja
    atomic_write_json(cfg_path, cfg)


def render_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn rendered with the chat template and the generation prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # older/newer return conventions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _record_field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def render_training_example(tokenizer, record: Any) -> tuple[list[int], int] | None:
    """``(prompt_ids + reference_ids + [eos], prompt_len)`` for a prompt record, or None without
    a reference. ``record`` is a ``PromptRecord`` or a dict with ``turns`` and ``reference``."""
    turns = _record_field(record, "turns")
    ref = _record_field(record, "reference")
    if not turns:
        raise ValueError(f"record {_record_field(record, 'id')!r}: field 'turns' is empty")
    if ref is None:
        return None
    prompt = render_prompt_ids(tokenizer, turns[0])
    resp = tokenizer(ref, add_special_tokens=False)["input_ids"]
    return prompt + list(resp) + [int(tokenizer.eos_token_id)], len(prompt)


def _to_token_sequences(tokenizer, items: Sequence[Any]) -> tuple[list[list[int]], list[int], int]:
    """Normalise pretraining inputs to token sequences + prompt lengths (0 = no prompt part).

    Accepts token-id lists, plain strings (rendered as ``bos + text + eos``) or prompt records.
    Returns ``(seqs, prompt_lens, n_skipped_without_reference)``.
    """
    seqs: list[list[int]] = []
    plens: list[int] = []
    skipped = 0
    for it in items:
        if isinstance(it, str):
            ids = tokenizer(it, add_special_tokens=False)["input_ids"]
            seqs.append([int(tokenizer.bos_token_id)] + list(ids) + [int(tokenizer.eos_token_id)])
            plens.append(0)
        elif isinstance(it, (list, tuple)) and (not it or isinstance(it[0], int)):
            seqs.append([int(i) for i in it])
            plens.append(0)
        else:
            r = render_training_example(tokenizer, it)
            if r is None:
                skipped += 1
                continue
            seqs.append(r[0])
            plens.append(r[1])
    return seqs, plens, skipped


# --------------------------------------------------------------------------- tiny target model


@dataclass
class TinyTargetConfig:
    """Architecture of the tiny target. ``architecture`` is an HF ``model_type``.

    ``llama`` is supported; ``qwen3_moe`` builds through the same path (MoE fields below map onto
    its HF config). ``extra`` is passed verbatim to ``AutoConfig.for_model`` (overrides win).
    """

    architecture: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    seed: int = 0
    # qwen3_moe only
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    SUPPORTED = ("llama", "qwen3_moe")

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.architecture not in self.SUPPORTED:
            raise ValueError(f"TinyTargetConfig.architecture={self.architecture!r} is not supported; "
                             f"use one of {self.SUPPORTED}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"TinyTargetConfig.hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads} (or set head_dim)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyTargetConfig.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.num_layers < 1:
            raise ValueError("TinyTargetConfig.num_layers must be >= 1")
        if self.resolved_head_dim() not in VLLM_CPU_HEAD_SIZES:
            # A warning, not an error: unit tests use smaller models that never meet vLLM.
            warnings.warn(f"tiny target head_dim={self.resolved_head_dim()} is not supported by vLLM's "
                          f"CPU backend {VLLM_CPU_HEAD_SIZES}; vLLM cross-checks will not run",
                          stacklevel=3)

    def hf_config_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.resolved_head_dim(), intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range, hidden_act="silu",
        )
        if self.architecture == "qwen3_moe":
            kw.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True, use_sliding_window=False)
        kw.update(self.extra)
        return kw

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TinyTargetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TinyTargetConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def build_tiny_target(cfg: TinyTargetConfig, tokenizer):
    """Random-init (seeded by ``cfg.seed``, global RNG untouched) HF causal LM in fp32, eval mode.

    Vocabulary size and the bos/eos/pad ids come from ``tokenizer``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg.validate()
    hf_cfg = AutoConfig.for_model(
        cfg.architecture, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **cfg.hf_config_kwargs())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model.eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- pretraining


def _lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - frac)
        if schedule == "constant":
            return 1.0
        raise ValueError(f"unknown lr schedule {schedule!r}; use cosine, linear or constant")
    return f


def pack_sequences(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], seq_len: int,
                   response_only_loss: bool = False):
    """Concatenate sequences and cut into blocks of ``seq_len`` (tail remainder dropped).

    Returns ``(input_ids [nb, seq_len], position_ids [nb, seq_len], labels [nb, seq_len])`` int64.
    Position ids restart at 0 on every document, which makes transformers 5 mask attention per
    document (packed-sequence detection when ``attention_mask`` is None); labels are -100 at a
    document start (predicting it from the previous document is meaningless) and, with
    ``response_only_loss``, on prompt tokens.
    """
    import torch

    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []
    for s, pl in zip(seqs, prompt_lens):
        n = len(s)
        ids.extend(s)
        pos.extend(range(n))
        for j, t in enumerate(s):
            lab.append(-100 if j == 0 or (response_only_loss and j < pl) else int(t))
    nb = len(ids) // seq_len
    if nb == 0:
        raise ValueError(f"pretraining data has {len(ids)} tokens, fewer than one block of "
                         f"seq_len={seq_len}; add data or lower target.pretrain.seq_len")
    n = nb * seq_len
    as_t = lambda x: torch.tensor(x[:n], dtype=torch.long).view(nb, seq_len)  # noqa: E731
    return as_t(ids), as_t(pos), as_t(lab)


def evaluate_next_token_accuracy(model, tokenizer, records: Sequence[Any], *,
                                 max_records: int | None = 64,
                                 max_len: int | None = None) -> dict[str, Any]:
    """Greedy next-token accuracy and mean NLL of ``model`` on the response (reference + eos)
    tokens of ``records`` that have a reference; the prompt only conditions."""
    import torch

    n_rec = 0
    correct = 0
    total = 0
    nll = 0.0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rec in records:
            if max_records is not None and n_rec >= max_records:
                break
            r = render_training_example(tokenizer, rec)
            if r is None:
                continue
            ids, pl = r
            if max_len is not None:
                ids = ids[:max_len]
            if len(ids) <= pl:
                continue
            x = torch.tensor([ids], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits[0].float()  # [T, V]
            # logits[t-1] predicts ids[t]; score t in [pl, T)
            pred_logits = logits[pl - 1: len(ids) - 1]
            tgt = x[0, pl:]
            correct += int((pred_logits.argmax(-1) == tgt).sum())
            nll += float(torch.nn.functional.cross_entropy(pred_logits, tgt, reduction="sum"))
            total += int(tgt.numel())
            n_rec += 1
    model.train(was_training)
    return {"heldout_next_token_accuracy": (correct / total) if total else None,
            "heldout_loss": (nll / total) if total else None,
            "heldout_tokens": total, "heldout_records": n_rec}


def pretrain_tiny_target(model, tokenizer, train: Sequence[Any], eval_records: Sequence[Any], *,
                         steps: int, seq_len: int, batch_size: int, lr: float, warmup: int,
                         seed: int = 0, out_dir: str | Path | None = None,
                         log: Callable[[dict], None] | str | Path | None = None,
                         weight_decay: float = 0.1, schedule: str = "cosine",
                         min_lr_ratio: float = 0.1, grad_clip: float = 1.0,
                         response_only_loss: bool = False, num_threads: int | None = None,
                         log_every: int = 10, eval_max_records: int | None = 64,
                         progress: bool = True) -> dict[str, Any]:
    """Next-token pretraining of ``model`` in place (fp32, AdamW, warm-up then decay).

    ``train``: prompt records (rendered ``chat(prompt) + reference + eos``), plain strings or
    token-id lists. Sequences are packed into ``[batch_size, seq_len]`` blocks with per-document
    attention (see ``pack_sequences``); blocks are visited in a seeded random order, epoch by
    epoch. ``log`` is a callable receiving one dict per ``log_every`` steps, or a JSONL path.
    If ``out_dir`` is given, model + tokenizer are saved to ``out_dir/model`` (atomically) and the
    metrics to ``out_dir/pretrain_metrics.json``. Returns the metrics dict (incl.
    ``heldout_next_token_accuracy`` on the eval records' reference tokens).
    """
    import torch
    from tqdm.auto import tqdm

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    for name, v in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"pretrain_tiny_target: {name}={v} must be >= 1")
    max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    seqs, plens, skipped = _to_token_sequences(tokenizer, train)
    truncated = sum(len(s) > max_pos for s in seqs)
    seqs = [s[:max_pos] for s in seqs]
    input_ids, position_ids, labels = pack_sequences(seqs, plens, seq_len, response_only_loss)
    nb = input_ids.shape[0]
    device = next(model.parameters()).device

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps, schedule, min_lr_ratio))

    log_records: list[dict] = []
    log_fn = log if callable(log) else None
    order = torch.randperm(nb, generator=gen)
    cursor = 0
    epochs = 0
    losses: list[float] = []
    tokens_seen = 0
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain target", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    ema = None
    for step in bar:
        idx = []
        while len(idx) < batch_size:
            if cursor >= nb:
                order = torch.randperm(nb, generator=gen)
                cursor = 0
                epochs += 1
            take = min(batch_size - len(idx), nb - cursor)
            idx.extend(order[cursor:cursor + take].tolist())
            cursor += take
        ix = torch.tensor(idx)
        out = model(input_ids=input_ids[ix].to(device), position_ids=position_ids[ix].to(device),
                    labels=labels[ix].to(device), use_cache=False)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}; "
                                     f"lower target.pretrain.lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        losses.append(lv)
        tokens_seen += batch_size * seq_len
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % log_every == 0 or step == steps - 1:
            el = time.perf_counter() - t0
            rec = {"step": step, "loss": lv, "loss_ema": ema, "lr": sched.get_last_lr()[0],
                   "tokens": tokens_seen, "tokens_per_s": tokens_seen / max(el, 1e-9)}
            log_records.append(rec)
            if log_fn:
                log_fn(rec)
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    k = max(1, min(10, len(losses)))
    metrics: dict[str, Any] = {
        "steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "schedule": schedule, "seed": seed, "num_parameters": count_parameters(model),
        "train_sequences": len(seqs), "train_skipped_without_reference": skipped,
        "train_truncated": truncated, "train_tokens_available": int(nb * seq_len),
        "num_blocks": nb, "epochs": epochs + cursor / nb, "tokens_seen": tokens_seen,
        "train_loss_first": sum(losses[:k]) / k, "train_loss_last": sum(losses[-k:]) / k,
        "wall_s": wall, "tokens_per_s": tokens_seen / max(wall, 1e-9),
        "threads": torch.get_num_threads(),
    }
    metrics.update(evaluate_next_token_accuracy(model, tokenizer, eval_records,
                                                max_records=eval_max_records, max_len=max_pos))
    if isinstance(log, (str, Path)):
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in log_records))
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_target_model(model, tokenizer, out_dir / "model")
        atomic_write_json(out_dir / "pretrain_metrics.json", metrics)
    return metrics


def save_target_model(model, tokenizer, model_dir: str | Path) -> None:
    """``save_pretrained`` model + tokenizer into ``model_dir`` atomically (safetensors)."""
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        # transformers 5 writes rope_parameters/dtype only; older readers (vLLM envs on
        # transformers 4.x) look for rope_theta/torch_dtype and would silently use defaults.
        rp = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        if "torch_dtype" not in cfg and "dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        atomic_write_json(cfg_path, cfg)


# --------------------------------------------------------------------------- aux layer ids


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """Three distinct aux layer ids (``hidden_states[i]`` = input to layer i) for an L-layer target.

    vLLM's EAGLE-3 default is ``[2, L//2, L-3]``; it is used when its ids are distinct and lie in
    ``[0, L)`` (L >= 7). Otherwise (shallow targets, where the default collapses, e.g. L=4 gives
    [2, 2, 1]) the fallback spreads over ``1..L-1``: ``[1, L//2, L-1]`` (L >= 4; L=4 -> [1, 2, 3]),
    and ``[0, 1, 2]`` for L=3. Fewer than 3 layers is an error. A config value always overrides.
    """
    L = int(num_layers)
    if L < 3:
        raise ValueError(f"a target with {L} layers cannot provide three distinct aux layer ids; "
                         f"use >= 3 layers")
    ids = [2, L // 2, L - 3]
    if len(set(ids)) == 3 and all(0 <= i < L for i in ids) and ids == sorted(ids):
        return ids
    if L >= 4:
        return [1, L // 2, L - 1]
    return [0, 1, 2]


def validate_aux_layer_ids(ids: Sequence[int], num_layers: int, where: str = "aux_layer_ids") -> list[int]:
    """Check three distinct ints in ``[0, L)`` and return them ascending.

    Ascending because vLLM collects aux states while walking the layers, so its concatenation
    order is layer order whatever order the config lists them in.
    """
    ids = [int(i) for i in ids]
    if len(ids) != 3 or len(set(ids)) != 3:
        raise ValueError(f"{where}: need three distinct layer ids, got {ids} (vLLM dedups repeated ids)")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{where}: ids {bad} outside [0, {num_layers}) for a {num_layers}-layer "
                         f"target (id i = input to layer i; id L would need a hook)")
    return sorted(ids)


# --------------------------------------------------------------------------- target.json


def write_target_json(out_path: str | Path, *, path: str, kind: str, num_layers: int,
                      hidden_size: int, vocab_size: int, aux_layer_ids: Sequence[int] | None,
                      mask_token_id: int | None, eos_token_id: int | Sequence[int] | None,
                      heldout_next_token_accuracy: float | None = None,
                      **extra: Any) -> dict[str, Any]:
    """Write ``target.json`` (ARCHITECTURE.md "Target") atomically and return its contents.

    ``path`` is an HF id or a local dir; a local dir inside ``out_path``'s directory is stored
    relative to it so the results tree can be moved. ``aux_layer_ids=None`` takes the default.
    Extra keyword fields (architecture, head counts, pretrain metrics, ...) are stored as given.
    """
    if kind not in ("tiny", "hf"):
        raise ValueError(f"target.json: kind={kind!r}; use 'tiny' or 'hf'")
    out_path = Path(out_path)
    aux = validate_aux_layer_ids(aux_layer_ids if aux_layer_ids is not None
                                 else default_aux_layer_ids(num_layers), num_layers,
                                 "target.aux_layer_ids")
    if mask_token_id is not None and not 0 <= int(mask_token_id) < int(vocab_size):
        raise ValueError(f"target.json: mask_token_id={mask_token_id} outside vocabulary [0, {vocab_size})")
    stored_path = str(path)
    p = Path(path)
    if p.exists():
        try:
            stored_path = os.path.relpath(p.resolve(), out_path.parent.resolve())
            if stored_path.startswith(".."):
                stored_path = str(p.resolve())
        except ValueError:  # different drive (Windows)
            stored_path = str(p.resolve())
    info: dict[str, Any] = {
        "format": TARGET_JSON_FORMAT, "path": stored_path, "kind": kind,
        "num_layers": int(num_layers), "hidden_size": int(hidden_size), "vocab_size": int(vocab_size),
        "aux_layer_ids": aux, "mask_token_id": None if mask_token_id is None else int(mask_token_id),
        "eos_token_id": eos_token_id, "heldout_next_token_accuracy": heldout_next_token_accuracy,
    }
    info.update(extra)
    atomic_write_json(out_path, info)
    return info


def read_target_json(target_json: str | Path) -> dict[str, Any]:
    target_json = Path(target_json)
    if not target_json.exists():
        raise FileNotFoundError(f"{target_json} not found; run the `target` stage first")
    try:
        info = json.loads(target_json.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{target_json}: not valid JSON ({e}); re-run the `target` stage") from e
    for key in ("path", "kind", "num_layers", "hidden_size", "vocab_size", "aux_layer_ids",
                "mask_token_id", "eos_token_id"):
        if key not in info:
            raise ValueError(f"{target_json}: missing field '{key}'; re-run the `target` stage")
    validate_aux_layer_ids(info["aux_layer_ids"], info["num_layers"], f"{target_json}: aux_layer_ids")
    return info


def resolve_model_path(target_json: str | Path, stored: str) -> str:
    """Stored ``path`` -> something ``from_pretrained`` accepts: a dir relative to the json's
    directory, else an existing path as given, else (unchanged) an HF hub id."""
    rel = Path(target_json).parent / stored
    if rel.exists():
        return str(rel)
    if Path(stored).exists():
        return stored
    return stored


def load_target(target_json: str | Path, device: str = "cpu", dtype: "str | torch.dtype" = "float32",
                *, attn_implementation: str | None = "sdpa"):
    """Load the target described by ``target.json``: ``(model, tokenizer, info)``.

    The model is an HF ``*ForCausalLM`` in eval mode with gradients off; the same code serves local
    dirs and HF ids (``HF_HUB_OFFLINE=1`` is respected by transformers). The stored shapes are
    checked against the loaded config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_target_json(target_json)
    where = resolve_model_path(target_json, info["path"])
    kw: dict[str, Any] = {"dtype": _parse_dtype(dtype)}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise OSError(f"{target_json}: cannot load target from {where!r} ({e}). For a tiny target "
                      f"re-run the `target` stage; for an HF id make sure it is in the local cache "
                      f"or that the network is reachable") from e
    model.to(device).eval()
    model.requires_grad_(False)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    checks = {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
              "vocab_size": model.get_output_embeddings().weight.shape[0]}
    for k, v in checks.items():
        if int(info[k]) != int(v):
            raise ValueError(f"{target_json}: {k}={info[k]} but the model at {where!r} has {v}; "
                             f"re-run the `target` stage")
    return model, tokenizer, info


def resolve_hf_target(hf_id: str, out_path: str | Path, *, num_layers: int | None = None,
                      hidden_size: int | None = None, vocab_size: int | None = None,
                      aux_layer_ids: Sequence[int] | None = None, mask_token_id: int | None = None,
                      eos_token_id: int | Sequence[int] | None = None,
                      **extra: Any) -> dict[str, Any]:
    """Write ``target.json`` for a Hugging Face target without downloading weights.

    If ``num_layers``/``hidden_size``/``vocab_size`` are all given (the paper profile states them),
    nothing is fetched and the profile is plannable offline; otherwise the model's config is read
    with ``AutoConfig.from_pretrained`` (needs the HF cache or network). ``mask_token_id`` must be
    given for P-EAGLE (real tokenizers have no dedicated mask token; use a reserved id).
    """
    if None in (num_layers, hidden_size, vocab_size):
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(hf_id)
        except Exception as e:  # noqa: BLE001 - network/cache errors come in many types
            raise RuntimeError(f"resolve_hf_target({hf_id!r}): cannot read its config ({e}); give "
                               f"target.num_layers, target.hidden_size and target.vocab_size in the "
                               f"profile to plan without network") from e
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        num_layers = num_layers if num_layers is not None else cfg.num_hidden_layers
        hidden_size = hidden_size if hidden_size is not None else cfg.hidden_size
        vocab_size = vocab_size if vocab_size is not None else cfg.vocab_size
        if eos_token_id is None:
            eos_token_id = getattr(cfg, "eos_token_id", None)
    return write_target_json(out_path, path=hf_id, kind="hf", num_layers=num_layers,
                             hidden_size=hidden_size, vocab_size=vocab_size,
                             aux_layer_ids=aux_layer_ids, mask_token_id=mask_token_id,
                             eos_token_id=eos_token_id, heldout_next_token_accuracy=None, **extra)


def make_tiny_target(out_dir: str | Path, train_records: Sequence[Any], eval_records: Sequence[Any],
                     arch: TinyTargetConfig, *, vocab_size: int, steps: int, seq_len: int,
                     batch_size: int, lr: float, warmup: int, seed: int = 0,
                     aux_layer_ids: Sequence[int] | None = None, name: str = "tiny-llama",
                     num_threads: int | None = None, progress: bool = True,
                     **pretrain_kw: Any) -> dict[str, Any]:
    """The whole tiny-target stage: tokenizer on the training prompts + references, build,
    pretrain, save ``out_dir/model``, write ``out_dir/target.json``; returns its contents.

    ``aux_layer_ids=None`` takes ``default_aux_layer_ids``. Extra keywords go to
    ``pretrain_tiny_target``.
    """
    out_dir = Path(out_dir)
    texts: list[str] = []
    for r in train_records:
        turns = _record_field(r, "turns") or []
        texts.extend(t for t in turns if t)
        ref = _record_field(r, "reference")
        if ref:
            texts.append(ref)
    tokenizer = train_tokenizer(texts, vocab_size, model_max_length=arch.max_position_embeddings)
    model = build_tiny_target(arch, tokenizer)
    metrics = pretrain_tiny_target(
        model, tokenizer, train_records, eval_records, steps=steps, seq_len=seq_len,
        batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, out_dir=out_dir,
        log=out_dir / "pretrain_log.jsonl", num_threads=num_threads, progress=progress,
        **pretrain_kw)
    cfg = model.config
    return write_target_json(
        out_dir / "target.json", path=out_dir / "model", kind="tiny",
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, vocab_size=len(tokenizer),
        aux_layer_ids=aux_layer_ids, mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        heldout_next_token_accuracy=metrics["heldout_next_token_accuracy"], name=name,
        architecture=arch.architecture, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=arch.resolved_head_dim(),
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings, rope_theta=arch.rope_theta,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        num_parameters=metrics["num_parameters"],
        pretrain={k: metrics[k] for k in ("steps", "seq_len", "batch_size", "lr", "tokens_seen",
                                         "train_loss_first", "train_loss_last", "heldout_loss",
                                         "heldout_tokens", "tokens_per_s", "wall_s")})


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the generation config's eos (int or list) plus the tokenizer's."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the target defines no eos_token_id (model.generation_config, model.config "
                         "and tokenizer all lack one); set it in the model's generation_config.json")
    return ids
