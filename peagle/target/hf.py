"""Loading a target (tiny or Hugging Face) for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from peagle.target.info import (read_target_json, resolve_model_path, validate_aux_layer_ids,
                                write_target_json)

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _parse_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16}
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[key]


# Attention implementations each architecture's HF class accepts (transformers 5.24, checked in
# its modeling files: GptOssPreTrainedModel has _supports_sdpa = False, _supports_flex_attn and
# _supports_flash_attn True; eager always works). "auto" takes the first.
ATTN_IMPLEMENTATIONS = {
    "gpt_oss": ("eager", "flex_attention", "flash_attention_2", "kernels-community/vllm-flash-attn3"),
    "llama": ("sdpa", "eager", "flex_attention", "flash_attention_2"),
    "qwen3_moe": ("sdpa", "eager", "flex_attention", "flash_attention_2"),
}

# Quantization formats -> the package transformers needs to load them (None: loads without one;
# MXFP4 is dequantized to bf16 when the `kernels` package / a Hopper GPU is missing).
QUANT_PACKAGES = {"mxfp4": None, "fp8": None, "bitsandbytes": "bitsandbytes", "gptq": "gptqmodel",
                  "awq": "awq", "compressed-tensors": "compressed_tensors", "hqq": "hqq", "torchao": "torchao"}


def resolve_attn_implementation(model_type: str, requested: str | None = "auto", *,
                                target: str = "target") -> str:
    """The attention implementation to load ``model_type`` with: ``requested``, or for "auto"/None
    the architecture's default (eager for gpt_oss, which has no SDPA path; sdpa otherwise)."""
    known = ATTN_IMPLEMENTATIONS.get(model_type)
    if requested in (None, "auto"):
        return known[0] if known else "sdpa"
    if known is not None and requested not in known and not str(requested).startswith("kernels-"):
        raise ValueError(f"{target}: attention implementation {requested!r} is not supported by "
                         f"architecture {model_type!r}; set target.attn_implementation to one of "
                         f"{list(known)} or 'auto'")
    return requested


def check_quantization(hf_config, *, target: str = "target") -> str | None:
    """The checkpoint's quantization method (None if unquantized); a clear error when loading it
    needs a package that is not installed."""
    import importlib.util

    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = str(getattr(method, "value", method))
    pkg = QUANT_PACKAGES.get(method, "unknown")
    if pkg == "unknown":
        raise ValueError(f"{target}: quantization method {method!r} is not one this suite knows how to "
                         f"load ({sorted(QUANT_PACKAGES)}); use an unquantized checkpoint (target.path)")
    if pkg is not None and importlib.util.find_spec(pkg) is None:
        raise ImportError(f"{target}: the checkpoint is quantized with {method!r}, which needs the "
                          f"package {pkg!r}; install it in this environment or use an unquantized "
                          f"checkpoint (target.path)")
    return method


_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float64": 8, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class DevicePlan:
    """How a target's weights spread over devices: ``device_map`` for ``from_pretrained`` (None when
    one device holds it all), bytes of the weights, and bytes placed per device."""

    weight_bytes: int
    per_device_bytes: tuple[int, ...]
    device_map: dict[str, int] | None

    @property
    def num_devices(self) -> int:
        return sum(1 for b in self.per_device_bytes if b)


def _module_bytes(model, dtype_bytes: int) -> tuple[dict[str, int], list[str]]:
    """Bytes per top-level placement unit (each decoder layer, embeddings, norm, head) in the
    order the forward visits them; parameters counted at ``dtype_bytes`` each."""
    units: dict[str, int] = {}
    order: list[str] = []
    layers_prefix = None
    for name, _ in model.named_modules():
        if name.endswith(".layers") or name == "layers":
            layers_prefix = name
            break
    for pname, p in model.named_parameters(remove_duplicate=False):
        if layers_prefix and pname.startswith(layers_prefix + "."):
            idx = pname[len(layers_prefix) + 1:].split(".", 1)[0]
            unit = f"{layers_prefix}.{idx}"
        else:
            unit = pname.rsplit(".", 1)[0]
        if unit not in units:
            units[unit] = 0
            order.append(unit)
        units[unit] += p.numel() * dtype_bytes
    return units, order


