"""Every paper target's architecture through the whole pipeline, shrunk (issue 11).

Tiny random checkpoints of gpt_oss (alternating sliding/full attention with a small window,
attention sinks, experts, YaRN), qwen3_moe and llama, each with a locally trained tokenizer that
carries the real model's special tokens and a chat template of the real one's structure (GPT-OSS's
harmony system header prints the date, as Llama 3.1's does). They run respond -> extract -> train
-> evaluate; the engine must be lossless past the sliding window and an oracle drafter must reach
AL = K + 1.
"""

import dataclasses
import json

import pytest
import torch

from peagle.spec_decode import OracleProposer, SpeculativeDecoder, TargetRunner, greedy_generate
from peagle.target import (TinyTargetConfig, build_tiny_target, load_target, render_prompt_ids,
                           save_target_model, write_target_json)

WINDOW = 8

# The real models' special tokens (tokenizer_config.json of openai/gpt-oss-20b,
# Qwen/Qwen3-Coder-30B-A3B-Instruct, meta-llama/Llama-3.1-8B-Instruct); generation eos in the
# real generation_config.json order. Mask: a reserved token, as the paper profile uses.
GPT_OSS_TEMPLATE = (
    "<|start|>system<|message|>You are a tiny test model.\nKnowledge cutoff: 2024-06\n"
    "Current date: {{ strftime_now('%Y-%m-%d') }}\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final.<|end|>"
    "{% for m in messages %}{% if m['role'] == 'user' %}<|start|>user<|message|>{{ m['content'] }}<|end|>"
    "{% else %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|return|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: {{ strftime_now('%d %b %Y') }}\n\n<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
ARCH = {
    "gpt_oss": dict(special=["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                             "<|start|>", "<|end|>", "<|message|>", "<|call|>", "<|reserved_200017|>"],
                    bos="<|startoftext|>", pad="<|endoftext|>", mask="<|reserved_200017|>",
                    eos=["<|return|>", "<|endoftext|>", "<|call|>"], template=GPT_OSS_TEMPLATE),
    "qwen3_moe": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"],
                      bos=None, pad="<|endoftext|>", mask="<|fim_pad|>",
                      eos=["<|im_end|>", "<|endoftext|>"], template=QWEN_TEMPLATE),
    "llama": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                           "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eom_id|>", "<|eot_id|>"],
                  bos="<|begin_of_text|>", pad="<|finetune_right_pad_id|>", mask="<|reserved_special_token_0|>",
                  eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], template=LLAMA_TEMPLATE),
}
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # item {i}\n" for i in range(120)]


