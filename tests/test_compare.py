"""``peagle compare``: synthetic regenerated tables -> side-by-side numbers and shape verdicts."""

from __future__ import annotations

import json

import pytest

from peagle.cli import main
from peagle.compare import compare_tables, parse_cell

CTX = {"ctx=32": 1024, "ctx=128": 4096, "ctx=256": 8192, "ctx=640": 20480}


def _table1(d, rows, paper_contexts=CTX):
    d.mkdir(exist_ok=True)
    lines = ["method,layers," + ",".join(CTX)]
    lines += [",".join(map(str, r)) for r in rows]
    (d / "table1.csv").write_text("\n".join(lines) + "\n")
    if paper_contexts is not None:
        (d / "table1.provenance.json").write_text(json.dumps({"paper_contexts": paper_contexts}))


PAPER_SHAPE = [
    ("parallelspec", 1, 1.4, 1.5, "OOM", "OOM"),
    ("pard", 4, 2.3, "infeasible", "OOM", "OOM"),
    ("peagle", 4, 2.3, 2.6, 2.7, 2.9),
]


def _line(text, start):
    hits = [ln for ln in text.splitlines() if ln.startswith(start)]
    assert hits, f"no line starting {start!r} in:\n{text}"
    return hits[0]


def test_parse_cell():
    assert parse_cell("2.5") == 2.5 and parse_cell("oom") == "OOM" and parse_cell("infeasible") == "infeasible"
    assert parse_cell("") is None and parse_cell(float("nan")) is None and parse_cell(">12") == ">12"


def test_table1_matching_shape(tmp_path):
    _table1(tmp_path, PAPER_SHAPE)
    text = compare_tables(tmp_path)
    assert "Failing cells (OOM/infeasible): MATCH the paper's pattern in all 12 compared cells" in text
    assert "(5 failing in ours, 5 in the paper's table)" in text
    # ctx=32: PARD and P-EAGLE tie in both; later columns: only P-EAGLE has a value in either.
    assert _line(text, "- ctx=32 (paper 1024)").endswith("-> MATCH")
    assert "PARD = P-EAGLE 2.300 (tie)" in _line(text, "- ctx=32 (paper 1024)")
    assert _line(text, "- ctx=128 (paper 4096)").endswith("-> MATCH")
    assert "not compared" in _line(text, "- ctx=640 (paper 20480)")
    assert _line(text, "P-EAGLE vs context").startswith("P-EAGLE vs context: ours rises with context (2.3 -> 2.6")
    assert _line(text, "P-EAGLE vs context").endswith("-> MATCH")
    assert "| ctx=32 ours" in text or "ctx=32 ours" in text  # side by side with the paper
    assert "paper ctx=1024" in text
    for name in ("table2", "table9", "drafting_cost"):
        assert f"## {name}: {tmp_path / (name + '.csv')} not found; skipped." in text


def test_table1_mismatching_shape(tmp_path):
    rows = [
        ("parallelspec", 1, 1.4, 1.5, "infeasible", "OOM"),  # fails, but for another reason
        ("pard", 4, 2.5, 2.1, "OOM", "OOM"),  # trains at 4K-equivalent where the paper's is infeasible
        ("peagle", 4, 2.3, 2.0, 2.1, 1.9),  # wins nowhere at ctx=32 and falls with context
    ]
    _table1(tmp_path, rows)
    text = compare_tables(tmp_path)
    fail = _line(text, "Failing cells")
    assert "DIFFER from the paper's pattern in 1 of 12 compared cells" in fail
    assert "PARD @ ctx=128 (paper ctx=4096): ours 2.1, paper infeasible" in fail
    assert "ParallelSpec @ ctx=256: ours infeasible, paper OOM" in _line(text, "  Both fail")
    assert _line(text, "- ctx=32 (paper 1024)").endswith("-> MATCH")  # PARD is among the paper's tied best
    assert _line(text, "- ctx=128 (paper 4096)").endswith("-> DIFFERS")
    assert "does not rise" in _line(text, "P-EAGLE vs context") and text.count("-> DIFFERS") >= 2


