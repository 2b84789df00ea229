"""The speculators checkpoint format: read into the suite's drafter, written from it; weight checksums."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from peagle import checkpoint as ckpt
from peagle.drafters import DrafterSpec, build_drafter
from peagle.speculators import is_speculators_config, save_speculators, spec_from_speculators

V, H = 97, 64


def _spec(parallel=True, layers=2, **kw):
    return DrafterSpec(hidden_size=H, vocab_size=V, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=32,
                       intermediate_size=80, mask_token_id=96, aux_layer_ids=[1, 2, 3], max_position_embeddings=256,
                       parallel=parallel, **kw)


def _pair(tmp_path, parallel=True, seed=3):
    model = build_drafter(_spec(parallel), seed=seed)
    ours = ckpt.save_drafter(tmp_path / "ours", model, {"method": "peagle" if parallel else "eagle3",
                                                        "k_train": 4 if parallel else None})
    theirs = save_speculators(model, tmp_path / "spec", verifier="org/target-model", k_train=4)
    return model, ours, theirs


def _edit(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("parallel", [True, False])
def test_speculators_export_loads_with_identical_weights(tmp_path, parallel):
    model, ours, theirs = _pair(tmp_path, parallel)
    raw = json.loads((theirs / "config.json").read_text())
    assert is_speculators_config(raw) and raw["speculators_model_type"] == ("peagle" if parallel else "eagle3")
    assert raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert raw["speculators_config"]["verifier"]["name_or_path"] == "org/target-model"
    assert raw["transformer_layer_config"]["model_type"] == "llama" and raw["norm_before_residual"] is False
    assert ("mask_token_id" in raw) == parallel
    assert "layers.0.hidden_norm.weight" in load_file(str(theirs / "model.safetensors"))
    a, _ = ckpt.load_drafter(ours)
    b, cfg_b = ckpt.load_drafter(theirs)
    # An EAGLE-3 drafter has no mask token (the speculators config carries none).
    assert a.spec == model.spec and b.spec == (model.spec if parallel else replace(model.spec, mask_token_id=0))
    assert cfg_b["peagle"]["format"] == "speculators" and cfg_b["peagle"]["k_train"] == (4 if parallel else None)
    assert cfg_b["peagle"]["method"] == ("peagle" if parallel else "eagle3")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_speculators_drafts_and_acceptance_equal_the_original(tmp_path, tiny_artifacts):
    from peagle.spec_decode import SpeculativeDecoder, TargetRunner, make_proposer
    from peagle.target import load_target

    target, _, info = load_target(tiny_artifacts["target_json"])
    spec = DrafterSpec(hidden_size=info["hidden_size"], vocab_size=info["vocab_size"], num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=32, intermediate_size=96, mask_token_id=info["mask_token_id"],
                       aux_layer_ids=info["aux_layer_ids"], max_position_embeddings=256)
    model = build_drafter(spec, embed=target.get_input_embeddings().weight, lm_head=target.lm_head.weight, seed=1)
    ours = ckpt.save_drafter(tmp_path / "ours", model, {"method": "peagle", "k_train": 3})
    theirs = save_speculators(model, tmp_path / "spec", verifier=str(tiny_artifacts["target_json"]), k_train=3)
    runner = TargetRunner(target, info["aux_layer_ids"])
    outs = []
    for d in (ours, theirs):
        engine = SpeculativeDecoder(runner, make_proposer(ckpt.load_drafter(d)[0]), k=3, eos_id=None)
        outs.append([engine.generate([3 + i, 40, 50 + i, 7], 10) for i in range(2)])
    for (ta, sa), (tb, sb) in zip(*outs):
        assert ta == tb
        assert (sa.rounds, sa.committed, sa.accepted_at) == (sb.rounds, sb.committed, sb.accepted_at)


def test_midlayer_names_and_identity_vocab_map_are_accepted(tmp_path):
    model, _, theirs = _pair(tmp_path)
    w = load_file(str(theirs / "model.safetensors"))
    w = {k.replace("layers.0.", "midlayer.", 1) if k.startswith("layers.0.") else k: v for k, v in w.items()}
    w["d2t"], w["t2d"] = torch.zeros(V, dtype=torch.long), torch.ones(V, dtype=torch.bool)
    save_file(w, str(theirs / "model.safetensors"))
    loaded, _ = ckpt.load_drafter(theirs)
    assert torch.equal(loaded.layers[0].hidden_norm.weight, model.layers[0].hidden_norm.weight)


def test_speculators_weight_problems_name_the_file(tmp_path):
    _, _, theirs = _pair(tmp_path)
    path = theirs / "model.safetensors"
    w = load_file(str(path))
    d2t = torch.zeros(V, dtype=torch.long)
    d2t[5] = 3
    save_file({**w, "d2t": d2t}, str(path))
    with pytest.raises(ckpt.CheckpointError, match="d2t maps draft ids") as err:
        ckpt.load_drafter(theirs)
    assert str(path) in str(err.value)
    save_file({k: v for k, v in w.items() if k != "embed_tokens.weight"}, str(path))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['embed_tokens.weight'\].*from the verifier"):
        ckpt.load_drafter(theirs)


BAD_CONFIGS = {
    "no speculative_tokens": (lambda c: c["speculators_config"]["proposal_methods"][0].pop("speculative_tokens"),
                              "speculators_config.proposal_methods[0].speculative_tokens"),
    "no proposal methods": (lambda c: c["speculators_config"].update(proposal_methods=[]),
                            "speculators_config.proposal_methods[0].speculative_tokens"),
    "no verifier": (lambda c: c["speculators_config"].pop("verifier"), "speculators_config.verifier.name_or_path"),
    "diff layer config": (lambda c: c["transformer_layer_config"].pop("hidden_size"),
                          "transformer_layer_config.hidden_size"),
    "qwen3 layers": (lambda c: c["transformer_layer_config"].update(model_type="qwen3"),
                     "transformer_layer_config.model_type='qwen3'"),
    "no norm_before_residual": (lambda c: c.pop("norm_before_residual"), "has no norm_before_residual"),
    "norm_before_residual": (lambda c: c.update(norm_before_residual=True), "norm_before_residual=True"),
    "norm_before_fc": (lambda c: c.update(norm_before_fc=True), "norm_before_fc=True"),
    "reduced vocab": (lambda c: c.update(draft_vocab_size=32), "draft_vocab_size=32"),
    "other width": (lambda c: c.update(target_hidden_size=128), "target_hidden_size=128"),
    "no aux ids": (lambda c: c.pop("eagle_aux_hidden_state_layer_ids"), "eagle_aux_hidden_state_layer_ids=None"),
    "no mask token": (lambda c: c.pop("mask_token_id"), "has no mask_token_id"),
    "mask token outside": (lambda c: c.update(mask_token_id=V), f"mask_token_id={V}"),
    "unknown type": (lambda c: c.update(speculators_model_type="medusa"), "speculators_model_type='medusa'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_speculators_config_fails_before_weights_are_read(tmp_path, case):
    _, _, theirs = _pair(tmp_path)
    fn, field = BAD_CONFIGS[case]
    _edit(theirs, fn)
    (theirs / "model.safetensors").write_bytes(b"not read")  # a config error must come first
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_drafter(theirs)
    msg = str(err.value)
    assert msg.startswith(f"{theirs / 'config.json'}: speculators config") and field in msg, msg


def test_spec_from_speculators_reads_head_dim_and_rope(tmp_path):
    _, _, theirs = _pair(tmp_path)
    raw = json.loads((theirs / "config.json").read_text())
    del raw["transformer_layer_config"]["head_dim"], raw["transformer_layer_config"]["rope_theta"]
    raw["transformer_layer_config"]["rope_parameters"]["rope_theta"] = 5e5
    spec, meta = spec_from_speculators(raw, theirs)
    assert spec.head_dim == H // 2 and spec.rope_theta == 5e5 and spec.num_kv_heads == 1
    assert meta == {"format": "speculators", "method": "peagle", "k_train": 4, "speculative_tokens": 4,
                    "verifier": "org/target-model", "speculators_version": None}


# --------------------------------------------------------------------------- weight checksums


def test_checksum_recorded_and_a_flipped_byte_is_caught(tmp_path):
    _, ours, _ = _pair(tmp_path)
    cfg = json.loads((ours / "config.json").read_text())
    from peagle.io import sha256_file

    assert cfg["peagle"]["weights_sha256"] == sha256_file(ours / "model.safetensors")
    ckpt.check_export(ours)
    path = ours / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    path.write_bytes(bytes(data))
    for check in (ckpt.load_drafter, ckpt.check_export):
        with pytest.raises(ckpt.CheckpointError, match="corrupt or were changed after export") as err:
            check(ours)
        assert str(path) in str(err.value) and "peagle.weights_sha256" in str(err.value)


def test_reserialised_copy_with_equal_tensors_still_verifies(tmp_path):
    model, ours, _ = _pair(tmp_path)
    w = load_file(str(ours / "model.safetensors"))
    save_file(dict(reversed(list(w.items()))), str(ours / "model.safetensors"), metadata={"by": "someone else"})
    loaded, _ = ckpt.load_drafter(ours)
    ckpt.check_export(ours)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    _, ours, _ = _pair(tmp_path)
    _edit(ours, lambda c: (c["peagle"].pop("weights_sha256"), c["peagle"].pop("tensors_sha256")))
    ckpt.load_drafter(ours)
    ckpt.check_export(ours)


def test_not_a_checkpoint_names_both_formats(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ckpt.CheckpointError, match="peagle.spec.*speculators_model_type"):
        ckpt.read_config(tmp_path)