def real_style_tokenizer(arch: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    a = ARCH[arch]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=a["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=a["bos"], eos_token=a["eos"][0],
                                  pad_token=a["pad"], mask_token=a["mask"], model_max_length=512)
    tok.chat_template = a["template"]
    return tok


def tiny_cfg(arch: str, **kw) -> TinyTargetConfig:
    return TinyTargetConfig(architecture=arch, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, max_position_embeddings=512, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=64, sliding_window=WINDOW, seed=0, **kw)


def make_target(arch: str, root, eos_in_json: bool = False):
    """A saved tiny random target whose generation config lists the real eos ids; target.json's
    eos_token_id is null unless ``eos_in_json`` (as for an HF target: filled at load)."""
    tok = real_style_tokenizer(arch)
    with pytest.warns(UserWarning, match="head_dim"):
        model = build_tiny_target(tiny_cfg(arch), tok)
    eos = [tok.convert_tokens_to_ids(t) for t in ARCH[arch]["eos"]]
    model.generation_config.eos_token_id = eos
    save_target_model(model, tok, root / "model")
    info = write_target_json(root / "target.json", path=str(root / "model"), kind="tiny", num_layers=4,
                             hidden_size=64, vocab_size=len(tok), aux_layer_ids=[1, 2, 3],
                             mask_token_id=tok.mask_token_id, eos_token_id=eos if eos_in_json else None,
                             name=f"tiny-{arch}", architecture=arch, max_position_embeddings=512)
    return root / "target.json", info, eos


def test_gpt_oss_keeps_the_real_structure(tmp_path):
    tj, _, eos = make_target("gpt_oss", tmp_path)
    model, tok, info = load_target(tj)
    c = model.config
    assert model.config._attn_implementation == "eager"  # GptOss refuses sdpa
    assert c.layer_types == ["sliding_attention", "full_attention"] * 2 and c.sliding_window == WINDOW
    assert c.rope_parameters["rope_type"] == "yarn" and c.num_local_experts == 4 and c.attention_bias
    assert model.model.layers[0].self_attn.sinks.shape == (4,)
    assert info["eos_token_id"] == eos  # null in target.json -> the generation config's list
    with pytest.raises(ValueError, match=r"target 'tiny-gpt_oss'.*target\.attn_implementation"):
        load_target(tj, attn_implementation="sdpa")


def _no_cache_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


class NoisyOracle(OracleProposer):
    """Right drafts with the j-th draft of every other round corrupted: partial acceptance, so
    the cache is cropped by every amount, across the window boundary."""

    def __init__(self, continuation, prompt_len):
        super().__init__(continuation, prompt_len)
        self.round = 0

    def propose(self, tokens, aux, k):
        drafts = super().propose(tokens, aux, k)
        self.round += 1
        j = self.round % (k + 1)
        if j < k:
            drafts[j] = (drafts[j] + 1) % 300
        return drafts


def test_engine_lossless_past_the_sliding_window(tmp_path):
    tj, _, _ = make_target("gpt_oss", tmp_path)
    model, tok, info = load_target(tj)  # fp32: the experts' grouped matmul has no float64
    prompt = render_prompt_ids(tok, "def f3(x): return x * 3")
    assert len(prompt) > 3 * WINDOW
    n = 6 * WINDOW  # divisible by k + 1 for k in 1, 3, 5
    ref = _no_cache_greedy(model, prompt, n)  # no KV cache at all: the independent reference
    runner = TargetRunner(model, info["aux_layer_ids"])
    assert greedy_generate(runner, prompt, n, None) == ref
    for k in (1, 3, 5):
        out, stats = SpeculativeDecoder(runner, OracleProposer(ref, len(prompt)), k, None).generate(prompt, n)
        assert out == ref and stats.acceptance_length == k + 1  # every draft accepted
        out, stats = SpeculativeDecoder(runner, NoisyOracle(ref, len(prompt)), k, None).generate(prompt, n)
        assert out == ref and 1 < stats.acceptance_length < k + 1 + 1e-9


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe", "llama"])
def test_pipeline_respond_extract_train_evaluate(arch, tiny_config, tmp_path):
    from peagle.evaluate import evaluate_drafter
    from peagle.generate import read_responses, regenerate_responses
    from peagle.hidden import extract_hidden_states
    from peagle.train import train_drafter

    tj, _, eos = make_target(arch, tmp_path)
    model, tok, info = load_target(tj)
    # Two conversations of two turns (MT-Bench's shape), two of one.
    prompts = [{"id": f"p{i}", "source": "test", "role": "mt_bench",
                "turns": [TEXTS[i * 7][: 10 + 3 * i]] + ([TEXTS[i * 7 + 1][:12]] if i < 2 else []),
                "reference": None} for i in range(4)]
    (tmp_path / "eval_mt_bench.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    stats = regenerate_responses(model, tok, prompts, 3 * WINDOW, 2, tmp_path / "resp.jsonl", progress=False)
    assert stats["num_prompts"] == 4 and stats["turns"] == 6
    rows = read_responses(tmp_path / "resp.jsonl")
    runner = TargetRunner(model, info["aux_layer_ids"])
    for r in rows:  # batched, left-padded HF generation == the engine's greedy reference
        assert len(r["prompt_ids"]) > WINDOW
        assert r["response_ids"] == greedy_generate(runner, r["prompt_ids"], 3 * WINDOW, eos)
    assert [len(r.get("answer_spans", [])) for r in rows] == [1, 1, 0, 0]  # the template keeps the history
    extract_hidden_states(model, tmp_path / "resp.jsonl", info["aux_layer_ids"], tmp_path / "hidden", 10_000,
                          "float32", arch, progress=False)
    from peagle.hidden import HiddenStateDataset

    seq = HiddenStateDataset(tmp_path / "hidden")[0]  # loss on both of the target's answers, nowhere else
    (a, b), n_prompt = rows[0]["answer_spans"][0], len(rows[0]["prompt_ids"])
    want = torch.zeros(n_prompt + len(rows[0]["response_ids"]), dtype=torch.uint8)
    want[a:b], want[n_prompt:] = 1, 1
    assert torch.equal(seq["loss_mask"], want)
    cfg = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, max_mask_len=1024, epochs=1),
        eval=dataclasses.replace(tiny_config.eval, max_new_tokens=2 * WINDOW, n_prompts=2, lossless_check_prompts=2,
                                 turns=2))
    # ctx 192 covers the longest prompt (the harmony system header) plus part of the response.
    summary = train_drafter(cfg, tj, tmp_path / "hidden", "peagle", 192, tmp_path / "run",
                            progress=False, log=lambda m: None)
    assert summary["status"] == "ok"
    res = evaluate_drafter(cfg, tj, tmp_path / "run", tmp_path / "eval_mt_bench.jsonl", 3, progress=False,
                           log=lambda m: None)
    # Both turns checked lossless: turn 2 is asked after the target's own first answer.
    assert all(c["equal"] for c in res["lossless_checks"]) and [c["turn"] for c in res["lossless_checks"]] == [1, 2] * 2
    assert 1 <= res["acceptance_length"] <= 4 and all(1 <= al <= 4 for al in res["acceptance_length_per_turn"])


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_chat_date_is_pinned(arch):
    tok = real_style_tokenizer(arch)
    a = render_prompt_ids(tok, "hi")
    assert a == render_prompt_ids(tok, "hi")
    text = tok.decode(a)
    assert ("2025-08-05" if arch == "gpt_oss" else "05 Aug 2025") in text
    assert render_prompt_ids(tok, "hi", date="2024-01-02") != a


def test_tokenizer_without_chat_template_is_a_clear_error():
    tok = real_style_tokenizer("qwen3_moe")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*target.path"):
        render_prompt_ids(tok, "hi")
