"""Profiles load; bad keys and types fail naming the key; the JSON schema mirrors the dataclasses.

The schema (workflow/schemas/config.schema.yaml) is what Snakemake validates at parse time, the
dataclasses (peagle.config) are what the CLI validates: the walks below fail as soon as the two
drift apart (a field in one and not the other, a different type, enum or default).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import yaml

from peagle.config import Config, ConfigError, config_from_dict, load_config, read_config_files

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "config" / "tiny.yaml"
PAPER = ROOT / "config" / "paper.yaml"
SMOKE = ROOT / "tests" / "fixtures" / "smoke.yaml"
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- profiles


def test_tiny_profile_loads():
    cfg = load_config(TINY)
    assert cfg.profile == "tiny"
    assert cfg.results_dir == "results/tiny"
    assert cfg.runtime.device == "cpu"
    assert cfg.data.source == "synthetic"
    assert cfg.target.kind == "tiny"
    assert len(cfg.table1.contexts) == len(cfg.table1.paper_contexts)


def test_paper_profile_loads():
    cfg = load_config(PAPER)
    assert cfg.profile == "paper"
    assert cfg.results_dir == "results/paper"
    assert cfg.runtime.device.startswith("cuda")
    assert cfg.target.kind == "hf" and cfg.target.path
    assert cfg.table1.contexts == [1024, 4096, 8192, 20480]
    # The paper profile is complete on its own: no tiny settings (see workflow/rules/common.smk).
    assert cfg.respond.n_prompts is None
    assert cfg.eval.n_prompts is None


def test_overlay_deep_merges_in_order():
    raw = read_config_files(TINY, SMOKE)
    cfg = config_from_dict(raw)
    assert cfg.profile == "tiny"  # from tiny.yaml
    assert cfg.results_dir == "results/smoke"  # from the overlay
    assert cfg.target.pretrain.steps == 4  # nested key from the overlay
    assert cfg.target.pretrain.lr == load_config(TINY).target.pretrain.lr  # sibling kept


@pytest.mark.parametrize("profile", [TINY, PAPER])
def test_profiles_pass_the_schema(validator, profile):
    errors = [e.message for e in validator.iter_errors(read_config_files(profile))]
    assert errors == []


def test_smoke_overlay_passes_the_schema(validator):
    assert [e.message for e in validator.iter_errors(read_config_files(TINY, SMOKE))] == []


# --------------------------------------------------------------------------- errors name key and file


def test_unknown_key_names_dotted_key_and_file(tmp_path):
    text, n = re.subn(r"(?m)^  epochs:", "  epoch:", TINY.read_text())
    assert n == 1
    bad = _write(tmp_path, "typo.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "train.epoch" in msg
    assert str(bad) in msg


def test_unknown_key_in_overlay_names_the_overlay(tmp_path):
    overlay = _write(tmp_path, "overlay.yaml", {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch") as err:
        load_config(TINY, overlay)
    assert str(overlay) in str(err.value)


def test_unknown_top_level_key(tmp_path):
    overlay = _write(tmp_path, "overlay.yaml", {"trian": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"unknown key trian\b"):
        load_config(TINY, overlay)


@pytest.mark.parametrize(
    "overlay, key",
    [
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"runtime": {"threads": 2.5}}, "runtime.threads"),
        ({"target": {"pretrain": {"steps": "many"}}}, "target.pretrain.steps"),
        ({"table1": {"contexts": [64, "256"]}}, "table1.contexts[1]"),
        ({"drafter": {"embed_trainable": "yes"}}, "drafter.embed_trainable"),
        ({"train": {"mask_strategy": "magic"}}, "train.mask_strategy"),
        ({"train": "fast"}, "train"),
    ],
)
def test_wrong_type_names_key(tmp_path, validator, overlay, key):
    path = _write(tmp_path, "overlay.yaml", overlay)
    with pytest.raises(ConfigError) as err:
        load_config(TINY, path)
    assert key in str(err.value)
    assert str(path) in str(err.value)
    assert list(validator.iter_errors(read_config_files(TINY, path))), f"schema accepts {overlay}"


def test_schema_rejects_the_same_typo(validator):
    raw = read_config_files(TINY)
    raw["train"]["epoch"] = raw["train"].pop("epochs")
    errors = list(validator.iter_errors(raw))
    assert errors, "the schema accepted train.epoch"
    assert any(e.validator == "additionalProperties" and list(e.absolute_path) == ["train"]
               and "'epoch'" in e.message for e in errors), [e.message for e in errors]


def test_missing_required_key_fails_in_both(validator):
    raw = read_config_files(TINY)
    del raw["results_dir"]
    with pytest.raises(ConfigError, match="results_dir"):
        config_from_dict(raw)
    assert any(e.validator == "required" for e in validator.iter_errors(raw))


def test_data_files_is_an_open_mapping_in_both(validator):
    raw = read_config_files(TINY)
    raw["data"]["data_files"] = {"ultrachat": "/data/ultrachat.jsonl", "my_set": "x.jsonl"}
    assert config_from_dict(raw).data.data_files["my_set"] == "x.jsonl"
    assert list(validator.iter_errors(raw)) == []
    raw["data"]["data_files"] = {"ultrachat": 3}
    with pytest.raises(ConfigError, match=r"data\.data_files\.ultrachat"):
        config_from_dict(raw)
    assert list(validator.iter_errors(raw))


# --------------------------------------------------------------------------- schema <-> dataclasses

_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean"}

# Keys typed ``list[str]`` in the dataclass whose values __post_init__ restricts to a fixed set;
# the schema states that set as an enum (checked against the dataclass below).
REFINED_ENUMS = {"eval.sets", "table9.eval_sets", "table10.eval_sets", "ablations.*.eval_sets"}


def _annotation_shape(tp: Any) -> tuple:
    """A comparable description of a dataclass field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == len(args):  # X | Y: the schema's oneOf (or a list of scalar types)
            return ("oneof", frozenset(_annotation_shape(a) for a in args))
        if len(rest) > 1:  # X | Y | None
            return ("nullable", ("oneof", frozenset(_annotation_shape(a) for a in rest)))
        assert len(rest) == 1 and len(args) == 2, f"unsupported union {tp}"
        return ("nullable", _annotation_shape(rest[0]))
    if origin is Literal:
        return ("enum", frozenset(args))
    if origin is list:
        return ("array", _annotation_shape(args[0]))
    if origin is dict:
        assert args[0] is str, f"mapping keys must be strings: {tp}"
        return ("map", _annotation_shape(args[1]))
    if dataclasses.is_dataclass(tp):
        return ("section", tp.__name__)
    assert tp in _SCALARS, f"unsupported annotation {tp}"
    return (_SCALARS[tp],)


