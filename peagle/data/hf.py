"""Loaders for the paper's datasets (Hugging Face hub ids) into prompt records.

Each dataset has pure converters (:func:`rows_to_records`, testable offline on hand-written
rows) and a loader (:func:`load_hf_prompts`) that reads the dataset with ``datasets`` by hub id
or, with ``data_files``, from local copies (:mod:`peagle.data.files`: JSON Lines, JSON, parquet,
gzip, one file or a sharded snapshot) in any of the dataset's known row layouts.

Row schemas assumed (checked against the dataset cards; a row missing a field is an error that
names the dataset, row index and field):

===================  ====================================  =========  ==========================================
name                 hub id (config)                       splits     row fields used
===================  ====================================  =========  ==========================================
``ultrachat``        HuggingFaceH4/ultrachat_200k          train_sft, ``prompt`` str, ``prompt_id`` str,
                                                           test_sft   ``messages`` [{"role", "content"}] (user/
                                                                      assistant alternating, user first)
``mt_bench``         HuggingFaceH4/mt_bench_prompts        train      ``prompt`` [str] (the turns), ``prompt_id``
                                                                      int, ``category`` str, ``reference`` [str]
                                                                      (empty for most categories)
``humaneval``        openai/openai_humaneval               test       ``task_id``, ``prompt`` (signature +
                                                                      docstring), ``canonical_solution``,
                                                                      ``test``, ``entry_point``
``gsm8k``            openai/gsm8k (``main``)               train,     ``question``, ``answer`` (worked solution
                                                           test       ending in ``#### <number>``)
``opencodeinstruct`` nvidia/OpenCodeInstruct               train      ``id``, ``input`` (instruction),
                                                                      ``output`` (response)
===================  ====================================  =========  ==========================================

Other layouts read from local files (the layout is recognised by the first row's columns; an
unknown one is an error that lists the columns found and the layouts known):

- ``mt_bench``: FastChat's ``question.jsonl`` (``question_id`` int, ``category``, ``turns``
  [str], ``reference`` [str] for some categories) and the ``philschmid/mt-bench`` copy that vLLM's
  serving benchmark reads (``question_id`` str or int, ``category``, ``turns``; no reference).
- ``ultrachat``: the original ``stingning/ultrachat`` release (``id``, ``data``: the turns as
  alternating user/assistant strings, user first).

Conversion choices:

- Record ids are ``<name>-<split>-<row index>`` (zero-padded to 5 digits), unique within a split
  and stable for a given dataset revision; upstream ids are not unique in every set.
- ``turns``: UltraChat's user messages in order; MT-Bench's ``prompt`` list; one turn otherwise.
  HumanEval's ``prompt`` is used verbatim (no instruction prepended), as EAGLE-style evaluations do.
- ``reference``: UltraChat's first assistant message, MT-Bench's ``reference[0]`` (or null when
  empty), HumanEval's ``canonical_solution``, GSM8K's ``answer``, OpenCodeInstruct's ``output``.
- Rows whose first turn is blank are skipped (they cannot be prompted), not errors.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peagle.data.files import DataFileError, Row, read_rows, resolve_data_files
from peagle.data.io import write_data_dir
from peagle.data.schema import ROLES, PromptRecord

__all__ = [
    "FULL_EVAL_SIZES",
    "HF_DATASETS",
    "HFDatasetSpec",
    "HFDataError",
    "RowLayout",
    "rows_to_records",
    "load_hf_prompts",
    "make_hf_data",
]


# Rows of the full evaluation sets (their dataset cards): what data.n_eval: null evaluates on.
FULL_EVAL_SIZES = {"mt_bench": 80, "humaneval": 164, "gsm8k": 1319}


class HFDataError(ValueError):
    """A dataset row or a loader argument is invalid."""


# (row, field getter) -> (turns, reference)
Converter = Callable[[Mapping[str, Any], Callable[[str, type | tuple[type, ...]], Any]], tuple[list[str], str | None]]


@dataclass(frozen=True)
class RowLayout:
    """One row schema of a dataset: the fields that identify it and how such a row becomes turns."""

    name: str
    fields: tuple[str, ...]
    convert: Converter

    def matches(self, columns: Iterable[str]) -> bool:
        return set(self.fields) <= set(columns)


@dataclass(frozen=True)
class HFDatasetSpec:
    """Where a dataset lives on the hub and how its rows become records.

    ``layouts[0]`` is the hub's schema; the others are layouts of the same data that users hold
    as local files.
    """

    name: str
    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    default_split: str
    default_role: str
    layouts: tuple[RowLayout, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        """The hub schema's fields."""
        return self.layouts[0].fields

    def layout_for(self, columns: Iterable[str], where: str) -> RowLayout:
        """The first layout whose fields are all among ``columns``; HFDataError naming ``where`` if none."""
        cols = list(columns)
        for layout in self.layouts:
            if layout.matches(cols):
                return layout
        known = "; ".join(f"{lay.name} ({', '.join(lay.fields)})" for lay in self.layouts)
        raise HFDataError(f"{self.name}: {where} is in no layout this suite knows for {self.name}: columns found "
                          f"{', '.join(sorted(cols)) or '(none)'}; layouts known: {known}")


