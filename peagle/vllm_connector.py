"""A KV connector for vLLM's ``extract_hidden_states`` method that works on CPU-only builds.

vLLM's ``ExampleHiddenStatesConnector`` copies each finished request's hidden states out of the
KV cache through pinned host memory on a CUDA stream and writes them from a thread pool; on a CPU
build the pinned allocation kills the engine after the first request (../shared/VLLM_NOTES.md).
This subclass copies and writes synchronously: the same safetensors file (``hidden_states``
[T, n_layers, H], ``token_ids`` [T]) under the same lock, done before the request is reported
finished. vLLM loads it by name (``kv_connector: SyncHiddenStatesConnector``,
``kv_connector_module_path: peagle.vllm_connector``). Importable only where vLLM is installed.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector, PendingSave, extract_from_kv_cache)


class _Done:
    """Stands in for the CUDA event the base class polls: the copy is complete when it exists."""

    @staticmethod
    def query() -> bool:
        return True


class SyncHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (offsets[None, :] + blocks[:, None] * self._block_size).flatten()
        states = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), pending.token_ids.shape[0])
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        try:
            save_file({"hidden_states": states.to("cpu").contiguous(), "token_ids": pending.token_ids.clone()},
                      pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the reader's lock: the file is complete
        self._req_copy_events[pending.req_id] = _Done()
