"""The training-recipe ablations (paper Tables 3-8): which training runs each table needs.

A group of ``cfg.ablations`` is a chain of tables on one target and method. Row r of table i
trains with the profile's settings, then the group's ``base``, then every earlier table's carried
(``then``) value, then its own value of the table's setting. A run is addressed by the digest of
what shapes its training (the target, the method, the context and the effective drafter, train
and method sections), however the settings were spelt: a run two tables share (Table 4's 4-layer
row is Table 7's first) is trained once, and a run whose settings are the profile's own is the
main DAG's run of that cell (Tables 1 and 9 reuse it). Nothing here imports ``peagle.config``:
the caller passes its ``config_from_dict`` as ``build``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

Scalar = bool | int | float | str


class AblationError(ValueError):
    """An ablation row that cannot train or be evaluated as asked; names the config key."""


@dataclass(frozen=True)
class AblationRun:
    """One training run of an ablation (one per seed in the DAG)."""

    target: str
    method: str
    ctx: int
    overrides: tuple[tuple[str, Scalar], ...]  # dotted keys whose values differ from the profile's
    digest: str  # 12 hex digits of the settings that shape the run

    @property
    def profile_settings(self) -> bool:
        """True when the run trains with the profile's own settings (then it is a main-DAG cell)."""
        return not self.overrides


@dataclass(frozen=True)
class AblationRow:
    label: str  # the table's row label, e.g. "drafter.num_layers=2"
    value: Scalar
    paper: str | None  # the paper's setting this row stands for (paper_numbers.csv spelling)
    run: AblationRun


@dataclass(frozen=True)
class AblationTablePlan:
    name: str
    group: str
    setting: str
    target: str
    method: str
    ctx: int
    k: int
    eval_sets: list[str]
    scale: str
    rows: list[AblationRow]
    carried: dict[str, Scalar]  # what the table's rows share: base + the earlier tables' carried values


def _set(d: dict[str, Any], key: str, value: Scalar) -> None:
    *parents, leaf = key.split(".")
    node = d
    for part in parents:
        node = node[part]
    node[leaf] = value


def _get(d: dict[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        node = node[part]
    return node


def _label(setting: str, value: Scalar) -> str:
    return f"{setting}={json.dumps(value) if isinstance(value, bool) else value}"


def _digest(target: str, method: str, ctx: int, d: dict[str, Any]) -> str:
    train = {k: v for k, v in d["train"].items() if k != "seeds"}  # the seed is the run's own wildcard
    shape = {"target": target, "method": method, "ctx": ctx, "drafter": d["drafter"], "train": train,
             "method_settings": d["methods"][method]}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def plan_ablations(cfg: Any, build: Callable[[dict[str, Any]], Any]) -> dict[str, AblationTablePlan]:
    """Every ablation table of ``cfg`` with its rows and their runs, in the profile's order.

    ``build``: ``peagle.config.config_from_dict``; each row's config is built with it, so a value
    that config validation refuses (``drafter.num_layers: 0``, an unknown ``hidden_variant``)
    fails here, naming the row. A table evaluated at a K above a row's trained K fails too.
    """
    base_raw = cfg.to_dict()
    base_raw["ablations"] = {}
    plans: dict[str, AblationTablePlan] = {}
    for gname, group in cfg.ablations.items():
        target = group.target or cfg.target.name
        ctx0 = group.ctx or cfg.table9.ctx
        carried: dict[str, Scalar] = dict(group.base)
        for tname, table in group.tables.items():
            where = f"ablations.{gname}.tables.{tname}"
            rows = []
            for i, value in enumerate(table.rows):
                settings = {**carried, table.setting: value}
                ctx = int(settings.pop("ctx", ctx0))
                if ctx < 3:
                    raise AblationError(f"{where}.rows[{i}]: ctx {ctx} is too short (need >= 3 tokens)")
                raw = copy.deepcopy(base_raw)
                for key, v in settings.items():
                    _set(raw, key, v)
                try:
                    run_cfg = build(raw)
                except ValueError as err:
                    raise AblationError(f"{where}.rows[{i}] ({_label(table.setting, value)}): {err}") from None
                eff = run_cfg.to_dict()
                overrides = tuple(sorted((k, _get(eff, k)) for k in settings if _get(eff, k) != _get(base_raw, k)))
                m = run_cfg.methods[group.method]
                if m.parallel and group.k > run_cfg.train.k_train:
                    raise AblationError(f"ablations.{gname}.k: K_infer={group.k} exceeds the {run_cfg.train.k_train} "
                                        f"depths that {where} row {_label(table.setting, value)} trains "
                                        "(train.k_train); evaluate at a smaller k or train a larger k_train")
                run = AblationRun(target, group.method, ctx, overrides, _digest(target, group.method, ctx, eff))
                paper = table.paper[i] if i < len(table.paper) else None
                rows.append(AblationRow(_label(table.setting, value), value, paper, run))
            plans[tname] = AblationTablePlan(tname, gname, table.setting, target, group.method, ctx0, group.k,
                                             list(group.eval_sets), group.scale, rows, dict(carried))
            carried[table.setting] = table.carried
    return plans


def run_config(cfg: Any, run: AblationRun, build: Callable[[dict[str, Any]], Any]) -> Any:
    """``cfg`` with ``run``'s overrides (its training config; ``ablations`` left out)."""
    raw = cfg.to_dict()
    raw["ablations"] = {}
    for key, value in run.overrides:
        _set(raw, key, value)
    return build(raw)


def find_run(plans: dict[str, AblationTablePlan], target: str, digest: str) -> AblationRun:
    """The run of ``target`` with this digest (the DAG's ``{run}`` wildcard)."""
    for plan in plans.values():
        for row in plan.rows:
            if row.run.digest == digest and row.run.target == target:
                return row.run
    raise AblationError(f"no ablation run {digest} for target {target!r} in this config; the ablation settings "
                        "changed since the DAG planned it: re-run snakemake")


def unique_runs(plans: dict[str, AblationTablePlan]) -> list[AblationRun]:
    """Every distinct run of every table, first appearance first."""
    seen: dict[tuple[str, str], AblationRun] = {}
    for plan in plans.values():
        for row in plan.rows:
            seen.setdefault((row.run.target, row.run.digest), row.run)
    return list(seen.values())
