"""Figure 1: length distribution of a target's regenerated training data (PNG, PDF, CSV)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peagle.cli import main
from peagle.figures import FIG1_STATS, length_stats, plot_fig1, read_sequence_lengths

ROOT = Path(__file__).resolve().parents[1]


def _responses(path: Path, lengths: list[tuple[int, int]]) -> Path:
    with path.open("w") as f:
        for i, (p, r) in enumerate(lengths):
            f.write(json.dumps({"id": f"s{i}", "prompt_ids": list(range(p)), "response_ids": [7] * r}) + "\n")
        f.write("\n")  # blank lines are skipped
    return path


def test_stats_and_files(tmp_path):
    # Totals 1..100 (prompt 1 + response 0..99): median 50.5, P90 90.1, P99 99.01 (linear interpolation).
    resp = _responses(tmp_path / "train.jsonl", [(1, r) for r in range(100)])
    assert read_sequence_lengths(resp).tolist() == list(range(1, 101))
    paths = plot_fig1(resp, tmp_path / "figs" / "fig1_lengths", label="tiny-llama", contexts=[32, 64])
    assert [p.name for p in paths] == ["fig1_lengths.png", "fig1_lengths.pdf", "fig1_lengths.csv"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    row = pd.read_csv(paths[2]).iloc[0]
    want = {"n": 100, "mean": 50.5, "median": 50.5, "p90": 90.1, "p99": 99.01, "max": 100}
    for key in FIG1_STATS:
        assert row[key] == pytest.approx(want[key])
    assert row["target"] == "tiny-llama" and row["responses"] == str(resp)
    assert row["share_over_32"] == pytest.approx(0.68) and row["share_over_64"] == pytest.approx(0.36)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_length_stats_matches_numpy():
    x = np.random.default_rng(0).integers(10, 5000, size=777)
    s = length_stats(x)
    assert s["n"] == 777 and s["max"] == x.max() and s["mean"] == pytest.approx(x.mean())
    assert [s["median"], s["p90"], s["p99"]] == pytest.approx(np.percentile(x, [50, 90, 99]).tolist())


def test_bad_record_names_file_and_line(tmp_path):
    bad = tmp_path / "r.jsonl"
    good = json.dumps({"id": "a", "prompt_ids": [1], "response_ids": [2]})
    bad.write_text(good + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not a responses record"):
        read_sequence_lengths(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no sequences"):
        read_sequence_lengths(tmp_path / "empty.jsonl")


def test_cli_fig1(tmp_path):
    resp = _responses(tmp_path / "train.jsonl", [(5, 10), (7, 40), (3, 300)])
    out = tmp_path / "fig1"
    assert main(["fig1", "--config", str(ROOT / "config" / "tiny.yaml"), "--responses", str(resp),
                 "--out", str(out), "--target-name", "tiny-llama"]) == 0
    df = pd.read_csv(out.with_suffix(".csv"))
    assert df.loc[0, "max"] == 303 and df.loc[0, "n"] == 3
    # Default markers: table1.contexts of the profile (64, 128, 256, 640).
    assert [c for c in df.columns if c.startswith("share_over_")] == [
        "share_over_64", "share_over_128", "share_over_256", "share_over_640"]
    assert main(["fig1", "--config", str(ROOT / "config" / "tiny.yaml"), "--responses", str(resp),
                 "--out", str(out), "--contexts"]) == 0
    assert not any(c.startswith("share_over_") for c in pd.read_csv(out.with_suffix(".csv")).columns)
