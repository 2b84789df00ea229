"""GPU self-checks of paths developed on CPU: ``python -m peagle.bench.cuda_checks OUT.json``.

* ``AmortizedMask(device="cuda")`` equals ``reference_mask`` on random layouts (documents,
  padding, both the factored fast path and the dense fallback);
* mask retrieval vs ``pard_mask`` on the GPU at n=2048, K=8, r=0.8 (median of 5 layouts);
* a ``peagle.memory`` budget on CUDA turns an allocation past it into ``BudgetExceeded`` and is
  lifted afterwards.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from peagle import memory
from peagle.cod import Layout, cod_sample
from peagle.masks import AmortizedMask, pard_mask, reference_mask


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    g = torch.Generator().manual_seed(0)
    am = AmortizedMask(40, 6, device="cuda")
    bad = checked = 0
    for i in range(200):
        n, k = int(torch.randint(1, 41, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        docs = None
        if i % 3 == 0 and n > 3:
            docs = torch.zeros(n, dtype=torch.int64)
            docs[n // 2:] = 1
        lay = cod_sample(n, k, 0.7, 0.1, generator=g, doc_ids=docs)
        lay = lay.pad_to(len(lay) + i % 3)
        cases = [lay]
        if i % 10 == 0:  # shuffled: the dense fallback
            p = torch.randperm(len(lay), generator=g)
            cases.append(Layout(lay.anchor[p], lay.depth[p], lay.doc[p], lay.valid[p]))
        for c in cases:
            bad += int(not torch.equal(am.get(c).cpu(), reference_mask(c)))
            checked += 1
    out["amortized_cuda_checked"], out["amortized_cuda_mismatches"] = checked, bad

    n, k = 2048, 8
    lays = [cod_sample(n, k, 0.8, generator=g) for _ in range(6)]
    amg = AmortizedMask(n, k, device="cuda")

    def median_s(fn) -> float:
        fn(lays[0])
        torch.cuda.synchronize()
        ts = []
        for lay in lays[1:]:
            t0 = time.perf_counter()
            fn(lay)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    out["gpu_amortized_s"] = median_s(lambda lay: amg.get(lay))
    out["gpu_pard_s"] = median_s(lambda lay: pard_mask(lay.to("cuda"), n, k))
    out["gpu_speedup"] = out["gpu_pard_s"] / out["gpu_amortized_s"]

    try:
        with memory.memory_budget(1024, "cuda"):
            keep = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
            keep2 = torch.empty(2048 * 2**20, dtype=torch.uint8, device="cuda")
        out["cuda_cap"] = f"no error ({keep.numel() + keep2.numel()} bytes allocated)"
    except memory.BudgetExceeded as err:
        out["cuda_cap"] = err.result()
    big = torch.empty(4096 * 2**20, dtype=torch.uint8, device="cuda")
    out["after_cap_4gib_ok"] = big.numel() == 4096 * 2**20
    text = json.dumps(out, indent=1)
    print(text)
    if argv:
        with open(argv[0], "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
