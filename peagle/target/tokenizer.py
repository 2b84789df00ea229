"""The tiny target's tokenizer: byte-level BPE with the project's special tokens and chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from peagle.io import atomic_dir, atomic_write_json

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
