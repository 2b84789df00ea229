"""``peagle plan``: exact counts from the config, stated rates, the log-normal length model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peagle.config import load_config
from peagle.plan import Lengths, PlanError, capped_mean, format_plan, hidden_bytes_per_token, load_rates, plan_profile

ROOT = Path(__file__).resolve().parents[1]
RATES = ROOT / "config" / "rates.yaml"


def test_capped_lognormal_mean_matches_a_large_sample():
    lengths = Lengths.from_entry({"median": 3891, "p90": 10800}, "test")
    assert math.exp(lengths.mu) == pytest.approx(3891)
    assert math.exp(lengths.mu + 1.2815515655446004 * lengths.sigma) == pytest.approx(10800)
    g = torch.Generator().manual_seed(0)
    x = torch.exp(lengths.mu + lengths.sigma * torch.randn(2_000_000, generator=g, dtype=torch.float64))
    for cap in (1024, 8192, 20480):
        assert lengths.capped_mean(cap) == pytest.approx(float(x.clamp(max=cap).mean()), rel=2e-3), cap
    assert capped_mean(lengths.mu, lengths.sigma, None) == pytest.approx(float(x.mean()), rel=1e-2)
    assert capped_mean(lengths.mu, lengths.sigma, 1.0) == pytest.approx(1.0, rel=1e-6)
    assert Lengths(mean=245).capped_mean(128) == 128 and Lengths(mean=245).capped_mean(None) == 245


def test_hidden_bytes_per_token_at_gpt_oss_width():
    # Three aux layers and the final state at H=2880 in bf16: 23,040 bytes of hidden values,
    # plus the token id and the loss mask.
    assert hidden_bytes_per_token(2880, 3, "bfloat16") == 4 * 2880 * 2 + 9 == 23_049


def test_paper_plan_counts_what_the_config_fixes():
    cfg = load_config(ROOT / "config" / "paper.yaml")
    rates = load_rates(RATES, "paper")
    plans = {(p.stage, p.target): p for p in plan_profile(cfg, rates)}
    resp = Lengths.from_entry(rates["lengths"]["response_tokens"], "").capped_mean(cfg.respond.max_new_tokens)
    prompt = rates["lengths"]["prompt_tokens"]["mean"]
    n = cfg.data.n_train
    ext = plans["extract", "gpt-oss-120b"]
    assert ext.tokens == pytest.approx(n * (prompt + resp))
    assert ext.disk_bytes == pytest.approx(ext.tokens * 23_049) and ext.disk_bytes > 10e12  # tens of TB
    assert plans["respond", "gpt-oss-20b"].tokens == pytest.approx(n * resp)
    # Table 1 (12 cells) on the 120B target plus Table 9's EAGLE-3 cell at 8K; the other targets Table 9 alone.
    assert plans["train", "gpt-oss-120b"].jobs == 13 and plans["train", "gpt-oss-20b"].jobs == 2
    # Table 9's P-EAGLE on MT-Bench at 8K is one of Table 1's evaluations: 12 + 6 - 1.
    assert plans["evaluate", "gpt-oss-120b"].jobs == 17
    # The full evaluation sets (data.n_eval: null): MT-Bench 80, HumanEval 164, GSM8K 1,319.
    assert plans["evaluate", "gpt-oss-20b"].tokens == 2 * (80 + 164 + 1319) * cfg.eval.max_new_tokens
    # GPU-hours = hours x the GPUs the jobs hold side by side: the extraction of the 120B target is
    # sharded over 8; its regeneration runs respond.parts (8) such jobs at once.
    assert plans["extract", "gpt-oss-120b"].gpu_hours == pytest.approx(8 * plans["extract", "gpt-oss-120b"].hours)
    respond = plans["respond", "gpt-oss-120b"]
    assert respond.jobs == cfg.respond.parts == 8 and respond.gpu_hours == pytest.approx(64 * respond.hours)
    text = format_plan(cfg, list(plans.values()), rates, gpus=8)
    assert "GPU-hours" in text and "paper, Figure 1" in text and "estimate:" in text


def test_tiny_plan_runs_on_cpu_without_gpu_hours():
    cfg = load_config(ROOT / "config" / "tiny.yaml")
    plans = plan_profile(cfg, load_rates(RATES, "tiny"))
    assert all(p.gpu_hours is None and p.hours > 0 for p in plans)
    assert "min on this machine" in format_plan(cfg, plans, load_rates(RATES, "tiny"), gpus=8)


def test_missing_rates_are_clear_errors(tmp_path):
    bad = tmp_path / "rates.yaml"
    bad.write_text("paper: {lengths: {prompt_tokens: {mean: 10}}}\n")
    with pytest.raises(PlanError, match=r"no section for profile 'tiny'"):
        load_rates(bad, "tiny")
    with pytest.raises(PlanError, match=r"lengths needs prompt_tokens and response_tokens"):
        plan_profile(load_config(ROOT / "config" / "paper.yaml"), load_rates(bad, "paper"), where=str(bad))
    with pytest.raises(PlanError, match=r"median < p90"):
        Lengths.from_entry({"median": 10, "p90": 5}, "x")
    proc = subprocess.run([sys.executable, "-m", "peagle", "plan", "--config", str(ROOT / "config" / "tiny.yaml"),
                           "--rates", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "no section for profile 'tiny'" in proc.stderr
