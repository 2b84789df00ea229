"""peagle.hidden: extraction layout, the transformers-5 final-norm convention, checksums, and the
DESIGN §1 shifted pairing."""

from __future__ import annotations

import json
import random

import pytest
import torch

from peagle.hidden import HiddenStateDataset, extract_hidden_states, shifted_rows
from peagle.io import sha256_file

AUX = [1, 2, 3]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=50, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                               head_dim=32, max_position_embeddings=128, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        # Non-trivial final-norm weight so "normed or not" is visible in the comparison below.
        m.model.norm.weight.data.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def responses(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("resp") / "train.jsonl"
    rows = []
    for i in range(7):
        p = [1] + [rng.randrange(3, 50) for _ in range(rng.randint(2, 6))]
        r = [rng.randrange(3, 50) for _ in range(rng.randint(1, 9))] + [2]
        rows.append({"id": f"s{i}", "prompt_ids": p, "response_ids": r})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_extraction_layout_and_final_norm_convention(model, responses, tmp_path):
    path, rows = responses
    man = extract_hidden_states(model, path, AUX, tmp_path / "H", shard_tokens=25, dtype="float32",
                                target_name="tiny-test", progress=False)
    assert len(man["shards"]) > 1 and man["num_sequences"] == len(rows)
    assert man["aux_layer_ids"] == AUX and man["hidden_size"] == 64 and man["target"] == "tiny-test"
    assert json.loads((tmp_path / "H" / "manifest.json").read_text()) == man
    for s in man["shards"]:
        assert sha256_file(tmp_path / "H" / s["file"]) == s["sha256"]
    ds = HiddenStateDataset(tmp_path / "H", verify="eager")
    assert len(ds) == len(rows) and ds.hidden_size == 64 and ds.aux_layer_ids == AUX
    assert ds.ids == [r["id"] for r in rows] and ds.id_of(3) == "s3"
    for i, row in enumerate(rows):
        seq = ds[i]
        x = row["prompt_ids"] + row["response_ids"]
        T = len(x)
        assert seq["input_ids"].tolist() == x and seq["input_ids"].dtype == torch.int64
        assert seq["aux_hidden"].shape == (T, 3 * 64) and seq["last_hidden"].shape == (T, 64)
        assert seq["loss_mask"].dtype == torch.uint8
        assert seq["loss_mask"].tolist() == [0] * len(row["prompt_ids"]) + [1] * len(row["response_ids"])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([x]), output_hidden_states=True)
            hs = out.hidden_states
            torch.testing.assert_close(seq["aux_hidden"], torch.cat([hs[j][0] for j in AUX], -1))
            # DESIGN §1 trap: hidden_states[-1] is already final-normed -> lm_head gives the logits
            logits = model.lm_head(seq["last_hidden"])
            torch.testing.assert_close(logits, out.logits[0], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(model.lm_head(model.model.norm(seq["last_hidden"])), out.logits[0],
                                      atol=1e-3)
    assert ds[-1]["input_ids"].tolist() == rows[-1]["prompt_ids"] + rows[-1]["response_ids"]
    with pytest.raises(IndexError):
        ds[len(rows)]


def test_truncation_dtype_and_stale_shards(model, responses, tmp_path):
    path, rows = responses
    out = tmp_path / "H"
    extract_hidden_states(model, path, AUX, out, shard_tokens=10, dtype="float32", target_name="t",
                          progress=False)
    n_before = len(list(out.glob("shard_*.safetensors")))
    man = extract_hidden_states(model, path, AUX, out, shard_tokens=10_000, dtype="bfloat16",
                                target_name="t", max_seq_len=6, progress=False)
    assert n_before > 1 and sorted(p.name for p in out.glob("shard_*.safetensors")) == ["shard_00000.safetensors"]
    ds = HiddenStateDataset(out)
    assert man["num_truncated"] == sum(len(r["prompt_ids"]) + len(r["response_ids"]) > 6 for r in rows)
    assert all(len(ds[i]["input_ids"]) == min(6, ds.lengths[i]) for i in range(len(ds)))
    assert ds[0]["aux_hidden"].dtype == torch.bfloat16 and ds.dtype == "bfloat16"
    with pytest.raises(ValueError, match="three distinct"):
        extract_hidden_states(model, path, [1, 1, 2], tmp_path / "X", 10, "float32", "t", progress=False)


def test_corrupted_shard_is_detected(model, responses, tmp_path):
    path, _ = responses
    out = tmp_path / "H"
    man = extract_hidden_states(model, path, AUX, out, shard_tokens=25, dtype="float32",
                                target_name="t", progress=False)
    victim = out / man["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit deep inside a tensor
    victim.write_bytes(bytes(data))
    ds = HiddenStateDataset(out)  # lazy: opening the directory is fine ...
    ds[0]  # ... and the intact first shard still reads
    first_bad = man["shards"][0]["num_sequences"]
    with pytest.raises(ValueError, match=rf"{victim.name}.*re-run hidden-state extraction"):
        ds[first_bad]
    with pytest.raises(ValueError, match=victim.name):
        HiddenStateDataset(out, verify="eager")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        HiddenStateDataset(out)[first_bad]


def test_shifted_rows_hand_built():
    # T = 4 tokens, H = 1: aux_hidden has width 3, values chosen so every entry is distinct.
    seq = {
        "input_ids": torch.tensor([10, 11, 12, 13]),
        "aux_hidden": torch.tensor([[100., 101., 102.], [110., 111., 112.],
                                    [120., 121., 122.], [130., 131., 132.]]),
        "last_hidden": torch.tensor([[200.], [210.], [220.], [230.]]),
        "loss_mask": torch.tensor([0, 0, 1, 1], dtype=torch.uint8),
    }
    rows = shifted_rows(seq)
    # row i: token x_{i+1}, hidden g_i, target z_{i+1} (last_hidden[i+1]), gate loss_mask[i+1]
    assert rows["input_ids"].tolist() == [11, 12, 13]
    assert rows["aux_hidden"].tolist() == [[100., 101., 102.], [110., 111., 112.], [120., 121., 122.]]
    assert rows["target_hidden"].tolist() == [[210.], [220.], [230.]]
    assert rows["loss_mask"].tolist() == [0, 1, 1]
    one = shifted_rows({k: v[:1] for k, v in seq.items()})
    assert all(v.shape[0] == 0 for v in one.values())
    with pytest.raises(ValueError, match="loss_mask"):
        shifted_rows(dict(seq, loss_mask=seq["loss_mask"][:3]))


def test_greedy_responses_agree_with_extracted_states(model, tmp_path):
    """Cross-module check: for greedy responses, lm_head(last_hidden[t]) picks x[t+1] on every
    response token, i.e. generation (left-padded, batched) and extraction see the same sequence."""
    from types import SimpleNamespace

    from peagle.generate import regenerate_responses

    m = model.double()
    try:
        prompts = [{"id": f"q{i}", "prompt_ids": [1] + list(range(3 + i, 9 + 2 * i))} for i in range(5)]
        regenerate_responses(m, SimpleNamespace(eos_token_id=2, pad_token_id=0), prompts, 12, 3,
                             tmp_path / "r.jsonl", progress=False)
        extract_hidden_states(m, tmp_path / "r.jsonl", AUX, tmp_path / "H", 10_000, "float64", "t",
                              progress=False)
        ds = HiddenStateDataset(tmp_path / "H")
        for i in range(len(ds)):
            rows = shifted_rows(ds[i])
            with torch.no_grad():
                pred = m.lm_head(rows["target_hidden"]).argmax(-1)  # row i predicts x_{i+2}
            x = ds[i]["input_ids"]
            gate = rows["loss_mask"][:-1].bool()  # response rows whose x_{i+2} exists
            assert torch.equal(pred[:-1][gate], x[2:][gate])
    finally:
        model.float()
