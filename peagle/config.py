"""Typed run configuration, validated when loaded.

A profile YAML (``config/tiny.yaml``, ``config/paper.yaml``) maps one-to-one onto the dataclasses
below. Unknown keys, wrong types and out-of-range values are errors that name the file and the
dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid.

    ``key`` is the dotted key the error is about (``train.epoch``, ``extra_targets[0].num_heads``),
    None when it concerns no one key (a missing required key). ``involves`` lists the other keys a
    cross-field check read. :func:`load_config` uses them to name the one file that sets them.
    """

    def __init__(self, message: str, *, key: str | None = None, involves: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.involves = tuple(involves)

    @property
    def keys(self) -> tuple[str, ...]:
        """The key first, then the involved ones."""
        return ((self.key,) if self.key else ()) + self.involves


def _check(cond: bool, key: str, msg: str, *, involves: tuple[str, ...] = ()) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``cond``; ``involves``: other keys the check compares."""
    if not cond:
        raise ConfigError(f"{key}: {msg}", key=key, involves=involves)


# Devices the stages accept (torch.device strings); anything else fails deep inside torch.
_DEVICE_RE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int = 2

    def __post_init__(self) -> None:
        _check(isinstance(self.device, str) and _DEVICE_RE.fullmatch(self.device) is not None, "runtime.device",
               f"{self.device!r} is not a supported device; use cpu, cuda or cuda:N (N: a GPU index), or mps")
        _check(self.threads >= 1, "runtime.threads", "must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from: ``synthetic`` (offline tiny data) or ``hf`` (the paper's sets)."""

    source: Literal["synthetic", "hf"] = "synthetic"
    n_train: int = 3000
    # Prompts per evaluation set; None = the full sets (hf: MT-Bench 80, HumanEval 164, GSM8K 1,319).
    n_eval: int | None = 40
    # Hugging Face dataset names (see peagle.data.hf) used for training when source == "hf".
    train_datasets: list[str] = field(default_factory=lambda: ["ultrachat", "gsm8k", "opencodeinstruct"])
    # Optional local copies keyed by dataset name or name:split (offline clusters): a file, a
    # directory, a glob or a list of them, in any layout peagle.data.hf knows for that dataset.
    data_files: dict[str, str | list[str]] = field(default_factory=dict)
    # Synthetic data only: the largest list-rule task (rules per task, items per list).
    list_max_rules: int = 3
    list_max_items: int = 20
    # ... and the form of the chat answers' steps (peagle.data.listrules.ListTask.chat_reference).
    list_walkthrough: Literal["item", "pair"] = "item"

    def __post_init__(self) -> None:
        _check(self.n_train >= 1, "data.n_train", "must be >= 1")
        _check(1 <= self.list_max_rules <= 6, "data.list_max_rules", "must be in 1..6")
        _check(1 <= self.list_max_items <= 40, "data.list_max_items", "must be in 1..40")
        _check(self.n_eval is None or self.n_eval >= 1, "data.n_eval", "must be >= 1, or null for the full sets")
        _check(self.n_eval is not None or self.source == "hf", "data.n_eval",
               "the synthetic data has no full set to take; give a number of prompts per set")
        for key, value in self.data_files.items():
            ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            _check(ok, f"data.data_files.{key}", "must be a path, a directory, a glob or a non-empty list of them")


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the tiny target (ignored for ``target.kind: hf``)."""

    steps: int = 600
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 30
    tokenizer_vocab_size: int = 2048

    def __post_init__(self) -> None:
        # "*." keys: built under target.pretrain or extra_targets[i].pretrain (see _build).
        _check(self.steps >= 1, "*.steps", "must be >= 1")
        _check(self.seq_len >= 8, "*.seq_len", "must be >= 8")
        _check(self.lr > 0, "*.lr", "must be > 0")


@dataclass(frozen=True)
class TargetConfig:
    """The frozen target LM: a tiny one built and pretrained here, or a Hugging Face model."""

    kind: Literal["tiny", "hf"] = "tiny"
    name: str = "tiny-llama"
    path: str | None = None  # HF id or local dir (kind: hf)
    architecture: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 768
    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    aux_layer_ids: list[int] | None = None
    mask_token_id: int | None = None
    # Mixture-of-experts targets (architecture qwen3_moe) only.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    # gpt_oss only: window of the sliding-attention layers (even layers; 128 in the real models).
    sliding_window: int = 128
    # Tiny targets: a directory of recorded pretrained targets (<dir>/<name>/, peagle.target.recorded)
    # reused when recorded with the same settings and data; None always pretrains.
    recorded_dir: str | None = None
    # Loading: "auto" = the architecture's own (eager for gpt_oss, which has no SDPA; sdpa otherwise).
    attn_implementation: str = "auto"
    # Sharding (kind: hf): weights over num_devices GPUs of max_memory_gib each (None: one device,
    # no plan). Checked before any job: a target that does not fit is an error naming these keys.
    num_devices: int = 1
    max_memory_gib: float | None = None
    # The generation config's end ids (kind: hf; None: read from the model's generation_config.json).
    eos_token_id: list[int] | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        if self.kind == "hf":
            _check(bool(self.path), "*.path", "a Hugging Face id or local dir is required for kind: hf",
                   involves=("*.kind",))
        else:
            _check(self.architecture in ("llama", "qwen3_moe", "gpt_oss"), "*.architecture",
                   f"{self.architecture!r}: tiny targets are built as llama, qwen3_moe or gpt_oss")
            _check(self.sliding_window >= 2, "*.sliding_window", f"must be >= 2, got {self.sliding_window}")
            _check(1 <= self.num_experts_per_tok <= self.num_experts, "*.num_experts_per_tok",
                   "must be in [1, num_experts]", involves=("*.num_experts",))
            _check(self.moe_intermediate_size >= 1, "*.moe_intermediate_size", "must be >= 1")
        # Counts first: the divisibility checks below would divide by zero.
        _check(self.num_heads >= 1, "*.num_heads", f"must be >= 1 (attention heads), got {self.num_heads}")
        _check(self.num_kv_heads >= 1, "*.num_kv_heads", f"must be >= 1 (key/value heads), got {self.num_kv_heads}")
        _check(self.hidden_size % self.num_heads == 0, "*.hidden_size", "must be divisible by target.num_heads",
               involves=("*.num_heads",))
        _check(self.num_heads % self.num_kv_heads == 0, "*.num_kv_heads",
               f"must divide num_heads ({self.num_heads}); got {self.num_kv_heads}", involves=("*.num_heads",))
        _check(self.num_devices >= 1, "*.num_devices", f"must be >= 1, got {self.num_devices}")
        _check(self.max_memory_gib is None or self.max_memory_gib > 0, "*.max_memory_gib",
               f"must be > 0 (GiB per device) or null, got {self.max_memory_gib}")
        if self.aux_layer_ids is not None:
            ids = self.aux_layer_ids
            _check(len(ids) == 3 and len(set(ids)) == 3, "*.aux_layer_ids", f"need three distinct ids, got {ids}")
            _check(all(0 <= i < self.num_layers for i in ids), "*.aux_layer_ids",
                   f"ids must lie in [0, {self.num_layers}), got {ids}", involves=("*.num_layers",))


@dataclass(frozen=True)
class RespondConfig:
    """Greedy regeneration of training responses by the target."""

    max_new_tokens: int = 384
    batch_size: int = 16  # HF generate's lock-step batch (the vllm backend batches continuously)
    n_prompts: int | None = None  # None: every training prompt
    # hf: transformers generate in this environment; vllm: vLLM's offline engine, the job running
    # in the vLLM environment (vllm.python or envs/vllm*.yaml) with the vllm.* engine settings.
    backend: Literal["hf", "vllm"] = "hf"
    # Conversations per shard (one file each, resumable); None: one shard.
    shard_prompts: int | None = None
    # Data-parallel parts (one job each, e.g. one per GPU): part p generates shards p, p+parts, ...
    parts: int = 1
    # User turns answered per conversation (each after the target's own earlier answers); None: all.
    max_turns: int | None = None
    # A turn whose prompt leaves no room below the target's context: fail, or skip it (its
    # conversation ends at the turn before; counted in the summary). Never truncated.
    on_long_prompt: Literal["fail", "skip"] = "fail"

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "respond.max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "respond.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.shard_prompts is None or self.shard_prompts >= 1, "respond.shard_prompts",
               f"must be >= 1, or null for one shard; got {self.shard_prompts}")
        _check(self.parts >= 1, "respond.parts", f"must be >= 1, got {self.parts}")
        _check(self.parts == 1 or self.shard_prompts is not None, "respond.parts",
               f"{self.parts} parts need respond.shard_prompts (parts split the shards); set it",
               involves=("respond.shard_prompts",))
        _check(self.max_turns is None or self.max_turns >= 1, "respond.max_turns",
               f"must be >= 1, or null for every turn; got {self.max_turns}")
        _check(self.n_prompts is None or self.n_prompts >= 1, "respond.n_prompts",
               f"must be >= 1, or null for every training prompt; got {self.n_prompts}")


@dataclass(frozen=True)
class HiddenConfig:
    """The hidden-state store (peagle.hidden): shards of whole sequences, bounded in tokens and bytes."""

    shard_tokens: int | None = 200_000  # None: bounded by shard_mb alone
    shard_mb: float | None = 2000.0  # MiB per shard (a longer single sequence gets a shard of its own)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # hf: one transformers forward per sequence; vllm: vLLM's extract_hidden_states method, the job
    # running in the vLLM environment (peagle.vllm_hidden; equal to hf within 1e-4 in fp32).
    backend: Literal["hf", "vllm"] = "hf"
    batch: int = 64  # sequences per vLLM call (backend vllm)

    def __post_init__(self) -> None:
        _check(self.shard_tokens is None or self.shard_tokens >= 1, "hidden.shard_tokens",
               f"must be >= 1, or null for shard_mb alone; got {self.shard_tokens}")
        _check(self.shard_mb is None or self.shard_mb > 0, "hidden.shard_mb",
               f"must be > 0 (MiB), or null for shard_tokens alone; got {self.shard_mb}")
        _check(self.batch >= 1, "hidden.batch", f"must be >= 1, got {self.batch}")
        _check(self.shard_tokens is not None or self.shard_mb is not None, "hidden.shard_tokens",
               "shard_tokens and shard_mb cannot both be null: shards would be unbounded", involves=("hidden.shard_mb",))


@dataclass(frozen=True)
class DrafterConfig:
    """Drafter architecture (width and vocabulary follow the target)."""

    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    embed_trainable: bool = True
    lm_head_trainable: bool = False
    # How MTP (mask) slots get their hidden input (peagle.drafters; Table 3): "shared" is P-EAGLE's
    # learnable h_shared, the others the paper's position-aware alternatives (definitions inferred).
    hidden_variant: Literal["shared", "depth_encoding", "ntp_depth_encoding", "ntp", "regularized_ntp"] = "shared"

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, "drafter.num_layers", "must be >= 1")
        # Counts first: the divisibility check below would divide by zero.
        _check(self.num_heads >= 1, "drafter.num_heads", f"must be >= 1 (attention heads), got {self.num_heads}")
        _check(self.num_kv_heads >= 1, "drafter.num_kv_heads",
               f"must be >= 1 (key/value heads), got {self.num_kv_heads}")
        _check(self.num_heads % self.num_kv_heads == 0, "drafter.num_kv_heads", "must divide drafter.num_heads",
               involves=("drafter.num_heads",))


@dataclass(frozen=True)
class TrainConfig:
    """Drafter training (DESIGN §3-4)."""

    k_train: int = 8
    retention: float = 0.8
    retention_min: float = 0.0
    epochs: int = 2
    lr: float = 1e-4
    warmup_ratio: float = 0.0025
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 8
    # Data order: the store's shards in a seeded order, taken this many at a time; the sequences of
    # each window of shards in a seeded random order. Every shard is then read once per epoch and
    # at most 2 windows of shards are in memory. A store of at most this many shards is shuffled
    # whole. None: always shuffle the whole store.
    shard_window: int | None = 2
    # offline: train on the extracted hidden-state store; online: the frozen target computes each
    # sequence's hidden states as the drafter trains (no store on disk; one target forward per read).
    hidden_source: Literal["offline", "online"] = "offline"
    # Sequence partitioning (paper §3.2): segments per sequence, each run forward+backward on its
    # own (peagle.partition); same gradient, lower peak memory. 1 = off. Must be <= rows (T - 1).
    partitions: int = 1
    # With partitions > 1: cut a sequence only into as many segments as keep each at most this
    # many rows (peagle.partition.segments_for), so short sequences train whole. None: always
    # ``partitions`` segments.
    segment_rows: int | None = None
    mask_strategy: Literal["amortized", "pard", "reference", "maskfree"] = "amortized"
    max_mask_len: int = 8192
    # Cap on one training run's memory in MiB (weights, gradients, optimizer, activations;
    # see peagle.memory). Exceeding it ends the run with status OOM; None = no cap.
    memory_budget_mb: int | None = None
    # How several training processes (torchrun) share the drafter: "ddp" replicates it and sums the
    # gradients once per step; "fsdp" shards weights, gradients and AdamW moments over them (FSDP2,
    # peagle.distributed) for a drafter whose training state does not fit one device.
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # Longest acceptable epoch in seconds (the paper's line is 10 h on 8xH200). The run measures
    # its first ``budget_probe_steps`` optimizer steps and stops with status "infeasible" when
    # step time x steps per epoch exceeds it; None = no limit.
    time_budget_s_per_epoch: float | None = None
    budget_probe_steps: int = 2
    loss: Literal["kl", "ce"] = "kl"
    # Supervised elements per chunk through the [V, H] heads (recomputed in backward); bounds the
    # [chunk, V] logits at large vocabularies. None: one chunk.
    loss_chunk_rows: int | None = 4096
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # One training run per seed (drafter initialisation, COD sampling and data order; the data and
    # the tiny target use the top-level ``seed``): each method x context cell of Tables 1 and 9 is
    # the mean and standard deviation over these. The first one is the seed of the stages that use
    # one drafter per cell (drafting cost, vLLM, compare-drafter) and of the benchmarks.
    seeds: list[int] = field(default_factory=lambda: [0])

    @property
    def seed(self) -> int:
        """The seed of a run: the first of ``seeds`` (a training run's config holds its seed alone,
        see :meth:`Config.for_seed`)."""
        return self.seeds[0]

    def __post_init__(self) -> None:
        _check(self.shard_window is None or self.shard_window >= 1, "train.shard_window",
               f"must be >= 1 (shards per shuffling window), or null to shuffle the whole store; got {self.shard_window}")
        _check(isinstance(self.seeds, list) and len(self.seeds) >= 1, "train.seeds",
               "must be a non-empty list of integers, e.g. [0] (one run per cell) or [0, 1, 2]")
        _check(all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds), "train.seeds",
               f"each seed must be an integer >= 0 (it names the drafter's directory, ..._s<seed>); got {self.seeds}")
        dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        _check(not dup, "train.seeds", f"seeds must be distinct; {dup} repeated in {self.seeds}")
        _check(self.k_train >= 1, "train.k_train", "must be >= 1")
        _check(0 < self.retention <= 1, "train.retention", "must be in (0, 1]")
        _check(0 <= self.retention_min <= 1, "train.retention_min", "must be in [0, 1]")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(isinstance(self.partitions, int) and not isinstance(self.partitions, bool)
               and self.partitions >= 1, "train.partitions", "must be a positive integer")
        _check(self.segment_rows is None or (isinstance(self.segment_rows, int) and not isinstance(self.segment_rows, bool)
                                             and self.segment_rows >= 1),
               "train.segment_rows", "must be a positive integer (rows per segment) or null")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.memory_budget_mb is None or self.memory_budget_mb >= 1, "train.memory_budget_mb",
               "must be >= 1 (MiB) or null")
        _check(self.time_budget_s_per_epoch is None or self.time_budget_s_per_epoch > 0,
               "train.time_budget_s_per_epoch", "must be > 0 (seconds) or null")
        _check(self.budget_probe_steps >= 1, "train.budget_probe_steps", "must be >= 1")
        _check(self.loss_chunk_rows is None or self.loss_chunk_rows >= 1, "train.loss_chunk_rows",
               "must be >= 1 or null")


MASK_STRATEGIES = ("amortized", "pard", "reference", "maskfree")


@dataclass(frozen=True)
class MethodConfig:
    """One drafter family (DESIGN §2, §5); unset (null) fields take the drafter/train values.

    parallel: K drafts from one pass over mask slots (P-EAGLE, PARD, ParallelSpec) rather than K
    autoregressive passes (EAGLE-3). cod: COD-sampled depths; false trains on the full n x K grid
    (ParallelSpec). ttt_steps/ttt_decay: EAGLE-3's training-time test (unrolled steps, weight
    decay**s per step); ignored by parallel methods.
    """

    num_layers: int | None = None
    parallel: bool = True
    cod: bool = True
    mask_strategy: Literal["amortized", "pard", "reference", "maskfree"] | None = None
    partitions: int | None = None
    segment_rows: int | None = None
    embed_trainable: bool | None = None
    ttt_steps: int = 7
    ttt_decay: float = 0.8

    def __post_init__(self) -> None:
        _check(self.num_layers is None or self.num_layers >= 1, "*.num_layers", "must be >= 1")
        _check(self.partitions is None or (isinstance(self.partitions, int) and self.partitions >= 1),
               "*.partitions", "must be a positive integer or null")
        _check(self.segment_rows is None or (isinstance(self.segment_rows, int) and self.segment_rows >= 1),
               "*.segment_rows", "must be a positive integer or null")
        _check(self.ttt_steps >= 1, "*.ttt_steps", "must be >= 1")
        _check(0 < self.ttt_decay <= 1, "*.ttt_decay", "must be in (0, 1]")
        if not self.parallel:
            _check(self.cod and self.mask_strategy is None and self.partitions is None
                   and self.segment_rows is None, "*.parallel",
                   "an autoregressive (parallel: false) method takes no cod/mask_strategy/partitions/segment_rows",
                   involves=("*.cod", "*.mask_strategy", "*.partitions", "*.segment_rows"))


# The four drafter families of the paper's comparisons; a profile's ``methods:`` is merged over these.
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "peagle": {},
    "pard": {"mask_strategy": "pard"},
    "parallelspec": {"num_layers": 1, "cod": False},
    "eagle3": {"num_layers": 1, "parallel": False, "embed_trainable": False},
}


@dataclass(frozen=True)
class EvalConfig:
    k: int = 5
    max_new_tokens: int = 256
    n_prompts: int | None = None  # None: the whole evaluation set
    sets: list[str] = field(default_factory=lambda: ["mt_bench", "humaneval", "gsm8k"])
    # Prompts on which the engine's output is also checked against plain greedy decoding.
    lossless_check_prompts: int = 2
    # User turns asked per conversation (MT-Bench has two): 1 = the first only, as vLLM's serving
    # benchmark asks; 2 = the second too, after the target's own first answer.
    turns: int = 1

    def __post_init__(self) -> None:
        _check(self.k >= 1, "eval.k", "must be >= 1")
        _check(self.n_prompts is None or self.n_prompts >= 1, "eval.n_prompts",
               f"must be >= 1, or null for the whole evaluation set; got {self.n_prompts}")
        bad = sorted(set(self.sets) - {"mt_bench", "humaneval", "gsm8k"})
        _check(not bad, "eval.sets", f"unknown evaluation sets {bad}; use mt_bench, humaneval, gsm8k")
        _check(self.turns >= 1, "eval.turns", f"must be >= 1 (user turns asked per conversation), got {self.turns}")


@dataclass(frozen=True)
class Table1Config:
    """Acceptance length against training context length (paper Table 1)."""

    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 20480])
    # The paper's context each column stands for (same order as ``contexts``).
    paper_contexts: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 20480])
    eval_set: str = "mt_bench"
    k: int = 5
    methods: list[str] = field(default_factory=lambda: ["parallelspec", "pard", "peagle"])
    target: str | None = None  # a target name; None: the profile's main ``target``

    def __post_init__(self) -> None:
        _check(len(self.contexts) == len(self.paper_contexts), "table1.paper_contexts",
               "must have one entry per table1.contexts entry", involves=("table1.contexts",))
        _check(all(c >= 8 for c in self.contexts), "table1.contexts", "each context must be >= 8 tokens")


@dataclass(frozen=True)
class Table9Config:
    """EAGLE-3 vs P-EAGLE acceptance length per target and evaluation set (paper Table 9)."""

    targets: list[str] | None = None  # target names; None: every target of the profile
    methods: list[str] = field(default_factory=lambda: ["eagle3", "peagle"])
    eval_sets: list[str] = field(default_factory=lambda: ["mt_bench", "humaneval", "gsm8k"])
    k: int = 5
    ctx: int = 8192  # training context length of these drafters

    def __post_init__(self) -> None:
        _check(self.k >= 1, "table9.k", "must be >= 1")
        _check(self.ctx >= 8, "table9.ctx", "must be >= 8 tokens")
        bad = sorted(set(self.eval_sets) - {"mt_bench", "humaneval", "gsm8k"})
        _check(not bad, "table9.eval_sets", f"unknown evaluation sets {bad}; use mt_bench, humaneval, gsm8k")


@dataclass(frozen=True)
class DraftingCostConfig:
    """Engine drafting/verification time per round vs K (the CPU counterpart of Table 10)."""

    ks: list[int] = field(default_factory=lambda: [3, 5, 7])
    methods: list[str] = field(default_factory=lambda: ["eagle3", "peagle"])
    eval_set: str = "mt_bench"
    n_prompts: int = 8
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        _check(all(k >= 1 for k in self.ks), "drafting_cost.ks", "each K must be >= 1")
        _check(self.n_prompts >= 1, "drafting_cost.n_prompts", "must be >= 1")


@dataclass(frozen=True)
class VllmConfig:
    """The vLLM stage (DESIGN §6-7, peagle.vllm_bench): offline acceptance with the engine cross-check,
    and the serving benchmark behind Table 10. Defaults: the measured CPU setup (docs/vllm_cpu_notes.md)."""

    python: str = ".venv-vllm/bin/python"  # the vLLM env's interpreter (envs/setup_vllm_cpu.sh); unused with --use-conda
    dtype: str = "float32"  # fp32: bit-level comparability with the engine on CPU; bfloat16 on H200
    max_model_len: int = 1024  # >= longest eval prompt + eval.max_new_tokens + K + 1 (checked)
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU backend)
    gpu_memory_utilization: float = 0.9  # CUDA only
    enforce_eager: bool = True
    max_num_seqs: int = 8
    seed: int = 0
    iomp_preload: bool = True  # LD_PRELOAD the env's libiomp5.so when present (CPU)
    startup_timeout_s: float = 900.0
    run_timeout_s: float = 1800.0
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4])  # serving benchmark levels
    n_prompts: int = 8  # prompts per concurrency level (first of the evaluation set)
    output_len: int = 32  # tokens per request (--ignore-eos)
    num_warmups: int = 1

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16", "float16"), "vllm.dtype", "use float32, bfloat16 or float16")
        _check(self.max_model_len >= 16, "vllm.max_model_len", "must be >= 16 tokens")
        _check(self.kv_cache_gib >= 1, "vllm.kv_cache_gib", "must be >= 1 (GiB)")
        _check(0 < self.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization", "must be in (0, 1]")
        _check(bool(self.concurrency) and all(c >= 1 for c in self.concurrency), "vllm.concurrency",
               "a non-empty list of levels >= 1")
        _check(self.n_prompts >= 1 and self.output_len >= 1, "vllm.n_prompts", "n_prompts and output_len must be >= 1",
               involves=("vllm.output_len",))
        _check(self.max_num_seqs >= 1, "vllm.max_num_seqs", "must be >= 1")
        _check(self.startup_timeout_s > 0 and self.run_timeout_s > 0, "vllm.startup_timeout_s",
               "timeouts must be > 0 (s)", involves=("vllm.run_timeout_s",))
        _check(self.num_warmups >= 0, "vllm.num_warmups", "must be >= 0")


@dataclass(frozen=True)
class Table10Config:
    """vLLM output tokens/s of P-EAGLE at each K vs EAGLE-3 at its best K (paper Table 10)."""

    targets: list[str] | None = None  # target names; None: every target of the profile
    eval_sets: list[str] = field(default_factory=lambda: ["mt_bench", "humaneval", "gsm8k"])
    ks: list[int] = field(default_factory=lambda: [3, 5, 7])  # P-EAGLE (each <= train.k_train)
    eagle3_ks: list[int] = field(default_factory=lambda: [3, 5, 7])  # EAGLE-3's best K is picked among these

    def __post_init__(self) -> None:
        _check(bool(self.ks) and all(k >= 1 for k in self.ks), "table10.ks", "each K must be >= 1")
        _check(bool(self.eagle3_ks) and all(k >= 1 for k in self.eagle3_ks), "table10.eagle3_ks",
               "each K must be >= 1")
        bad = sorted(set(self.eval_sets) - {"mt_bench", "humaneval", "gsm8k"})
        _check(not bad, "table10.eval_sets", f"unknown evaluation sets {bad}; use mt_bench, humaneval, gsm8k")


Scalar = bool | int | float | str


@dataclass(frozen=True)
class AblationTable:
    """One ablation table: its rows differ in one setting (peagle.ablations).

    ``setting``: a dotted config key that affects training (``drafter.num_layers``,
    ``train.k_train``, ...) or ``ctx``, the training context. ``rows``: its values, one row each.
    ``then``: the value later tables of the group train with (None: the last row), so that adding
    a row retrains nothing else. ``paper``: per row, the paper's setting it stands for, as
    ``paper_numbers.csv`` spells it (``layers=4``); rows beyond the list have no paper value.
    """

    setting: str
    rows: list[Scalar]
    then: Scalar | None = None
    paper: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(bool(self.rows), "*.rows", "an ablation table needs at least one row")
        _check(len(set(map(repr, self.rows))) == len(self.rows), "*.rows", f"rows repeat a value: {self.rows}")
        _check(len(self.paper) <= len(self.rows), "*.paper", "more paper labels than rows")

    @property
    def carried(self) -> Scalar:
        return self.rows[-1] if self.then is None else self.then


@dataclass(frozen=True)
class AblationGroup:
    """Ablation tables trained on one target and method, evaluated on ``eval_sets`` at depth ``k``.

    The tables form a chain in their order: table i's runs take ``base``, then every earlier
    table's ``then`` value, then their own row's value (the paper's Tables 6, 8, 5, 4, 7: each
    table's "before" row is the previous table's "after" row). ``ctx`` None: Table 9's context.
    ``scale``: how the group's lengths and epochs stand for the paper's (stated in the tables).
    """

    tables: dict[str, AblationTable]
    target: str | None = None  # None: the profile's main target
    method: str = "peagle"
    ctx: int | None = None
    k: int = 5
    eval_sets: list[str] = field(default_factory=lambda: ["humaneval"])
    base: dict[str, Scalar] = field(default_factory=dict)
    scale: str = ""

    def __post_init__(self) -> None:
        _check(self.k >= 1, "*.k", "must be >= 1")
        _check(self.ctx is None or self.ctx >= 3, "*.ctx", "must be >= 3 tokens")
        bad = sorted(set(self.eval_sets) - {"mt_bench", "humaneval", "gsm8k"})
        _check(bool(self.eval_sets) and not bad, "*.eval_sets", f"unknown evaluation sets {bad}; use mt_bench, "
               "humaneval, gsm8k")
        _check(bool(self.tables), "*.tables", "an ablation group needs at least one table")


@dataclass(frozen=True)
class ScalingConfig:
    """Training-overhead and memory benchmarks (paper Table 2, Figs. 3-4, memory scaling)."""

    table2_seq_len: int = 2048  # tokens per example (the paper's 2048)
    table2_k: int = 8
    table2_examples: int = 128  # examples whose data loading is timed
    table2_timed_steps: int = 2  # training examples timed per data path (after one warm-up)
    memory_k: int = 8
    memory_contexts: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 20480])
    memory_partitions: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    memory_partition_ctx: int = 8192  # context length of the partition (S) sweep
    # Mask strategies swept; names not available in this build are skipped (and logged).
    memory_strategies: list[str] = field(default_factory=lambda: ["amortized", "pard", "maskfree"])
    memory_budget_mb: int | None = None  # per-configuration cap; None: train.memory_budget_mb
    fig4_segments: int = 4

    def __post_init__(self) -> None:
        _check(self.table2_seq_len >= 3, "scaling.table2_seq_len", "must be >= 3 tokens")
        _check(self.table2_k >= 1 and self.memory_k >= 1, "scaling.table2_k", "depths must be >= 1")
        _check(self.table2_examples >= 1, "scaling.table2_examples", "must be >= 1")
        _check(self.table2_timed_steps >= 1, "scaling.table2_timed_steps", "must be >= 1")
        _check(all(c >= 3 for c in self.memory_contexts), "scaling.memory_contexts", "each must be >= 3 tokens")
        _check(all(s >= 1 for s in self.memory_partitions), "scaling.memory_partitions", "each must be >= 1")
        _check(self.memory_budget_mb is None or self.memory_budget_mb >= 1, "scaling.memory_budget_mb",
               "must be >= 1 (MiB) or null")
        _check(self.fig4_segments >= 1, "scaling.fig4_segments", "must be >= 1")


def _check_setting(key: str, where: str) -> None:
    """``key`` is ``ctx`` or a dotted key of a section that shapes training (drafter, train, methods.*)."""
    if key == "ctx":
        return
    parts = key.split(".")
    ok = parts[0] in ("drafter", "train") and len(parts) == 2 or parts[0] == "methods" and len(parts) == 3
    section = {"drafter": DrafterConfig, "train": TrainConfig, "methods": MethodConfig}.get(parts[0])
    ok = ok and parts[-1] in {f.name for f in dataclasses.fields(section)}
    _check(ok, where, f"{key!r} is not a training setting: use ctx, drafter.<key>, train.<key> or "
           "methods.<method>.<key> (peagle.config's DrafterConfig, TrainConfig, MethodConfig)")


@dataclass(frozen=True)
class Config:
    profile: str
    results_dir: str
    # Where the tables and figures go. None: ``paper_tables`` for a profile writing to its own
    # ``results/<profile>``, else ``<results_dir>/paper_tables``, so that an overlay with its own
    # results_dir (a smoke run, an experiment) never overwrites the profile's tables.
    tables_dir: str | None = None
    seed: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    hidden: HiddenConfig = field(default_factory=HiddenConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    table1: Table1Config = field(default_factory=Table1Config)
    table9: Table9Config = field(default_factory=Table9Config)
    drafting_cost: DraftingCostConfig = field(default_factory=DraftingCostConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    table10: Table10Config = field(default_factory=Table10Config)
    # Further targets (Table 9 runs every target); each has its own name, data and drafters.
    extra_targets: list[TargetConfig] = field(default_factory=list)
    methods: dict[str, MethodConfig] = field(
        default_factory=lambda: {k: MethodConfig(**v) for k, v in DEFAULT_METHODS.items()})
    # The training-recipe ablations (Tables 3-8, peagle.ablations), in groups of chained tables.
    ablations: dict[str, AblationGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.targets]
        name_keys = ("target.name", *(f"extra_targets[{i}].name" for i in range(len(self.extra_targets))))
        _check(len(set(names)) == len(names), "extra_targets", f"target names must be unique, got {names}",
               involves=name_keys)
        for name, name_key in zip(names, name_keys):
            if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name) is None:
                raise ConfigError(f"target.name: {name!r}: use letters, digits, '.' and '-' (it names result "
                                  "directories)", key=name_key)
        for key, methods in (("table1.methods", self.table1.methods), ("table9.methods", self.table9.methods),
                             ("drafting_cost.methods", self.drafting_cost.methods)):
            bad = sorted(set(methods) - set(self.methods))
            _check(not bad, key, f"unknown methods {bad}; defined in methods: {', '.join(self.methods)}",
                   involves=("methods",))
        for name in self.methods:
            _check(re.fullmatch(r"[a-z0-9]+", name) is not None, f"methods.{name}",
                   "method names are lower-case letters and digits (they name result directories)")
        for key, wanted in (("table1.target", [self.table1.target]), ("table9.targets", self.table9.targets),
                            ("table10.targets", self.table10.targets)):
            bad = sorted(set(w for w in wanted or [] if w is not None) - set(names))
            _check(not bad, key, f"unknown targets {bad}; the profile's targets are {names}", involves=name_keys)
        self._check_ablations(names)

    def _check_ablations(self, names: list[str]) -> None:
        """The ablations' structure: targets, methods, settings and table names. Whether every row
        makes a valid training run is checked where the ablations are used (peagle.ablations:
        the DAG's ablation rules, ``peagle plan``), so an overlay that shrinks, say, ``train.k_train``
        for another table is not refused for ablations it does not run."""
        seen: dict[str, str] = {}
        for gname, group in self.ablations.items():
            where = f"ablations.{gname}"
            _check(group.target is None or group.target in names, f"{where}.target",
                   f"unknown target {group.target!r}; the profile's targets are {names}")
            _check(group.method in self.methods, f"{where}.method",
                   f"unknown method {group.method!r}; defined in methods: {', '.join(self.methods)}")
            for key in group.base:
                _check_setting(key, f"{where}.base.{key}")
            for tname, table in group.tables.items():
                _check(re.fullmatch(r"table[0-9]+|fig[A-Za-z0-9]+", tname) is not None, f"{where}.tables.{tname}",
                       "ablation tables are named tableN (they name paper_tables/tableN.csv)")
                _check(tname not in seen, f"{where}.tables.{tname}", f"also defined in ablations.{seen.get(tname)}")
                seen[tname] = gname
                _check_setting(table.setting, f"{where}.tables.{tname}.setting")



    @property
    def tables_path(self) -> str:
        """The tables directory in effect (see ``tables_dir``)."""
        if self.tables_dir:
            return self.tables_dir.rstrip("/")
        results = self.results_dir.rstrip("/")
        return "paper_tables" if results == f"results/{self.profile}" else f"{results}/paper_tables"

    @property
    def targets(self) -> list[TargetConfig]:
        """The main target first, then ``extra_targets``."""
        return [self.target, *self.extra_targets]

    def target_named(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        raise ConfigError(f"no target named {name!r}; the profile's targets are {[t.name for t in self.targets]}")

    @property
    def table1_target(self) -> str:
        return self.table1.target or self.target.name

    @property
    def table9_targets(self) -> list[str]:
        return self.table9.targets or [t.name for t in self.targets]

    @property
    def table10_targets(self) -> list[str]:
        return self.table10.targets or [t.name for t in self.targets]

    def method(self, name: str) -> MethodConfig:
        if name not in self.methods:
            raise ConfigError(f"unknown method {name!r}; defined in methods: {', '.join(self.methods)}")
        return self.methods[name]

    def for_seed(self, seed: int) -> Config:
        """This config for one training run: ``train.seeds`` narrowed to ``[seed]``, one of them.

        A training run reads its seed as ``train.seed`` (the first of ``train.seeds``); the train
        stage gets the run's seed from the DAG (the drafter directory's ``_s<seed>``).
        """
        _check(seed in self.train.seeds, "train.seeds",
               f"seed {seed} is not one of train.seeds {self.train.seeds}; add it there (e.g. in an overlay "
               "like config/tiny-seeds.yaml) to train it")
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seeds=[seed]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of every setting that can change a number (see :func:`config_digest`)."""
        return config_digest(self)