def test_table1_partial_and_without_provenance(tmp_path):
    _table1(tmp_path, [("peagle", 4, 2.1, "", 2.4, 2.5)], paper_contexts=None)
    text = compare_tables(tmp_path)
    assert "columns mapped to the paper's [1024, 4096, 8192, 20480] by position" in text
    assert "Missing: our table has no row for ParallelSpec, PARD" in text
    assert "fewer than two methods" in _line(text, "- ctx=32 (paper 1024)")
    assert "Not compared (no value in ours): P-EAGLE @ ctx=128" in text
    assert "MATCH the paper's pattern in all 3 compared cells" in text
    assert "rises with context (2.1 -> - -> 2.4 -> 2.5) (failing/missing cells skipped)" in text


def test_table2_ratios(tmp_path):
    (tmp_path / "table2.csv").write_text(
        "method,data_path,mask_strategy,load_s_128_examples,load_ratio_vs_peagle,epoch_s,epoch_ratio_vs_peagle\n"
        "pard,x,pard,100.0,100.0,30.0,3.0\npeagle,y,amortized,1.0,1.0,10.0,1.0\n"
        "peagle-maskfree,z,maskfree,0.5,0.5,5.0,0.5\n")
    text = compare_tables(tmp_path)
    assert "Data loading, PARD/P-EAGLE: ours 100.00x, paper 41.06x -> MATCH in direction" in text
    assert "Epoch time, PARD/P-EAGLE: ours 3.00x, paper >6.67x -> MATCH in direction" in text
    assert "no EAGLE-3 row in ours (paper 0.85x)" in text
    assert "peagle-maskfree (ours only, no paper counterpart): load 0.5x, epoch 0.5x P-EAGLE" in text


def test_table9_signs(tmp_path):
    (tmp_path / "table9.csv").write_text(
        "target,architecture,eval_set,k,eagle3_layers,eagle3,peagle_layers,peagle,rel_diff_pct\n"
        "tiny-llama,llama,mt_bench,5,1,2.0,4,2.2,10.0\n"
        "tiny-llama,llama,humaneval,5,1,3.0,4,2.9,-3.3\n"
        "tiny-llama,llama,gsm8k,5,1,2.5,4,OOM,\n"
        "tiny-moe,qwen3_moe,mt_bench,5,1,1.8,4,1.9,5.6\n"
        "tiny-moe,qwen3_moe,humaneval,5,1,2.6,4,2.9,11.5\n")
    text = compare_tables(tmp_path)
    mt = _line(text, "- mt_bench:")
    assert "on 2/2 of our targets" in mt and "paper 3/3" in mt and mt.endswith("-> MATCH")
    he = _line(text, "- humaneval:")
    assert "1/2 of our targets" in he and "tiny-llama -3.3%" in he and he.endswith("-> DIFFERS")
    gs = _line(text, "- gsm8k:")
    assert "0/0" in gs and "tiny-llama n/a (2.5 vs OOM)" in gs and gs.endswith("not compared (no value in ours)")
    assert ("Overall: P-EAGLE >= EAGLE-3 in 3 of 4 cells in ours (strictly better in 3), paper 9 of 9 "
            "(strictly better in 6); 1 of our cells have no numeric value.") in text


def test_drafting_cost_verdict(tmp_path):
    rows = ["target_name,method,drafter_layers,k,draft_ms_per_round,verify_ms_per_round,acceptance_length,"
            "output_tokens_per_s"]
    for k in (3, 5, 7):
        rows.append(f"tiny-llama,eagle3,1,{k},{1.0 * k},2.0,2.0,{100 + k}")
        rows.append(f"tiny-llama,peagle,4,{k},3.1,2.0,2.1,{110 - k}")
    (tmp_path / "drafting_cost.csv").write_text("\n".join(rows) + "\n")
    text = compare_tables(tmp_path)
    assert "- tiny-llama EAGLE-3: 3.00 ms (K=3) -> 7.00 ms (K=7), x2.33; best output tokens/s 107.0 at K=7" in text
    assert _line(text, "- tiny-llama: EAGLE-3 drafting grows x2.33, P-EAGLE x1.00 -> MATCH")


def test_malformed_and_empty_tables_do_not_crash(tmp_path):
    (tmp_path / "table1.csv").write_text("foo,bar\n1,2\n")
    (tmp_path / "table2.csv").write_text("")
    (tmp_path / "table9.csv").write_text("target,eval_set\n")
    text = compare_tables(tmp_path)
    assert "table1.csv has no 'method' column; cannot compare." in text
    assert "## table2: could not be compared" in text or "## table2:" in text
    assert "## table9:" in text and "skipped" in _line(text, "## table9:")


