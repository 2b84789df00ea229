"""Table 9 from synthetic evaluate-rule results: values, ordering, relative difference, errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from peagle.config import config_from_dict
from peagle.tables import TABLE9_COLUMNS, TableError, concat_csv, write_table9

AL = {  # (target, eval_set) -> (eagle3, peagle)
    ("tiny-llama", "mt_bench"): (2.0, 2.2),
    ("tiny-llama", "humaneval"): (3.0, 2.97),
    ("tiny-llama", "gsm8k"): (2.5, 2.5),
    ("tiny-moe", "mt_bench"): (1.8, 1.9),
    ("tiny-moe", "humaneval"): (2.6, 2.9),
    ("tiny-moe", "gsm8k"): (2.1, 2.31234),
}
ARCH = {"tiny-llama": "llama", "tiny-moe": "qwen3_moe"}


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict({
        "profile": "test", "results_dir": str(tmp_path / "results"),
        "target": {"name": "tiny-llama"},
        "extra_targets": [{"name": "tiny-moe", "architecture": "qwen3_moe"}],
        "table9": {"k": 5},
    })


def _result(target, eval_set, method, **over):
    e3, pe = AL[(target, eval_set)]
    res = {"method": method, "ctx": 256, "target_name": target, "target": f"results/{target}/target/model",
           "target_architecture": ARCH[target], "eval_set": eval_set, "k": 5,
           "acceptance_length": e3 if method == "eagle3" else pe, "drafter_layers": 1 if method == "eagle3" else 4,
           "per_position_acceptance": [0.5, 0.3, 0.2, 0.1, 0.05], "prompts": 20,
           "lossless_checks": [{"id": "p0", "equal": True, "first_difference": None}], "status": "ok"}
    res.update(over)
    return res


def _write(tmp_path, results):
    paths = []
    for i, res in enumerate(results):
        p = tmp_path / "evals" / f"{i:02d}_{res['method']}_{res['eval_set']}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(res))
        paths.append(str(p))
    return paths


def _all(order=("gsm8k", "humaneval", "mt_bench"), targets=("tiny-llama", "tiny-moe")):
    return [_result(t, s, m) for t in targets for s in order for m in ("peagle", "eagle3")]


def test_table9_values_ordering_and_provenance(cfg, tmp_path):
    # Results arrive in an arbitrary set order; rows come out mt_bench, humaneval, gsm8k per target.
    evals = _write(tmp_path, _all())
    out = tmp_path / "tables" / "table9.csv"
    df = write_table9(cfg, evals, out, config_files=["c.yaml"])
    assert list(df.columns) == TABLE9_COLUMNS
    assert list(zip(df["target"], df["eval_set"])) == [
        ("tiny-llama", "mt_bench"), ("tiny-llama", "humaneval"), ("tiny-llama", "gsm8k"),
        ("tiny-moe", "mt_bench"), ("tiny-moe", "humaneval"), ("tiny-moe", "gsm8k")]
    assert df["architecture"].tolist() == ["llama"] * 3 + ["qwen3_moe"] * 3
    assert (df["k"] == 5).all() and (df["eagle3_layers"] == 1).all() and (df["peagle_layers"] == 4).all()
    assert df["rel_diff_pct"].tolist() == [10.0, -1.0, 0.0, 5.6, 11.5, 10.1]
    assert df.iloc[5]["peagle"] == 2.312  # ALs rounded to 3 decimals
    back = pd.read_csv(out)
    assert back.shape == (6, 9) and back["rel_diff_pct"].tolist() == df["rel_diff_pct"].tolist()
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["table"] == "table9" and prov["profile"] == "test" and prov["config_files"] == ["c.yaml"]
    assert "commit" in prov and prov["config"]["table9"]["k"] == 5
    cell = prov["cells"]["tiny-moe/gsm8k/peagle"]
    assert cell["acceptance_length"] == 2.31234 and cell["prompts"] == 20 and cell["file"] in evals
    assert cell["per_position_acceptance"][0] == 0.5 and cell["lossless_checks"][0]["equal"] is True
    assert len(prov["cells"]) == 12


def test_table9_target_name_fallback_and_failed_cells(tmp_path):
    cfg = config_from_dict({"profile": "test", "results_dir": str(tmp_path / "r")})
    results = _all(targets=("tiny-llama",))
    for r in results:
        del r["target_name"], r["target_architecture"]
    results[0].update(status="OOM", training={"status": "OOM", "drafter_layers": 4})
    del results[0]["acceptance_length"], results[0]["drafter_layers"]
    df = write_table9(cfg, _write(tmp_path, results), tmp_path / "t9.csv")
    assert df["target"].unique().tolist() == ["results/tiny-llama/target/model"]
    g = df.set_index("eval_set").loc["gsm8k"]
    assert g["peagle"] == "OOM" and pd.isna(g["rel_diff_pct"]) and g["eagle3"] == 2.5
    assert df["architecture"].isna().all() and (df["peagle_layers"] == 4).all()


@pytest.mark.parametrize("change, match", [
    (lambda rs: rs.pop(3), r"missing.*eagle3 on tiny-llama/humaneval"),
    (lambda rs: rs.append(dict(rs[0])), r"a second result for peagle on tiny-llama/gsm8k"),
    (lambda rs: rs[-1].update(k=7), r"mixed K \[5, 7\]"),
    (lambda rs: [r.update(k=3) for r in rs], r"K=3.*table9.k is 5"),
    (lambda rs: rs[0].update(method="pard"), r"method 'pard'"),
    (lambda rs: [rs.remove(r) for r in list(rs) if r["target_name"] == "tiny-moe"], r"no evaluation results for "
     r"targets \['tiny-moe'\]"),
    (lambda rs: rs[0].update(acceptance_length=None), r"status ok but acceptance_length is None"),
])
def test_table9_errors(cfg, tmp_path, change, match):
    results = _all()
    change(results)
    with pytest.raises(TableError, match=match):
        write_table9(cfg, _write(tmp_path, results), tmp_path / "t9.csv")
    assert not (tmp_path / "t9.csv").exists()


def test_table9_missing_file(cfg, tmp_path):
    with pytest.raises(TableError, match="evaluation result missing"):
        write_table9(cfg, [str(tmp_path / "nope.json")], tmp_path / "t9.csv")


def test_concat_csv(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x,y\n1,2\n")
    b.write_text("x,y\n3,4\n5,6\n")
    (tmp_path / "a.provenance.json").write_text('{"commit": "abc"}')
    df = concat_csv([a, b], tmp_path / "out" / "ab.csv")
    assert df["x"].tolist() == [1, 3, 5]
    assert pd.read_csv(tmp_path / "out" / "ab.csv").shape == (3, 2)
    prov = json.loads((tmp_path / "out" / "ab.provenance.json").read_text())
    assert prov["parts"] == {str(a): {"commit": "abc"}} and prov["inputs"] == [str(a), str(b)]
    (tmp_path / "c.csv").write_text("x,z\n1,2\n")
    with pytest.raises(TableError, match="columns"):
        concat_csv([a, tmp_path / "c.csv"], tmp_path / "bad.csv")
