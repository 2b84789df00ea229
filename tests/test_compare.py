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
