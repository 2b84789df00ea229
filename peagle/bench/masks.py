"""Mask retrieval speed: PARD-style per-example construction vs amortized retrieval.

``python -m peagle.bench.masks [--n 2048 --k 8 --retention 0.8 --repeats 7 --out FILE.json]``
times, on the same COD layouts: ``pard_mask`` (built from scratch per example),
``AmortizedMask.get`` (factored-grid retrieval, the fast path; once with each mask dropped before
the next retrieval as in training, so its buffer is recycled, and once with every mask kept, so
each needs a fresh allocation) and the dense-grid gather
(``grid[idx][:, idx]``, what ``get`` falls back to for non-canonical layouts). Medians over
``repeats`` layouts after one warm-up call each; the one-time precomputation is timed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from peagle.cod import cod_sample
from peagle.masks import AmortizedMask, pard_mask


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mask_speed(n: int = 2048, k: int = 8, retention: float = 0.8, repeats: int = 7, seed: int = 0,
               dense: bool = True) -> dict:
    """Median seconds per example of each path and the speed-ups over ``pard_mask``."""
    gen = torch.Generator().manual_seed(seed)
    layouts = [cod_sample(n, k, retention, generator=gen) for _ in range(repeats)]
    t_setup = time.perf_counter()
    amort = AmortizedMask(n, k)
    setup_s = time.perf_counter() - t_setup
    out = {"n": n, "k": k, "retention": retention, "repeats": repeats, "threads": torch.get_num_threads(),
           "elements_mean": statistics.mean(len(x) for x in layouts), "amortized_setup_s": setup_s}
    assert torch.equal(amort.get(layouts[0]), pard_mask(layouts[0], n, k))  # same mask, and warm-up
    out["pard_s"] = statistics.median(_time(lambda: pard_mask(lay, n, k)) for lay in layouts)
    # As a training loop uses it: each mask is dropped before the next one is retrieved, so
    # the output buffer is recycled.
    out["amortized_s"] = statistics.median(_time(lambda: amort.get(lay)) for lay in layouts)
    # As a caller that keeps every mask: each retrieval needs a freshly allocated [L, L] tensor.
    kept = []
    out["amortized_fresh_s"] = statistics.median(_time(lambda: kept.append(amort.get(lay))) for lay in layouts)
    kept.clear()
    if dense:
        # Materialise the dense grid outside the per-example timing.
        out["dense_grid_setup_s"] = _time(lambda: amort.grid)
        dense_get = lambda lay: amort._get_dense(lay.valid, lay.anchor, lay.depth, lay.doc,  # noqa: E731
                                                 int(lay.anchor.min()))
        dense_get(layouts[0])
        out["dense_gather_s"] = statistics.median(_time(lambda: dense_get(lay)) for lay in layouts)
        out["speedup_dense_gather_vs_pard"] = out["pard_s"] / out["dense_gather_s"]
    out["speedup_amortized_vs_pard"] = out["pard_s"] / out["amortized_s"]
    out["speedup_amortized_fresh_vs_pard"] = out["pard_s"] / out["amortized_fresh_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peagle.bench.masks", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--retention", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-dense", action="store_true", help="skip the dense-grid gather (saves (n*k)^2 bytes)")
    p.add_argument("--out", help="also write the result JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = mask_speed(args.n, args.k, args.retention, args.repeats, dense=not args.no_dense)
    res["torch"] = torch.__version__
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        from peagle.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
