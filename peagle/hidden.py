"""Target hidden-state extraction, the shard dataset and the shifted training pairing.

Per sequence ``x_0..x_{T-1}`` (prompt + response ids) a shard stores, concatenated over its S
sequences (N tokens in all; ARCHITECTURE.md "Hidden states"):

- ``input_ids``   [N] int64
- ``offsets``     [S+1] int64   (sequence s = rows ``offsets[s]:offsets[s+1]``)
- ``aux_hidden``  [N, 3H]       (``hidden_states[i]`` = input to layer i, for i in aux ids, ascending)
- ``last_hidden`` [N, H]        (``hidden_states[-1]``: in transformers 5 already final-normed,
                                 so target logits = ``lm_head(last_hidden)``; checked at run time)
- ``loss_mask``   [N] uint8     (1 on the target's tokens: the response and, in a conversation of
                                 several turns, its earlier answers, ``answer_spans``)

``manifest.json`` lists the shards with their sha256, bytes, tokens and per-sequence lengths, and
the store's totals. A shard is at most ``shard_mb`` MiB (one longer sequence gets a shard of its
own) and at most about ``shard_tokens`` tokens. ``HiddenStateDataset`` checks a shard's sha256
when it first reads it and refuses a shard whose bytes do not match.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from peagle.io import atomic_path, atomic_write_json, sha256_file
from peagle.target import validate_aux_layer_ids
from peagle.target.hf import _parse_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

HIDDEN_FORMAT = "peagle-hidden-v1"
SHARD_PATTERN = "shard_{:05d}.safetensors"
TENSOR_KEYS = ("input_ids", "offsets", "aux_hidden", "last_hidden", "loss_mask")


def _dtype_name(dt: "torch.dtype") -> str:
    return str(dt).replace("torch.", "")


def _first_supervised(mask: "torch.Tensor") -> int | None:
    """The first position t >= 1 whose loss mask is set (row t-1 of the shifted pairing), or None."""
    hits = mask[1:].nonzero()
    return int(hits[0, 0]) + 1 if hits.numel() else None


def _write_shard(out_dir: Path, index: int, buf: dict[str, list], ids: list[str],
                 meta: dict[str, str]) -> dict[str, Any]:
    """Concatenate the buffered sequences into one safetensors file (atomic); return its entry."""
    import torch
    from safetensors.torch import save_file

    lengths = [int(t.shape[0]) for t in buf["input_ids"]]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    tensors = {
        "input_ids": torch.cat(buf["input_ids"]).contiguous(),
        "offsets": offsets,
        "aux_hidden": torch.cat(buf["aux_hidden"]).contiguous(),
        "last_hidden": torch.cat(buf["last_hidden"]).contiguous(),
        "loss_mask": torch.cat(buf["loss_mask"]).contiguous(),
    }
    name = SHARD_PATTERN.format(index)
    with atomic_path(out_dir / name) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        digest = sha256_file(tmp)
    return {"file": name, "num_sequences": len(lengths), "num_tokens": int(offsets[-1]),
            "num_response_tokens": int(tensors["loss_mask"].sum()), "sha256": digest,
            "num_bytes": (out_dir / name).stat().st_size, "ids": ids, "lengths": lengths,
            "first_supervised": [_first_supervised(m) for m in buf["loss_mask"]]}


def bytes_per_token(hidden_size: int, dtype: "torch.dtype") -> int:
    """Stored bytes per token: aux [3H] + last [H] hidden states, the int64 id and the uint8 mask."""
    import torch

    return 4 * hidden_size * torch.empty((), dtype=dtype).element_size() + 8 + 1


def sequence_of(row: dict[str, Any], max_seq_len: int | None, vocab: int,
                where: str | Path) -> tuple[list[int], list[int], bool]:
    """A response row's training sequence: ``(prompt + response ids, loss mask, whether cut)``.

    The mask is 1 on the target's tokens (the response and ``answer_spans``); a sequence longer
    than ``max_seq_len`` is cut to it. Errors name ``where`` (the responses file) and the row.
    """
    p, r = list(row["prompt_ids"]), list(row["response_ids"])
    x = p + r
    mask = [0] * len(p) + [1] * len(r)
    for a, b in row.get("answer_spans", []):  # the target's earlier answers in the history
        mask[a:b] = [1] * (b - a)
    cut = max_seq_len is not None and len(x) > max_seq_len
    if cut:
        x, mask = x[:max_seq_len], mask[:max_seq_len]
    if not x:
        raise ValueError(f"{where}: sequence {row['id']!r} is empty")
    if min(x) < 0 or max(x) >= vocab:
        raise ValueError(f"{where}: sequence {row['id']!r} has token ids outside the target's vocabulary "
                         f"[0, {vocab}); responses from another target? Re-run the `respond` stage with this target")
    return x, mask, cut


def target_hidden_states(model, ids: "torch.Tensor", aux: Sequence[int], num_layers: int,
                         check: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One target forward of ``ids`` [1, T] -> (``aux_hidden`` [T, 3H], ``last_hidden`` [T, H]).

    ``aux_hidden``: ``hidden_states[i]`` concatenated for the ascending ``aux``; ``last_hidden``:
    ``hidden_states[-1]``. ``check``: also verify that ``lm_head(hidden_states[-1])`` is the
    model's logits (DESIGN §1: in transformers 5 the last entry is already final-normed).
    """
    import torch

    # logits_to_keep=1: we never need full-vocabulary logits, only the last one for the check.
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    hs = out.hidden_states
    if len(hs) != num_layers + 1:
        raise RuntimeError(f"model returned {len(hs)} hidden states, expected L+1={num_layers + 1}; the "
                           "output_hidden_states convention changed")
    if check:
        mine = model.get_output_embeddings()(hs[-1][:, -1:]).float()
        ref = out.logits[:, -1:].float()
        if not torch.allclose(mine, ref, rtol=1e-3, atol=1e-3 * max(1.0, float(ref.abs().max()))):
            raise RuntimeError("lm_head(hidden_states[-1]) != model logits: this transformers version (or model) "
                               "does not return the final-normed state last; last_hidden would be wrong. "
                               "See DESIGN §1.")
    return torch.cat([hs[i][0] for i in aux], dim=-1), hs[-1][0]