def _conv_ultrachat(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    prompt = get("prompt", str)
    get("prompt_id", str)
    messages = get("messages", list)
    user_turns: list[str] = []
    reference: str | None = None
    for j, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise _FieldProblem(f"messages[{j}]", "must be an object with string 'role' and 'content'")
        if msg["role"] == "user":
            user_turns.append(msg["content"])
        elif msg["role"] == "assistant" and reference is None and len(user_turns) == 1:
            reference = msg["content"]
    # Some rows repeat the prompt only in `prompt`; keep `prompt` authoritative for turn 0.
    if not user_turns or user_turns[0] != prompt:
        user_turns.insert(0, prompt)
    return user_turns, reference


def _conv_ultrachat_original(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    get("id", (str, int))
    data = get("data", list)
    if not data or not all(isinstance(t, str) for t in data):
        raise _FieldProblem("data", "must be a non-empty list of strings (user and assistant turns alternating)")
    return list(data[0::2]), data[1] if len(data) > 1 else None


def _mt_bench_turns(row: Mapping[str, Any], get: Callable[..., Any], field: str) -> tuple[list[str], str | None]:
    turns = get(field, list)
    if not all(isinstance(t, str) for t in turns):
        raise _FieldProblem(field, "must be a list of strings (one per turn)")
    ref = row.get("reference")
    reference: str | None = None
    if isinstance(ref, list) and ref and isinstance(ref[0], str) and ref[0].strip():
        reference = ref[0]
    elif ref is not None and not isinstance(ref, list):
        raise _FieldProblem("reference", f"must be a list of strings or absent, got {type(ref).__name__}")
    return list(turns), reference


def _conv_mt_bench(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    get("prompt_id", int)
    get("category", str)
    return _mt_bench_turns(row, get, "prompt")


def _conv_mt_bench_fastchat(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    get("question_id", (int, str))  # int in FastChat's file, str in philschmid/mt-bench
    get("category", str)
    return _mt_bench_turns(row, get, "turns")


def _conv_humaneval(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    get("task_id", str)
    get("entry_point", str)
    get("test", str)
    return [get("prompt", str)], get("canonical_solution", str)


def _conv_gsm8k(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    return [get("question", str)], get("answer", str)


def _conv_opencodeinstruct(row: Mapping[str, Any], get: Callable[..., Any]) -> tuple[list[str], str | None]:
    get("id", str)
    return [get("input", str)], get("output", str)


HF_DATASETS: dict[str, HFDatasetSpec] = {
    s.name: s
    for s in (
        HFDatasetSpec("ultrachat", "HuggingFaceH4/ultrachat_200k", None, ("train_sft", "test_sft"), "train_sft",
                      "train", (RowLayout("HuggingFaceH4/ultrachat_200k", ("prompt", "prompt_id", "messages"),
                                          _conv_ultrachat),
                                RowLayout("stingning/ultrachat (original release)", ("id", "data"),
                                          _conv_ultrachat_original))),
        HFDatasetSpec("mt_bench", "HuggingFaceH4/mt_bench_prompts", None, ("train",), "train",
                      "mt_bench", (RowLayout("HuggingFaceH4/mt_bench_prompts", ("prompt", "prompt_id", "category"),
                                             _conv_mt_bench),
                                   RowLayout("FastChat question.jsonl / philschmid/mt-bench (vLLM's serving benchmark)",
                                             ("question_id", "category", "turns"), _conv_mt_bench_fastchat))),
        HFDatasetSpec("humaneval", "openai/openai_humaneval", None, ("test",), "test",
                      "humaneval", (RowLayout("openai/openai_humaneval (also HumanEval.jsonl.gz)",
                                              ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
                                              _conv_humaneval),)),
        HFDatasetSpec("gsm8k", "openai/gsm8k", "main", ("train", "test"), "test",
                      "gsm8k", (RowLayout("openai/gsm8k", ("question", "answer"), _conv_gsm8k),)),
        HFDatasetSpec("opencodeinstruct", "nvidia/OpenCodeInstruct", None, ("train",), "train",
                      "train", (RowLayout("nvidia/OpenCodeInstruct", ("id", "input", "output"),
                                          _conv_opencodeinstruct),)),
    )
}


class _FieldProblem(Exception):
    def __init__(self, field: str, msg: str) -> None:
        super().__init__(field, msg)
        self.field = field
        self.msg = msg


def _spec(name: str) -> HFDatasetSpec:
    if name not in HF_DATASETS:
        raise HFDataError(f"unknown dataset name {name!r}; known: {', '.join(sorted(HF_DATASETS))} (peagle.data.hf)")
    return HF_DATASETS[name]


def _resolve(spec: HFDatasetSpec, split: str | None, role: str | None) -> tuple[str, str]:
    split = spec.default_split if split is None else split
    role = spec.default_role if role is None else role
    if role not in ROLES:
        raise HFDataError(f"{spec.name}: role {role!r} is not one of {', '.join(ROLES)}")
    if not split or any(c in split for c in "[]: /"):
        raise HFDataError(f"{spec.name}: split {split!r} must be a plain split name such as {spec.default_split!r}")
    return split, role


def _convert_row(spec: HFDatasetSpec, layout: RowLayout, index: int, row: Any, split: str, role: str,
                 where: str) -> PromptRecord | None:
    if not isinstance(row, Mapping):
        raise HFDataError(f"{where}: expected a mapping of fields, got {type(row).__name__}")

    def get(field: str, typ: type | tuple[type, ...]) -> Any:
        if field not in row or row[field] is None:
            raise _FieldProblem(field, f"missing (expected fields of the {layout.name} layout: "
                                       f"{', '.join(layout.fields)})")
        value = row[field]
        # bool is an int subclass; an id of True is a schema mix-up, not a number.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise _FieldProblem(field, f"expected {names}, got {type(value).__name__}")
        return value

    try:
        turns, reference = layout.convert(row, get)
    except _FieldProblem as p:
        raise HFDataError(f"{where}: field '{p.field}': {p.msg}") from None
    if not turns or not turns[0].strip():
        return None
    return PromptRecord(
        id=f"{spec.name}-{split}-{index:05d}", source=spec.hub_id, role=role, turns=tuple(turns), reference=reference
    )


def rows_to_records(
    name: str,
    rows: Iterable[Mapping[str, Any]],
    role: str | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
    indices: Sequence[int] | None = None,
) -> list[PromptRecord]:
    """Convert dataset rows (dicts in one of the dataset's layouts, or :class:`~peagle.data.files.Row`
    s read from files) to records; pure, no network.

    ``role``/``split`` default to the dataset's (see :data:`HF_DATASETS`); ``split`` only names the
    ids. ``limit`` caps the number of records returned (rows with a blank prompt do not count).
    ``indices`` gives each row's index in the full split when ``rows`` is a subsample (ids use the
    original indices). The layout is the first row's; errors name the row 1-based (``row 1`` is
    the first), or the file and line a :class:`~peagle.data.files.Row` came from.
    """
    spec = _spec(name)
    split, role = _resolve(spec, split, role)
    if limit is not None and limit < 0:
        raise HFDataError(f"{name}: limit must be >= 0 or None, got {limit}")
    out: list[PromptRecord] = []
    layout: RowLayout | None = None
    for pos, item in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        index = pos if indices is None else int(indices[pos])
        row, where = (item.data, item.where) if isinstance(item, Row) else (item, f"{spec.hub_id} row {index + 1}")
        if layout is None:
            layout = spec.layout_for(row if isinstance(row, Mapping) else (), where)
        rec = _convert_row(spec, layout, index, row, split, role, f"{name}: {where}")
        if rec is not None:
            out.append(rec)
    return out


def load_hf_prompts(
    name: str,
    split: str | None = None,
    role: str | None = None,
    limit: int | None = None,
    data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    sample_seed: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    key: str | None = None,
) -> list[PromptRecord]:
    """Load a dataset by hub id (or local copies) and convert it to prompt records.

    ``data_files``: local files in any of the dataset's layouts: a file, a directory, a glob or a
    list of them (:func:`peagle.data.files.resolve_data_files`), read without network; ``split``
    then only names the ids. ``key`` is the setting that named them, for errors (default
    ``data.data_files.<name>``). ``sample_seed``: take a seeded random subset of ``limit`` rows
    (sorted by index) instead of the first ``limit`` rows.
    """
    spec = _spec(name)
    split, role = _resolve(spec, split, role)
    if data_files is not None:
        try:
            rows: Sequence[Any] = list(read_rows(resolve_data_files(data_files, key=key or f"data.data_files.{name}")))
        except DataFileError as err:
            raise HFDataError(f"{name}: {err}") from None
        return _sample(name, rows, role, limit, split, sample_seed)  # the first row's layout decides

    import datasets  # lazy: importing datasets costs ~1 s

    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if split not in spec.splits:
        raise HFDataError(f"{name}: split {split!r} not in {spec.hub_id}'s splits {', '.join(spec.splits)}")
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.config, split=split, **kwargs)
    except Exception as exc:  # network / auth / cache problems all land here
        raise HFDataError(
            f"{name}: could not load {spec.hub_id} split {split!r} ({type(exc).__name__}: {exc}); "
            f"offline machines need local copies: data.data_files.{name}: <a file, directory or glob of "
            f".jsonl/.json/.parquet, optionally .gz>"
        ) from exc
    spec.layout_for(ds.column_names, f"{spec.hub_id} split {split!r}")
    return _sample(name, ds, role, limit, split, sample_seed)


def _sample(name: str, rows: Any, role: str, limit: int | None, split: str, sample_seed: int | None) -> list[PromptRecord]:
    """Records of ``rows`` (a list of :class:`Row` or a ``datasets.Dataset``): the first ``limit``,
    or with ``sample_seed`` a seeded subset of ``limit`` rows in index order."""
    if sample_seed is not None and limit is not None and limit < len(rows):
        # Oversample a little so rows with a blank prompt do not leave the subset short.
        k = min(len(rows), limit + max(8, limit // 20))
        indices = sorted(random.Random(sample_seed).sample(range(len(rows)), k))
        subset = rows.select(indices) if hasattr(rows, "select") else [rows[i] for i in indices]
        return rows_to_records(name, subset, role, limit, split=split, indices=indices)
    return rows_to_records(name, rows, role, limit, split=split)


def make_hf_data(
    out_dir: str | os.PathLike[str],
    *,
    n_train: int,
    n_eval: int | None = None,
    train_datasets: Sequence[str] = ("ultrachat", "gsm8k", "opencodeinstruct"),
    data_files: Mapping[str, str] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Write the data stage's files (``train.jsonl``, ``eval_*.jsonl``, ``manifest.json``) from hub data.

    ``n_train`` is split evenly over ``train_datasets`` (seeded subsets; GSM8K contributes its
    ``train`` split); eval sets are MT-Bench, HumanEval and the GSM8K ``test`` split, capped at
    ``n_eval`` (None = the full sets: MT-Bench 80, HumanEval 164, GSM8K test 1,319).
    ``data_files`` maps ``name`` or ``name:split`` (e.g. ``gsm8k:train`` vs ``gsm8k:test``; the
    split-specific key wins) to local copies (a file, directory, glob or list). A source whose
    split is smaller than its share gives what it has (GSM8K train: 7,473 rows) and training
    prompts whose text equals an eval prompt are dropped, so train may come out short: the
    manifest's ``train_per_source`` says what each source gave, ``train_requested_per_source``
    what was asked, and ``log`` gets one line per source.
    """
    data_files = dict(data_files or {})
    for key in data_files:
        name, _, split = key.partition(":")
        spec = _spec(name)
        if split and split not in spec.splits:
            raise HFDataError(f"data_files key {key!r}: split {split!r} not in {', '.join(spec.splits)}")

    def local(name: str, split: str) -> tuple[Any, str | None]:
        """The local copies of one split and the setting that names them."""
        for key in (f"{name}:{split}", name):
            if key in data_files:
                return data_files[key], f"data.data_files.{key}"
        return None, None
    if n_train < 1:
        raise HFDataError(f"make_hf_data: n_train must be >= 1, got {n_train}")
    if not train_datasets:
        raise HFDataError("make_hf_data: train_datasets is empty (config data.train_datasets)")
    evals: dict[str, list[PromptRecord]] = {}
    for ev_name, ev_split in (("mt_bench", "train"), ("humaneval", "test"), ("gsm8k", "test")):
        files, key = local(ev_name, ev_split)
        evals[ev_name] = load_hf_prompts(ev_name, ev_split, ev_name, n_eval, files, cache_dir=cache_dir, key=key)
        log(f"eval {ev_name}: {len(evals[ev_name])} prompts"
            + (f" (data.n_eval caps at {n_eval})" if n_eval is not None else " (the full set)"))
    eval_texts = {r.turns[0] for recs in evals.values() for r in recs}
    share, extra = divmod(n_train, len(train_datasets))
    train: list[PromptRecord] = []
    per_source: dict[str, int] = {}
    requested: dict[str, int] = {}
    for i, ds_name in enumerate(train_datasets):
        k = share + (1 if i < extra else 0)
        split = "train" if ds_name == "gsm8k" else _spec(ds_name).default_split
        files, key = local(ds_name, split)
        loaded = load_hf_prompts(ds_name, split, "train", k, files, sample_seed=seed + i, cache_dir=cache_dir, key=key)
        recs = [r for r in loaded if r.turns[0] not in eval_texts]
        per_source[ds_name], requested[ds_name] = len(recs), k
        short = (f"; the split gave only {len(loaded)}" if len(loaded) < k else "") + (
            f"; {len(loaded) - len(recs)} equal an evaluation prompt and are dropped" if len(recs) < len(loaded) else "")
        log(f"train {ds_name}: {len(recs)} of the {k} prompts asked for{short}")
        train.extend(recs)
    random.Random(f"peagle-hf:{seed}:train-order").shuffle(train)
    params = {
        "source": "hf",
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "train_datasets": list(train_datasets),
        "data_files": data_files,
        "hub_ids": {k: HF_DATASETS[k].hub_id for k in sorted({*train_datasets, *evals})},
    }
    log(f"train: {len(train)} prompts of the {n_train} asked for (data.n_train)")
    return write_data_dir(out_dir, train, evals, params=params,
                          extra={"train_per_source": per_source, "train_requested_per_source": requested})
