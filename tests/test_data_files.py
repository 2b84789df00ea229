"""Local dataset files in the layouts users hold (peagle.data.files, peagle.data.hf's layouts).

Every fixture is written here from the hub-schema fixtures in tests/fixtures/hf, so each layout
is checked against the same records the hub schema gives.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from peagle.config import ConfigError, DataConfig
from peagle.data import HFDataError, load_hf_prompts
from peagle.data.files import DataFileError, read_rows, resolve_data_files

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _turns(recs):
    return [(r.turns, r.reference) for r in recs]


@pytest.fixture(scope="module")
def mt_bench_h4():
    return load_hf_prompts("mt_bench", data_files=FIXTURES / "mt_bench_prompts.jsonl")


def test_mt_bench_fastchat_layout(tmp_path, mt_bench_h4):
    """FastChat's question.jsonl: question_id, category, turns and (for some categories) reference."""
    rows = [{"question_id": 81 + i, "category": r["category"], "turns": r["prompt"],
             **({"reference": r["reference"]} if r["reference"] else {})} for i, r in enumerate(_rows("mt_bench_prompts.jsonl"))]
    recs = load_hf_prompts("mt_bench", data_files=_jsonl(tmp_path / "question.jsonl", rows))
    assert _turns(recs) == _turns(mt_bench_h4) and recs[1].reference == "3/8"
    assert [r.id for r in recs] == [r.id for r in mt_bench_h4] and all(len(r.turns) == 2 for r in recs)


def test_mt_bench_vllm_benchmark_layout(tmp_path, mt_bench_h4):
    """philschmid/mt-bench, the copy vLLM's serving benchmark reads: string ids, no reference."""
    rows = [{"question_id": str(81 + i), "category": r["category"], "turns": r["prompt"]}
            for i, r in enumerate(_rows("mt_bench_prompts.jsonl"))]
    import pandas as pd

    pq = tmp_path / "train-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    recs = load_hf_prompts("mt_bench", data_files=pq)
    assert [r.turns for r in recs] == [r.turns for r in mt_bench_h4] and all(r.reference is None for r in recs)


def test_ultrachat_original_release_layout(tmp_path):
    rows = [{"id": "0", "data": ["Hi, how do I boil an egg?", "Put it in boiling water.", "For how long?", "Nine minutes."]}]
    (rec,) = load_hf_prompts("ultrachat", data_files=_jsonl(tmp_path / "ultrachat.jsonl", rows))
    assert rec.turns == ("Hi, how do I boil an egg?", "For how long?") and rec.reference == "Put it in boiling water."


@pytest.mark.parametrize("form", ["jsonl.gz", "json.gz", "json"])
def test_compressed_and_array_files_read_like_jsonl(tmp_path, form):
    """HumanEval's own release is HumanEval.jsonl.gz; JSON exports are one array."""
    plain = load_hf_prompts("humaneval", data_files=FIXTURES / "openai_humaneval.jsonl")
    rows = _rows("openai_humaneval.jsonl")
    path = tmp_path / f"HumanEval.{form}"
    text = "".join(json.dumps(r) + "\n" for r in rows) if form == "jsonl.gz" else json.dumps(rows, indent=1)
    path.write_bytes(gzip.compress(text.encode()) if form.endswith(".gz") else text.encode())
    assert load_hf_prompts("humaneval", data_files=path) == plain


def test_sharded_snapshot_as_directory_glob_and_list(tmp_path):
    """A hub snapshot sharded into parquet files reads like the one file it was cut from."""
    import pandas as pd

    whole = load_hf_prompts("gsm8k", "test", data_files=FIXTURES / "gsm8k_main.jsonl")
    rows = _rows("gsm8k_main.jsonl")
    snap = tmp_path / "snapshot"
    (snap / "main").mkdir(parents=True)
    (snap / ".cache").mkdir()
    half = len(rows) // 2
    pd.DataFrame(rows[:half]).to_parquet(snap / "main" / "test-00000-of-00002.parquet")
    pd.DataFrame(rows[half:]).to_parquet(snap / "main" / "test-00001-of-00002.parquet")
    (snap / ".cache" / "stale.jsonl").write_text('{"question": "not data", "answer": "0"}\n')
    (snap / "README.md").write_text("card")
    shards = sorted(str(p) for p in (snap / "main").glob("*.parquet"))
    for spec in (snap, str(snap / "main" / "test-*.parquet"), shards):
        assert load_hf_prompts("gsm8k", "test", data_files=spec) == whole, spec
    assert resolve_data_files(snap) == [Path(p) for p in shards]  # hidden directories and READMEs skipped
    # Rows are numbered per file, 1-based, so an error points into the right shard.
    assert [r.where for r in read_rows([Path(shards[1])])][0] == f"{shards[1]}: row 1"


def test_unreadable_files_name_file_and_line(tmp_path):
    good = _rows("gsm8k_main.jsonl")
    truncated = tmp_path / "gsm8k.jsonl"
    truncated.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n" + json.dumps(good[2])[:25])
    with pytest.raises(HFDataError, match=rf"gsm8k: {re.escape(str(truncated))}: line 3: not valid JSON"):
        load_hf_prompts("gsm8k", data_files=truncated)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(HFDataError, match=rf"{re.escape(str(empty))}: holds no rows"):
        load_hf_prompts("gsm8k", data_files=empty)
    bad_row = _jsonl(tmp_path / "bad_row.jsonl", [good[0], {"question": "2+2?"}])
    with pytest.raises(HFDataError, match=rf"{re.escape(str(bad_row))}: line 2: field 'answer': missing"):
        load_hf_prompts("gsm8k", data_files=bad_row)
    not_object = _jsonl(tmp_path / "list.jsonl", [good[0]])
    not_object.write_text(not_object.read_text() + "[1, 2]\n")
    with pytest.raises(HFDataError, match=r"list.jsonl: line 2: expected a JSON object"):
        load_hf_prompts("gsm8k", data_files=not_object)
    broken_gz = tmp_path / "cut.jsonl.gz"
    broken_gz.write_bytes(gzip.compress(b'{"question": "q", "answer": "a"}\n' * 50)[:40])
    with pytest.raises(HFDataError, match=r"cut.jsonl.gz: cannot be read"):
        load_hf_prompts("gsm8k", data_files=broken_gz)
    with pytest.raises(DataFileError, match=r"data.data_files.gsm8k: the pattern .* matches no file ending in"):
        resolve_data_files(str(tmp_path / "nothing-*.parquet"), key="data.data_files.gsm8k")
    (tmp_path / "docs").mkdir()
    with pytest.raises(DataFileError, match=r"the directory .*docs holds no file"):
        resolve_data_files(tmp_path / "docs")


def test_data_files_setting_takes_lists_and_full_eval_sets():
    cfg = DataConfig(source="hf", n_eval=None, data_files={"gsm8k": ["a.parquet", "b.parquet"], "mt_bench": "q.jsonl"})
    assert cfg.n_eval is None and cfg.data_files["gsm8k"] == ["a.parquet", "b.parquet"]
    with pytest.raises(ConfigError, match=r"data.data_files.gsm8k"):
        DataConfig(source="hf", data_files={"gsm8k": []})
    with pytest.raises(ConfigError, match=r"data.n_eval: the synthetic data has no full set"):
        DataConfig(source="synthetic", n_eval=None)
