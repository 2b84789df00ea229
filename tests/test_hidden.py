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
    with pytest.raises(ValueError, match=rf"{victim.name}.*Rebuild the store: snakemake --cores all --forcerun extract .*manifest.json"):
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


def test_shards_are_bounded_in_bytes_and_the_manifest_sizes_the_store(tiny_artifacts, tmp_path):
    from peagle.hidden import bytes_per_token
    from peagle.target import load_target

    model, _, _ = load_target(tiny_artifacts["target_json"])
    per_token = bytes_per_token(64, torch.float32)
    cap_mb = 60 * per_token / 2**20  # 60 tokens' worth: every shard but single long sequences stays under
    m = extract_hidden_states(model, tiny_artifacts["responses"], [1, 2, 3], tmp_path / "H", None, "float32", "t",
                              shard_mb=cap_mb, progress=False)
    assert len(m["shards"]) > 3 and m["num_bytes"] == sum((tmp_path / "H" / s["file"]).stat().st_size for s in m["shards"])
    for s in m["shards"]:
        assert s["num_tokens"] * per_token <= cap_mb * 2**20 or s["num_sequences"] == 1
        assert s["num_bytes"] <= s["num_tokens"] * per_token + 4096  # the safetensors header on top
    ds = HiddenStateDataset(tmp_path / "H")
    assert ds.num_tokens == m["num_tokens"] and len(ds) == 12
    # the manifest's first supervised positions equal the stored masks'
    for i in range(len(ds)):
        hits = ds[i]["loss_mask"][1:].nonzero()
        assert ds.first_supervised[i] == (int(hits[0, 0]) + 1 if hits.numel() else None)


def test_shard_window_order_reads_each_shard_once_per_epoch(tiny_artifacts, tiny_config, tmp_path, monkeypatch):
    """Training one epoch reads every shard's file exactly once when the sampler takes the store a
    window of shards at a time (a whole-store shuffle over a small cache reads shards many times)."""
    import dataclasses

    from peagle import hidden
    from peagle.target import load_target
    from peagle.train import shard_window_order, train_drafter

    shards = [0, 0, 1, 1, 1, 2, 3, 3, 4]
    order = shard_window_order(shards, seed=3, epoch=0, window=2)
    assert sorted(order) == list(range(len(shards)))
    seen: list[int] = []  # each window's shards appear contiguously and never again
    for p in order:
        if not seen or seen[-1] != shards[p]:
            seen.append(shards[p])
    assert len(set(seen)) == 5 and shard_window_order(shards, 3, 0, 9) == shard_window_order(shards, 3, 0, None)
    assert shard_window_order(shards, 3, 1, 2) != order  # reshuffled per epoch

    model, _, _ = load_target(tiny_artifacts["target_json"])
    m = extract_hidden_states(model, tiny_artifacts["responses"], [1, 2, 3], tmp_path / "H", 40, "float32", "t",
                              progress=False)
    assert len(m["shards"]) >= 6
    reads: list[int] = []
    real = hidden.HiddenStateDataset._read_verified

    def counting(self, k, force_verify=False):
        reads.append(k)
        return real(self, k, force_verify)

    monkeypatch.setattr(hidden.HiddenStateDataset, "_read_verified", counting)
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, epochs=1, shard_window=2,
                                                                      grad_accum=2))
    summary = train_drafter(cfg, tiny_artifacts["target_json"], tmp_path / "H", "peagle", 64, tmp_path / "run",
                            progress=False, log=lambda msg: None)
    assert summary["status"] == "ok"
    assert sorted(reads) == list(range(len(m["shards"])))  # once each: no read for the usable-sequence scan either


def test_online_mode_equals_the_store(tiny_artifacts, tiny_config, tmp_path):
    """Online mode (the target computes hidden states as training reads them, no store) gives the
    store's tensors bit for bit, hence the same losses, gradients and weights."""
    import dataclasses
    import json

    from safetensors.torch import load_file

    from peagle.hidden import OnlineHiddenStates
    from peagle.target import load_target
    from peagle.train import train_drafter

    model, _, _ = load_target(tiny_artifacts["target_json"])
    online = OnlineHiddenStates(model, tiny_artifacts["responses"], [1, 2, 3], "float32")
    offline = HiddenStateDataset(tiny_artifacts["hidden_dir"])
    assert len(online) == len(offline) and online.lengths == offline.lengths and online.ids == offline.ids
    assert online.first_supervised == offline.first_supervised
    for i in range(len(offline)):
        a, b = online[i], offline[i]
        assert all(torch.equal(a[k], b[k]) for k in b)
    runs = {}
    for source, where in (("offline", tiny_artifacts["hidden_dir"]), ("online", tiny_artifacts["responses"])):
        cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, epochs=1, grad_accum=2,
                                                                          hidden_source=source))
        out = tmp_path / source
        assert train_drafter(cfg, tiny_artifacts["target_json"], where, "peagle", 64, out, progress=False,
                             log=lambda m: None)["status"] == "ok"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[source] = ([(m["loss"], m["grad_norm"]) for m in metrics], load_file(str(out / "final" / "model.safetensors")))
    assert runs["online"][0] == runs["offline"][0] and len(runs["online"][0]) >= 3
    assert all(torch.equal(runs["online"][1][k], w) for k, w in runs["offline"][1].items())
