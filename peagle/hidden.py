"""Target hidden-state extraction, the shard dataset and the shifted training pairing.

Per sequence ``x_0..x_{T-1}`` (prompt + response ids) a shard stores, concatenated over its S
sequences (N tokens in all; ARCHITECTURE.md "Hidden states"):

- ``input_ids``   [N] int64
- ``offsets``     [S+1] int64   (sequence s = rows ``offsets[s]:offsets[s+1]``)
- ``aux_hidden``  [N, 3H]       (``hidden_states[i]`` = input to layer i, for i in aux ids, ascending)
- ``last_hidden`` [N, H]        (``hidden_states[-1]``: in transformers 5 already final-normed,
                                 so target logits = ``lm_head(last_hidden)``; checked at run time)
- ``loss_mask``   [N] uint8     (1 on response tokens)

``manifest.json`` lists the shards with their sha256; ``HiddenStateDataset`` refuses a shard whose
bytes do not match.
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
            "ids": ids, "lengths": lengths}


def extract_hidden_states(model, responses_path: str | Path, aux_layer_ids: Sequence[int],
                          out_dir: str | Path, shard_tokens: int, dtype: "str | torch.dtype",
                          target_name: str, max_seq_len: int | None = None, *,
                          check_logits: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run the target once per (prompt + response) sequence and stream hidden states to shards.

    One forward per sequence (batch 1: no padding effects) with ``output_hidden_states=True``;
    ``aux_hidden`` = concat of ``hidden_states[i]`` for the ascending ``aux_layer_ids``,
    ``last_hidden`` = ``hidden_states[-1]``; both cast to ``dtype``. A shard is flushed once it
    holds >= ``shard_tokens`` tokens (a sequence never spans shards), so memory stays bounded by
    about one shard. Sequences longer than ``max_seq_len`` are cut to it. ``manifest.json`` is
    written last; shards of an earlier run that the new manifest does not list are removed.
    Returns the manifest.
    """
    import torch
    from tqdm.auto import tqdm

    from peagle.generate import read_responses

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_tokens < 1:
        raise ValueError(f"extract_hidden_states: shard_tokens={shard_tokens} must be >= 1")
    store_dtype = _parse_dtype(dtype)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = int(cfg.num_hidden_layers)
    hidden_size = int(cfg.hidden_size)
    aux = validate_aux_layer_ids(aux_layer_ids, num_layers, "aux_layer_ids")
    rows = read_responses(responses_path)
    if not rows:
        raise ValueError(f"{responses_path}: no responses; re-run the `respond` stage")
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    meta = {"format": HIDDEN_FORMAT, "aux_layer_ids": json.dumps(aux),
            "hidden_size": str(hidden_size), "dtype": _dtype_name(store_dtype)}

    shards: list[dict[str, Any]] = []
    buf: dict[str, list] = {k: [] for k in ("input_ids", "aux_hidden", "last_hidden", "loss_mask")}
    buf_ids: list[str] = []
    buf_tokens = 0
    truncated = 0
    total_tokens = 0
    checked = not check_logits
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(rows, desc="extract hidden states", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with torch.no_grad():
        for row in bar:
            p, r = list(row["prompt_ids"]), list(row["response_ids"])
            x = p + r
            mask = [0] * len(p) + [1] * len(r)
            if max_seq_len is not None and len(x) > max_seq_len:
                x, mask = x[:max_seq_len], mask[:max_seq_len]
                truncated += 1
            if not x:
                raise ValueError(f"{responses_path}: sequence {row['id']!r} is empty")
            if min(x) < 0 or max(x) >= vocab:
                raise ValueError(f"{responses_path}: sequence {row['id']!r} has token ids outside the "
                                 f"target's vocabulary [0, {vocab}); responses from another target? "
                                 f"Re-run the `respond` stage with this target")
            ids = torch.tensor([x], dtype=torch.long, device=device)
            # logits_to_keep=1: we never need full-vocabulary logits, only the last one for a check.
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            hs = out.hidden_states
            if len(hs) != num_layers + 1:
                raise RuntimeError(f"model returned {len(hs)} hidden states, expected L+1="
                                   f"{num_layers + 1}; the output_hidden_states convention changed")
            if not checked:
                # DESIGN §1 trap: hidden_states[-1] must already be final-normed (transformers 5).
                head = model.get_output_embeddings()
                mine = head(hs[-1][:, -1:]).float()
                ref = out.logits[:, -1:].float()
                if not torch.allclose(mine, ref, rtol=1e-3, atol=1e-3 * max(1.0, float(ref.abs().max()))):
                    raise RuntimeError("lm_head(hidden_states[-1]) != model logits: this transformers "
                                       "version (or model) does not return the final-normed state "
                                       "last; last_hidden would be wrong. See DESIGN §1.")
                checked = True
            buf["input_ids"].append(ids[0].cpu())
            buf["aux_hidden"].append(torch.cat([hs[i][0] for i in aux], dim=-1).to("cpu", store_dtype))
            buf["last_hidden"].append(hs[-1][0].to("cpu", store_dtype))
            buf["loss_mask"].append(torch.tensor(mask, dtype=torch.uint8))
            buf_ids.append(str(row["id"]))
            buf_tokens += len(x)
            total_tokens += len(x)
            if buf_tokens >= shard_tokens:
                shards.append(_write_shard(out_dir, len(shards), buf, buf_ids, meta))
                buf = {k: [] for k in buf}
                buf_ids, buf_tokens = [], 0
            bar.set_postfix(tok_s=f"{total_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    model.train(was_training)
    if buf_ids:
        shards.append(_write_shard(out_dir, len(shards), buf, buf_ids, meta))
    wall = time.perf_counter() - t0
    manifest = {
        "format": HIDDEN_FORMAT, "target": str(target_name), "aux_layer_ids": aux,
        "num_layers": num_layers, "hidden_size": hidden_size, "dtype": _dtype_name(store_dtype),
        "responses": str(responses_path), "responses_sha256": sha256_file(responses_path),
        "max_seq_len": max_seq_len, "num_truncated": truncated,
        "num_sequences": sum(s["num_sequences"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_response_tokens": sum(s["num_response_tokens"] for s in shards),
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
        if verify == "eager":
            self.verify_all()

    # -- metadata
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
                                    f"re-run the `extract` stage")
        data = path.read_bytes()
        if (self.verify != "none" or force_verify) and (k not in self._verified or force_verify):
            got = hashlib.sha256(data).hexdigest()
            if got != entry["sha256"]:
                raise ValueError(f"hidden-state shard {path}: sha256 {got[:16]}... does not match the "
                                 f"manifest's {entry['sha256'][:16]}...; the file is corrupted or "
                                 f"stale: re-run hidden-state extraction (`extract` stage)")
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
            raise ValueError(f"hidden-state shard {path} cannot be parsed ({e}); re-run the "
                             f"`extract` stage") from e
        missing = [t for t in TENSOR_KEYS if t not in tensors]
        if missing:
            raise ValueError(f"hidden-state shard {path} lacks tensors {missing}; re-run `extract`")
        n = int(self._shards[k]["num_sequences"])
        if tensors["offsets"].numel() != n + 1 or tensors["aux_hidden"].shape[-1] != 3 * self.hidden_size:
            raise ValueError(f"hidden-state shard {path} disagrees with manifest.json (sequences or "
                             f"width); re-run the `extract` stage")
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
