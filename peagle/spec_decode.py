"""Speculative decoding engine: chain drafting, greedy verification, KV-cache rollback (DESIGN §6).

Batch size 1, temperature 0. Each round the proposer drafts K tokens, the target scores the newest
committed token plus the K drafts in one forward pass, the longest agreeing prefix is accepted
and the target's own next token is appended as the bonus. The target's KV cache is cropped back
to the committed prefix, so the output equals the target's own greedy decoding token for token.

:class:`PEagleProposer` drafts K tokens in one drafter pass; :class:`Eagle3Proposer` (the EAGLE-3
baseline) in K chained passes; :func:`make_proposer` picks by ``drafter.spec.parallel``.

Drafter rows follow DESIGN §1: row i pairs token x_{i+1} with the target's features g_i, so after
a round that commits m drafts plus the bonus, m + 1 new rows become available to the drafter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from peagle.drafters import KVCache, PEagleDrafter


class TargetRunner:
    """An HF causal LM with a croppable KV cache that also returns the EAGLE-3 aux features."""

    def __init__(self, model, aux_layer_ids: list[int]) -> None:
        self.model = model
        self.aux_layer_ids = list(aux_layer_ids)
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        # Sliding-window layers (GPT-OSS's even layers) drop keys beyond the window as they go,
        # which cannot be rolled back; with past recording they keep the newest tokens until the
        # next crop, so a rejected draft can be removed exactly. Full-attention layers ignore it.
        self.cache.activate_past_recording()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def forward(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``ids`` after the cached prefix -> logits [n, V], aux features [n, 3H]."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i][0] for i in self.aux_layer_ids], dim=-1)
        return out.logits[0], aux

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens. Call after every forward: on sliding-window layers
        ``crop`` (even of 0 tokens) also trims the recorded past back to the window."""
        # transformers 5 takes the number of tokens to remove, as a negative count.
        extra = self.length - length
        if extra < 0:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        self.cache.crop(-extra)


def _eos_set(eos_id: int | list[int] | None) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id] if isinstance(eos_id, int) else eos_id)


@torch.no_grad()
def greedy_generate(runner: TargetRunner, prompt: list[int], max_new_tokens: int,
                    eos_id: int | list[int] | None) -> list[int]:
    """The target's own greedy continuation (the losslessness reference), one token per step."""
    eos = _eos_set(eos_id)
    runner.reset()
    logits, _ = runner.forward(prompt)
    runner.crop(len(prompt))
    out: list[int] = []
    while True:
        tok = int(logits[-1].argmax())
        out.append(tok)
        if len(out) >= max_new_tokens or tok in eos:
            return out
        logits, _ = runner.forward([tok])
        runner.crop(runner.length)  # nothing removed; trims sliding-window layers to the window


class Proposer(Protocol):
    def reset(self) -> None: ...

    def propose(self, tokens: list[int], aux: torch.Tensor, k: int) -> list[int]:
        """Draft ``k`` tokens after ``tokens``; ``aux`` [len(tokens) - 1, 3H] holds g_0..g_{n-1}."""


class _CachedProposer:
    """A drafter in eval mode with its own KV cache of the committed (real) rows."""

    def __init__(self, drafter: PEagleDrafter) -> None:
        self.drafter = drafter.eval()
        self.device = next(drafter.parameters()).device
        self.dtype = next(drafter.parameters()).dtype
        self.reset()

    def reset(self) -> None:
        self.cache = KVCache(len(self.drafter.layers))


class PEagleProposer(_CachedProposer):
    """One drafter forward per round: new real rows, then K-1 mask slots (DESIGN §2)."""

    @torch.no_grad()
    def propose(self, tokens: list[int], aux: torch.Tensor, k: int) -> list[int]:
        spec = self.drafter.spec
        start, rows = self.cache.length, aux.shape[0]
        # Rows start..rows-1 are new: token x_{i+1} with features g_i at position i.
        ids = tokens[start + 1:rows + 1] + [spec.mask_token_id] * (k - 1)
        n_new = rows - start
        positions = torch.arange(start, rows + k - 1, device=self.device)
        is_mask = torch.arange(n_new + k - 1, device=self.device) >= n_new
        # Mask slots carry the anchor's (the newest row's) features, which only the non-shared
        # hidden variants read; depth d of the chain is d.
        hidden = aux[start:rows].to(self.device, self.dtype)
        hidden = torch.cat([hidden, hidden[-1:].expand(k - 1, -1)])
        depths = torch.cat([torch.zeros(n_new, dtype=torch.long), torch.arange(1, k)]).to(self.device)
        logits = self.drafter(
            torch.tensor([ids], device=self.device), hidden[None], is_mask[None], positions[None], cache=self.cache,
            depths=depths[None],
        )[0]
        # Mask slots are scratch: only the real rows stay in the drafter's cache.
        self.cache.crop(rows)
        return logits[n_new - 1:].argmax(-1).tolist()


