"""The frozen target LM: a tiny one built, tokenized and pretrained here, or a Hugging Face model.

One idea per module; every public name is importable from ``peagle.target`` as before.

- ``tokenizer``: ``train_tokenizer(texts, vocab_size, out_dir)`` (byte-level BPE + chat template),
  ``save_tokenizer``, the special tokens.
- ``chat``: ``render_prompt_ids(tokenizer, text)`` / ``render_training_example(tokenizer, record)``:
  the one place where prompts become token ids (chat template with generation prompt, a pinned date).
- ``tiny``: ``TinyTargetConfig`` / ``build_tiny_target(cfg, tokenizer)`` (random-init HF
  ``*ForCausalLM``: llama, qwen3_moe, gpt_oss) and ``make_tiny_target(...)``, the whole tiny stage.
- ``pretrain``: ``pretrain_tiny_target(...)`` (packed next-token pretraining, saves ``out_dir/model``).
- ``info``: ``default_aux_layer_ids`` / ``validate_aux_layer_ids``, ``write_target_json`` /
  ``read_target_json``.
- ``hf``: ``load_target(target_json)``, ``resolve_hf_target``, ``eos_token_ids``, the attention
  implementation per architecture, ``plan_device_map`` (sharding over devices), and
  ``read_embedding_tensors`` (the embedding and LM head alone, straight from the safetensors files).

Heavy libraries (torch, transformers, tokenizers) are imported inside functions so that importing
this package (e.g. for the CLI's ``--help``) stays cheap.
"""

from peagle.target.chat import DEFAULT_CHAT_DATE, render_prompt_ids, render_training_example
from peagle.target.hf import (DevicePlan, check_hf_target, check_quantization, eos_token_ids,
                              load_target, plan_device_map, read_embedding_tensors,
                              resolve_attn_implementation, resolve_hf_target)
from peagle.target.info import (TARGET_JSON_FORMAT, default_aux_layer_ids, read_target_json,
                                resolve_model_path, validate_aux_layer_ids, write_target_json)
from peagle.target.pretrain import (count_parameters, evaluate_next_token_accuracy, pack_sequences,
                                    pretrain_tiny_target, save_target_model)
from peagle.target.tiny import VLLM_CPU_HEAD_SIZES, TinyTargetConfig, build_tiny_target, make_tiny_target
from peagle.target.tokenizer import (ASSISTANT_TOKEN, BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, MASK_TOKEN,
                                     PAD_TOKEN, SPECIAL_TOKENS, USER_TOKEN,
                                     save_tokenizer, train_tokenizer)

__all__ = [
    "ASSISTANT_TOKEN", "BOS_TOKEN", "CHAT_TEMPLATE", "DEFAULT_CHAT_DATE", "DevicePlan", "EOS_TOKEN",
    "MASK_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "TARGET_JSON_FORMAT", "TinyTargetConfig", "USER_TOKEN",
    "VLLM_CPU_HEAD_SIZES", "build_tiny_target", "check_hf_target", "check_quantization", "count_parameters",
    "default_aux_layer_ids", "eos_token_ids", "evaluate_next_token_accuracy", "load_target",
    "make_tiny_target", "pack_sequences", "plan_device_map", "pretrain_tiny_target",
    "read_embedding_tensors", "read_target_json", "render_prompt_ids", "render_training_example",
    "resolve_attn_implementation", "resolve_hf_target", "resolve_model_path", "save_target_model",
    "save_tokenizer", "train_tokenizer", "validate_aux_layer_ids", "write_target_json",
]
