"""Tables 1 and 9 from synthetic evaluate-rule results: values, ordering, relative difference, the
mean and standard deviation over seeds, the near-budget flag, errors."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest

from peagle.config import config_from_dict
from peagle.tables import TABLE9_COLUMNS, TableError, concat_csv, write_table1, write_table9

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
    assert back.shape == (6, 12) and back["rel_diff_pct"].tolist() == df["rel_diff_pct"].tolist()
    assert (back["n_seeds"] == 1).all() and back["peagle_std"].isna().all()  # one seed: no spread
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["table"] == "table9" and prov["profile"] == "test" and prov["config_files"] == ["c.yaml"]
    assert "commit" in prov and prov["config"]["table9"]["k"] == 5
    agg = prov["cells"]["tiny-moe/gsm8k/peagle"]
    assert agg["mean"] == 2.31234 and agg["std"] is None and agg["n_seeds"] == 1 and list(agg["runs"]) == ["0"]
    cell = agg["runs"]["0"]
    assert cell["acceptance_length"] == 2.31234 and cell["prompts"] == 20 and cell["file"] in evals
    assert cell["per_position_acceptance"][0] == 0.5 and cell["lossless_checks"][0]["equal"] is True
    assert len(prov["cells"]) == 12
    assert prov["seeds"]["train"] == [0] and prov["seed_spread"]["n_seeds"] == 1
    assert prov["seed_spread"]["note"].startswith("1 seed, no spread")


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


# --------------------------------------------------------------------------- seeds


def _seeds_cfg(tmp_path, seeds, **over):
    return config_from_dict({
        "profile": "test", "results_dir": str(tmp_path / "results"), "target": {"name": "tiny-llama"},
        "extra_targets": [{"name": "tiny-moe", "architecture": "qwen3_moe"}],
        "train": {"seeds": seeds, "memory_budget_mb": 100},
        "table1": {"methods": ["peagle", "pard"], "contexts": [32, 64], "paper_contexts": [1024, 4096],
                   "eval_set": "mt_bench", "k": 5},
        "table9": {"k": 5}, **over,
    })


def _t1(method, ctx, seed, al, peak, **training):
    status = al if isinstance(al, str) else "ok"
    return {"method": method, "ctx": ctx, "eval_set": "mt_bench", "k": 5, "seed": seed, "status": status,
            "acceptance_length": None if status != "ok" else al, "drafter_layers": 4,
            "training": {"status": status, "seed": seed, "peak_mem_mb": peak, "budget_mb": 100, **training}}


# (method, ctx) -> per seed 0, 1, 2: (acceptance length or status, training peak MiB of a 100 MiB budget)
T1 = {
    ("peagle", 32): [(1.5, 50), (1.7, 50), (1.9, 50)],
    ("peagle", 64): [(2.0, 80), (2.1, 109), (2.35, 85)],  # seed 1 peaks at +9%: near the budget
    ("pard", 32): [("OOM", 111), ("OOM", 111), ("OOM", 111)],  # +11%: not near the budget
    ("pard", 64): [("OOM", 89), (1.8, 70), ("OOM", 120)],  # seeds disagree; -11%: not near
}


def _t1_files(tmp_path, seeds=(0, 1, 2)):
    return _write(tmp_path, [_t1(m, c, seed, al, peak) for (m, c), runs in T1.items()
                             for seed, (al, peak) in zip(seeds, runs)])


def test_table1_mean_and_std_over_seeds(tmp_path):
    cfg = _seeds_cfg(tmp_path, [0, 1, 2])
    out = tmp_path / "t1" / "table1.csv"
    df = write_table1(cfg, _t1_files(tmp_path), [], out).set_index("method")
    assert list(df.reset_index().columns) == [
        "method", "layers", "n_seeds", "ctx=32", "ctx=64", "ctx=32_std", "ctx=64_std",
        "ctx=32_peak_mem_mb", "ctx=64_peak_mem_mb", "budget_mb", "near_budget"]
    assert (df["n_seeds"] == 3).all() and (df["budget_mb"] == 100).all() and (df["layers"] == 4).all()
    assert df.loc["peagle", "ctx=32"] == 1.7 and df.loc["peagle", "ctx=32_std"] == 0.2
    assert df.loc["peagle", "ctx=64"] == round(statistics.fmean([2.0, 2.1, 2.35]), 3) == 2.15
    assert df.loc["peagle", "ctx=64_std"] == round(statistics.stdev([2.0, 2.1, 2.35]), 3) == 0.180
    # Every seed OOM: the cell is OOM; seeds that disagree: the failures with their count, no mean.
    assert df.loc["pard", "ctx=32"] == "OOM" and pd.isna(df.loc["pard", "ctx=32_std"])
    assert df.loc["pard", "ctx=64"] == "OOM (2/3 seeds)" and pd.isna(df.loc["pard", "ctx=64_std"])
    assert df.loc["peagle", "ctx=64_peak_mem_mb"] == 109.0 and df.loc["pard", "ctx=64_peak_mem_mb"] == 120.0
    back = pd.read_csv(out, keep_default_na=False).set_index("method")
    assert back.loc["pard", "ctx=64"] == "OOM (2/3 seeds)" and float(back.loc["peagle", "ctx=64"]) == 2.15

    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["seeds"] == {"global": 0, "train": [0, 1, 2]}
    assert prov["seed_spread"]["n_seeds"] == 3 and "sample standard deviation" in prov["seed_spread"]["statistic"]
    cell = prov["cells"]["peagle@ctx=64"]
    assert cell["mean"] == statistics.fmean([2.0, 2.1, 2.35]) and cell["std"] == statistics.stdev([2.0, 2.1, 2.35])
    assert list(cell["runs"]) == ["0", "1", "2"] and cell["runs"]["1"]["acceptance_length"] == 2.1
    mixed = prov["cells"]["pard@ctx=64"]
    assert mixed["agree"] is False and mixed["per_seed"] == {"0": "OOM", "1": 1.8, "2": "OOM"}
    assert mixed["ok_mean"] == 1.8 and mixed["mean"] is None


def test_table1_flags_a_peak_within_ten_percent_of_the_budget(tmp_path):
    cfg = _seeds_cfg(tmp_path, [0, 1, 2])
    df = write_table1(cfg, _t1_files(tmp_path), [], tmp_path / "table1.csv").set_index("method")
    # peagle@64: one seed peaks at 109 MiB of 100 (+9%): flagged; pard: +11% and -11%: not.
    assert df.loc["peagle", "near_budget"] == "ctx=64 (+9.0%)" and df.loc["pard", "near_budget"] == ""
    prov = json.loads((tmp_path / "table1.provenance.json").read_text())
    assert prov["cells"]["peagle@ctx=64"]["near_budget"] is True
    assert prov["cells"]["pard@ctx=32"]["near_budget"] is False and prov["near_budget"]["threshold"] == 0.10
    # budget_margin from the summary wins over peak / budget: -9% is near, whatever the peak says.
    evals = [_t1(m, c, 0, al, peak, **({"budget_margin": -0.09} if (m, c) == ("pard", 32) else {}))
             for (m, c), runs in T1.items() for al, peak in runs[:1]]
    one = write_table1(_seeds_cfg(tmp_path, [0]), _write(tmp_path, evals), [], tmp_path / "one.csv")
    one = one.set_index("method")
    assert one.loc["pard", "near_budget"] == "ctx=32 (-9.0%)" and one.loc["peagle", "near_budget"] == ""
    assert (one["n_seeds"] == 1).all() and one["ctx=32_std"].isna().all()  # one seed: no spread


def test_table1_needs_every_seed_of_every_cell(tmp_path):
    cfg = _seeds_cfg(tmp_path, [0, 1, 2])
    files = _t1_files(tmp_path)
    with pytest.raises(TableError, match=r"no evaluation result of seed\(s\) \[2\] for method pard at ctx 64"):
        write_table1(cfg, files[:-1], [], tmp_path / "t.csv")
    with pytest.raises(TableError, match=r"a second result for method peagle at ctx 32, seed 0"):
        write_table1(cfg, files + files[:1], [], tmp_path / "t.csv")
    with pytest.raises(TableError, match=r"seed 2, which is not one of train.seeds \[0, 1\]"):
        write_table1(_seeds_cfg(tmp_path, [0, 1]), files, [], tmp_path / "t.csv")
    res = _t1("peagle", 32, None, 1.5, 50)
    res["training"].pop("seed")
    (tmp_path / "other").mkdir()
    with pytest.raises(TableError, match=r"names no training seed, but train.seeds has 3"):
        write_table1(cfg, files + _write(tmp_path / "other", [res]), [], tmp_path / "t.csv")
    assert not (tmp_path / "t.csv").exists()


def test_table9_mean_and_std_over_seeds(tmp_path):
    cfg = _seeds_cfg(tmp_path, [3, 7])
    results = []
    for seed, shift in ((3, -0.1), (7, 0.1)):
        for r in _all():
            r.update(seed=seed, acceptance_length=r["acceptance_length"] + shift)
            results.append(r)
    df = write_table9(cfg, _write(tmp_path, results), tmp_path / "t9.csv")
    assert list(df.columns) == TABLE9_COLUMNS and (df["n_seeds"] == 2).all()
    row = df.set_index(["target", "eval_set"]).loc[("tiny-llama", "mt_bench")]
    assert row["eagle3"] == 2.0 and row["peagle"] == 2.2 and row["rel_diff_pct"] == 10.0
    assert row["eagle3_std"] == row["peagle_std"] == round(statistics.stdev([1.9, 2.1]), 3) == 0.141
    prov = json.loads((tmp_path / "t9.provenance.json").read_text())
    assert list(prov["cells"]["tiny-moe/gsm8k/peagle"]["runs"]) == ["3", "7"]  # in train.seeds order
    assert prov["seeds"]["train"] == [3, 7]
    with pytest.raises(TableError, match=r"no evaluation result of seed\(s\) \[7\] for eagle3 on tiny-llama"):
        write_table9(cfg, _write(tmp_path, [r for r in results if not (r["seed"] == 7 and r["method"] == "eagle3"
                                                                      and r["target_name"] == "tiny-llama")]),
                     tmp_path / "t9.csv")
