"""``peagle`` command line: one subcommand per pipeline stage (see docs/ARCHITECTURE.md).

Heavy libraries (torch, transformers, datasets) are imported inside the commands that need them,
so ``peagle --help`` and config validation stay instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


DEFAULT_PROFILE = "config/tiny.yaml"


def _log(msg: str) -> None:
    print(f"[peagle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _config(args):
    from peagle.config import load_config

    return load_config(*args.config)


def _threads(cfg) -> None:
    import torch

    torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(cfg.seed)


# --------------------------------------------------------------------------- stages


def cmd_data(args) -> None:
    cfg = _config(args)
    if cfg.data.source == "synthetic":
        from peagle.data.tiny import make_tiny_data

        manifest = make_tiny_data(args.out_dir, seed=cfg.seed, n_train=cfg.data.n_train, n_eval=cfg.data.n_eval,
                                  max_rules=cfg.data.list_max_rules, max_items=cfg.data.list_max_items,
                                  walkthrough=cfg.data.list_walkthrough)
    else:
        from peagle.data.hf import make_hf_data

        manifest = make_hf_data(args.out_dir, n_train=cfg.data.n_train, n_eval=cfg.data.n_eval,
                                train_datasets=cfg.data.train_datasets, data_files=cfg.data.data_files,
                                seed=cfg.seed, log=_log)
    _log(f"data written to {args.out_dir}: {json.dumps({k: v for k, v in manifest.items() if 'count' in k})}")


def cmd_target(args) -> None:
    cfg = _config(args)
    tc = cfg.target_named(args.name) if args.name else cfg.target
    out = Path(args.out_dir)
    if tc.kind == "hf":
        from peagle.target import DEFAULT_CHAT_DATE, check_hf_target, resolve_hf_target

        # Settings checked against the model's config where it can be read (cache/network)
        # before anything long runs: attention implementation, aux ids, the device plan.
        check_hf_target(tc, dtype=cfg.runtime.dtype, log=_log)
        resolve_hf_target(tc.path, out / "target.json", num_layers=tc.num_layers, hidden_size=tc.hidden_size,
                          vocab_size=tc.vocab_size, aux_layer_ids=tc.aux_layer_ids,
                          mask_token_id=tc.mask_token_id, eos_token_id=tc.eos_token_id, name=tc.name,
                          max_position_embeddings=tc.max_position_embeddings, architecture=tc.architecture,
                          attn_implementation=tc.attn_implementation, num_devices=tc.num_devices,
                          max_memory_gib=tc.max_memory_gib, chat_template_date=DEFAULT_CHAT_DATE)
        _log(f"target {tc.path} recorded in {out / 'target.json'}")
        return
    _threads(cfg)
    data = Path(args.data_dir)
    if args.record and not tc.recorded_dir:
        raise SystemExit(f"peagle target --record: target {tc.name!r} has no target.recorded_dir; "
                         "set it in the profile (config/tiny.yaml: results/recorded/tiny/targets)")
    key, record_dir = None, Path(tc.recorded_dir or ".") / tc.name
    if tc.recorded_dir:
        from peagle.target.recorded import record_key, reuse_recorded

        key = record_key(tc, cfg.seed, json.loads((data / "manifest.json").read_text()))
        if not args.record:
            reused, why = reuse_recorded(record_dir, out, key)
            _log(why)
            if reused:
                return
    from peagle.target.tiny import pretrain_configured_target

    _log(f"tiny target {tc.name} ({tc.architecture}): pretraining {tc.pretrain.steps} steps")
    info = pretrain_configured_target(tc, cfg.seed, data, out, heldout_sets=cfg.eval.sets,
                                      num_threads=cfg.runtime.threads)
    if info["vocab_size"] != tc.vocab_size:
        _log(f"note: tokenizer has {info['vocab_size']} entries; the model's vocabulary is target.vocab_size={tc.vocab_size}")
    _log(f"tiny target: {info['num_parameters'] / 1e6:.2f}M parameters; "
         f"held-out next-token accuracy {info['heldout_next_token_accuracy']:.4f}")
    if args.record:
        from peagle.provenance import git_commit
        from peagle.target.recorded import record_target

        command = "python -m peagle " + " ".join(sys.argv[1:])
        record_target(out, record_dir, key, commit=git_commit(), command=command)
        _log(f"recorded {tc.name} in {record_dir}")


def _greedy_backend(cfg, target_json: str):
    """The profile's regeneration backend for a target: ``(generator, tokenizer)``."""
    if cfg.respond.backend == "vllm":
        from transformers import AutoTokenizer

        from peagle.generate import VllmGreedy
        from peagle.target.hf import read_target_json, resolve_model_path
        from peagle.vllm_bench import VllmSettings

        where = resolve_model_path(target_json, read_target_json(target_json)["path"])
        tok = AutoTokenizer.from_pretrained(where)
        return VllmGreedy(where, tok, VllmSettings.from_config(cfg), cfg.runtime.device), tok
    from peagle.generate import HFGreedy
    from peagle.target import load_target

    model, tok, _ = load_target(target_json, device=cfg.runtime.device, dtype=cfg.runtime.dtype)
    return HFGreedy(model, tok, cfg.respond.batch_size), tok