# Settings that only say where files go or which interpreter runs: they change no result, so two
# runs that differ only in them have the same digest (a recorded baseline stays current).
LOCATION_KEYS = ("results_dir", "tables_dir", "vllm.python")
# Sections whose results carry their own digest (the ablation tables record the config digest and
# their group's), so that defining or extending an ablation leaves every other table current.
OWN_DIGEST_KEYS = ("ablations",)


# Settings added after results were recorded, each with the value at which the code computes, for
# every recorded result (results/recorded), what it computed before the setting existed. At that value a setting is left out of the digest, so
# adding it leaves recorded digests (and their baselines) current; any other value is hashed. The
# value is pinned here, not read from the dataclass: changing a default later changes digests.
# "methods.*" and "extra_targets[*]" stand for every entry.
NEUTRAL_SETTINGS: dict[str, Any] = {
    "data.list_max_rules": 3,
    "data.list_max_items": 20,
    "data.list_walkthrough": "item",
    "respond.backend": "hf",
    "respond.shard_prompts": None,
    "respond.parts": 1,
    "respond.max_turns": None,  # every recorded conversation has one turn
    "respond.on_long_prompt": "fail",
    "eval.turns": 1,
    "hidden.backend": "hf",
    "hidden.batch": 64,
    "hidden.shard_mb": 2000.0,  # every recorded store's shards are smaller (at most 0.4 GiB)
    "train.shard_window": 2,  # every recorded store has at most 2 shards: shuffled whole
    "train.hidden_source": "offline",
    "train.parallelism": "ddp",
}


