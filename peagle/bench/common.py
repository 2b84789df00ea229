"""Shared pieces of the benchmarks: a drafter of the configured shape, device timing."""

from __future__ import annotations

import time
from typing import Any

import torch

from peagle.config import Config
from peagle.drafters import DrafterSpec, PEagleDrafter, build_drafter


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock intervals measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), seconds), synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - t0


def bench_drafter(cfg: Config, hidden_size: int, vocab_size: int, mask_token_id: int, max_positions: int,
                  device: torch.device, dtype: torch.dtype, seed: int = 0, *, num_layers: int | None = None,
                  parallel: bool = True, embed_trainable: bool | None = None) -> tuple[PEagleDrafter, torch.Tensor]:
    """A randomly initialised drafter of the configured architecture and a frozen LM head [V, H].

    Built like ``peagle.train.train_drafter`` builds it (trainable flags from ``cfg.drafter``),
    but with random embeddings and head: timings and memory depend on shapes, not on values.
    num_layers / parallel / embed_trainable override ``cfg.drafter`` for a method of its own
    (EAGLE-3: ``MethodPlan.of(cfg, "eagle3")``'s layers, ``parallel=False``, frozen embeddings).
    """
    dc = cfg.drafter
    spec = DrafterSpec(
        hidden_size=hidden_size, vocab_size=vocab_size,
        num_layers=dc.num_layers if num_layers is None else num_layers, num_heads=dc.num_heads,
        num_kv_heads=dc.num_kv_heads, head_dim=dc.head_dim or hidden_size // dc.num_heads,
        intermediate_size=dc.intermediate_size, mask_token_id=mask_token_id, aux_layer_ids=[0, 1, 2],
        rms_norm_eps=dc.rms_norm_eps, rope_theta=dc.rope_theta, max_position_embeddings=max_positions,
        parallel=parallel,
    )
    # Initialise on the device itself: a paper-width drafter has ~2B parameters, slow to
    # initialise on the host and to copy over.
    with torch.device(device):
        drafter = build_drafter(spec, seed=seed)
    drafter = drafter.to(dtype=dtype)
    drafter.embed_tokens.weight.requires_grad_(dc.embed_trainable if embed_trainable is None else embed_trainable)
    drafter.lm_head.weight.requires_grad_(dc.lm_head_trainable)
    head = drafter.lm_head.weight.detach().clone()  # stands in for the target's head
    return drafter, head


def available_strategies(names: list[str], max_len: int, k: int) -> tuple[list[str], list[str]]:
    """Split mask-strategy names into (available in this build, missing), preserving order.

    A strategy is available when ``peagle.example.MaskBuilder`` accepts its name, so strategies
    added later (e.g. ``maskfree``) are picked up by name without changes here.
    """
    from peagle.example import MaskBuilder, TrainingError

    ok, missing = [], []
    for name in names:
        try:
            MaskBuilder(name, min(max_len, 8), k)
        except TrainingError:
            missing.append(name)
        else:
            ok.append(name)
    return ok, missing