class HFStates:
    """Hidden states by HF forwards, one sequence at a time (batch 1: no padding effects)."""

    backend, batch = "hf", 1

    def __init__(self, model, aux_layer_ids: Sequence[int], check_logits: bool = True):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.model, self.num_layers, self.hidden_size = model, int(cfg.num_hidden_layers), int(cfg.hidden_size)
        self.aux = validate_aux_layer_ids(aux_layer_ids, self.num_layers, "aux_layer_ids")
        self.vocab = int(model.get_input_embeddings().weight.shape[0])
        self._check = check_logits

    def __call__(self, seqs: Sequence[Sequence[int]]) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        """``[(aux_hidden [T, 3H], last_hidden [T, H])]`` per sequence, on the model's device."""
        import torch

        device = next(self.model.parameters()).device
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for x in seqs:
                    out.append(target_hidden_states(self.model, torch.tensor([list(x)], device=device), self.aux,
                                                    self.num_layers, check=self._check))
                    self._check = False
        finally:
            self.model.train(was_training)
        return out


def extract_hidden_states(model, responses_path: str | Path, aux_layer_ids: Sequence[int],
                          out_dir: str | Path, shard_tokens: int | None, dtype: "str | torch.dtype",
                          target_name: str, max_seq_len: int | None = None, *, shard_mb: float | None = None,
                          check_logits: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run the target over every (prompt + response) sequence and stream hidden states to shards.

    ``model``: an HF model (one forward per sequence, :class:`HFStates`) or a states backend with
    the same call (:class:`peagle.vllm_hidden.VllmStates`, batches through vLLM). ``aux_hidden`` =
    concat of ``hidden_states[i]`` for the ascending ``aux_layer_ids``, ``last_hidden`` =
    ``hidden_states[-1]`` (final-normed); both cast to ``dtype``. A sequence never spans shards:
    a shard is flushed once it holds >= ``shard_tokens`` tokens, and before a sequence that would
    take it past ``shard_mb`` MiB, so memory stays bounded by about one shard. Sequences longer
    than ``max_seq_len`` are cut to it. ``manifest.json`` is written last; shards of an earlier run
    that the new manifest does not list are removed. Returns the manifest.
    """
    import torch
    from tqdm.auto import tqdm

    from peagle.generate import read_responses

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_tokens is not None and shard_tokens < 1:
        raise ValueError(f"hidden.shard_tokens={shard_tokens} must be >= 1 (or null: shard_mb alone)")
    if shard_mb is not None and shard_mb <= 0:
        raise ValueError(f"hidden.shard_mb={shard_mb} must be > 0 (or null: shard_tokens alone)")
    states = model if hasattr(model, "batch") else HFStates(model, aux_layer_ids, check_logits)
    store_dtype = _parse_dtype(dtype)
    num_layers, hidden_size, aux = states.num_layers, states.hidden_size, states.aux
    if list(aux) != sorted(int(i) for i in aux_layer_ids):
        raise ValueError(f"aux_layer_ids {list(aux_layer_ids)} differ from the states backend's {list(aux)}")
    rows = read_responses(responses_path)
    if not rows:
        raise ValueError(f"{responses_path}: no responses; re-run the `respond` stage")
    meta = {"format": HIDDEN_FORMAT, "aux_layer_ids": json.dumps(aux),
            "hidden_size": str(hidden_size), "dtype": _dtype_name(store_dtype)}
    per_token = bytes_per_token(hidden_size, store_dtype)
    max_tokens = shard_tokens or (1 << 62)
    max_bytes = (1 << 62) if shard_mb is None else int(shard_mb * 2**20)

    shards: list[dict[str, Any]] = []
    buf: dict[str, list] = {k: [] for k in ("input_ids", "aux_hidden", "last_hidden", "loss_mask")}
    buf_ids: list[str] = []
    buf_tokens = truncated = total_tokens = 0

    def flush() -> None:
        nonlocal buf, buf_ids, buf_tokens
        shards.append(_write_shard(out_dir, len(shards), buf, buf_ids, meta))
        buf = {k: [] for k in buf}
        buf_ids, buf_tokens = [], 0

    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), desc="extract hidden states", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for c in range(0, len(rows), states.batch):
        chunk = rows[c:c + states.batch]
        seqs = [sequence_of(row, max_seq_len, states.vocab, responses_path) for row in chunk]
        for row, (x, mask, cut), (aux_h, last_h) in zip(chunk, seqs, states([x for x, _, _ in seqs])):
            truncated += cut
            if buf_ids and (buf_tokens + len(x)) * per_token > max_bytes:  # this sequence would pass shard_mb
                flush()
            buf["input_ids"].append(torch.tensor(x, dtype=torch.long))
            buf["aux_hidden"].append(aux_h.to("cpu", store_dtype))
            buf["last_hidden"].append(last_h.to("cpu", store_dtype))
            buf["loss_mask"].append(torch.tensor(mask, dtype=torch.uint8))
            buf_ids.append(str(row["id"]))
            buf_tokens += len(x)
            total_tokens += len(x)
            if buf_tokens >= max_tokens:
                flush()
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{total_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if buf_ids:
        flush()
    wall = time.perf_counter() - t0
    manifest = {
        "format": HIDDEN_FORMAT, "target": str(target_name), "backend": states.backend, "aux_layer_ids": aux,
        "num_layers": num_layers, "hidden_size": hidden_size, "dtype": _dtype_name(store_dtype),
        "responses": str(responses_path), "responses_sha256": sha256_file(responses_path),
        "max_seq_len": max_seq_len, "num_truncated": truncated,
        "num_sequences": sum(s["num_sequences"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_response_tokens": sum(s["num_response_tokens"] for s in shards),
        "num_bytes": sum(s["num_bytes"] for s in shards), "shard_tokens": shard_tokens, "shard_mb": shard_mb,
        "wall_s": wall, "tokens_per_s": total_tokens / max(wall, 1e-9),
        "shards": shards,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    keep = {s["file"] for s in shards}
    for f in out_dir.glob("shard_*.safetensors"):
        if f.name not in keep:  # stale shard from an earlier, larger run
            f.unlink()
    return manifest


class HiddenStateDataset:
    """Per-sequence view of an extraction directory.

    ``ds[i]`` -> ``{"input_ids": [T] int64, "aux_hidden": [T, 3H], "last_hidden": [T, H],
    "loss_mask": [T] uint8}`` (views into the loaded shard; clone before modifying in place).

    ``verify``: ``"lazy"`` (default) checks a shard's sha256 when it is first loaded, from the same
    bytes that are then parsed; ``"eager"`` hashes every shard in the constructor; ``"none"`` skips.
    A mismatch raises ``ValueError`` naming the shard file. Up to ``cache_shards`` loaded shards
    are kept (least recently used evicted), so sequential or shard-grouped access is cheap.
    """

    def __init__(self, directory: str | Path, verify: str = "lazy", cache_shards: int = 2):
        if verify not in ("lazy", "eager", "none"):
            raise ValueError(f"HiddenStateDataset: verify={verify!r}; use lazy, eager or none")
        self.dir = Path(directory)
        mpath = self.dir / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath} not found; run the `extract` stage first")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath}: invalid JSON ({e}); re-run the `extract` stage") from e
        for k in ("format", "aux_layer_ids", "hidden_size", "dtype", "shards"):
            if k not in self.manifest:
                raise ValueError(f"{mpath}: missing field '{k}'; re-run the `extract` stage")
        if self.manifest["format"] != HIDDEN_FORMAT:
            raise ValueError(f"{mpath}: format {self.manifest['format']!r}, expected {HIDDEN_FORMAT!r}")
        self.verify = verify
        self.cache_shards = max(1, int(cache_shards))
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        self._starts = [0]
        for s in self._shards:
            self._starts.append(self._starts[-1] + int(s["num_sequences"]))
        self._cache: dict[int, dict[str, Any]] = {}
        self._verified: set[int] = set()
        self.shard_reads: dict[int, int] = {}  # shard -> times its file was read (each costs I/O)
        if verify == "eager":
            self.verify_all()

    # -- metadata
    @property
    def rebuild_command(self) -> str:
        """The Snakemake command that rebuilds this store (the `extract` rule's output)."""
        return f"snakemake --cores all --forcerun extract {self.dir / 'manifest.json'}"

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def first_supervised(self) -> list[int | None] | None:
        """Per sequence, its first supervised position t >= 1 (None: none), from the manifest; None
        for a store written before the manifest recorded it."""
        if not all("first_supervised" in s for s in self._shards):
            return None
        return [f for s in self._shards for f in s["first_supervised"]]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def aux_layer_ids(self) -> list[int]:
        return [int(i) for i in self.manifest["aux_layer_ids"]]

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def num_tokens(self) -> int:
        return sum(int(s["num_tokens"]) for s in self._shards)

    @property
    def lengths(self) -> list[int]:
        """Sequence lengths T in dataset order (from the manifest, no shard is read)."""
        return [int(n) for s in self._shards for n in s["lengths"]]

    @property
    def ids(self) -> list[str]:
        return [str(i) for s in self._shards for i in s["ids"]]

    def shard_of(self, i: int) -> int:
        """Index of the shard holding sequence ``i`` (for shard-grouped samplers)."""
        return self._locate(i)[0]

    def __len__(self) -> int:
        return self._starts[-1]

    # -- loading
    def _read_verified(self, k: int, force_verify: bool = False) -> bytes:
        entry = self._shards[k]
        path = self.dir / entry["file"]
        if not path.exists():
            raise FileNotFoundError(f"hidden-state shard {path} listed in the manifest is missing; "
                                    f"rebuild the store: {self.rebuild_command}")
        data = path.read_bytes()
        self.shard_reads[k] = self.shard_reads.get(k, 0) + 1
        if (self.verify != "none" or force_verify) and (k not in self._verified or force_verify):
            got = hashlib.sha256(data).hexdigest()
            if got != entry["sha256"]:
                raise ValueError(f"hidden-state shard {path}: sha256 {got[:16]}... does not match the "
                                 f"manifest's {entry['sha256'][:16]}...; the file is corrupted or stale. "
                                 f"Rebuild the store: {self.rebuild_command}")
            self._verified.add(k)
        return data

    def verify_all(self) -> None:
        """Hash every shard now (raises on the first mismatch)."""
        for k in range(len(self._shards)):
            self._read_verified(k, force_verify=True)

    def _load(self, k: int) -> dict[str, Any]:
        if k in self._cache:
            self._cache[k] = self._cache.pop(k)  # mark most recently used
            return self._cache[k]
        from safetensors.torch import load as st_load

        data = self._read_verified(k)
        path = self.dir / self._shards[k]["file"]
        try:
            tensors = st_load(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"hidden-state shard {path} cannot be parsed ({e}); rebuild the store: "
                             f"{self.rebuild_command}") from e
        missing = [t for t in TENSOR_KEYS if t not in tensors]
        if missing:
            raise ValueError(f"hidden-state shard {path} lacks tensors {missing}; rebuild the store: "
                             f"{self.rebuild_command}")
        n = int(self._shards[k]["num_sequences"])
        if tensors["offsets"].numel() != n + 1 or tensors["aux_hidden"].shape[-1] != 3 * self.hidden_size:
            raise ValueError(f"hidden-state shard {path} disagrees with manifest.json (sequences or "
                             f"width); rebuild the store: {self.rebuild_command}")
        shard = {"tensors": tensors, "offsets": tensors["offsets"].tolist()}
        self._cache[k] = shard
        while len(self._cache) > self.cache_shards:
            self._cache.pop(next(iter(self._cache)))
        return shard

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        import bisect

        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, j = self._locate(int(i))
        shard = self._load(k)
        a, b = shard["offsets"][j], shard["offsets"][j + 1]
        t = shard["tensors"]
        return {key: t[key][a:b] for key in ("input_ids", "aux_hidden", "last_hidden", "loss_mask")}

    def id_of(self, i: int) -> str:
        """The response record id of sequence ``i`` (from the manifest)."""
        k, j = self._locate(int(i))
        return str(self._shards[k]["ids"][j])


class OnlineHiddenStates:
    """Online mode: the store's per-sequence view (``ds[i]``, ``lengths``, ``first_supervised``, ...)
    over a responses file, each sequence's hidden states computed by a target forward when asked
    for, exactly as extraction computes them (:func:`target_hidden_states`). No store on disk;
    every read costs one target forward.

    ``model``: the frozen target (HF), on the device the trainer uses; ``dtype``: the precision the
    store would have held (the states are rounded to it, so that online equals offline).
    """

    def __init__(self, model, responses_path: str | Path, aux_layer_ids: Sequence[int], dtype: "str | torch.dtype",
                 max_seq_len: int | None = None):
        from peagle.generate import read_responses

        self._states = HFStates(model, aux_layer_ids)
        self.aux_layer_ids, self.hidden_size = self._states.aux, self._states.hidden_size
        self.store_dtype = _parse_dtype(dtype)
        self._rows = read_responses(responses_path)
        if not self._rows:
            raise ValueError(f"{responses_path}: no responses; re-run the `respond` stage")
        self._seqs = [sequence_of(r, max_seq_len, self._states.vocab, responses_path)[:2] for r in self._rows]
        self.num_shards = 1

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x, _ in self._seqs]

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self._rows]

    @property
    def first_supervised(self) -> list[int | None]:
        return [next((t for t in range(1, len(m)) if m[t]), None) for _, m in self._seqs]

    def shard_of(self, i: int) -> int:
        return 0

    def __len__(self) -> int:
        return len(self._seqs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        x, mask = self._seqs[i]
        ((aux_h, last_h),) = self._states([x])
        # Rounded to the store's dtype and back on the CPU, as a stored shard is read.
        return {"input_ids": torch.tensor(x, dtype=torch.long), "aux_hidden": aux_h.to("cpu", self.store_dtype),
                "last_hidden": last_h.to("cpu", self.store_dtype), "loss_mask": torch.tensor(mask, dtype=torch.uint8)}


def shifted_rows(seq: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """DESIGN §1 shifted pairing of one stored sequence of length T into n = T-1 training rows.

    Row i (0 <= i < T-1): ``input_ids[i+1]`` (the newest token, [n]), ``aux_hidden[i]`` (the
    target state that exists when x_{i+1} is fed, [n, 3H]), ``target_hidden = last_hidden[i+1]``
    (its lm_head gives the target distribution over x_{i+2}, [n, H]) and
    ``loss_mask = loss_mask[i+1]`` ([n]).
    """
    T = int(seq["input_ids"].shape[0])
    for k in ("aux_hidden", "last_hidden", "loss_mask"):
        if int(seq[k].shape[0]) != T:
            raise ValueError(f"shifted_rows: {k} has {seq[k].shape[0]} rows, input_ids has {T}")
    return {
        "input_ids": seq["input_ids"][1:],
        "aux_hidden": seq["aux_hidden"][:-1],
        "target_hidden": seq["last_hidden"][1:],
        "loss_mask": seq["loss_mask"][1:],
    }