def _schema_shape(node: dict[str, Any]) -> tuple:
    """The same description, read from a schema node."""
    if "oneOf" in node:
        return ("oneof", frozenset(_schema_shape(n) for n in node["oneOf"]))
    if "enum" in node:
        assert "type" not in node, f"enum node with a type: {node}"
        if None in node["enum"]:  # a nullable enum lists null among its values
            return ("nullable", ("enum", frozenset(v for v in node["enum"] if v is not None)))
        return ("enum", frozenset(node["enum"]))
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    nullable = "null" in kinds
    kinds = [k for k in kinds if k != "null"]
    if len(kinds) > 1:  # several scalar types: a union of scalars (the ablations' values)
        assert set(kinds) <= set(_SCALARS.values()), f"unsupported type list {node['type']}"
        shape = ("oneof", frozenset((k,) for k in kinds))
        return ("nullable", shape) if nullable else shape
    kind = kinds[0]
    if kind == "array":
        shape: tuple = ("array", _schema_shape(node["items"]))
    elif kind == "object":
        assert "properties" not in node, "nested sections are compared by the walk"
        assert isinstance(node.get("additionalProperties"), dict), "an open mapping needs a value schema"
        shape = ("map", _schema_shape(node["additionalProperties"]))
    else:
        shape = (kind,)
    return ("nullable", shape) if nullable else shape


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _walk(cls: type, node: dict[str, Any], prefix: str = ""):
    """Yield (dotted key, problem) for every disagreement between ``cls`` and schema ``node``."""
    where = prefix.rstrip(".") or "<top level>"
    if node.get("type") != "object" or node.get("additionalProperties") is not False:
        yield where, "schema section must be a closed object (type: object, additionalProperties: false)"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    props = node.get("properties", {})
    for name in sorted(set(fields) - set(props)):
        yield prefix + name, "dataclass field missing from the schema"
    for name in sorted(set(props) - set(fields)):
        yield prefix + name, "schema property that is no dataclass field"
    required = {n for n, f in fields.items() if _default(f) is dataclasses.MISSING}
    if set(node.get("required", [])) != required:
        yield where, f"schema required {sorted(node.get('required', []))} != dataclass {sorted(required)}"
    hints = typing.get_type_hints(cls)
    for name in sorted(set(fields) & set(props)):
        key, tp, sub = prefix + name, hints[name], props[name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, sub, key + ".")
            continue
        # Containers of sections: a list of targets, a mapping of methods by name.
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list and dataclasses.is_dataclass(args[0]):
            if sub.get("type") != "array":
                yield key, "a list of sections needs type: array"
            yield from _walk(args[0], sub.get("items", {}), key + "[].")
            continue
        if origin is dict and dataclasses.is_dataclass(args[1]):
            if sub.get("type") != "object" or not isinstance(sub.get("additionalProperties"), dict):
                yield key, "a mapping of sections needs type: object with an additionalProperties schema"
            yield from _walk(args[1], sub.get("additionalProperties") or {}, key + ".*.")
            if "default" not in sub and _default(fields[name]) is not dataclasses.MISSING:
                yield key, "schema has no default"
            continue
        try:
            want, got = _annotation_shape(tp), _schema_shape(sub)
        except (AssertionError, KeyError) as err:
            yield key, f"cannot compare: {err!r}"
            continue
        if key in REFINED_ENUMS and want == ("array", ("string",)) and got[0] == "array" and got[1][0] == "enum":
            pass  # see test_refined_enums_match_dataclass_checks
        elif want != got:
            yield key, f"type {got} in the schema, {want} in the dataclass"
        default = _default(fields[name])
        if default is dataclasses.MISSING:
            if "default" in sub:
                yield key, "required field with a schema default"
        elif "default" not in sub:
            yield key, f"schema has no default (dataclass: {default!r})"
        elif json.dumps(sub["default"]) != json.dumps(default):
            yield key, f"default {sub['default']!r} in the schema, {default!r} in the dataclass"