def plan_device_map(hf_config, *, dtype: str = "bfloat16", num_devices: int = 1,
                    max_memory_gib: float | None = None, reserve_fraction: float = 0.1,
                    target: str = "target") -> DevicePlan:
    """Place a target's weights over ``num_devices`` devices of ``max_memory_gib`` each, layer by
    layer in forward order (dependency-free; the model is instantiated on the meta device, so no
    memory is used). ``reserve_fraction`` of every device stays free for activations and the KV
    cache. Raises ``ValueError`` naming the settings to change when the weights do not fit.

    ``max_memory_gib=None``: no limit (everything on device 0). Quantized checkpoints are planned at
    ``dtype`` (the dequantized size), an upper bound of what they take.
    """
    import torch
    from transformers import AutoModelForCausalLM

    nbytes = _DTYPE_BYTES.get(str(dtype).replace("torch.", ""))
    if nbytes is None:
        raise ValueError(f"{target}: unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    cfg = hf_config
    if getattr(cfg, "quantization_config", None) is not None:
        import copy

        cfg = copy.deepcopy(cfg)
        delattr(cfg, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    units, order = _module_bytes(model, nbytes)
    total = sum(units.values())
    if max_memory_gib is None or num_devices <= 1 and max_memory_gib is None:
        return DevicePlan(total, (total,), None)
    cap = int(max_memory_gib * (1 - reserve_fraction) * 2**30)
    per = [0] * max(1, num_devices)
    dmap: dict[str, int] = {}
    dev = 0
    for u in order:
        b = units[u]
        while dev < len(per) and per[dev] + b > cap:
            dev += 1
        if dev >= len(per):
            need = total / 2**30 / (1 - reserve_fraction)
            raise ValueError(
                f"{target}: {total / 2**30:.1f} GiB of {dtype} weights do not fit on {num_devices} "
                f"device(s) of {max_memory_gib:g} GiB ({reserve_fraction:.0%} kept free), about "
                f"{need / max_memory_gib:.1f} needed; raise target.num_devices or "
                f"target.max_memory_gib, or lower runtime.dtype")
        per[dev] += b
        dmap[u] = dev
    return DevicePlan(total, tuple(per), dmap if sum(1 for x in per if x) > 1 else None)


def load_target(target_json: str | Path, device: str = "cpu", dtype: "str | torch.dtype" = "float32",
                *, attn_implementation: str | None = None, num_devices: int | None = None,
                max_memory_gib: float | None = None):
    """Load the target described by ``target.json``: ``(model, tokenizer, info)``.

    The model is an HF ``*ForCausalLM`` in eval mode with gradients off; the same code serves local
    dirs and HF ids (``HF_HUB_OFFLINE=1`` is respected by transformers). The stored shapes are
    checked against the loaded config.

    Loading settings come from the keywords, else from target.json (``attn_implementation``,
    ``num_devices``, ``max_memory_gib``, written by the target stage from the profile), else the
    defaults: the architecture's attention implementation (:func:`resolve_attn_implementation`)
    and one device. A target larger than one device is sharded layer by layer over
    ``num_devices`` GPUs (:func:`plan_device_map`; needs the ``accelerate`` package). An
    ``eos_token_id`` of null in target.json is filled from the model's generation config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = read_target_json(target_json)
    name = info.get("name") or info["path"]
    where = resolve_model_path(target_json, info["path"])
    torch_dtype = _parse_dtype(dtype)
    try:
        hf_cfg = AutoConfig.from_pretrained(where)
    except OSError as e:
        raise OSError(f"{target_json}: cannot load target from {where!r} ({e}). For a tiny target "
                      f"re-run the `target` stage; for an HF id make sure it is in the local cache "
                      f"or that the network is reachable") from e
    text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    validate_aux_layer_ids(info["aux_layer_ids"], int(text_cfg.num_hidden_layers),
                           f"target {name!r}: target.aux_layer_ids")
    attn = resolve_attn_implementation(hf_cfg.model_type,
                                       attn_implementation or info.get("attn_implementation"),
                                       target=f"target {name!r}")
    check_quantization(hf_cfg, target=f"target {name!r}")
    kw: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn}
    n_dev = num_devices or info.get("num_devices") or 1
    gib = max_memory_gib or info.get("max_memory_gib")
    plan = None
    if gib is not None:
        plan = plan_device_map(hf_cfg, dtype=str(torch_dtype).replace("torch.", ""), num_devices=n_dev,
                               max_memory_gib=gib, target=f"target {name!r}")
    if plan is not None and plan.device_map is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ImportError(f"target {name!r}: {plan.weight_bytes / 2**30:.0f} GiB of weights are "
                              f"sharded over {plan.num_devices} devices, which needs the package "
                              f"'accelerate' (pip install accelerate)")
        kw["device_map"] = plan.device_map
        kw["max_memory"] = {i: f"{gib}GiB" for i in range(n_dev)}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise OSError(f"{target_json}: cannot load target from {where!r} ({e}). For a tiny target "
                      f"re-run the `target` stage; for an HF id make sure it is in the local cache "
                      f"or that the network is reachable") from e
    if "device_map" not in kw:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    checks = {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
              "vocab_size": model.get_output_embeddings().weight.shape[0]}
    for k, v in checks.items():
        if int(info[k]) != int(v):
            raise ValueError(f"{target_json}: {k}={info[k]} but the model at {where!r} has {v}; "
                             f"re-run the `target` stage")
    if info.get("eos_token_id") is None:
        info = {**info, "eos_token_id": eos_token_ids(model, tokenizer)}
    return model, tokenizer, info


def check_hf_target(tc, *, dtype: str = "bfloat16", log=None) -> DevicePlan | None:
    """Check a profile's ``kind: hf`` target settings (a ``TargetConfig``) before any long job:
    the attention implementation for its architecture; and, where the model's config.json can be
    read (local dir, HF cache or network), its layer count and width against the profile, its
    quantization format, and the weights' device plan (``target.num_devices`` x
    ``target.max_memory_gib``). Errors name the target and the setting to change; returns the plan
    (None without a config or a memory limit)."""
    where = f"target {tc.name!r} ({tc.path})"
    resolve_attn_implementation(tc.architecture, tc.attn_implementation, target=where)
    try:
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(tc.path)
    except Exception as e:  # noqa: BLE001 - offline planning: the load re-checks everything
        if log:
            log(f"{where}: config.json not readable here ({type(e).__name__}); the device plan and "
                f"shapes are checked when the target is loaded")
        return None
    text = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    if hf_cfg.model_type != tc.architecture:
        raise ValueError(f"{where}: config.json says model_type {hf_cfg.model_type!r} but the profile's "
                         f"target.architecture is {tc.architecture!r}; fix target.architecture")
    for key, have in (("num_layers", text.num_hidden_layers), ("hidden_size", text.hidden_size)):
        if getattr(tc, key) != int(have):
            raise ValueError(f"{where}: config.json has {key}={have}, the profile says "
                             f"target.{key}={getattr(tc, key)}; fix the profile")
    if tc.aux_layer_ids is not None:
        validate_aux_layer_ids(tc.aux_layer_ids, int(text.num_hidden_layers), f"{where}: target.aux_layer_ids")
    check_quantization(hf_cfg, target=where)
    if tc.max_memory_gib is None:
        return None
    plan = plan_device_map(hf_cfg, dtype=dtype, num_devices=tc.num_devices, max_memory_gib=tc.max_memory_gib,
                           target=where)
    if log:
        log(f"{where}: {plan.weight_bytes / 2**30:.1f} GiB of {dtype} weights on {plan.num_devices} device(s)")
    return plan


def _safetensors_files(where: str) -> tuple[dict[str, str], Any]:
    """tensor name -> local safetensors file, from ``model.safetensors.index.json`` or the single
    ``model.safetensors`` of a local dir or a cached/downloadable hub repo (never the whole repo)."""
    import json

    from safetensors import safe_open

    def local(fname: str) -> str | None:
        p = Path(where) / fname
        if Path(where).is_dir():
            return str(p) if p.exists() else None
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(where, fname)
        except Exception:  # noqa: BLE001 - missing file or no network: try the next layout
            return None

    index = local("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        return weight_map, local
    single = local("model.safetensors")
    if single is None:
        raise FileNotFoundError(f"{where!r}: no model.safetensors(.index.json) found")
    with safe_open(single, framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}, local


def read_embedding_tensors(target_json: str | Path, dtype: "str | torch.dtype" = "float32"):
    """``(embed [V, H], lm_head [V, H])`` of a target, read straight from its safetensors files:
    only those two tensors are read (a 120B target's embeddings are ~1 GiB of its ~234 GiB), never
    the model. A tied head (no ``lm_head.weight``) returns the embedding twice."""
    from safetensors import safe_open

    info = read_target_json(target_json)
    where = resolve_model_path(target_json, info["path"])
    weight_map, local = _safetensors_files(where)

    def pick(suffix: str) -> str | None:
        hits = sorted((k for k in weight_map if k == suffix or k.endswith("." + suffix)), key=len)
        return hits[0] if hits else None

    names = {"embed": pick("embed_tokens.weight") or pick("wte.weight"), "head": pick("lm_head.weight")}
    if names["embed"] is None:
        raise ValueError(f"{target_json}: no embedding tensor (*embed_tokens.weight) in {where!r}")
    if names["head"] is None:
        names["head"] = names["embed"]  # tied word embeddings
    out = {}
    for key, tname in names.items():
        with safe_open(local(weight_map[tname]), framework="pt") as f:
            out[key] = f.get_tensor(tname).to(_parse_dtype(dtype))
    V = int(info["vocab_size"])
    for key, t in out.items():
        if t.shape[0] != V or t.shape[1] != int(info["hidden_size"]):
            raise ValueError(f"{target_json}: {names[key]} has shape {tuple(t.shape)}, expected "
                             f"[{V}, {info['hidden_size']}]; re-run the `target` stage")
    return out["embed"], out["head"]


def read_final_norm(target_json: str | Path) -> tuple["torch.Tensor", float]:
    """The target's final RMSNorm: ``(weight [H] fp32, eps)``, read from its files (not the model)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    info = read_target_json(target_json)
    where = resolve_model_path(target_json, info["path"])
    weight_map, local = _safetensors_files(where)
    hits = sorted((k for k in weight_map if k == "norm.weight" or k.endswith(".norm.weight")), key=len)
    if not hits:
        raise ValueError(f"{target_json}: no final norm tensor (*.norm.weight) in {where!r}")
    with safe_open(local(weight_map[hits[0]]), framework="pt") as f:
        weight = f.get_tensor(hits[0]).float()
    cfg = AutoConfig.from_pretrained(where)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return weight, float(text_cfg.rms_norm_eps)


def _generation_eos(hf_id: str) -> list[int] | None:
    """The generation config's eos ids (a list) of a local dir or cached hub repo, or None."""
    try:
        from transformers import GenerationConfig

        gc = GenerationConfig.from_pretrained(hf_id)
    except Exception:  # noqa: BLE001 - absent file, no cache, no network
        return None
    eos = gc.eos_token_id
    if eos is None:
        return None
    return [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]


def resolve_hf_target(hf_id: str, out_path: str | Path, *, num_layers: int | None = None,
                      hidden_size: int | None = None, vocab_size: int | None = None,
                      aux_layer_ids: Sequence[int] | None = None, mask_token_id: int | None = None,
                      eos_token_id: int | Sequence[int] | None = None,
                      **extra: Any) -> dict[str, Any]:
    """Write ``target.json`` for a Hugging Face target without downloading weights.

    If ``num_layers``/``hidden_size``/``vocab_size`` are all given (the paper profile states them),
    nothing is fetched and the profile is plannable offline; otherwise the model's config is read
    with ``AutoConfig.from_pretrained`` (needs the HF cache or network). ``mask_token_id`` must be
    given for P-EAGLE (real tokenizers have no dedicated mask token; use a reserved id).
    ``eos_token_id`` None: the generation config's list when it can be read (else null, which
    ``load_target`` fills from the loaded model).
    """
    if None in (num_layers, hidden_size, vocab_size):
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(hf_id)
        except Exception as e:  # noqa: BLE001 - network/cache errors come in many types
            raise RuntimeError(f"resolve_hf_target({hf_id!r}): cannot read its config ({e}); give "
                               f"target.num_layers, target.hidden_size and target.vocab_size in the "
                               f"profile to plan without network") from e
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        num_layers = num_layers if num_layers is not None else cfg.num_hidden_layers
        hidden_size = hidden_size if hidden_size is not None else cfg.hidden_size
        vocab_size = vocab_size if vocab_size is not None else cfg.vocab_size
        if eos_token_id is None:
            eos_token_id = _generation_eos(hf_id) or getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = _generation_eos(hf_id)
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return write_target_json(out_path, path=hf_id, kind="hf", num_layers=num_layers,
                             hidden_size=hidden_size, vocab_size=vocab_size,
                             aux_layer_ids=aux_layer_ids, mask_token_id=mask_token_id,
                             eos_token_id=None if eos_token_id is None else [int(i) for i in eos_token_id],
                             heldout_next_token_accuracy=None, **extra)


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the generation config's eos (int or list) plus the tokenizer's."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the target defines no eos_token_id (model.generation_config, model.config "
                         "and tokenizer all lack one); set it in the model's generation_config.json")
    return ids
