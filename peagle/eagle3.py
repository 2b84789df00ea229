"""EAGLE-3's training-time test (TTT, DESIGN §5): the autoregressive baseline's training loss.

Rows are DESIGN §1's shifted rows of one sequence (:func:`peagle.hidden.shifted_rows`): row i holds
token x_{i+1} (``input_ids`` [n]), target features g_i (``aux_hidden`` [n, 3H]), the target's final
hidden state whose LM head gives the distribution over x_{i+2} (``target_hidden`` [n, H]) and
``loss_mask`` [n].

Step s (0 <= s < S) has one element per row i with i + s <= n - 1 (m_s = n - s elements). Element
(i, s): input token ``input_ids[i + s]`` (ground truth), RoPE position i + s, hidden input fc(g_i) at
s = 0 and the drafter's own step-(s-1) pre-norm output at row i for s >= 1 (H wide, no fc), target
row i + s, gated by ``loss_mask[i + s]``. Its query sees the step-0 keys of rows <= i plus row i's
keys of steps 1..s: DESIGN §3's rule with anchor i and depth s. That is exactly what inference
does (:class:`peagle.spec_decode.Eagle3Proposer`): real rows in the cache, then one element per
drafted token, each seeing the cache and the chain's earlier drafts.

Steps run one after another (step s needs step s-1's output); step s's forward computes only
its m_s queries, against keys/values of steps 0..s that keep their gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peagle.drafters import PEagleDrafter
from peagle.losses import head_loss

__all__ = ["StepAttention", "ttt_hidden", "ttt_loss"]


class StepAttention:
    """Attention of TTT step s against steps 0..s, passed to the drafter as its ``attn_mask``.

    Keeps every layer's keys/values of the steps run so far (with their autograd history). Step
    0 is plain causal attention (SDPA). For a step-s query at row i the allowed keys are the
    step-0 keys 0..i -- a causal block, and only rows < m_s are ever needed since i < m_s --
    plus exactly s more keys, row i's keys of steps 1..s. So a step is scored as one [m, m]
    causal matmul plus an [m, s] row-wise dot product, with one softmax over both. A dense mask
    over the concatenated keys ([m, m_0 + ... + m_s], mostly False) would cost (s+1)x the
    compute and memory of the causal block, O(n^2 S^2) per sequence instead of O(n^2 S).
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, heads, m, hd]; k, v [B, kv_heads, m, hd] of the current step (rows 0..m-1) ->
        [B, heads, m, hd]."""
        keys, values = self.keys[layer], self.values[layer]
        keys.append(k)
        values.append(v)
        groups = q.shape[1] // k.shape[1]
        if len(keys) == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        m = q.shape[2]
        # Causal context block (rows < m only) and the chain's diagonal keys [B, kv, m, s, hd].
        k0, v0 = keys[0][:, :, :m], values[0][:, :, :m]
        kd = torch.stack([t[:, :, :m] for t in keys[1:]], dim=3)
        vd = torch.stack([t[:, :, :m] for t in values[1:]], dim=3)
        if groups > 1:  # SDPA's enable_gqa layout: query head j reads kv head j // groups
            k0, v0, kd, vd = (t.repeat_interleave(groups, dim=1) for t in (k0, v0, kd, vd))
        # Scores in at least fp32 (bf16 training); float64 stays float64 for exactness tests.
        acc = torch.promote_types(q.dtype, torch.float32)
        qa = q.to(acc) * q.shape[-1] ** -0.5
        ctx = qa @ k0.to(acc).transpose(-1, -2)  # [B, h, m, m]
        causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        ctx = ctx.masked_fill(~causal, float("-inf"))
        diag = (qa.unsqueeze(3) * kd.to(acc)).sum(-1)  # [B, h, m, s]
        p = torch.softmax(torch.cat([ctx, diag], dim=-1), dim=-1)
        out = p[..., :m] @ v0.to(acc) + (p[..., m:, None] * vd.to(acc)).sum(3)
        return out.to(q.dtype)


def ttt_hidden(drafter: PEagleDrafter, input_ids: torch.Tensor, aux_hidden: torch.Tensor,
               steps: int) -> list[torch.Tensor]:
    """Normed drafter outputs of every TTT step that has elements: list of [m_s, H], m_s = n - s.

    input_ids [n] (long), aux_hidden [n, 3H]; both on the drafter's device. Differentiable
    through all steps (the pre-norm outputs fed forward and the earlier steps' keys/values).
    """
    n = int(input_ids.shape[0])
    dev = input_ids.device
    attn = StepAttention(len(drafter.layers))
    hidden = aux_hidden[None]  # [1, n, 3H]: fc applies at step 0 only (width 3H)
    outs = []
    for s in range(min(steps, n)):
        m = n - s
        normed, pre = drafter.forward_hidden(
            input_ids[None, s:], hidden, None, torch.arange(s, n, device=dev)[None], attn, return_prenorm=True)
        outs.append(normed[0])
        hidden = pre[:, :m - 1]  # row i's step-s output is row i's hidden input at step s + 1
    return outs


def ttt_loss(drafter: PEagleDrafter, target_head: torch.Tensor, rows: dict[str, torch.Tensor], steps: int,
             decay: float = 0.8, kind: str = "kl",
             chunk_rows: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """EAGLE-3 training-time-test loss of one sequence.

    rows: ``input_ids`` [n], ``aux_hidden`` [n, 3H], ``target_hidden`` [n, H], ``loss_mask`` [n]
    (shifted rows, DESIGN §1); target_head [V, H] is the frozen target LM head, on the device
    where the work runs. Step s's loss is the summed ``kind`` loss (``kl``: forward KL(target ||
    draft); ``ce``: cross-entropy on the target argmax) over its supervised elements divided by
    their count, weighted ``decay**s``; the result is the sum over steps (a step without
    supervised elements adds nothing). chunk_rows: see :func:`peagle.losses.head_loss`.

    Returns (loss: scalar, stats) with stats ``correct``/``count`` LongTensor [steps]
    (argmax(draft) == argmax(target) over supervised elements, per step), ``elements`` (int, sum
    of m_s) and ``supervised`` (int). With nothing supervised the drafter is not run and the loss
    is a zero leaf that requires grad, so ``loss.backward()`` still works (and changes nothing).
    """

    dev = target_head.device
    ids = rows["input_ids"].to(dev)
    gate = rows["loss_mask"].to(dev).bool()
    n = int(ids.shape[0])
    live = [s for s in range(min(steps, n)) if bool(gate[s:].any())]
    correct = torch.zeros(steps, dtype=torch.long)
    count = torch.zeros(steps, dtype=torch.long)
    stats = {"correct": correct, "count": count, "elements": sum(max(n - s, 0) for s in range(steps)),
             "supervised": 0}
    if not live:
        return torch.zeros((), dtype=drafter.fc.weight.dtype, device=dev, requires_grad=True), stats
    # Steps past the last supervised one are not run: nothing downstream of them is trained.
    outs = ttt_hidden(drafter, ids, rows["aux_hidden"].to(dev), live[-1] + 1)
    target_hidden = rows["target_hidden"].to(dev)
    loss = None
    for s in live:
        sel = gate[s:].nonzero().squeeze(-1)  # supervised rows i of step s (target row i + s)
        step_loss, hit = head_loss(outs[s][sel], drafter.lm_head.weight, target_hidden[s:][sel], target_head,
                                   kind, chunk_rows)
        term = step_loss * (decay**s / sel.numel())
        loss = term if loss is None else loss + term
        correct[s] = int(hit.sum())
        count[s] = sel.numel()
    stats["supervised"] = int(count.sum())
    return loss, stats
