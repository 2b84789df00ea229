"""Does a target write text like its training data? Repetition and length-cap statistics.

A degenerate greedy decoder loops (``from_from_from…``) and runs into the length cap; its
responses are what the drafters learn from, so the suite measures both on token ids:

* repeated n-gram fraction of one sequence: the share of its n-grams (n = 4) that already
  occurred earlier in the same sequence;
* cap rate: the share of responses that reached ``max_new_tokens`` without an end-of-sequence;
* copy accuracy: teacher-forced next-token accuracy on the reference tokens that copy a number
  of the prompt (a list item, a rule's threshold, a name's quantity), beside the accuracy on the
  rest. A target that cannot copy restates numbers that are not in the prompt, which is how the
  tiny targets' answers come to repeat themselves (README, "Does the tiny target write text?").

The same repetition statistic on the reference texts of the same role (the data's worked
answers, tokenized alike) is the yardstick: :func:`compare_to_reference` gives the ratio.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["repeated_ngram_fraction", "response_stats", "compare_to_reference", "copy_accuracy"]


def repeated_ngram_fraction(tokens: Sequence[int], n: int = 4) -> float | None:
    """Share of the ``len(tokens) - n + 1`` n-grams of ``tokens`` seen earlier in it.

    None for a sequence shorter than ``n`` (it has no n-gram, so no repetition to speak of).
    ``[1, 2, 3, 4, 1, 2, 3, 4]`` at n=4: five 4-grams, one (``1 2 3 4``) repeated -> 0.2.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    total = len(tokens) - n + 1
    if total < 1:
        return None
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for i in range(total):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def response_stats(responses: Iterable[Sequence[int]], *, eos_ids: Iterable[int] | None = None,
                   cap: int | None = None, n: int = 4) -> dict[str, Any]:
    """Repetition and length statistics of token sequences (responses or reference texts).

    responses: token ids, each without the prompt. A response "hit the cap" when it has at
    least ``cap`` tokens and does not end in one of ``eos_ids`` (both needed for the cap rate;
    reference texts pass neither). ``repetition`` is the mean of :func:`repeated_ngram_fraction`
    over the sequences long enough to have an n-gram.
    """
    seqs = [list(r) for r in responses]
    if not seqs:
        raise ValueError("response_stats: no sequences")
    fracs = [f for f in (repeated_ngram_fraction(s, n) for s in seqs) if f is not None]
    lens = [len(s) for s in seqs]
    out: dict[str, Any] = {
        "n": len(seqs), "ngram": n,
        "repetition": statistics.fmean(fracs) if fracs else 0.0,
        "mean_len": statistics.fmean(lens), "median_len": statistics.median(lens),
        "p90_len": _quantile(lens, 0.9), "max_len": max(lens),
    }
    if cap is not None and eos_ids is not None:
        eos = set(eos_ids)
        hit = sum(1 for s in seqs if len(s) >= cap and not (s and s[-1] in eos))
        out.update(cap=cap, cap_hits=hit, cap_rate=hit / len(seqs))
    return out


def compare_to_reference(generated: dict[str, Any], reference: dict[str, Any], *,
                         max_repetition_ratio: float = 1.5, max_cap_rate: float = 0.10) -> dict[str, Any]:
    """Verdicts of a target's response statistics against the reference texts of the same role.

    Both arguments are :func:`response_stats` results. The ratio is generated / reference
    repetition (reference repetition 0 makes any repetition an infinite ratio).
    """
    ref = reference["repetition"]
    gen = generated["repetition"]
    ratio = gen / ref if ref > 0 else (1.0 if gen == 0 else float("inf"))
    out = {"repetition": gen, "reference_repetition": ref, "repetition_ratio": ratio,
           "repetition_ok": ratio <= max_repetition_ratio, "max_repetition_ratio": max_repetition_ratio}
    if "cap_rate" in generated:
        out.update(cap_rate=generated["cap_rate"], cap_ok=generated["cap_rate"] <= max_cap_rate,
                   max_cap_rate=max_cap_rate)
    return out


def copy_accuracy(pairs: Iterable[tuple[Sequence[int], Sequence[int], Iterable[int]]]) -> dict[str, Any]:
    """Accuracy of predictions on copied tokens and on the rest, pooled over sequences.

    ``pairs``: ``(predicted, target, copyable)`` per sequence, ``predicted[i]`` the model's argmax
    for ``target[i]`` and ``copyable`` the token ids a target token copies from the prompt (its
    number tokens). ``predicted [1, 7, 3]``, ``target [1, 9, 3]``, ``copyable {9}``: copy accuracy
    0 of 1, other accuracy 2 of 2. An accuracy with no token to count is None.
    """
    hits = {True: 0, False: 0}
    counts = {True: 0, False: 0}
    for predicted, target, copyable in pairs:
        if len(predicted) != len(target):
            raise ValueError(f"copy_accuracy: {len(predicted)} predictions for {len(target)} target tokens")
        copy = set(copyable)
        for p, y in zip(predicted, target):
            counts[y in copy] += 1
            hits[y in copy] += p == y
    acc = lambda k: hits[k] / counts[k] if counts[k] else None  # noqa: E731
    return {"copy_accuracy": acc(True), "copy_tokens": counts[True],
            "other_accuracy": acc(False), "other_tokens": counts[False]}
