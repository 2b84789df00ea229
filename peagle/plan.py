"""What a profile will cost before it runs: tokens, GPU-hours, wall time and disk per stage.

``peagle plan`` multiplies what the config fixes exactly (how many prompts are regenerated, the
hidden-state width, dtype and layers stored per token, the training cells of Tables 1 and 9 with
their contexts, epochs and seeds, the evaluations) by what it cannot know: sequence lengths and
throughputs, read from ``config/rates.yaml`` where each carries its source (measured here,
measured on a GPU, the paper, or an estimate). The report prints every assumption beside the
figures it drives, so a user sees before starting that the offline hidden states of a paper
target take tens of terabytes.

Response lengths given as a median and a P90 are modelled as a log-normal through those two
quantiles, capped at ``respond.max_new_tokens``; training sequences are capped at the cell's
context. Means of capped log-normal lengths are exact (closed form of the truncated
log-normal), not sampled; a length given only as a mean is capped as min(mean, cap), an
overestimate of the capped mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peagle.config import Config

__all__ = ["Lengths", "StagePlan", "capped_mean", "hidden_bytes_per_token", "plan_profile", "format_plan",
           "load_rates", "PlanError"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Per stored token besides the hidden states: input id (int64) and loss mask (uint8).
ID_MASK_BYTES = 8 + 1
_Z90 = 1.2815515655446004  # standard normal quantile at 0.9


class PlanError(ValueError):
    """The rates file lacks what the profile needs (names the file and key)."""


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True)
class Lengths:
    """A length distribution: a fixed mean, or a log-normal (``mu``, ``sigma`` of log length)."""

    mean: float | None = None
    mu: float | None = None
    sigma: float | None = None

    @classmethod
    def from_entry(cls, entry: dict[str, Any], where: str) -> "Lengths":
        if "mean" in entry:
            return cls(mean=float(entry["mean"]))
        if "median" in entry and "p90" in entry:
            med, p90 = float(entry["median"]), float(entry["p90"])
            if not 0 < med < p90:
                raise PlanError(f"{where}: needs 0 < median < p90, got {med} and {p90}")
            return cls(mu=math.log(med), sigma=(math.log(p90) - math.log(med)) / _Z90)
        raise PlanError(f"{where}: give `mean`, or `median` and `p90`")

    def capped_mean(self, cap: float | None) -> float:
        """E[min(X, cap)] (cap None: E[X])."""
        if self.mean is not None:
            return self.mean if cap is None else min(self.mean, cap)
        return capped_mean(self.mu, self.sigma, cap)


def capped_mean(mu: float, sigma: float, cap: float | None) -> float:
    """E[min(X, c)] for log X ~ N(mu, sigma^2): E[X; X < c] + c P(X >= c)."""
    full = math.exp(mu + sigma * sigma / 2)
    if cap is None:
        return full
    z = (math.log(cap) - mu) / sigma
    return full * _phi(z - sigma) + cap * (1.0 - _phi(z))


def hidden_bytes_per_token(hidden_size: int, aux_layers: int, dtype: str) -> int:
    """Bytes one token takes in the hidden-state store: aux layers + the final state, id and mask."""
    return (aux_layers + 1) * hidden_size * DTYPE_BYTES[dtype] + ID_MASK_BYTES


@dataclass(frozen=True)
class StagePlan:
    """One stage for one target: jobs, tokens through it, GPU-hours, disk it writes."""

    stage: str
    target: str
    jobs: int
    tokens: float
    hours: float  # the stage's jobs one after another
    gpu_hours: float | None  # hours x the GPUs a job holds (None on CPU)
    disk_bytes: float
    rate: str  # the rate used and its source


def load_rates(path: str | Path, profile: str) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise PlanError(f"{path} not found; `peagle plan --rates <file>` names the rates file")
    data = yaml.safe_load(path.read_text()) or {}
    if profile not in data:
        raise PlanError(f"{path}: no section for profile {profile!r} (sections: {', '.join(data) or 'none'}); "
                        f"add its lengths and rates")
    return data[profile]


def _rate(rates: dict[str, Any], key: str, target: str, gpus: int, where: str) -> tuple[float, str]:
    """Tokens/s of one job of ``gpus`` GPUs (a ``<key>_per_gpu`` rate times ``gpus``), and its description."""
    if key in rates:
        entry, scale = rates[key], 1
    elif f"{key}_per_gpu" in rates:
        entry, scale = rates[f"{key}_per_gpu"], gpus
        if "value" not in entry:  # per target
            if target not in entry:
                raise PlanError(f"{where}: rates.{key}_per_gpu has no entry for target {target!r}")
            entry = entry[target]
    else:
        raise PlanError(f"{where}: rates has no {key} (or {key}_per_gpu)")
    value = float(entry["value"]) * scale
    per = f" x {gpus} GPUs" if scale > 1 else ""
    return value, f"{entry['value']:,} tok/s{per} ({entry.get('source', 'no source given')})"


def plan_profile(cfg: Config, rates: dict[str, Any], *, where: str = "config/rates.yaml") -> list[StagePlan]:
    """Every stage of the profile's DAG (Tables 1 and 9, their evaluations, the ablations' training), per target."""
    lengths = rates.get("lengths", {})
    r = rates.get("rates", {})
    if "prompt_tokens" not in lengths or "response_tokens" not in lengths:
        raise PlanError(f"{where}: {cfg.profile}.lengths needs prompt_tokens and response_tokens")
    prompt = Lengths.from_entry(lengths["prompt_tokens"], f"{where}: {cfg.profile}.lengths.prompt_tokens")
    response = Lengths.from_entry(lengths["response_tokens"], f"{where}: {cfg.profile}.lengths.response_tokens")
    n_seq = cfg.respond.n_prompts or cfg.data.n_train
    resp_mean = response.capped_mean(cfg.respond.max_new_tokens)
    prompt_mean = prompt.capped_mean(None)
    gpu = cfg.runtime.device.startswith("cuda")

    def seq_mean(ctx: int) -> float:
        # Sequences are prompt + response; a training context cuts the response (prompts are short).
        return prompt_mean + response.capped_mean(min(max(ctx - prompt_mean, 0.0), cfg.respond.max_new_tokens))

    from peagle.ablations import plan_ablations, run_config, unique_runs
    from peagle.config import config_from_dict

    try:
        ablation_runs = unique_runs(plan_ablations(cfg, config_from_dict))
    except ValueError:  # ablations this config cannot run (the DAG refuses them with the reason)
        ablation_runs = []
    plans: list[StagePlan] = []
    table9_targets = cfg.table9.targets or [t.name for t in cfg.targets]
    for tc in cfg.targets:
        devices = tc.num_devices if gpu else 1
        def stage(name: str, jobs: int, tokens: float, key: str, gpus: int, disk: float = 0.0,
                  note: str = "") -> None:
            if not jobs:  # nothing of this stage for this target
                return
            rate, desc = _rate(r, key, tc.name, gpus, where)
            hours = tokens / rate / 3600
            plans.append(StagePlan(name, tc.name, jobs, tokens, hours, hours * gpus if gpu else None, disk,
                                   desc + note))

        # respond.parts jobs side by side, each on its own devices.
        parts = cfg.respond.parts
        stage("respond", parts, n_seq * resp_mean, "respond_tokens_per_s", devices * parts if gpu else 1,
              note=f"; {parts} parts in parallel" if parts > 1 else "")
        online = cfg.train.hidden_source == "online"
        if not online:
            tokens = n_seq * (prompt_mean + resp_mean)
            bpt = hidden_bytes_per_token(tc.hidden_size, len(tc.aux_layer_ids), cfg.hidden.dtype)
            stage("extract", 1, tokens, "extract_tokens_per_s", devices, tokens * bpt, f"; {bpt:,} bytes/token stored")
        # The DAG's training cells and evaluations, each once (Table 9's P-EAGLE cell at its
        # context may be one of Table 1's).
        table1 = tc.name == (cfg.table1.target or cfg.target.name)
        cells = {(m, c) for m in cfg.table1.methods for c in cfg.table1.contexts} if table1 else set()
        evals = {(m, c, cfg.table1.eval_set) for m, c in cells}
        if tc.name in table9_targets:
            cells |= {(m, cfg.table9.ctx) for m in cfg.table9.methods}
            evals |= {(m, cfg.table9.ctx, s) for m in cfg.table9.methods for s in cfg.table9.eval_sets}
        seeds = len(cfg.train.seeds)
        tokens = sum(n_seq * seq_mean(c) for _, c in cells) * cfg.train.epochs * seeds
        stage("train", len(cells) * seeds, tokens, "train_tokens_per_s", 1,
              note=f"; {len(cells)} cells x {seeds} seeds x {cfg.train.epochs} epochs")
        # The ablation runs (Tables 3-8) that are not main-DAG cells, each at its own context and epochs.
        runs = [(run, run_config(cfg, run, config_from_dict)) for run in ablation_runs
                if run.target == tc.name and not (run.profile_settings and (run.method, run.ctx) in cells)]
        if runs:
            ab_tokens = sum(n_seq * seq_mean(run.ctx) * rc.train.epochs * seeds for run, rc in runs)
            stage("train: ablations", len(runs) * seeds, ab_tokens, "train_tokens_per_s", 1,
                  note=f"; {len(runs)} runs x {seeds} seeds, Tables 3-8")
            tokens += ab_tokens
        if online:  # no store: every sequence a training run reads costs a target forward
            stage("train: online target forwards", len(cells) * seeds, tokens, "extract_tokens_per_s", devices,
                  note="; train.hidden_source online, at the extraction rate")
        prompts = sum(_eval_prompts(cfg, s) for _, _, s in evals) * seeds
        stage("evaluate", len(evals) * seeds, prompts * cfg.eval.max_new_tokens, "eval_tokens_per_s", devices,
              note=f"; {len(evals) * seeds} evaluations, {prompts:,} prompts x {cfg.eval.max_new_tokens} tokens")
    return plans


def _eval_prompts(cfg: Config, eval_set: str) -> int:
    """Prompts one evaluation of ``eval_set`` decodes: eval.n_prompts, capped by the set's size."""
    from peagle.data.hf import FULL_EVAL_SIZES

    size = cfg.data.n_eval if cfg.data.n_eval is not None else FULL_EVAL_SIZES[eval_set]
    return min(size, cfg.eval.n_prompts) if cfg.eval.n_prompts is not None else size