def _digest_nodes(d: dict[str, Any], parents: list[str]) -> list[dict[str, Any]]:
    """The dicts of ``d`` at the dotted path ``parents`` (``*`` entries expand to every child)."""
    nodes = [d]
    for part in parents:
        nxt = []
        for node in nodes:
            name, star = (part[:-3], True) if part.endswith("[*]") else (part, False)
            if name == "*":
                nxt.extend(v for v in node.values() if isinstance(v, dict))
            elif star:
                nxt.extend(v for v in node.get(name) or [] if isinstance(v, dict))
            elif isinstance(node.get(name), dict):
                nxt.append(node[name])
        nodes = nxt
    return nodes


def config_digest(cfg: Config) -> str:
    """sha256 (16 hex digits) of the validated config, defaults filled in, without LOCATION_KEYS
    and without NEUTRAL_SETTINGS at their neutral values.

    Equal digests mean equal settings, whichever files and overlays spelt them; the tables record
    it, and ``peagle compare`` calls a recorded result stale when its digest differs from the
    profile's.
    """
    import hashlib
    import json

    d = cfg.to_dict()
    for key in LOCATION_KEYS + OWN_DIGEST_KEYS:
        *parents, leaf = key.split(".")
        for node in _digest_nodes(d, parents):
            node.pop(leaf, None)
    for key, neutral in NEUTRAL_SETTINGS.items():
        *parents, leaf = key.split(".")
        for node in _digest_nodes(d, parents):
            if leaf in node and node[leaf] == neutral:
                del node[leaf]
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}", key=key)
    if origin is Literal:
        _check(value in args, key, f"{value!r} is not one of {list(args)}")
        return value
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (valid keys here: {', '.join(sorted(names))})",
                          key=f"{where}{unknown[0]}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {err}") from None
    except ConfigError as err:
        # Sections used at several places (targets, methods) name their keys relative to "*".
        def here(key: str) -> str:
            return prefix + key[1:] if key.startswith("*.") else key

        raise ConfigError(here(str(err)), key=here(err.key) if err.key else None,
                          involves=tuple(map(here, err.involves))) from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    train = raw.get("train")
    if isinstance(train, dict) and "seed" in train:
        raise ConfigError(f"train.seed: replaced by train.seeds, a list with one training run per seed; write "
                          f"`seeds: [{train['seed']}]` under train (several seeds, e.g. config/tiny-seeds.yaml, "
                          "give Tables 1 and 9 a spread)", key="train.seed")
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict):
        raise ConfigError(f"methods: expected a mapping, got {type(methods).__name__}", key="methods")
    # A profile adds methods or changes fields of the default ones; it never drops one silently.
    raw["methods"] = _deep_merge(DEFAULT_METHODS, methods)
    return _build(Config, raw, "")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (profiles live in config/, e.g. config/tiny.yaml)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def read_config_files(*paths: str | Path) -> dict[str, Any]:
    """Read one or more YAML files, later ones deep-merged over earlier ones (no validation)."""
    merged: dict[str, Any] = {}
    for path in map(Path, paths):
        merged = _deep_merge(merged, _read_config_file(path))
    return merged