def cmd_respond(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    from peagle.data.schema import read_prompts
    from peagle.generate import gather_parts, regenerate_part
    from peagle.io import atomic_write_json, sha256_file

    rc = cfg.respond
    records = read_prompts(args.prompts)
    if rc.n_prompts is not None:
        records = records[:rc.n_prompts]
    gen, tok = _greedy_backend(cfg, args.target)
    shard_dir = args.shard_dir or f"{args.out}.shards"
    parts = range(rc.parts) if args.part is None else [args.part]
    summaries = [regenerate_part(gen, tok, records, shard_dir, max_new_tokens=rc.max_new_tokens,
                                 shard_prompts=rc.shard_prompts, part=p, parts=rc.parts, max_turns=rc.max_turns,
                                 on_long_prompt=rc.on_long_prompt, target_sha256=sha256_file(args.target)) for p in parts]
    for s in summaries:
        _log(f"part {s['part'] + 1}/{s['parts']}: {len(s['shards'])} shards ({s['shards_reused']} reused), "
             f"{s['num_prompts']} conversations, {s['turns']} turns, {s['response_tokens']} response tokens, "
             f"{s['generated_tokens']} generated at {s['tokens_per_s']:.0f} tok/s")
    if args.part is None:  # the whole set in this process: the responses file itself
        _log(f"responses: {json.dumps(gather_parts(summaries, args.out))}")
    else:
        atomic_write_json(args.out, summaries[0])


def cmd_gather_responses(args) -> None:
    from peagle.generate import gather_parts
    from peagle.io import read_json

    stats = gather_parts([read_json(p, ValueError, fix="re-run the respond stage") for p in args.parts], args.out)
    _log(f"responses: {json.dumps(stats)}")


def cmd_extract(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    from peagle.hidden import extract_hidden_states
    from peagle.target import load_target, read_target_json

    hc = cfg.hidden
    if hc.backend == "vllm":
        from peagle.vllm_bench import VllmSettings
        from peagle.vllm_hidden import VllmStates

        info = read_target_json(args.target)
        states = VllmStates(args.target, info["aux_layer_ids"], VllmSettings.from_config(cfg), cfg.runtime.device,
                            batch=hc.batch, work_dir=f"{args.out_dir}/.vllm")
    else:
        states, _, info = load_target(args.target, device=cfg.runtime.device, dtype=cfg.runtime.dtype)
    manifest = extract_hidden_states(states, args.responses, info["aux_layer_ids"], args.out_dir, hc.shard_tokens,
                                     hc.dtype, info["path"], shard_mb=hc.shard_mb)
    _log(f"hidden states ({hc.backend}): {manifest['num_sequences']} sequences, {manifest['num_tokens']} tokens, "
         f"{manifest['num_bytes'] / 2**30:.2f} GiB in {len(manifest['shards'])} shards")


def _ablation_config(cfg, target: str, digest: str):
    """The training config of ablation run ``digest`` of ``target`` (peagle.ablations)."""
    from peagle.ablations import find_run, plan_ablations, run_config
    from peagle.config import config_from_dict

    run = find_run(plan_ablations(cfg, config_from_dict), target, digest)
    return run, run_config(cfg, run, config_from_dict)


def cmd_train(args) -> None:
    cfg = _config(args)
    if args.ablation_run:
        from peagle.target import read_target_json

        run, cfg = _ablation_config(cfg, read_target_json(args.target)["name"], args.ablation_run)
        if (run.method, run.ctx) != (args.method, args.ctx):
            raise ValueError(f"ablation run {run.digest} trains {run.method} at ctx {run.ctx}, not {args.method} at "
                             f"{args.ctx}; re-run snakemake")
    # One run, one seed (drafter init, COD sampling, data order): the run's config holds it alone.
    seed = cfg.train.seeds[0] if args.seed is None else args.seed
    cfg = cfg.for_seed(seed)
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: training needs at least 1 process")
    if not args.in_process and "LOCAL_RANK" not in os.environ:  # not one of torchrun's processes
        from peagle.supervise import supervise

        code = supervise(args.argv, args.nproc, cfg, args.target, args.method, args.ctx, args.out_dir, _log)
        if code:
            raise SystemExit(code)
        return
    _threads(cfg)
    from peagle.distributed import World
    from peagle.memory import is_oom
    from peagle.supervise import EXIT_OOM, record_oom
    from peagle.train import train_drafter

    try:
        summary = train_drafter(cfg, args.target, args.hidden_dir, args.method, args.ctx, args.out_dir, log=_log)
    except BaseException as err:  # noqa: BLE001 -- only out-of-memory is caught
        if not is_oom(err):
            raise
        traceback.print_exc()
        cuda = type(err).__name__ == "OutOfMemoryError"
        msg = (str(err).strip().splitlines() or [""])[-1][:400]
        record_oom(cfg, args.target, args.method, args.ctx, args.out_dir,
                   f"{'device' if cuda else 'host'} memory, outside the memory meter: {type(err).__name__}: {msg}",
                   device=cfg.runtime.device if cuda else "host")
        raise SystemExit(EXIT_OOM) from None  # torchrun stops the other processes; the supervisor succeeds
    finally:
        World.shutdown()  # torchrun's process group, if any
    if summary.get("status") == "OOM":
        _log(f"OUT OF MEMORY under train.memory_budget_mb={summary['budget_mb']}: {summary['error']} "
             f"(recorded in {args.out_dir}/summary.json)")
    elif summary.get("status") == "infeasible":
        _log(f"INFEASIBLE: projected epoch {summary['projected_epoch_s']:.0f} s > train.time_budget_s_per_epoch="
             f"{summary['time_budget_s_per_epoch']:.0f} s (recorded in {args.out_dir}/summary.json)")


def cmd_evaluate(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    from peagle.evaluate import evaluate_drafter
    from peagle.io import atomic_write_json

    result = evaluate_drafter(cfg, args.target, args.drafter, args.prompts, args.k, seed=args.seed, log=_log)
    atomic_write_json(args.out, result)


def cmd_table1(args) -> None:
    cfg = _config(args)
    from peagle.tables import write_table1

    df = write_table1(cfg, args.evals, args.benchmarks or [], args.out, config_files=args.config,
                      target_json=args.target)
    print(df.to_string(index=False))


def cmd_table2(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    from peagle.bench.table2 import write_table2

    df = write_table2(cfg, args.target, args.hidden_dir, args.out, config_files=args.config, log=_log)
    print(df.to_string(index=False))


def cmd_figures(args) -> None:
    cfg = _config(args)
    from peagle.figures import write_figures

    for path in write_figures(cfg, args.out_dir):
        _log(f"wrote {path}")


def cmd_fig1(args) -> None:
    cfg = _config(args)
    from peagle.figures import plot_fig1

    contexts = args.contexts if args.contexts is not None else list(cfg.table1.contexts)
    for path in plot_fig1(args.responses, args.out, label=args.target_name, contexts=contexts):
        _log(f"wrote {path}")


def cmd_memory_scaling(args) -> None:
    cfg = _config(args)
    from peagle.bench.memory import run_sweep

    from peagle.bench.memory import overrides

    run_sweep(cfg, args.out, config_files=args.config, device=args.device, hidden_size=args.hidden_size,
              budget_mb=args.budget_mb, figure=args.figure, timeout_s=args.timeout, **overrides(args), log=_log)


def cmd_ablation_table(args) -> None:
    cfg = _config(args)
    from peagle.tables import write_ablation_table

    df = write_ablation_table(cfg, args.table, args.evals, args.out, benchmarks=args.benchmarks or [],
                              config_files=args.config)
    _log(f"{args.table}: {len(df)} rows -> {args.out}")


def cmd_fig_alpha(args) -> None:
    from peagle.figures import plot_fig_alpha
    from peagle.tables import paper_numbers

    paper = paper_numbers()
    hit = paper[(paper["table"] == "figB") & (paper["metric"] == "alpha_final")]["value"]
    paths = plot_fig_alpha(args.runs, args.out, paper_final=float(hit.iloc[0]) if len(hit) else None)
    _log(f"Figure B -> {', '.join(map(str, paths))}")


def cmd_table9(args) -> None:
    cfg = _config(args)
    from peagle.tables import write_table9

    df = write_table9(cfg, args.evals, args.out, config_files=args.config)
    print(df.to_string(index=False))


def cmd_table10(args) -> None:
    cfg = _config(args)
    from peagle.tables import write_table10

    df = write_table10(cfg, args.results, args.out, config_files=args.config)
    print(df.to_string(index=False))


def cmd_drafting_cost(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    from peagle.bench.drafting_cost import write_drafting_cost

    dc = getattr(cfg, "drafting_cost", None)
    ks = args.ks or getattr(dc, "ks", None) or [3, 5, 7]
    n_prompts = args.n_prompts or getattr(dc, "n_prompts", None) or 8
    max_new = args.max_new_tokens or getattr(dc, "max_new_tokens", None) or cfg.eval.max_new_tokens
    df = write_drafting_cost(cfg, args.target, args.drafters, args.prompts, ks, n_prompts, max_new, args.out,
                             config_files=args.config, progress=not args.no_progress, log=_log)
    print(df.to_string(index=False))


def cmd_vllm_eval(args) -> None:
    cfg = _config(args)
    from peagle.io import atomic_write_json
    from peagle.vllm_bench import vllm_eval

    if args.drafter is not None and args.k is None:
        raise ValueError("--k is required with --drafter")
    result = vllm_eval(cfg, args.target, args.drafter, args.prompts, args.k, baseline=args.baseline,
                       engine_result=args.engine_result, work_dir=args.work_dir, log=_log)
    atomic_write_json(args.out, result)


def cmd_vllm_throughput(args) -> None:
    cfg = _config(args)
    from peagle.io import atomic_write_json
    from peagle.vllm_bench import vllm_throughput

    if args.drafter is not None and args.k is None:
        raise ValueError("--k is required with --drafter")
    result = vllm_throughput(cfg, args.target, args.drafter, args.prompts, args.k, work_dir=args.work_dir, log=_log)
    atomic_write_json(args.out, result)


def cmd_vllm_crosscheck(args) -> None:
    from peagle.vllm_bench import write_crosscheck

    df = write_crosscheck(args.results, args.out)
    print(df.to_string(index=False))


def cmd_plan(args) -> None:
    from peagle.config import load_config
    from peagle.io import atomic_write_text
    from peagle.plan import PlanError, format_plan, load_rates, plan_profile

    cfg = load_config(*(args.config or [DEFAULT_PROFILE]))
    try:
        rates = load_rates(args.rates, cfg.profile)
        text = format_plan(cfg, plan_profile(cfg, rates, where=args.rates), rates, args.gpus)
    except PlanError as err:
        raise SystemExit(f"peagle plan: {err}") from None
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
        _log(f"plan written to {args.out}")


def ablation_digests(cfg) -> dict[str, str]:
    """Each ablation table's digest of its rows' runs under ``cfg`` (what a current table carries)."""
    from peagle.tables import ablation_digest

    tables = [t for group in cfg.ablations.values() for t in group.tables]
    try:
        return {t: ablation_digest(cfg, t) for t in tables}
    except ValueError:  # rows this config cannot train: no table of it is current
        return {t: "(not trainable)" for t in tables}


def cmd_compare(args) -> None:
    from peagle.compare import compare_tables
    from peagle.config import load_config
    from peagle.io import atomic_write_text
    from peagle.record import recorded_dir

    from peagle.record import MANIFEST

    def made_by(tables_dir: Path, fallback):
        # Recorded tables are current when the config files that made them (a profile and its
        # overlays, e.g. config/tiny-seeds.yaml) still digest as they did.
        manifest = tables_dir / MANIFEST
        files = json.loads(manifest.read_text()).get("config_files") if manifest.exists() else None
        return load_config(*files) if files and all(Path(f).exists() for f in files) else fallback

    cfg = load_config(*(args.config or [DEFAULT_PROFILE]))
    tables_dir = Path(args.tables_dir or recorded_dir(cfg.profile))
    recorded = not args.config and not args.tables_dir
    if recorded:
        cfg = made_by(tables_dir, cfg)
    text = compare_tables(tables_dir, current_digest=cfg.digest(), only=args.tables,
                          ablation_digests=ablation_digests(cfg))
    ablations = tables_dir / "ablations"
    if recorded and ablations.is_dir():  # the recorded ablations, a run of their own (README "Ablations")
        acfg = made_by(ablations, cfg)
        text += "\n" + compare_tables(ablations, current_digest=acfg.digest(), ablation_digests=ablation_digests(acfg),
                                      only=[p.stem for p in sorted(ablations.glob("table*.csv"))])
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
        _log(f"comparison written to {args.out}")


def cmd_record(args) -> None:
    from peagle.config import load_config
    from peagle.record import record_run, recorded_dir

    files = args.config or [DEFAULT_PROFILE]
    cfg = load_config(*files)
    out = args.out or recorded_dir(cfg.profile)
    manifest = record_run(cfg, args.tables_dir or cfg.tables_path,
                          args.benchmarks_dir or f"{cfg.results_dir.rstrip('/')}/benchmarks", out, files,
                          wall_s=args.wall_s)
    _log(f"recorded {len(manifest['files'])} files of profile {cfg.profile} (commit {manifest['commit']}, "
         f"config digest {manifest['config_digest']}) in {out}")


def cmd_compare_drafter(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    from peagle.drafter_compare import compare_drafter

    out = compare_drafter(cfg, args.drafter, args.target, args.data_dir, args.recorded, args.out, name=args.name,
                          k=args.k, vllm=args.vllm, config_files=args.config, progress=not args.no_progress, log=_log)
    for note in out["notes"]:
        _log(f"note: {note}")
    _log(f"report written to {out['paths']['md']} (+ {out['paths']['csv']}, {out['paths']['png']})")


def cmd_target_quality(args) -> None:
    cfg = _config(args)
    _threads(cfg)
    import pandas as pd

    from peagle.provenance import write_table
    from peagle.target.quality import target_quality_rows

    sets = args.sets or list(cfg.eval.sets)
    rows = []
    for target in args.targets:
        rows += target_quality_rows(target, args.data_dir, sets, n_prompts=args.n_prompts or cfg.eval.n_prompts,
                                    max_new_tokens=cfg.respond.max_new_tokens,
                                    batch_size=cfg.respond.batch_size, device=cfg.runtime.device,
                                    dtype=cfg.runtime.dtype, log=_log)
    df = pd.DataFrame(rows)
    write_table(df, args.out, table="target_quality", cfg=cfg, config_files=args.config,
                what="greedy responses of each target to held-out prompts: 4-gram repetition and cap rate "
                     "beside the reference texts of the same role (pass: ratio <= 1.5, cap rate <= 10%)",
                targets=args.targets, sets=sets)
    print(df.to_string(index=False))


def cmd_concat_csv(args) -> None:
    from peagle.tables import concat_csv

    df = concat_csv(args.inputs, args.out, table=args.table)
    _log(f"{len(df)} rows from {len(args.inputs)} files written to {args.out}")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peagle", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_profile(sp, what):
        # Optional here (unlike the stages' --config): these commands default to the tiny profile.
        sp.add_argument("--config", action="append", help=f"profile YAML (+ overlays) {what} (default {DEFAULT_PROFILE})")

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", action="append", required=True,
                        help="profile YAML (repeat to deep-merge overlays in order)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("data", cmd_data, "make or load prompts: train.jsonl, eval_*.jsonl, manifest.json")
    sp.add_argument("--out-dir", required=True)
    sp = add("target", cmd_target, "build+pretrain the tiny target, or record the HF target")
    sp.add_argument("--name", help="which of the profile's targets (default: the main `target`)")
    sp.add_argument("--data-dir", required=True)
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--record", action="store_true",
                    help="pretrain afresh and record the result in target.recorded_dir/<name> (tiny targets)")
    sp = add("respond", cmd_respond, "regenerate training responses with the target (greedy, every turn)")
    sp.add_argument("--target", required=True)
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--out", required=True, help="the responses JSONL; with --part, that part's summary (JSON)")
    sp.add_argument("--part", type=int, help="generate only part PART of respond.parts (0-based); gather the "
                    "parts with `peagle gather-responses`")
    sp.add_argument("--shard-dir", help="where the resumable shards go (default: OUT.shards)")
    sp = add("gather-responses", cmd_gather_responses, "concatenate the respond parts' shards into the responses JSONL")
    sp.add_argument("--parts", nargs="+", required=True, help="every part's summary (respond --part)")
    sp.add_argument("--out", required=True)
    sp = add("extract", cmd_extract, "extract target hidden states into safetensors shards")
    sp.add_argument("--target", required=True)
    sp.add_argument("--responses", required=True)
    sp.add_argument("--out-dir", required=True)
    sp = add("train", cmd_train, "train a drafter")
    sp.add_argument("--target", required=True)
    sp.add_argument("--hidden", "--hidden-dir", dest="hidden_dir", required=True,
                    help="the hidden-state store (its directory); with train.hidden_source online, the responses JSONL")
    sp.add_argument("--method", required=True)
    sp.add_argument("--ctx", type=int, required=True, help="training context length (tokens)")
    sp.add_argument("--seed", type=int, help="this run's seed, one of train.seeds (default: the first)")
    sp.add_argument("--ablation-run", help="train ablation run DIGEST of the config's ablations (the DAG's {run})")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--nproc", type=int, default=1,
                    help="training processes, one per GPU: more than 1 trains data-parallel under torchrun")
    sp.add_argument("--in-process", action="store_true",
                    help="train in this process, unsupervised (torchrun's processes always do): a kill for memory "
                         "fails the command, an allocation failure records an OOM result and exits 75")
    sp = add("evaluate", cmd_evaluate, "acceptance length with the speculative-decoding engine")
    sp.add_argument("--target", required=True)
    sp.add_argument("--drafter", required=True,
                    help="a drafter checkpoint dir, or a training run dir (summary.json + final/)")
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--k", type=int, required=True)
    sp.add_argument("--seed", type=int, help="the drafter's training seed, recorded in the result (checked "
                    "against the one its training recorded)")
    sp.add_argument("--out", required=True)
    sp = add("table1", cmd_table1, "paper Table 1: acceptance length vs training context length")
    sp.add_argument("--target", help="target.json, recorded in the provenance sidecar")
    sp.add_argument("--evals", nargs="+", required=True)
    sp.add_argument("--benchmarks", nargs="*")
    sp.add_argument("--out", required=True)
    sp = add("table2", cmd_table2, "paper Table 2: data-loading and epoch time per data path")
    sp.add_argument("--target", required=True, help="target.json (width, vocabulary, mask token)")
    sp.add_argument("--hidden-dir", required=True, help="hidden states of the training set")
    sp.add_argument("--out", required=True)
    sp = add("figures", cmd_figures, "paper Figs. 3-4: the cross-depth mask and sequence partitioning")
    sp.add_argument("--out-dir", required=True)
    sp = add("fig1", cmd_fig1, "paper Fig. 1: length distribution of a target's regenerated training data")
    sp.add_argument("--responses", required=True, help="the respond stage's JSONL")
    sp.add_argument("--out", required=True, help="base path: writes OUT.png, OUT.pdf and OUT.csv")
    sp.add_argument("--target-name", help="label for the title and the CSV")
    sp.add_argument("--contexts", type=int, nargs="*",
                    help="training contexts to mark (default: table1.contexts; none: no markers)")
    sp = add("memory-scaling", cmd_memory_scaling,
             "peak training memory and step time vs context length and partitions (one subprocess each)")
    sp.add_argument("--out", required=True, help="CSV (provenance sidecar written beside it)")
    sp.add_argument("--device", help="override runtime.device (e.g. cuda)")
    sp.add_argument("--hidden-size", type=int, help="drafter width (default: target.hidden_size; paper: 2880)")
    sp.add_argument("--budget-mb", type=int, help="cap per configuration (default: scaling.memory_budget_mb, "
                    "then train.memory_budget_mb)")
    sp.add_argument("--figure", help="also plot the sweep to this path (.png; a .pdf is written beside it)")
    sp.add_argument("--timeout", type=int, default=600, help="seconds per configuration before it is recorded "
                    "as TIMEOUT")
    from peagle.bench.memory import add_overrides

    add_overrides(sp)
    sp = add("table9", cmd_table9, "paper Table 9: EAGLE-3 vs P-EAGLE acceptance length per target and set")
    sp.add_argument("--evals", nargs="+", required=True)
    sp.add_argument("--out", required=True)
    sp = add("ablation-table", cmd_ablation_table, "paper Tables 3-8: one training-recipe ablation beside the paper")
    sp.add_argument("--table", required=True, help="the ablation table (table3 ... table8)")
    sp.add_argument("--evals", nargs="+", required=True, help="evaluate JSONs, in the order rows x eval sets x seeds")
    sp.add_argument("--benchmarks", nargs="*", help="benchmark TSVs of the table's jobs (wall times)")
    sp.add_argument("--out", required=True)
    sp = add("fig-alpha", cmd_fig_alpha, "paper Figure B: the regularized design's alpha over training steps")
    sp.add_argument("--runs", nargs="+", required=True, help="training run dirs (regularized_ntp), one per seed")
    sp.add_argument("--out", required=True, help="base path: writes OUT.png, OUT.pdf and OUT.csv")
    sp = add("table10", cmd_table10, "paper Table 10: vLLM output tokens/s, P-EAGLE at each K vs EAGLE-3 at its best K")
    sp.add_argument("--results", nargs="+", required=True, help="vllm-throughput JSONs")
    sp.add_argument("--out", required=True)
    sp = add("target-quality", cmd_target_quality,
             "does each target write text like its training data? repetition and cap rate on held-out prompts")
    sp.add_argument("--targets", nargs="+", required=True, help="target.json files")
    sp.add_argument("--data-dir", required=True, help="directory with eval_<set>.jsonl")
    sp.add_argument("--sets", nargs="+", help="evaluation sets (default: eval.sets)")
    sp.add_argument("--n-prompts", type=int, help="prompts per set (default: eval.n_prompts)")
    sp.add_argument("--out", required=True, help="CSV (provenance sidecar written beside it)")
    sp = add("drafting-cost", cmd_drafting_cost,
             "engine drafting/verification ms per round and tokens/s vs K, one target (CPU Table 10)")
    sp.add_argument("--target", required=True, help="target.json")
    sp.add_argument("--drafters", nargs="+", required=True, help="drafter checkpoint directories")
    sp.add_argument("--prompts", required=True, help="evaluation prompts (eval_*.jsonl)")
    sp.add_argument("--ks", type=int, nargs="+", help="K values (default: drafting_cost.ks)")
    sp.add_argument("--n-prompts", type=int, help="timed prompts (default: drafting_cost.n_prompts)")
    sp.add_argument("--max-new-tokens", type=int, help="default: drafting_cost.max_new_tokens")
    sp.add_argument("--out", required=True, help="CSV (provenance sidecar written beside it)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    # The vLLM stage runs with the vLLM environment's python and the repo on PYTHONPATH (peagle is not
    # installed there): PYTHONPATH=$REPO $VLLM_PY -m peagle vllm-eval ... (see peagle/vllm_bench.py).
    def add_vllm(name, fn, help_):
        sp = add(name, fn, help_)
        sp.add_argument("--target", required=True, help="target.json")
        sp.add_argument("--drafter", help="a drafter checkpoint dir or a training run dir (summary.json + final/); "
                        "omit for no speculation")
        sp.add_argument("--prompts", required=True, help="evaluation prompts (eval_*.jsonl)")
        sp.add_argument("--k", type=int, help="speculation depth (required with --drafter)")
        sp.add_argument("--work-dir", help="keep vLLM's requests, results and logs here (default: a temp dir)")
        sp.add_argument("--out", required=True)
        return sp

    sp = add_vllm("vllm-eval", cmd_vllm_eval, "acceptance length in vLLM's offline engine, checked lossless and "
                  "parallel; without --drafter: the no-speculation baseline")
    sp.add_argument("--baseline", help="a baseline JSON from `vllm-eval` without --drafter (else run here)")
    sp.add_argument("--engine-result", help="the evaluate stage's JSON for the same cell: cross-check the ALs")
    add_vllm("vllm-throughput", cmd_vllm_throughput, "vLLM serving benchmark at vllm.concurrency levels: "
             "output tokens/s, TPOT, AL (Table 10)")
    sp = sub.add_parser("vllm-crosscheck", help="engine vs vLLM acceptance length of vllm-eval results, one table")
    sp.set_defaults(fn=cmd_vllm_crosscheck)
    sp.add_argument("--results", nargs="+", required=True, help="vllm-eval JSONs (run with --engine-result)")
    sp.add_argument("--out", required=True, help="CSV (provenance sidecar written beside it)")
    sp = sub.add_parser("plan", help="before a run: tokens, GPU-hours and disk per stage for the profile, "
                        "from the rates file")
    sp.set_defaults(fn=cmd_plan)
    add_profile(sp, "to plan")
    sp.add_argument("--rates", default="config/rates.yaml", help="lengths and rates with their sources")
    sp.add_argument("--gpus", type=int, default=8, help="GPUs the wall-time estimate spreads over (default 8)")
    sp.add_argument("--out", help="also write the report here")
    sp = sub.add_parser("compare", help="tables beside the paper's numbers, with verdicts and staleness "
                        "(default: the profile's recorded baselines)")
    sp.set_defaults(fn=cmd_compare)
    add_profile(sp, "whose digest decides what is stale")
    sp.add_argument("--tables-dir", help="tables to compare (default: results/recorded/<profile>)")
    sp.add_argument("--tables", nargs="+", help="only these tables (e.g. table3 table4; default: every one)")
    sp.add_argument("--out", help="also write the report here")
    sp = add("compare-drafter", cmd_compare_drafter,
             "your own EAGLE-3/P-EAGLE drafter (this suite's or the speculators format) vs the recorded baselines")
    sp.add_argument("--drafter", required=True, help="drafter checkpoint dir (or a training run dir)")
    sp.add_argument("--target", required=True, help="the target's target.json")
    sp.add_argument("--data-dir", required=True, help="the data stage's directory (eval_*.jsonl)")
    sp.add_argument("--recorded", required=True, help="recorded baselines (`peagle record`), e.g. results/recorded/tiny")
    sp.add_argument("--out", required=True, help="OUT.md; OUT.csv and OUT_al_vs_k.png are written beside it")
    sp.add_argument("--name", help="the drafter's name in the report (default: its directory name)")
    sp.add_argument("--k", type=int, help="Table 9 comparison depth (default: table9.k)")
    sp.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                    help="also evaluate in vLLM (default: when vllm.python exists)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp = sub.add_parser("record", help="keep a finished run's tables as the profile's recorded baselines "
                        "(results/recorded/<profile>/, with a manifest)")
    sp.set_defaults(fn=cmd_record)
    add_profile(sp, "the run used")
    sp.add_argument("--tables-dir", help="the run's tables (default: the profile's tables directory)")
    sp.add_argument("--benchmarks-dir", help="the run's Snakemake benchmarks (default: <results_dir>/benchmarks)")
    sp.add_argument("--out", help="default: results/recorded/<profile>")
    sp.add_argument("--wall-s", type=float, help="the run's measured wall time (recorded in the manifest)")
    sp = sub.add_parser("concat-csv", help="stack CSVs with the same columns (e.g. drafting cost per target)")
    sp.set_defaults(fn=cmd_concat_csv)
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--table", help="the table's name in its provenance (default: the output's stem)")
    sp.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what peagle train's children rerun
    from peagle.config import ConfigError

    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # Input errors: one clear line, not a traceback deep inside a library.
        print(f"peagle {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