def _si(x: float, unit: str) -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def format_plan(cfg: Config, plans: list[StagePlan], rates: dict[str, Any], gpus: int) -> str:
    """A markdown report: one row per stage and target, totals, and the assumptions behind them."""
    gpu = cfg.runtime.device.startswith("cuda")
    lines = [f"# Plan for profile `{cfg.profile}` (config digest {cfg.digest()})", "",
             "| stage | target | jobs | tokens | hours | GPU-hours | disk |", "|---|---|---|---|---|---|---|"]
    for p in plans:
        gh = "-" if p.gpu_hours is None else f"{p.gpu_hours:,.1f}"
        lines.append(f"| {p.stage} | {p.target} | {p.jobs} | {_si(p.tokens, '')} | {p.hours:,.2f} | {gh} | "
                     f"{_si(p.disk_bytes, 'B') if p.disk_bytes else '-'} |")
    disk = _si(sum(p.disk_bytes for p in plans), "B")
    lines.append("")
    if gpu:
        total = sum(p.gpu_hours or 0.0 for p in plans)
        lines.append(f"**Total**: {total:,.0f} GPU-hours ({total / gpus / 24:,.1f} days on {gpus} GPUs if every "
                     f"stage kept them all busy); "
                     + ("no hidden-state store (online mode)." if cfg.train.hidden_source == "online" else
                        f"hidden-state store {disk} in offline mode (train.hidden_source online: none)."))
    else:
        total = sum(p.hours for p in plans)
        lines.append(f"**Total**: about {total * 60:,.0f} min on this machine, one job at a time; hidden-state "
                     f"store {disk}.")
    lines += ["", "Assumptions (config/rates.yaml unless --rates):", ""]
    for key, entry in rates.get("lengths", {}).items():
        shown = ", ".join(f"{k} {v:,}" for k, v in entry.items() if k != "source")
        lines.append(f"- {key}: {shown} ({entry.get('source', 'no source given')})")
    lines += [f"- {p.stage} / {p.target}: {p.rate}" for p in plans]
    return "\n".join(lines) + "\n"