def test_schema_mirrors_dataclasses(schema):
    problems = [f"{key}: {problem}" for key, problem in _walk(Config, schema)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("key", sorted(k for k in REFINED_ENUMS if "*" not in k))
def test_refined_enums_match_dataclass_checks(schema, validator, key):
    path = tuple(key.split("."))
    node = schema
    for part in path:
        node = node["properties"][part]
    allowed = node["items"]["enum"]
    for value in allowed:  # every value the schema allows, the dataclass allows
        raw = _set(read_config_files(TINY), path, [value])
        assert list(validator.iter_errors(raw)) == []
        config_from_dict(raw)
    raw = _set(read_config_files(TINY), path, ["no_such_value"])  # and both reject the rest
    assert list(validator.iter_errors(raw))
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(raw)


def test_every_schema_object_is_closed(schema):
    """additionalProperties: false everywhere, except open mappings that type their values."""
    bad = []

    def visit(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" or "properties" in node:
            ap = node.get("additionalProperties")
            if "properties" in node and ap is not False:
                bad.append(path or "<top level>")
            if "properties" not in node and not isinstance(ap, dict):
                bad.append(path or "<top level>")
        for key, value in node.get("properties", {}).items():
            visit(value, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            visit(node["items"], path + "[]")

    visit(schema, "")
    assert bad == []


def _leaves(cls: type, prefix: tuple[str, ...] = ()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, prefix + (f.name,))
        else:
            yield prefix + (f.name,), tp


def _wrong_value(tp: Any) -> Any:
    shape = _annotation_shape(tp)
    if shape[0] == "nullable":
        shape = shape[1]
    return {"integer": 2.5, "number": "fast", "string": 7, "boolean": "yes", "enum": "no-such-choice",
            "array": "not-a-list", "map": ["not", "a", "mapping"]}[shape[0]]


def _set(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return out


LEAVES = list(_leaves(Config))


@pytest.mark.parametrize("path, tp", LEAVES, ids=[".".join(p) for p, _ in LEAVES])
def test_both_reject_a_wrong_type_for_every_key(validator, path, tp):
    key = ".".join(path)
    raw = _set(read_config_files(TINY), path, _wrong_value(tp))
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value)
    assert list(validator.iter_errors(raw)), f"the schema accepts a wrong type for {key}"


@pytest.mark.parametrize("section", sorted({p[0] for p, _ in LEAVES if len(p) > 1}) + ["target.pretrain"])
def test_both_reject_an_unknown_key_in_every_section(validator, section):
    path = tuple(section.split(".")) + ("no_such_key",)
    raw = _set(read_config_files(TINY), path, 1)
    with pytest.raises(ConfigError, match=rf"unknown key {section}\.no_such_key"):
        config_from_dict(raw)
    assert list(validator.iter_errors(raw))


def _schema_bounds(schema: dict[str, Any]):
    """(path, bad value) just outside every numeric bound the schema states for a scalar key."""

    def visit(node: dict[str, Any], path: tuple[str, ...]):
        for key, sub in node.get("properties", {}).items():
            yield from visit(sub, path + (key,))
        kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        step = 1 if "integer" in kinds else 0.5
        if "minimum" in node:
            yield path, node["minimum"] - step
        if "exclusiveMinimum" in node:
            yield path, node["exclusiveMinimum"]
        if "maximum" in node:
            yield path, node["maximum"] + step
        if "exclusiveMaximum" in node:
            yield path, node["exclusiveMaximum"]

    return list(visit(schema, ()))


def test_schema_bounds_are_dataclass_bounds(schema, validator):
    """The schema is never stricter than the dataclasses (which would reject a config the CLI accepts)."""
    bounds = _schema_bounds(schema)
    assert bounds, "expected numeric bounds in the schema"
    for path, value in bounds:
        raw = _set(read_config_files(TINY), path, value)
        assert list(validator.iter_errors(raw)), f"schema accepts {'.'.join(path)}={value}"
        with pytest.raises(ConfigError):
            config_from_dict(raw)


@pytest.mark.parametrize("patch, key", [
    ({"methods": {"peagle": {"num_layers": "four"}}}, "methods.peagle.num_layers"),
    ({"methods": {"peagle": {"partitions": 0}}}, "methods.peagle.partitions"),
    ({"methods": {"eagle3": {"mask_strategy": "pard"}}}, "methods.eagle3.parallel"),
    ({"methods": {"mine": {"no_such": 1}}}, "unknown key methods.mine.no_such"),
    ({"extra_targets": [{"name": "t2", "architecture": "gpt2"}]}, "extra_targets[0].architecture"),
    ({"extra_targets": [{"name": "tiny-llama"}]}, "target names must be unique"),
    ({"table1": {"methods": ["peagle", "medusa"]}}, "table1.methods"),
    ({"table9": {"targets": ["nope"]}}, "table9.targets"),
])
def test_methods_and_targets_errors_name_the_key(patch, key):
    from peagle.config import _deep_merge

    raw = _deep_merge(read_config_files(TINY), patch)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value)


def test_profile_methods_merge_over_the_defaults():
    raw = read_config_files(TINY)
    raw["methods"] = {"peagle": {"partitions": 2}, "mine": {"num_layers": 2}}
    cfg = config_from_dict(raw)
    assert cfg.methods["peagle"].partitions == 2
    assert cfg.methods["parallelspec"].num_layers == 1 and not cfg.methods["parallelspec"].cod
    assert not cfg.methods["eagle3"].parallel and cfg.methods["eagle3"].embed_trainable is False
    assert cfg.methods["mine"].num_layers == 2


# --------------------------------------------------------------------------- bad values caught at load


def _extra_targets_with(**changes: Any) -> list[dict[str, Any]]:
    """tiny.yaml's extra_targets with ``changes`` applied to the first (lists replace on overlay)."""
    targets = copy.deepcopy(read_config_files(TINY)["extra_targets"])
    targets[0].update(changes)
    return targets


def _load_error(tmp_path: Path, overlay: dict[str, Any], *base: Path) -> tuple[Path, ConfigError]:
    path = _write(tmp_path, "overlay.yaml", overlay)
    with pytest.raises(ConfigError) as err:
        load_config(*(base or (TINY,)), path)
    return path, err.value


@pytest.mark.parametrize("overlay, key", [
    ({"drafter": {"num_kv_heads": 0}}, "drafter.num_kv_heads"),
    ({"drafter": {"num_heads": 0}}, "drafter.num_heads"),
    ({"target": {"num_heads": 0}}, "target.num_heads"),
    ({"target": {"num_kv_heads": 0}}, "target.num_kv_heads"),
    ({"extra_targets": _extra_targets_with(num_heads=0)}, "extra_targets[0].num_heads"),
    ({"extra_targets": _extra_targets_with(num_kv_heads=0)}, "extra_targets[0].num_kv_heads"),
])
def test_zero_heads_are_a_config_error_not_a_zero_division(tmp_path, validator, overlay, key):
    path, err = _load_error(tmp_path, overlay)
    msg = str(err)
    assert msg.startswith(f"{path}: {key}: must be >= 1"), msg
    assert str(TINY) not in msg and err.key == key
    assert list(validator.iter_errors(read_config_files(TINY, path))), f"schema accepts {overlay}"


@pytest.mark.parametrize("overlay, key", [
    ({"data": {"list_max_items": 0}}, "data.list_max_items"),
    ({"data": {"list_max_items": 41}}, "data.list_max_items"),
    ({"data": {"list_max_rules": 7}}, "data.list_max_rules"),
])
def test_list_task_sizes_are_bounded_and_their_defaults_leave_the_digest(tmp_path, validator, overlay, key):
    path, err = _load_error(tmp_path, overlay)
    assert f"{path}: {key}: must be in" in str(err) and err.key == key
    assert list(validator.iter_errors(read_config_files(TINY, path))), f"schema accepts {overlay}"
    spelt = _write(tmp_path, "spelt.yaml", {"data": {"list_max_items": 20, "list_max_rules": 3, "list_walkthrough": "item"}})
    assert load_config(TINY, spelt).digest() == load_config(TINY).digest()  # the recorded baselines stay current


@pytest.mark.parametrize("overlay, key", [
    ({"target": {"num_kv_heads": 3}}, "target.num_kv_heads"),
    ({"drafter": {"num_kv_heads": 3}}, "drafter.num_kv_heads"),
    ({"extra_targets": _extra_targets_with(num_kv_heads=3)}, "extra_targets[0].num_kv_heads"),
])
def test_kv_heads_must_divide_heads(tmp_path, overlay, key):
    path, err = _load_error(tmp_path, overlay)
    msg = str(err)
    assert f"{key}: must divide" in msg and str(path) in msg, msg
    # A cross-field check: tiny.yaml sets num_heads too, unless the overlay's list replaced it.
    assert (str(TINY) in msg) == (not key.startswith("extra_targets")), msg


@pytest.mark.parametrize("device", ["gpu", "cuda0", "cuda:", "cuda:x", "CUDA", "cpu:0", "tpu", ""])
def test_unknown_device_is_refused_at_load(tmp_path, validator, device):
    path, err = _load_error(tmp_path, {"runtime": {"device": device}})
    msg = str(err)
    assert msg.startswith(f"{path}: runtime.device: {device!r}"), msg
    assert "use cpu, cuda or cuda:N" in msg and str(TINY) not in msg
    assert list(validator.iter_errors(read_config_files(TINY, path))), f"schema accepts device {device!r}"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:3", "mps"])
def test_valid_devices_load_in_both(tmp_path, validator, device):
    path = _write(tmp_path, "overlay.yaml", {"runtime": {"device": device}})
    assert load_config(TINY, path).runtime.device == device
    assert list(validator.iter_errors(read_config_files(TINY, path))) == []


@pytest.mark.parametrize("section", ["eval", "respond"])
def test_n_prompts_zero_is_refused_and_null_means_all(tmp_path, validator, section):
    path, err = _load_error(tmp_path, {section: {"n_prompts": 0}})
    msg = str(err)
    assert msg.startswith(f"{path}: {section}.n_prompts: must be >= 1, or null"), msg
    assert list(validator.iter_errors(read_config_files(TINY, path)))
    for ok in (None, 1, 5):
        path = _write(tmp_path, "ok.yaml", {section: {"n_prompts": ok}})
        assert getattr(load_config(TINY, path), section).n_prompts == ok
        assert list(validator.iter_errors(read_config_files(TINY, path))) == []


# --------------------------------------------------------------------------- the error names the one file


@pytest.mark.parametrize("overlay, key", [
    ({"train": {"epoch": 3}}, "train.epoch"),
    ({"extra_targets": _extra_targets_with(num_heads=0)}, "extra_targets[0].num_heads"),
    ({"extra_targets": _extra_targets_with(pretrain={"steps": 0})}, "extra_targets[0].pretrain.steps"),
    ({"target": {"pretrain": {"steps": 0}}}, "target.pretrain.steps"),
    ({"methods": {"peagle": {"partitions": 0}}}, "methods.peagle.partitions"),
    # Keys the file does not set itself: the section it sets stands for them.
    ({"methods": {"eagle3": {"mask_strategy": "pard"}}}, "methods.eagle3.parallel"),
    ({"target": {"kind": "hf"}}, "target.path"),
    ({"table1": {"contexts": [64, "256"]}}, "table1.contexts[1]"),
    ({"extra_targets": _extra_targets_with(name="bad/name")}, "target.name"),
])
def test_error_names_only_the_overlay_that_sets_the_key(tmp_path, overlay, key):
    path, err = _load_error(tmp_path, overlay)
    msg = str(err)
    assert msg.startswith(f"{path}: "), msg
    assert key in msg and str(TINY) not in msg


def test_error_in_the_base_file_names_the_base_file(tmp_path):
    text, n = re.subn(r"(?m)^  epochs:", "  epoch:", TINY.read_text())
    assert n == 1
    base = _write(tmp_path, "base.yaml", text)
    overlay = _write(tmp_path, "overlay.yaml", {"train": {"lr": 1e-3}, "drafter": {"num_layers": 2}})
    with pytest.raises(ConfigError) as err:
        load_config(base, overlay)
    msg = str(err.value)
    assert msg.startswith(f"{base}: unknown key train.epoch"), msg
    assert str(overlay) not in msg and err.value.key == "train.epoch"


def test_key_set_in_several_files_names_the_last(tmp_path):
    first = _write(tmp_path, "first.yaml", {"train": {"lr": -1.0}})
    second = _write(tmp_path, "second.yaml", {"train": {"lr": -2.0}})
    with pytest.raises(ConfigError) as err:
        load_config(TINY, first, second)
    msg = str(err.value)
    assert msg.startswith(f"{second}: train.lr: must be > 0"), msg
    assert str(first) not in msg and str(TINY) not in msg


def test_replaced_list_is_blamed_on_the_file_that_replaced_it(tmp_path):
    # tiny.yaml sets extra_targets[0].num_heads; the overlay's list replaces it and is the culprit.
    first = _write(tmp_path, "first.yaml", {"extra_targets": _extra_targets_with(hidden_size=250)})
    second = _write(tmp_path, "second.yaml", {"extra_targets": _extra_targets_with(num_heads=0)})
    with pytest.raises(ConfigError) as err:
        load_config(TINY, first, second)
    assert str(err.value).startswith(f"{second}: extra_targets[0].num_heads: must be >= 1"), str(err.value)


@pytest.mark.parametrize("overlay, key", [
    # tiny.yaml defines methods:, the overlay refers to one it lacks: either file may need the fix.
    ({"table1": {"methods": ["peagle", "medusa"]}}, "table1.methods"),
    # tiny.yaml sets hidden_size 256, the overlay a head count that does not divide it.
    ({"target": {"num_heads": 3, "num_kv_heads": 1}}, "target.hidden_size"),
    ({"table9": {"targets": ["nope"]}}, "table9.targets"),
])
def test_cross_file_errors_name_every_file(tmp_path, overlay, key):
    path, err = _load_error(tmp_path, overlay)
    msg = str(err)
    assert msg.startswith(f"{TINY}, {path}: {key}: "), msg


def test_cross_field_error_within_one_file_names_that_file(tmp_path):
    path, err = _load_error(tmp_path, {"target": {"hidden_size": 250, "num_heads": 4}})
    assert str(err).startswith(f"{path}: target.hidden_size: must be divisible"), str(err)


def test_missing_required_key_names_every_file(tmp_path):
    raw = read_config_files(TINY)
    del raw["results_dir"]
    base = _write(tmp_path, "base.yaml", raw)
    overlay = _write(tmp_path, "overlay.yaml", {"seed": 1})
    with pytest.raises(ConfigError) as err:
        load_config(base, overlay)
    msg = str(err.value)
    assert msg.startswith(f"{base}, {overlay}: ") and "results_dir" in msg, msg


# --------------------------------------------------------------------------- train.seeds

SEEDS = ROOT / "config" / "tiny-seeds.yaml"


def test_seeds_default_to_one_and_the_overlay_gives_three(validator):
    assert load_config(TINY).train.seeds == [0] and load_config(PAPER).train.seeds == [0]
    cfg = load_config(TINY, SEEDS)
    assert cfg.train.seeds == [0, 1, 2] and cfg.train.seed == 0 and cfg.seed == 0  # data/target seed stays single
    assert cfg.profile == "tiny" and cfg.digest() != load_config(TINY).digest()
    assert [e.message for e in validator.iter_errors(read_config_files(TINY, SEEDS))] == []
    assert "profile" not in read_config_files(SEEDS)  # an overlay, merged over the profile in effect


def test_a_run_narrows_the_seeds_to_its_own():
    cfg = load_config(TINY, SEEDS)
    run = cfg.for_seed(2)
    assert run.train.seeds == [2] and run.train.seed == 2 and cfg.train.seeds == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"seed 5 is not one of train\.seeds \[0, 1, 2\]"):
        cfg.for_seed(5)


@pytest.mark.parametrize("seeds, match", [
    ([], r"train\.seeds: must be a non-empty list"),
    ([0, 1, 0], r"train\.seeds: seeds must be distinct; \[0\] repeated"),
    ([0, -1], r"train\.seeds: each seed must be an integer >= 0"),
    ([0, "1"], r"train\.seeds\[1\]: expected an integer"),
    (3, r"train\.seeds: expected a list"),
])
def test_bad_seeds_name_the_key_and_the_file(tmp_path, validator, seeds, match):
    path, err = _load_error(tmp_path, {"train": {"seeds": seeds}})
    assert re.search(match, str(err)), str(err)
    assert str(err).startswith(f"{path}: "), str(err)
    raw = read_config_files(TINY, path)
    assert list(validator.iter_errors(raw)), f"schema accepts train.seeds: {seeds}"


def test_the_old_single_train_seed_is_refused_with_the_fix(tmp_path):
    path, err = _load_error(tmp_path, {"train": {"seed": 3}})
    msg = str(err)
    assert msg.startswith(f"{path}: train.seed: replaced by train.seeds") and "`seeds: [3]`" in msg, msg
