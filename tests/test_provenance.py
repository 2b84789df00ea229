"""The shared table writer, staleness by config digest, and recorded baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from peagle.compare import compare_tables, provenance_line
from peagle.config import config_digest, load_config
from peagle.provenance import read_provenance, sidecar, write_table
from peagle.record import RecordError, record_run, stage_wall_times

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "config" / "tiny.yaml"


def _table1(path: Path, cfg, value: float = 2.0) -> None:
    df = pd.DataFrame([{"method": m, "layers": 4, **{f"ctx={c}": value for c in cfg.table1.contexts}}
                       for m in cfg.table1.methods])
    write_table(df, path, table="table1", what="test", cfg=cfg, config_files=[str(TINY)],
                paper_contexts=dict(zip((f"ctx={c}" for c in cfg.table1.contexts), cfg.table1.paper_contexts)))


def test_write_table_writes_the_csv_and_a_sidecar_with_the_base_fields(tmp_path):
    cfg = load_config(TINY)
    df = pd.DataFrame({"a": [1, 2]})
    prov = write_table(df, tmp_path / "t.csv", table="t", what="two numbers", cfg=cfg, config_files=["x.yaml"],
                       cells={"a": 1})
    assert pd.read_csv(tmp_path / "t.csv").equals(df)
    on_disk = json.loads(sidecar(tmp_path / "t.csv").read_text())
    assert on_disk == prov == read_provenance(tmp_path / "t.csv")
    for key in ("table", "what", "commit", "created", "machine", "profile", "config_digest", "config", "seeds",
                "config_files", "cells"):
        assert key in prov, key
    assert prov["config_digest"] == cfg.digest() and prov["profile"] == "tiny"
    assert prov["machine"]["cpus"] >= 1
    with pytest.raises(ValueError, match="base fields"):
        write_table(df, tmp_path / "u.csv", table="u", what="x", cfg=cfg, commit="fake")
    assert not (tmp_path / "u.csv").exists()


def test_the_digest_ignores_locations_and_follows_settings(tmp_path):
    base = load_config(TINY)
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump({"results_dir": "results/elsewhere", "vllm": {"python": "/x/python"}}))
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    assert config_digest(load_config(TINY, moved)) == base.digest()
    assert config_digest(load_config(TINY, changed)) != base.digest()
    assert load_config(ROOT / "config" / "paper.yaml").digest() != base.digest()


def test_tables_go_where_the_results_go(tmp_path):
    assert load_config(TINY).tables_path == "paper_tables"
    assert load_config(ROOT / "config" / "paper.yaml").tables_path == "paper_tables"
    over = tmp_path / "o.yaml"
    over.write_text(yaml.safe_dump({"results_dir": "results/exp"}))
    assert load_config(TINY, over).tables_path == "results/exp/paper_tables"
    over.write_text(yaml.safe_dump({"results_dir": "results/exp", "tables_dir": "tables/exp/"}))
    assert load_config(TINY, over).tables_path == "tables/exp"


def test_compare_marks_tables_current_or_stale(tmp_path):
    cfg = load_config(TINY)
    _table1(tmp_path / "table1.csv", cfg)
    assert provenance_line(tmp_path / "table1.csv", cfg.digest()).endswith("-> current.")
    assert "STALE" in provenance_line(tmp_path / "table1.csv", "0" * 16)
    (tmp_path / "table9.csv").write_text("target,eval_set,eagle3,peagle\nt,mt_bench,2.0,2.5\n")
    assert "none" in provenance_line(tmp_path / "table9.csv", cfg.digest())
    old = json.loads(sidecar(tmp_path / "table1.csv").read_text())
    del old["config_digest"]
    (tmp_path / "old.provenance.json").write_text(json.dumps(old))
    (tmp_path / "old.csv").write_text("a\n1\n")
    assert "predates digests" in provenance_line(tmp_path / "old.csv", cfg.digest())
    report = compare_tables(tmp_path, current_digest=cfg.digest())
    assert "## Table 1" in report and "-> current." in report


def _fake_run(tmp_path: Path, cfg) -> tuple[Path, Path]:
    tables, bench = tmp_path / "paper_tables", tmp_path / "bench"
    _table1(tables / "table1.csv", cfg)
    (tables / "figures").mkdir(parents=True)
    (tables / "figures" / "fig1_lengths.png").write_bytes(b"\x89PNG fake")
    for stage, name, s in (("train", "a", 10.0), ("train", "b", 5.5), ("evaluate", "a", 2.0)):
        (bench / stage).mkdir(parents=True, exist_ok=True)
        (bench / stage / f"{name}.tsv").write_text(f"s\th:m:s\tmax_rss\n{s}\t0:00:10\t100\n")
    (bench / "data.tsv").write_text("s\th:m:s\n1.5\t0:00:01\n")
    return tables, bench


def test_stage_wall_times_sum_the_benchmark_files(tmp_path):
    _, bench = _fake_run(tmp_path, load_config(TINY))
    times = stage_wall_times(bench)
    assert times["train"] == {"jobs": 2, "s": 15.5, "max_s": 10.0}
    assert times["evaluate"]["s"] == 2.0 and times["data"]["jobs"] == 1


def test_record_keeps_older_tables_and_lists_every_file(tmp_path):
    cfg = load_config(TINY)
    tables, bench = _fake_run(tmp_path, cfg)
    out = tmp_path / "recorded"
    out.mkdir()
    (out / "table2.csv").write_text("method,epoch_s\npeagle,1\n")  # an earlier recording, no digest
    manifest = record_run(cfg, tables, bench, out, [str(TINY)], wall_s=123.0)
    assert manifest["config_digest"] == cfg.digest() and manifest["wall_time_s"] == 123.0
    assert manifest["stage_time_total_s"] == 19.0
    assert set(manifest["files"]) >= {"table1.csv", "table1.provenance.json", "table2.csv", "comparison.md",
                                      "figures/fig1_lengths.png"}
    assert manifest["files"]["table1.csv"]["config_digest"] == cfg.digest()
    assert manifest["current_tables"] == ["table1.csv"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    report = (out / "comparison.md").read_text()
    assert "Recorded run: profile tiny" in report and "-> current." in report
    assert "table2" in report and "Provenance: none" in report


def test_record_refuses_tables_made_with_other_settings(tmp_path):
    cfg = load_config(TINY)
    tables, bench = _fake_run(tmp_path, cfg)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"seed": 7}))
    with pytest.raises(RecordError, match="config digest"):
        record_run(load_config(TINY, other), tables, bench, tmp_path / "rec", [str(TINY), str(other)])
    with pytest.raises(RecordError, match="no tables"):
        record_run(cfg, tmp_path / "empty", bench, tmp_path / "rec", [str(TINY)])
    assert not (tmp_path / "rec" / "manifest.json").exists()