class Eagle3Proposer(_CachedProposer):
    """EAGLE-3 chain drafting (DESIGN §5): K drafter forwards per round.

    One forward over the new real rows (kept in the drafter's KV cache) gives draft 1 at the last
    real row; each further draft is one single-element forward: token = the previous draft,
    hidden = the previous step's pre-norm output (H wide, no fc), position = previous + 1,
    attending to the cache (real rows + the chain's earlier drafts). The drafts are then cropped
    from the cache. This is the training-time test's attention rule (:mod:`peagle.eagle3`).
    """

    @torch.no_grad()
    def draft_logits(self, tokens: list[int], aux: torch.Tensor, k: int,
                     forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """Drafts and their logits [k, V]; ``forced`` (k - 1 tokens) replaces the fed-back drafts
        (teacher forcing: step j's logits then equal the TTT step-j logits of the last row)."""
        start, rows = self.cache.length, aux.shape[0]
        ids = torch.tensor([tokens[start + 1:rows + 1]], device=self.device)
        hidden = aux[start:rows].to(self.device, self.dtype)[None]
        pos = torch.arange(start, rows, device=self.device)[None]
        drafts, logits = [], []
        for j in range(k):
            normed, pre = self.drafter.forward_hidden(ids, hidden, None, pos, cache=self.cache, return_prenorm=True)
            logits.append(self.drafter.lm_head(normed[0, -1]))
            drafts.append(int(logits[-1].argmax()))
            # Next: one element, the draft just made (or the forced token) at the next position.
            tok = drafts[-1] if forced is None or j == k - 1 else forced[j]
            ids, hidden, pos = torch.tensor([[tok]], device=self.device), pre[:, -1:], pos[:, -1:] + 1
        # Drafts are scratch: only the real rows stay in the drafter's cache.
        self.cache.crop(rows)
        return drafts, torch.stack(logits)

    def propose(self, tokens: list[int], aux: torch.Tensor, k: int) -> list[int]:
        return self.draft_logits(tokens, aux, k)[0]


def make_proposer(drafter: PEagleDrafter) -> PEagleProposer | Eagle3Proposer:
    """The drafter's own inference procedure: one pass with mask slots (P-EAGLE) or K chained passes."""
    return PEagleProposer(drafter) if drafter.spec.parallel else Eagle3Proposer(drafter)


class OracleProposer:
    """Drafts the known greedy continuation: every draft is accepted (tests the accounting)."""

    def __init__(self, continuation: list[int], prompt_len: int) -> None:
        self.continuation, self.prompt_len = continuation, prompt_len

    def reset(self) -> None:
        pass

    def propose(self, tokens: list[int], aux: torch.Tensor, k: int) -> list[int]:
        done = len(tokens) - self.prompt_len
        drafts = self.continuation[done:done + k]
        return drafts + [0] * (k - len(drafts))


@dataclass
class DecodeStats:
    """Acceptance accounting of one or more requests."""

    k: int
    rounds: int = 0
    committed: int = 0  # accepted drafts + bonus tokens, summed over rounds
    accepted_at: list[int] = field(default_factory=list)  # rounds whose draft j (0-based) was accepted
    draft_s: float = 0.0
    verify_s: float = 0.0
    new_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.accepted_at:
            self.accepted_at = [0] * self.k

    @property
    def acceptance_length(self) -> float:
        """Mean tokens committed per target verification step, bonus included (ceiling K + 1)."""
        return self.committed / self.rounds if self.rounds else float("nan")

    def per_position_acceptance(self) -> list[float]:
        return [a / self.rounds if self.rounds else float("nan") for a in self.accepted_at]

    def merge(self, other: "DecodeStats") -> None:
        self.rounds += other.rounds
        self.committed += other.committed
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at)]
        self.draft_s += other.draft_s
        self.verify_s += other.verify_s
        self.new_tokens += other.new_tokens


class SpeculativeDecoder:
    def __init__(self, target: TargetRunner, proposer: Proposer, k: int, eos_id: int | list[int] | None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.target, self.proposer, self.k, self.eos = target, proposer, k, _eos_set(eos_id)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], DecodeStats]:
        """Greedy speculative decoding of one request -> (new tokens, stats)."""
        if not prompt:
            raise ValueError("empty prompt")
        stats = DecodeStats(self.k)
        self.target.reset()
        self.proposer.reset()
        logits, aux = self.target.forward(prompt)
        self.target.crop(len(prompt))
        tokens = list(prompt) + [int(logits[-1].argmax())]
        rows = aux  # g_0 .. g_{n-1}: tokens always has one more entry than there are rows
        while not self._finished(tokens, len(prompt), max_new_tokens):
            t0 = time.perf_counter()
            drafts = self.proposer.propose(tokens, rows, self.k)
            t1 = time.perf_counter()
            # The target has not seen the newest token yet: score it together with the drafts.
            logits, aux = self.target.forward([tokens[-1]] + drafts)
            preds = logits.argmax(-1).tolist()
            m = 0
            while m < self.k and drafts[m] == preds[m]:
                m += 1
            stats.rounds += 1
            stats.committed += m + 1
            for j in range(m):
                stats.accepted_at[j] += 1
            tokens += drafts[:m] + [preds[m]]
            self.target.crop(len(tokens) - 1)
            rows = torch.cat([rows, aux[:m + 1]])
            stats.verify_s += time.perf_counter() - t1
            stats.draft_s += t1 - t0
        new = self._trim(tokens[len(prompt):], max_new_tokens)
        stats.new_tokens = len(new)
        return new, stats

    def _finished(self, tokens: list[int], prompt_len: int, max_new: int) -> bool:
        new = tokens[prompt_len:]
        return len(new) >= max_new or any(t in self.eos for t in new)

    def _trim(self, new: list[int], max_new: int) -> list[int]:
        new = new[:max_new]
        for i, t in enumerate(new):
            if t in self.eos:
                return new[:i + 1]
        return new
