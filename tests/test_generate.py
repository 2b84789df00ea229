"""peagle.generate: batched greedy regeneration equals batch-1 decoding; EOS handling; file format."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peagle.generate import cut_at_eos, generate_greedy_batch, read_responses, regenerate_responses


@pytest.fixture(scope="module")
def model():
    """Random 2-layer Llama in float64 (so padded and unpadded runs agree exactly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=61, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               head_dim=32, max_position_embeddings=128, bos_token_id=1,
                               eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return m.to(torch.float64).eval()


PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32, 33, 34],
           [1, 40, 41], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 3, 4]]


def pick_eos(model) -> int:
    """A token that greedy decoding emits mid-response for some prompts, so EOS really fires."""
    outs = [generate_greedy_batch(model, [p], 12, eos_ids=[60], pad_id=0)[0] for p in PROMPTS]
    counts: dict[int, int] = {}
    for o in outs:
        for t in set(o[2:8]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t], -t))


def test_cut_at_eos():
    assert cut_at_eos([4, 5, 2, 2, 0, 0], [2]) == [4, 5, 2]
    assert cut_at_eos([4, 5, 6], [2]) == [4, 5, 6]
    assert cut_at_eos([4, 9, 5], [2, 9]) == [4, 9]
    assert cut_at_eos([4, 5, 6, 2], [2], limit=2) == [4, 5]


def test_batched_equals_single_and_eos(model, tmp_path):
    eos = pick_eos(model)
    model.generation_config.eos_token_id = eos
    tok = SimpleNamespace(eos_token_id=eos, pad_token_id=0)
    records = [{"id": f"p{i}", "prompt_ids": p} for i, p in enumerate(PROMPTS)]
    stats1 = regenerate_responses(model, tok, records, max_new_tokens=16, batch_size=1,
                                  out_path=tmp_path / "single.jsonl", progress=False)
    stats4 = regenerate_responses(model, tok, records, max_new_tokens=16, batch_size=4,
                                  out_path=tmp_path / "batched.jsonl", progress=False)
    regenerate_responses(model, tok, records, max_new_tokens=16, batch_size=3,
                         out_path=tmp_path / "dynamic.jsonl", cache_implementation=None, progress=False)
    single = read_responses(tmp_path / "single.jsonl")
    batched = read_responses(tmp_path / "batched.jsonl")
    assert single == batched == read_responses(tmp_path / "dynamic.jsonl")
    assert [r["id"] for r in batched] == [f"p{i}" for i in range(len(PROMPTS))]  # input order
    assert [r["prompt_ids"] for r in batched] == PROMPTS
    stopped = 0
    for r in batched:
        resp = r["response_ids"]
        assert 1 <= len(resp) <= 16
        assert eos not in resp[:-1]  # nothing after the first EOS
        if resp[-1] == eos:
            stopped += 1
        else:
            assert len(resp) == 16  # ran to the limit
        assert 0 not in resp or eos not in resp or resp.index(0) < resp.index(eos)  # no pad tail
    assert stopped >= 1 and stats4["num_stopped_at_eos"] == stopped == stats1["num_stopped_at_eos"]
    # unpadded reference through a plain no-cache argmax loop
    for p, r in zip(PROMPTS, batched):
        seq = list(p)
        with torch.no_grad():
            for _ in range(len(r["response_ids"])):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(p):] == r["response_ids"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_chat_records_and_errors(tmp_path):
    from peagle.target import TinyTargetConfig, build_tiny_target, render_prompt_ids, train_tokenizer

    tok = train_tokenizer(["hello world, how are you today?"] * 20, vocab_size=300)
    m = build_tiny_target(TinyTargetConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                           intermediate_size=128, max_position_embeddings=64), tok)
    recs = [{"id": "a", "turns": ["hello"]}, {"id": "b", "turns": ["how are you today?", "x"]}]
    stats = regenerate_responses(m, tok, recs, max_new_tokens=3, batch_size=2,
                                 out_path=tmp_path / "r.jsonl", progress=False)
    rows = read_responses(tmp_path / "r.jsonl")
    assert [r["id"] for r in rows] == ["a", "b"] and stats["num_prompts"] == 2
    assert rows[1]["prompt_ids"] == render_prompt_ids(tok, "how are you today?")  # turns[0] only
    assert all(1 <= len(r["response_ids"]) <= 3 for r in rows)
    # never past max_position_embeddings
    regenerate_responses(m, tok, [{"id": "long", "prompt_ids": [1] * 60}], max_new_tokens=50,
                         batch_size=1, out_path=tmp_path / "l.jsonl", progress=False)
    assert len(read_responses(tmp_path / "l.jsonl")[0]["response_ids"]) <= 4
    with pytest.raises(ValueError, match="duplicate prompt id"):
        regenerate_responses(m, tok, recs + recs[:1], 2, 2, tmp_path / "d.jsonl", progress=False)
    with pytest.raises(ValueError, match="'id'"):
        regenerate_responses(m, tok, [{"turns": ["x"]}], 2, 2, tmp_path / "e.jsonl", progress=False)
