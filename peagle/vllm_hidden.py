"""Hidden-state extraction through vLLM (``hidden.backend: vllm``), into the same store as HF's.

vLLM's ``extract_hidden_states`` method runs the target with a cache-only drafter that keeps the
hidden states of the requested layers in the KV cache; a KV connector writes each finished
request's states to a safetensors file (:mod:`peagle.vllm_connector`: ``hidden_states``
[T, n_layers, H]). A sequence is sent as a prompt with one token to generate, so its prefill
covers every stored position. Layer id i is HF's ``hidden_states[i]`` (the input to layer i), and
id L the last layer's output before the final norm: ``last_hidden`` is that state through the
target's final RMSNorm, computed here in fp32 as HF does (HF's last entry is after the norm). On
the tiny targets in fp32 the store equals HF extraction's to 1e-4 (tests/test_vllm.py).
Runs in the vLLM environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from peagle.target import validate_aux_layer_ids


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in fp32, cast back, scale. ``x`` [T, H] -> [T, H]."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * h.to(x.dtype)


class VllmStates:
    """``[(aux_hidden [T, 3H], last_hidden [T, H])]`` per sequence, ``batch`` sequences per vLLM call.

    ``target_json``: the target (its model directory and aux layer ids); ``settings``: the vLLM
    engine settings (:class:`peagle.vllm_bench.VllmSettings`); ``work_dir``: where the connector
    writes its per-request files (each is read, then removed).
    """

    backend = "vllm"

    def __init__(self, target_json: str | Path, aux_layer_ids: Sequence[int], settings: Any, device: str,
                 batch: int = 64, work_dir: str | Path | None = None):
        from transformers import AutoConfig

        from peagle.target import read_target_json, resolve_model_path
        from peagle.target.hf import read_final_norm
        from peagle.vllm_bench import _child_env, _engine_kwargs

        where = resolve_model_path(target_json, read_target_json(target_json)["path"])
        cfg = AutoConfig.from_pretrained(where)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers, self.hidden_size = int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size)
        self.vocab = int(text_cfg.vocab_size)
        self.aux = validate_aux_layer_ids(aux_layer_ids, self.num_layers, "aux_layer_ids")
        self.batch = int(batch)
        self.norm_weight, self.norm_eps = read_final_norm(target_json)
        self._work = Path(work_dir or tempfile.mkdtemp(prefix="peagle-vllm-hidden-"))
        for key, value in _child_env(settings, device).items():
            if key not in ("LD_PRELOAD", "PYTHONPATH"):  # too late for a running process
                os.environ.setdefault(key, value)
        from vllm import LLM

        engine = {**_engine_kwargs(settings, device), "max_model_len": int(text_cfg.max_position_embeddings)}
        self.llm = LLM(
            model=where, distributed_executor_backend="uni", enable_prefix_caching=False, **engine,
            speculative_config={"method": "extract_hidden_states", "num_speculative_tokens": 1,
                                "draft_model_config": {"hf_config": {
                                    "eagle_aux_hidden_state_layer_ids": [*self.aux, self.num_layers]}}},
            kv_transfer_config={"kv_connector": "SyncHiddenStatesConnector",
                                "kv_connector_module_path": "peagle.vllm_connector", "kv_role": "kv_producer",
                                "kv_connector_extra_config": {"shared_storage_path": str(self._work)}})

    def __call__(self, seqs: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from vllm import SamplingParams
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states, load_hidden_states)
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(x)) for x in seqs],
                                 SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        result = []
        for x, out in zip(seqs, outs):
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if path is None:
                raise RuntimeError("vLLM returned no hidden_states_path: the extract_hidden_states method or its "
                                   "KV connector is not active in this vLLM build")
            data = load_hidden_states(path)
            cleanup_hidden_states(path)
            hs, ids = data["hidden_states"], data["token_ids"]
            if ids.tolist() != list(x):
                raise RuntimeError(f"vLLM stored states of {ids.numel()} tokens for a {len(x)}-token sequence "
                                   "(prefix caching on, or the connector changed what it saves)")
            aux = hs[:, :len(self.aux)].reshape(len(x), len(self.aux) * self.hidden_size)
            result.append((aux, rms_norm(hs[:, len(self.aux)], self.norm_weight, self.norm_eps)))
        return result
