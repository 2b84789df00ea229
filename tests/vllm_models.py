"""Tiny vLLM-servable target + drafters built with the repo's own code (docs/vllm_cpu_notes.md §2).

Used by tests/test_vllm.py in both environments. ``python tests/vllm_models.py OUT_DIR [ARCH]`` builds
them by hand. Sizes: target 4 layers, hidden 128, 2 heads of 64 (vLLM's CPU attention needs head_dim in
{32, 64, ...}), vocabulary 512.

* ``target``: ``initializer_range=0.1`` so its greedy text is diverse (0.02 degenerates into a loop).
* ``peagle`` (2 layers, k_train 5) / ``eagle3`` (1 layer): projections and ``fc`` re-drawn at fan-in
  scale, norms from U(0.5, 1.5), ``mask_hidden`` std 0.05, so drafts depend on the context.
* ``target_const`` + ``*_const``: final norm weight 0 in the target (all logits 0: greedy picks id 0)
  and in the drafters (they always draft 0): every draft is accepted, AL = K + 1 (the accounting check).
* ``*_half``: context-dependent drafters with lm_head row 0 scaled x50, so on ``target_const`` they
  draft the accepted id 0 in part of the contexts: AL strictly between 1 and K + 1, decided draft by
  draft by the drafter's whole computation (the informative cross-check). The seed is the first whose
  engine AL on three probe prompts is in [1.25, 3.5] (recorded in the export's ``peagle`` block).
* The tokenizer is trained on a fixed synthetic corpus, so the models do not change with the repo.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Explain how a hash table works.", "def fibonacci(n):", "Write a haiku about the sea.",
           "import os\nimport sys\n", "class Stack:\n    def push(self, x):", "List three prime numbers."]
K_TRAIN = 5


def write_eval_prompts(path: Path, texts: list[str] = PROMPTS, role: str = "mt_bench") -> Path:
    with path.open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"p{i}", "source": "test", "role": role, "turns": [t], "reference": None}) + "\n")
    return path


def corpus(n: int = 600) -> list[str]:
    """A fixed synthetic training corpus for the tokenizer (independent of any file that may change)."""
    import random

    words = ("def return class import self value index list dict key item for while if else print range len "
             "sum the of and to in is hash table sea haiku prime number stack push pop explain write how "
             "works summarise plot three").split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(30)) + f"\n    x{i} = f({i * 7 % 97}, '{i % 13}')\n"
            for i in range(n)]


def _fan_in(model) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.weight") or n == "fc.weight":
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)  # every input matters: drafts depend on context
            elif n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


def _engine_al(drafter, runner, prompts: list[list[int]], k: int = 3, n_new: int = 16) -> float:
    from peagle.spec_decode import DecodeStats, SpeculativeDecoder, make_proposer

    total = DecodeStats(k)
    for p in prompts:
        total.merge(SpeculativeDecoder(runner, make_proposer(drafter), k, None).generate(p, n_new)[1])
    return total.acceptance_length


def build(out: Path, architecture: str = "llama", sliding_window: int = 8, peagle_layers: int = 2) -> dict[str, Path]:
    """Write target{,_const}/ (+ target.json), {peagle,eagle3}{,_half,_const}/, eval_mt_bench.jsonl.

    ``architecture``: the target's HF model type (``llama``; ``qwen3_moe``: 8 experts, 2 active;
    ``gpt_oss``: sliding-window attention of ``sliding_window`` tokens on even layers, full on odd
    ones, attention sinks, 8 experts, 2 active). ``peagle_layers``: decoder layers of the P-EAGLE drafters.
    """
    import copy

    from safetensors.torch import load_file, save_file

    from peagle.checkpoint import check_export, save_drafter
    from peagle.drafters import DrafterSpec, build_drafter
    from peagle.spec_decode import TargetRunner
    from peagle.target import (TinyTargetConfig, build_tiny_target, eos_token_ids, render_prompt_ids,
                               save_target_model, train_tokenizer, write_target_json)

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus(), vocab_size=512)
    arch = TinyTargetConfig(hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=256,
                            max_position_embeddings=1024, seed=0, initializer_range=0.1, architecture=architecture,
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                            sliding_window=sliding_window)
    target = build_tiny_target(arch, tok)
    target_const = copy.deepcopy(target)
    with torch.no_grad():
        target_const.model.norm.weight.zero_()
    vocab = target.get_output_embeddings().weight.shape[0]
    paths: dict[str, Path] = {}
    for name in ("target", "target_const"):
        save_target_model(target, tok, out / name / "model")
        if name == "target_const":
            w = out / name / "model" / "model.safetensors"
            state = load_file(str(w))
            state["model.norm.weight"].zero_()
            save_file(state, str(w), metadata={"format": "pt"})
        paths[name] = out / name / "target.json"
        write_target_json(paths[name], path=str(out / name / "model"), kind="tiny", num_layers=4,
                          hidden_size=128, vocab_size=vocab, aux_layer_ids=[1, 2, 3], mask_token_id=tok.mask_token_id,
                          eos_token_id=eos_token_ids(target, tok), name=f"tiny-vllm-{name}",
                          max_position_embeddings=1024)
    base = dict(hidden_size=128, vocab_size=vocab, num_heads=2, num_kv_heads=2, head_dim=64, intermediate_size=256,
                mask_token_id=tok.mask_token_id, aux_layer_ids=[1, 2, 3], mask_hidden_init_std=0.05)
    runner = TargetRunner(target_const, [1, 2, 3])
    probe = [render_prompt_ids(tok, t) for t in PROMPTS[:3]]
    for name, layers, parallel in (("peagle", peagle_layers, True), ("eagle3", 1, False)):
        spec = DrafterSpec(**base, num_layers=layers, parallel=parallel)
        meta = {"method": name, "ctx": 256, "parallel": parallel, "k_train": K_TRAIN if parallel else None}
        model = build_drafter(spec, seed=2)
        _fan_in(model)
        paths[name] = save_drafter(out / name, model, meta)
        # Whether id 0 wins in about half of the contexts depends on the draw: take the first seed whose
        # acceptance on target_const (measured with the suite's engine) is clearly mixed.
        for seed in range(3, 40):
            model = build_drafter(spec, seed=seed)
            _fan_in(model)
            with torch.no_grad():
                model.lm_head.weight[0] *= 50
            al = _engine_al(model, runner, probe)
            if 1.25 <= al <= 3.5:
                break
        else:
            raise RuntimeError(f"no {name} seed in 3..39 gives a mixed acceptance on target_const")
        paths[f"{name}_half"] = save_drafter(out / f"{name}_half", model, {**meta, "seed": seed, "probe_al": al})
        with torch.no_grad():
            model.norm.weight.zero_()
        paths[f"{name}_const"] = save_drafter(out / f"{name}_const", model, meta)
        for n in (name, f"{name}_half", f"{name}_const"):
            check_export(out / n)
    paths["prompts"] = write_eval_prompts(out / "eval_mt_bench.jsonl")
    return paths


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    dest = Path(sys.argv[1])
    shutil.rmtree(dest, ignore_errors=True)
    print({k: str(v) for k, v in build(dest, *sys.argv[2:3]).items()})