def test_cli_compare_writes_the_report(tmp_path, capsys):
    _table1(tmp_path, PAPER_SHAPE)
    out = tmp_path / "report" / "compare.md"
    assert main(["compare", "--tables-dir", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed and "MATCH the paper's pattern" in printed


@pytest.mark.parametrize("cmd", ["table9", "drafting-cost", "compare", "concat-csv"])
def test_cli_has_the_commands(cmd):
    from peagle.cli import build_parser

    with pytest.raises(SystemExit) as err:
        build_parser().parse_args([cmd, "--help"])
    assert err.value.code == 0


# --------------------------------------------------------------------------- seeds: spread and ties


def _table1_seeds(d, rows, n_seeds=3, near=None):
    """rows: (method, layers, [(mean, std)] per CTX column); std None: empty."""
    d.mkdir(exist_ok=True)
    cols = list(CTX)
    lines = ["method,layers,n_seeds," + ",".join(cols) + "," + ",".join(f"{c}_std" for c in cols) + ",near_budget"]
    for m, layers, cells in rows:
        vals = [str(v) for v, _ in cells] + ["" if s is None else str(s) for _, s in cells]
        lines.append(",".join([m, str(layers), str(n_seeds), *vals, (near or {}).get(m, "")]))
    (d / "table1.csv").write_text("\n".join(lines) + "\n")
    (d / "table1.provenance.json").write_text(json.dumps(
        {"paper_contexts": CTX, "seed_spread": {"seeds": list(range(n_seeds)), "n_seeds": n_seeds}}))


def test_table1_difference_within_the_spread_is_a_tie(tmp_path):
    rows = [
        ("parallelspec", 1, [(1.4, 0.02), (1.5, 0.02), ("OOM", None), ("OOM", None)]),
        # ctx=32: P-EAGLE leads PARD by 0.02 with stds 0.05 / 0.03: a tie, neither a match nor a difference.
        ("pard", 4, [(2.28, 0.03), ("infeasible", None), ("OOM", None), ("OOM (2/3 seeds)", None)]),
        # ctx=128: P-EAGLE leads ParallelSpec by 1.1, far beyond the spread: a match.
        ("peagle", 4, [(2.30, 0.05), (2.6, 0.01), (2.7, 0.02), (2.9, 0.04)]),
    ]
    _table1_seeds(tmp_path, rows, near={"peagle": "ctx=640 (+4.0%)"})
    text = compare_tables(tmp_path)
    assert _line(text, "Seeds: 3 per cell (train.seeds [0, 1, 2]); cells are mean ± sample standard deviation. "
                       "Tie rule: two values whose difference is at most the larger of their standard deviations")
    c32 = _line(text, "- ctx=32 (paper 1024)")
    assert "P-EAGLE 2.300 ± 0.050, within the seed spread of PARD 2.28 ± 0.03" in c32 and "-> TIE" in c32
    assert "MATCH" not in c32 and "DIFFERS" not in c32
    assert _line(text, "- ctx=128 (paper 4096)").endswith("-> MATCH")
    assert "2.3 ± 0.05" in text  # cells shown with their spread
    # A cell whose seeds disagree is reported, not counted as failing or as training.
    assert "Seeds disagree (some seeds train, others fail; not compared): PARD @ ctx=640: OOM (2/3 seeds)" in text
    assert "MATCH the paper's pattern in all 11 compared cells" in _line(text, "Failing cells")
    assert "2.9 ± 0.04 †" in text
    assert _line(text, "† near budget:").startswith(
        "† near budget: the training memory peak lies within ±10% of the memory budget (peak / budget - 1) in "
        "P-EAGLE @ ctx=640 (+4.0%)")
    assert _line(text, "P-EAGLE vs context").endswith("-> MATCH")  # 2.3 -> 2.9: far beyond the spread
    # Equal means with a spread: a tie too (with one seed an exact tie among the paper's best is a match).
    rows[1] = ("pard", 4, [(2.30, 0.03)] + rows[1][2][1:])
    _table1_seeds(tmp_path / "equal", rows)
    c32 = _line(compare_tables(tmp_path / "equal"), "- ctx=32 (paper 1024)")
    assert "ours PARD = P-EAGLE 2.300 ± 0.030 (tie)" in c32 and "-> TIE" in c32, c32


def test_table1_trend_within_the_spread_is_a_tie(tmp_path):
    rows = [("peagle", 4, [(2.3, 0.3), (2.2, 0.3), (2.4, 0.3), (2.5, 0.3)])]
    _table1_seeds(tmp_path, rows)
    trend = _line(compare_tables(tmp_path), "P-EAGLE vs context")
    assert "ours flat within the seed spread (2.3 ± 0.3 -> 2.2 ± 0.3" in trend and trend.endswith(
        "-> TIE (first and last context differ by less than their spread)")


def test_one_seed_says_there_is_no_spread(tmp_path):
    _table1(tmp_path, PAPER_SHAPE)  # a table from before seeds: no n_seeds, no _std columns
    text = compare_tables(tmp_path)
    assert _line(text, "Seeds: 1 seed, no spread: each cell is a single training run")
    assert "TIE" not in text
    assert "Memory: table1.csv records no training memory peaks" in text
    # The same with one-seed columns (empty std): exact values, verdicts as without seeds.
    rows = [(m, layers, [(v, None) for v in vals]) for m, layers, *vals in PAPER_SHAPE]
    _table1_seeds(tmp_path, rows, n_seeds=1)
    text = compare_tables(tmp_path)
    assert _line(text, "Seeds: 1 seed, no spread (train.seeds [0])")
    assert _line(text, "- ctx=32 (paper 1024)").endswith("-> MATCH") and "TIE" not in text
    assert "Memory: no cell's training memory peak lies within ±10% of its budget." in text


def test_table9_difference_within_the_spread_is_a_tie(tmp_path):
    (tmp_path / "table9.csv").write_text(
        "target,architecture,eval_set,k,n_seeds,eagle3_layers,eagle3,eagle3_std,peagle_layers,peagle,peagle_std,"
        "rel_diff_pct\n"
        "tiny-llama,llama,mt_bench,5,3,1,2.0,0.1,4,2.05,0.02,2.5\n"       # +0.05 within 0.1: tie
        "tiny-llama,llama,humaneval,5,3,1,3.0,0.01,4,2.9,0.02,-3.3\n"     # -0.1 beyond 0.02: worse
        "tiny-moe,qwen3_moe,mt_bench,5,3,1,1.8,0.01,4,1.9,0.01,5.6\n"     # +0.1 beyond: better
        "tiny-moe,qwen3_moe,humaneval,5,3,1,2.6,0.2,4,2.5,0.2,-3.8\n")    # -0.1 within 0.2: tie
    text = compare_tables(tmp_path)
    assert _line(text, "Seeds: 3 per cell")
    mt = _line(text, "- mt_bench:")
    assert "tiny-llama +2.5% (tie within the seed spread)" in mt and "on 1/1 of our targets outside the seed" in mt
    assert mt.endswith("-> MATCH (1 tie(s) within the seed spread not counted)")
    he = _line(text, "- humaneval:")
    assert "on 0/1 of our targets" in he and he.endswith("-> DIFFERS (1 tie(s) within the seed spread not counted)")
    assert "; 2 of our cells are ties within the seed spread." in _line(text, "Overall:")
    # Every difference within the spread: the set is a tie.
    (tmp_path / "table9.csv").write_text(
        "target,architecture,eval_set,k,n_seeds,eagle3_layers,eagle3,eagle3_std,peagle_layers,peagle,peagle_std,"
        "rel_diff_pct\ntiny-llama,llama,gsm8k,5,3,1,2.5,0.1,4,2.45,0.1,-2.0\n")
    assert _line(compare_tables(tmp_path), "- gsm8k:").endswith(
        "-> TIE (every difference of ours is within the seed spread)")


def test_drafting_cost_says_one_seed_no_spread(tmp_path):
    (tmp_path / "drafting_cost.csv").write_text(
        "target_name,method,k,draft_ms_per_round\ntiny-llama,eagle3,3,3.0\ntiny-llama,eagle3,5,5.0\n")
    assert _line(compare_tables(tmp_path), "Seeds: 1 seed, no spread: one drafter per method, the first of "
                                           "train.seeds")