_KEY_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _key_parts(key: str) -> list[str | int]:
    """``extra_targets[0].num_heads`` -> ``["extra_targets", 0, "num_heads"]``."""
    return [int(index) if index else name for index, name in _KEY_PART.findall(key)]


def _setter(raws: list[dict[str, Any]], key: str, *, exact: bool) -> int | None:
    """Index of the file whose setting is in effect for ``key`` (the deep-merge order of
    :func:`read_config_files`: a later mapping merges, a later list or scalar replaces).

    ``exact``: None unless some file sets the key itself; else the file setting its longest prefix
    that any file sets (None when no file sets even the top-level key).
    """
    layer: list[tuple[int, Any]] = list(enumerate(raws))
    owner, parts = None, _key_parts(key)
    for part in parts:
        found = []
        for i, node in layer:
            if isinstance(part, str) and isinstance(node, dict) and part in node:
                found.append((i, node[part]))
            elif isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
                found.append((i, node[part]))
        if not found:
            return None if exact else owner
        # Values before the last non-mapping are replaced; a non-mapping last replaces them all.
        cut = max((j for j, (_, v) in enumerate(found) if not isinstance(v, dict)), default=-1)
        layer = found[cut:] if cut == len(found) - 1 else found[cut + 1:]
        owner = layer[-1][0]
    return owner


def _file_of(raws: list[dict[str, Any]], err: ConfigError) -> int | None:
    """The one file to blame for ``err``, or None when no single file can be identified."""
    keys = err.keys
    if not keys:
        return None
    if len(keys) == 1:  # the key, or the section that sets it
        return _setter(raws, keys[0], exact=False)
    # A cross-field check: one file only when every key it read and some file sets is set there.
    owners = {_setter(raws, k, exact=True) for k in keys} - {None}
    return owners.pop() if len(owners) == 1 else None


def load_config(*paths: str | Path) -> Config:
    """Load and validate a profile YAML (plus optional overlays).

    Errors name the dotted key and the file that sets it (the last one, for a key several files
    set); all the files when no one file can be identified (a missing key, a check across files).
    """
    if not paths:
        raise ConfigError("no config file given (e.g. config/tiny.yaml)")
    raws = [_read_config_file(Path(p)) for p in paths]
    raw: dict[str, Any] = {}
    for one in raws:
        raw = _deep_merge(raw, one)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        i = _file_of(raws, err)
        where = str(paths[i]) if i is not None else ", ".join(map(str, paths))
        raise ConfigError(f"{where}: {err}", key=err.key, involves=err.involves) from None
