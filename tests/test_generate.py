"""peagle.generate: batched greedy regeneration equals batch-1 decoding; EOS handling; file format;
every turn of a conversation; shards that resume and parts that gather to one run's bytes."""

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
                                 out_path=tmp_path / "r.jsonl", progress=False, max_turns=1)
    rows = read_responses(tmp_path / "r.jsonl")
    assert [r["id"] for r in rows] == ["a", "b"] and stats["num_prompts"] == 2
    assert rows[1]["prompt_ids"] == render_prompt_ids(tok, "how are you today?")  # max_turns=1: turns[0] only
    assert "answer_spans" not in rows[1] and all(1 <= len(r["response_ids"]) <= 3 for r in rows)
    # never past max_position_embeddings
    regenerate_responses(m, tok, [{"id": "long", "prompt_ids": [1] * 60}], max_new_tokens=50,
                         batch_size=1, out_path=tmp_path / "l.jsonl", progress=False)
    assert len(read_responses(tmp_path / "l.jsonl")[0]["response_ids"]) <= 4
    # a prompt with no room to answer: an error naming the setting, or skipped and counted
    too_long = [{"id": "long", "prompt_ids": [1] * 64}, {"id": "ok", "prompt_ids": [1] * 8}]
    with pytest.raises(ValueError, match="respond.on_long_prompt"):
        regenerate_responses(m, tok, too_long, 2, 1, tmp_path / "f.jsonl", progress=False)
    stats = regenerate_responses(m, tok, too_long, 2, 1, tmp_path / "s.jsonl", on_long_prompt="skip", progress=False)
    assert [r["id"] for r in read_responses(tmp_path / "s.jsonl")] == ["ok"] and stats["turns_skipped_too_long"] == 1
    with pytest.raises(ValueError, match="duplicate prompt id"):
        regenerate_responses(m, tok, recs + recs[:1], 2, 2, tmp_path / "d.jsonl", progress=False)
    with pytest.raises(ValueError, match="'id'"):
        regenerate_responses(m, tok, [{"turns": ["x"]}], 2, 2, tmp_path / "e.jsonl", progress=False)


@pytest.fixture(scope="module")
def chat_target():
    """A tiny chat target (its own tokenizer and template) whose answers are a few tokens long."""
    from peagle.target import TinyTargetConfig, build_tiny_target, train_tokenizer

    tok = train_tokenizer(["hello world, how are you today? fine thanks, and you?"] * 20, vocab_size=300)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        m = build_tiny_target(TinyTargetConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                               intermediate_size=128, max_position_embeddings=256), tok)
    return m.to(torch.float64).eval(), tok


def test_every_turn_is_answered_after_the_targets_own_answers(chat_target, tmp_path):
    from peagle.target import render_prompt_ids
    from peagle.target.chat import answer_text, history_prompt_ids

    m, tok = chat_target
    turns = ["how are you today?", "and you?", "hello world"]
    regenerate_responses(m, tok, [{"id": "c", "turns": turns}], 5, 1, tmp_path / "r.jsonl", progress=False)
    (row,) = read_responses(tmp_path / "r.jsonl")
    # The reference: the same conversation asked one turn at a time through plain greedy decoding.
    answers: list[list[int]] = []
    for n in range(3):
        prompt, spans = history_prompt_ids(tok, turns[:n + 1], [answer_text(tok, a) for a in answers])
        answers.append(generate_greedy_batch(m, [prompt], 5, [tok.eos_token_id], 0)[0])
    assert row["prompt_ids"] == prompt and row["response_ids"] == answers[-1] and row["turns"] == 3
    assert row["answer_spans"] == [list(s) for s in spans] and len(spans) == 2
    first = render_prompt_ids(tok, turns[0])
    (s0, e0), (s1, _) = spans
    assert row["prompt_ids"][:len(first)] == first and s0 == len(first) and e0 < s1
    # span 0 holds answer 1 as the history renders it, closed by the template's end of turn
    assert tok.decode(row["prompt_ids"][s0:e0], skip_special_tokens=True).strip() == answer_text(tok, answers[0]).strip()
    assert tok.eos_token_id in row["prompt_ids"][s0:e0]


class CountingGreedy:
    """Wraps a backend; counts its calls and can fail at call ``fail_at`` (a killed run)."""

    def __init__(self, gen, fail_at=None):
        self.gen, self.fail_at, self.calls = gen, fail_at, 0
        self.eos_ids, self.max_pos, self.vocab, self.backend = gen.eos_ids, gen.max_pos, gen.vocab, gen.backend

    def settings(self):
        return self.gen.settings()

    def __call__(self, prompts, limits, progress=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.gen(prompts, limits, progress)


def test_shards_resume_and_parts_gather_to_one_runs_bytes(model, tmp_path):
    from peagle.generate import HFGreedy, ResponsesError, gather_parts, regenerate_part

    model.generation_config.eos_token_id = 60
    tok = SimpleNamespace(eos_token_id=60, pad_token_id=0)
    records = [{"id": f"p{i}", "prompt_ids": p} for i, p in enumerate(PROMPTS + [[1, 2, 3], [1, 44]])]
    kw = dict(max_new_tokens=6, shard_prompts=3, progress=False)  # 8 prompts: shards of 3, 3, 2

    def gen(fail_at=None):
        return CountingGreedy(HFGreedy(model, tok, batch_size=2), fail_at)

    one = regenerate_part(gen(), tok, records, tmp_path / "one", **kw)
    gather_parts([one], tmp_path / "one.jsonl")
    whole = (tmp_path / "one.jsonl").read_bytes()
    assert one["num_shards"] == 3 and [r["id"] for r in read_responses(tmp_path / "one.jsonl")] == [r["id"] for r in records]
    # Parts 0/2 and 1/2, each on its own, gather to the same bytes.
    parts = [regenerate_part(gen(), tok, records, tmp_path / "two", part=p, parts=2, **kw) for p in (0, 1)]
    assert [[e["index"] for e in p["shards"]] for p in parts] == [[0, 2], [1]]
    gather_parts(parts[::-1], tmp_path / "two.jsonl")
    assert (tmp_path / "two.jsonl").read_bytes() == whole
    with pytest.raises(ResponsesError, match=r"shards \[1\] of 3 are in no part"):
        gather_parts(parts[:1], tmp_path / "x.jsonl")
    # Killed while generating shard 2 (its third call): the rerun generates shard 2 only.
    killed = gen(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        regenerate_part(killed, tok, records, tmp_path / "resume", **kw)
    assert sorted(f.name for f in (tmp_path / "resume").iterdir()) == [
        "shard_00000.jsonl", "shard_00000.jsonl.json", "shard_00001.jsonl", "shard_00001.jsonl.json"]
    rerun = gen()
    summary = regenerate_part(rerun, tok, records, tmp_path / "resume", **kw)
    assert rerun.calls == 1 and summary["shards_reused"] == 2
    gather_parts([summary], tmp_path / "resume.jsonl")
    assert (tmp_path / "resume.jsonl").read_bytes() == whole
    # A shard made with other settings, or whose bytes changed, is made again.
    again = gen()
    regenerate_part(again, tok, records, tmp_path / "resume", **{**kw, "max_new_tokens": 5})
    assert again.calls == 3
    shard = tmp_path / "one" / "shard_00001.jsonl"
    shard.write_bytes(shard.read_bytes().replace(b"p3", b"q3"))
    fixed = gen()
    regenerate_part(fixed, tok, records, tmp_path / "one", **kw)
    assert fixed.calls == 1 and (tmp_path / "one" / "shard_00001.jsonl").read_bytes().count(b'"p3"') == 1
