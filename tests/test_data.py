"""Tests for peagle.data (schema, HF converters, tiny data) and peagle.io (atomic writes)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peagle.data import (
    DATA_FILES,
    DataDirError,
    HFDataError,
    PromptRecord,
    SchemaError,
    TinyDataError,
    load_hf_prompts,
    make_hf_data,
    make_math_problem,
    make_tiny_data,
    read_prompts,
    rows_to_records,
    validate_data_dir,
    write_prompts,
)
from peagle.data.listrules import Action, Condition, ListTask, make_list_task
from peagle.data.tiny import MATH_TEMPLATES
from peagle.io import atomic_path, atomic_write_json, atomic_write_text, sha256_file

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
HF_FIXTURE = {
    "ultrachat": "ultrachat_200k.jsonl",
    "mt_bench": "mt_bench_prompts.jsonl",
    "humaneval": "openai_humaneval.jsonl",
    "gsm8k": "gsm8k_main.jsonl",
    "opencodeinstruct": "opencodeinstruct.jsonl",
}
TINY_N_TRAIN, TINY_N_EVAL = 600, 30
GOOD = {"id": "a-1", "source": "unit", "role": "train", "turns": ["hello"], "reference": "hi"}


# ------------------------------------------------------------------------------------- schema


def test_record_roundtrip_and_validation() -> None:
    rec = PromptRecord(id="x-0", source="s", role="gsm8k", turns=["q1", "q2"], reference=None)
    assert rec.turns == ("q1", "q2") and rec.prompt == "q1"
    assert PromptRecord.from_dict(rec.to_dict()) == rec
    assert list(rec.to_dict()) == ["id", "source", "role", "turns", "reference"]
    with pytest.raises(SchemaError, match="'role'"):
        PromptRecord(id="x", source="s", role="chat", turns=("q",))
    with pytest.raises(SchemaError, match="'turns'"):
        PromptRecord(id="x", source="s", role="train", turns=())
    with pytest.raises(SchemaError, match="'turns'"):
        PromptRecord(id="x", source="s", role="train", turns=("   ",))


def _line(obj: object) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj)


@pytest.mark.parametrize(
    "bad, field",
    [
        ('{"id": "b", "source": ', "malformed JSON"),
        ({k: v for k, v in GOOD.items() if k != "turns"} | {"id": "b"}, "'turns'"),
        (GOOD | {"id": "b", "turns": "not a list"}, "'turns'"),
        (GOOD | {"id": "b", "turns": []}, "'turns'"),
        (GOOD | {"id": "b", "turns": ["ok", 3]}, "'turns'"),
        (GOOD | {"id": "b", "role": "eval"}, "'role'"),
        (GOOD | {"id": "b", "reference": 7}, "'reference'"),
        (GOOD | {"id": "b", "source": ""}, "'source'"),
        (GOOD | {"id": 5}, "'id'"),
        (GOOD, "duplicate id"),  # same id as line 1
        (GOOD | {"id": "b", "extra": 1}, "'extra'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_read_prompts_errors_name_file_line_field(tmp_path: Path, bad: object, field: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + _line(bad) + "\n", encoding="utf-8")
    with pytest.raises(SchemaError) as err:
        read_prompts(path)
    msg = str(err.value)
    assert f"{path}:2:" in msg, msg
    assert field in msg, msg


def test_read_prompts_missing_file_and_role_check(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompts(tmp_path / "nope.jsonl")
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n", encoding="utf-8")  # blank lines are skipped
    assert len(read_prompts(path)) == 1
    with pytest.raises(SchemaError, match=r"p\.jsonl:2: field 'role'"):
        read_prompts(path, expect_role="gsm8k")


@pytest.mark.parametrize("text", ["", "\n", "\n  \n\n"])
def test_read_prompts_empty_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    # An empty eval set used to surface much later as "Out of range float values ...: nan".
    path = tmp_path / "eval_mt_bench.jsonl"
    path.write_text(text, encoding="utf-8")
    for kwargs in ({}, {"expect_role": "mt_bench"}):
        with pytest.raises(SchemaError) as err:
            read_prompts(path, **kwargs)
        msg = str(err.value)
        assert msg.startswith(f"{path}: no prompts (empty file); re-run the data rule"), msg
        assert "non-empty" in msg


def test_write_prompts_roundtrip_one_line_per_record(tmp_path: Path) -> None:
    recs = [
        PromptRecord("r-0", "s", "mt_bench", ("line one\nline two", "second turn"), "ref\n\nwith ünïcode"),
        PromptRecord("r-1", "s", "mt_bench", ("q",), None),
    ]
    path = tmp_path / "sub" / "out.jsonl"
    digest = write_prompts(path, recs)
    assert digest == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(path.read_bytes().splitlines()) == 2
    assert read_prompts(path) == recs
    with pytest.raises(SchemaError, match="duplicate id"):
        write_prompts(tmp_path / "dup.jsonl", [recs[0], recs[0]])
    assert not (tmp_path / "dup.jsonl").exists()


# ----------------------------------------------------------------------------------- atomic io


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    atomic_write_text(dest, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half-writ")
            assert tmp.parent == dest.parent and tmp != dest
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert _leftovers(tmp_path) == []
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and _leftovers(tmp_path) == []


def test_write_prompts_no_partial_file_when_records_fail(tmp_path: Path) -> None:
    dest = tmp_path / "train.jsonl"

    def records():
        yield PromptRecord("ok-0", "s", "train", ("q",), None)
        raise KeyError("generator died")

    with pytest.raises(KeyError):
        write_prompts(dest, records())
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_atomic_write_json_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    atomic_write_json(a, {"b": 1, "a": [1, 2]})
    atomic_write_json(b, {"a": [1, 2], "b": 1})
    assert a.read_bytes() == b.read_bytes() and a.read_bytes().endswith(b"\n")
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- HF converters


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_cache")


def _load(name: str, cache: Path, **kw: object) -> list[PromptRecord]:
    return load_hf_prompts(name, data_files=FIXTURES / HF_FIXTURE[name], cache_dir=cache, **kw)


def test_ultrachat_fixture(hf_cache: Path) -> None:
    recs = _load("ultrachat", hf_cache)
    assert [r.id for r in recs] == [f"ultrachat-train_sft-{i:05d}" for i in range(4)]
    assert all(r.role == "train" and r.source == "HuggingFaceH4/ultrachat_200k" for r in recs)
    assert recs[0].turns == ("How do I keep basil plants alive on a windowsill?", "What if the leaves turn yellow?")
    assert recs[0].reference.startswith("Give them at least six hours")  # first assistant reply
    assert len(recs[2].turns) == 3 and recs[1].turns[0].startswith("Write a short poem")


def test_mt_bench_fixture(hf_cache: Path) -> None:
    recs = _load("mt_bench", hf_cache)
    assert len(recs) == 4 and all(r.role == "mt_bench" and len(r.turns) == 2 for r in recs)
    assert recs[0].reference is None  # empty reference list -> null
    assert recs[1].reference == "3/8"
    assert recs[0].id == "mt_bench-train-00000"


def test_humaneval_fixture_solutions_pass_their_tests(hf_cache: Path) -> None:
    recs = _load("humaneval", hf_cache)
    rows = [json.loads(line) for line in (FIXTURES / HF_FIXTURE["humaneval"]).read_text().splitlines()]
    assert len(recs) == len(rows) == 4
    for rec, row in zip(recs, rows):
        assert rec.role == "humaneval" and rec.turns == (row["prompt"],)
        ns: dict = {}
        exec(rec.turns[0] + rec.reference + "\n" + row["test"], ns)  # noqa: S102 - our own fixture
        ns["check"](ns[row["entry_point"]])


def test_gsm8k_fixture_and_parquet_mirror(hf_cache: Path, tmp_path: Path) -> None:
    recs = _load("gsm8k", hf_cache, split="test")
    assert [r.id for r in recs][:2] == ["gsm8k-test-00000", "gsm8k-test-00001"]
    assert all(r.role == "gsm8k" and re.search(r"#### -?\d+$", r.reference) for r in recs)
    import pandas as pd

    pq = tmp_path / "gsm8k.parquet"
    pd.read_json(FIXTURES / HF_FIXTURE["gsm8k"], lines=True).to_parquet(pq)
    assert load_hf_prompts("gsm8k", "test", data_files=pq, cache_dir=hf_cache) == recs
    train = load_hf_prompts("gsm8k", "train", "train", limit=2, data_files=pq, cache_dir=hf_cache)
    assert [r.id for r in train] == ["gsm8k-train-00000", "gsm8k-train-00001"] and train[0].role == "train"


def test_opencodeinstruct_fixture(hf_cache: Path) -> None:
    recs = _load("opencodeinstruct", hf_cache)
    assert len(recs) == 3 and all(r.role == "train" and r.reference.startswith("```python") for r in recs)
    sub = _load("opencodeinstruct", hf_cache, limit=2, sample_seed=1)
    assert len(sub) == 2 and set(sub) <= set(recs)


def test_load_hf_prompts_rejects_wrong_schema_file(hf_cache: Path) -> None:
    humaneval = FIXTURES / HF_FIXTURE["humaneval"]
    with pytest.raises(HFDataError, match=rf"{re.escape(str(humaneval))}: line 1 is in no layout .* columns found "
                                          r"canonical_solution, entry_point, prompt, task_id, test; layouts known: "
                                          r"openai/gsm8k \(question, answer\)"):
        load_hf_prompts("gsm8k", data_files=humaneval, cache_dir=hf_cache)
    with pytest.raises(HFDataError, match=r"data.data_files.gsm8k: .*missing.jsonl not found"):
        load_hf_prompts("gsm8k", data_files=FIXTURES / "missing.jsonl", cache_dir=hf_cache)
    with pytest.raises(HFDataError, match=r"README.md is not a dataset file .* must end in one of .jsonl, .jsonl.gz"):
        load_hf_prompts("gsm8k", data_files=FIXTURES / "README.md", cache_dir=hf_cache)


def test_rows_to_records_errors_name_dataset_row_field() -> None:
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?"}]
    with pytest.raises(HFDataError) as err:
        rows_to_records("gsm8k", rows)
    assert "gsm8k" in str(err.value) and "row 2" in str(err.value) and "'answer'" in str(err.value)  # 1-based
    with pytest.raises(HFDataError, match=r"humaneval: openai/openai_humaneval row 1: field 'prompt': expected str, got int"):
        rows_to_records("humaneval", [{"task_id": "t", "prompt": 3, "canonical_solution": "", "test": "", "entry_point": "f"}])
    with pytest.raises(HFDataError, match=r"row 1: field 'messages\[1\]'"):
        rows_to_records("ultrachat", [{"prompt": "p", "prompt_id": "x", "messages": [{"role": "user", "content": "p"}, "oops"]}])
    with pytest.raises(HFDataError, match="unknown dataset name 'alpaca'"):
        rows_to_records("alpaca", [])
    with pytest.raises(HFDataError, match="role 'test'"):
        rows_to_records("gsm8k", rows[:1], role="test")
    # Blank prompts are skipped and do not count against the limit.
    rows = [{"question": " ", "answer": "a"}] + [{"question": f"q{i}", "answer": "a"} for i in range(3)]
    out = rows_to_records("gsm8k", rows, limit=2, split="train")
    assert [r.id for r in out] == ["gsm8k-train-00001", "gsm8k-train-00002"]


def test_make_hf_data_from_fixtures(tmp_path: Path, hf_cache: Path) -> None:
    files = {k: str(FIXTURES / v) for k, v in HF_FIXTURE.items()}
    gsm_train = tmp_path / "gsm8k_train.jsonl"
    gsm_train.write_text(
        "".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}) + "\n" for i in range(5)),
        encoding="utf-8",
    )
    manifest = make_hf_data(
        tmp_path / "d", n_train=6, n_eval=3, data_files=files | {"gsm8k:train": str(gsm_train)}, seed=0, cache_dir=hf_cache
    )
    data = validate_data_dir(tmp_path / "d", require_manifest=True)
    assert manifest["train_per_source"] == {"ultrachat": 2, "gsm8k": 2, "opencodeinstruct": 2}
    assert manifest["train_requested_per_source"] == {"ultrachat": 2, "gsm8k": 2, "opencodeinstruct": 2}
    assert len(data["train"]) == 6 and {r.source for r in data["train"]} == {
        "HuggingFaceH4/ultrachat_200k", "openai/gsm8k", "nvidia/OpenCodeInstruct"}
    assert {r.id.rsplit("-", 1)[0] for r in data["train"] if r.source == "openai/gsm8k"} == {"gsm8k-train"}
    assert {len(data[r]) for r in ("mt_bench", "humaneval", "gsm8k")} == {3}
    assert all(r.id.startswith("gsm8k-test-") for r in data["gsm8k"])

    # One mirror for both GSM8K splits: the leak filter drops train prompts that are eval prompts.
    manifest = make_hf_data(tmp_path / "e", n_train=6, n_eval=4, data_files=files, seed=0, cache_dir=hf_cache)
    data = validate_data_dir(tmp_path / "e")
    assert manifest["train_per_source"]["gsm8k"] == 0 and len(data["train"]) == 4
    with pytest.raises(HFDataError, match="gsm8k:dev"):
        make_hf_data(tmp_path / "f", n_train=2, data_files={"gsm8k:dev": str(gsm_train)}, cache_dir=hf_cache)


# ------------------------------------------------------------------------------------ tiny data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "data"
    manifest = make_tiny_data(out, seed=0, n_train=TINY_N_TRAIN, n_eval=TINY_N_EVAL)
    return out, manifest


def _kind(rec: PromptRecord) -> str:
    return {"tiny/list-code": "code", "tiny/list-chat": "chat", "tiny/arith": "math"}[rec.source]


def test_tiny_files_roles_counts(tiny: tuple[Path, dict]) -> None:
    out, manifest = tiny
    data = validate_data_dir(out, require_manifest=True)
    assert len(data["train"]) == TINY_N_TRAIN
    for role in ("mt_bench", "humaneval", "gsm8k"):
        assert len(data[role]) == TINY_N_EVAL and all(r.role == role for r in data[role])
    assert {_kind(r) for r in data["humaneval"]} == {"code"}
    assert {_kind(r) for r in data["mt_bench"]} == {"chat"}
    assert {_kind(r) for r in data["gsm8k"]} == {"math"}
    kinds = [_kind(r) for r in data["train"]]
    assert {k: kinds.count(k) for k in ("code", "chat", "math")} == {"code": 240, "chat": 180, "math": 180}
    assert len(set(kinds[:60])) == 3  # kinds are interleaved, so any prefix is a mix
    assert all(r.reference for recs in data.values() for r in recs)
    for fname, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / fname)
    assert manifest["counts"]["train"] == {"code": 240, "chat": 180, "math": 180}


def test_tiny_same_seed_byte_identical_across_processes(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    other = tmp_path / "again"
    code = (
        "import sys; from peagle.data import make_tiny_data; "
        f"make_tiny_data(sys.argv[1], seed=0, n_train={TINY_N_TRAIN}, n_eval={TINY_N_EVAL})"
    )
    # A fresh interpreter with a different hash seed: catches set/dict-order dependence.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, env=env, cwd=Path(__file__).parents[1])
    for fname in [*DATA_FILES.values(), "manifest.json"]:
        assert (out / fname).read_bytes() == (other / fname).read_bytes(), fname


def test_tiny_other_seed_differs(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    make_tiny_data(tmp_path / "s1", seed=1, n_train=TINY_N_TRAIN, n_eval=TINY_N_EVAL)
    for fname in DATA_FILES.values():
        assert (out / fname).read_bytes() != (tmp_path / "s1" / fname).read_bytes(), fname


def test_tiny_train_eval_disjoint(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    data = validate_data_dir(out)
    train_prompts = {r.turns[0] for r in data["train"]}
    eval_recs = [r for role in ("mt_bench", "humaneval", "gsm8k") for r in data[role]]
    assert not train_prompts & {r.turns[0] for r in eval_recs}


def _run_code(rec: PromptRecord) -> dict:
    instruction, code = rec.turns[0].split("\n\n", 1)
    name = re.search(r"`(\w+)`", instruction).group(1)
    assert code.startswith(f"def {name}("), rec.id
    ns: dict = {}
    exec(compile(code + rec.reference, rec.id, "exec"), ns)  # noqa: S102 - generated by the tests' own data
    return ns[name]


def test_tiny_code_references_run_and_agree_with_their_rules(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    data = validate_data_dir(out)
    recs = [r for r in data["train"] + data["humaneval"] if _kind(r) == "code"]
    assert len(recs) == 240 + TINY_N_EVAL
    probe = list(range(41))
    for rec in recs:
        fn = _run_code(rec)
        result = fn(probe)
        # The docstring's "Return the new list." / "Return the total ..." decides the type.
        assert isinstance(result, list if rec.turns[0].rstrip().endswith('list.\n    """') else int), rec.id


def _by_hand(task: ListTask, xs: list[int]) -> list[int] | int:
    """The rules applied by an independent loop (first matching condition wins)."""
    new = []
    for x in xs:
        for cond, act in (*task.rules, (None, task.otherwise)):
            if cond is None or eval(cond.code("x")):  # noqa: S307 - generated condition text
                if act.kind != "drop":
                    new.append(eval(act.expr("x")))  # noqa: S307
                break
    return sum(new) if task.aggregate == "total" else new


def test_list_tasks_three_renderings_agree() -> None:
    import random

    rng = random.Random(3)
    for _ in range(300):
        task = make_list_task(rng)
        want = _by_hand(task, list(task.items))
        assert task.apply(task.items) == want
        ns: dict = {}
        exec(task.code_prompt().split("\n\n", 1)[1] + task.code_reference(), ns)  # noqa: S102
        assert ns[task.name](list(task.items)) == want
        # The chat answer states every item of the prompt's list in order, and the result.
        ref = task.chat_reference()
        steps = re.findall(r"^- (\d+) is ", ref, flags=re.M)
        assert tuple(int(x) for x in steps) == task.items and len(set(task.items)) == len(task.items)
        assert ", ".join(map(str, task.items)) in task.chat_prompt()
        last = ref.rstrip().splitlines()[-1]
        assert (f"The total is {want}." in last or last.endswith(f"the total is {want}.")) if task.aggregate == "total" \
            else (f"{want}." in last)


def test_list_task_phrases() -> None:
    task = ListTask("adjust_scores", "score", "scores",
                    ((Condition("gt", 7), Action("mul", 3)), (Condition("even"), Action("add", 4))),
                    Action("drop"), "list", (8, 2, 5))
    assert task.apply(task.items) == [24, 6]
    assert task.chat_prompt() == ("Take the scores 8, 2, 5. If a score is greater than 7, multiply it by 3. "
                                  "Otherwise, if a score is even, add 4 to it. Otherwise, leave it out. "
                                  "Explain each step, then give the new list.")
    assert task.chat_reference().splitlines()[2:5] == [
        "- 8 is greater than 7, so it is multiplied by 3: 8 * 3 = 24.",
        "- 2 is not greater than 7, but it is even, so 4 is added: 2 + 4 = 6.",
        "- 5 is not greater than 7 and not even, so it is left out.",
    ]
    assert task.chat_reference("pair").splitlines()[2:5] == [
        "- 8 is greater than 7, so it is multiplied by 3: 8 * 3 = 24.",
        "- After 8, 2: 2 is not greater than 7, but it is even, so 4 is added: 2 + 4 = 6.",
        "- After 2, 5: 5 is not greater than 7 and not even, so it is left out.",
    ]
    with pytest.raises(ValueError, match="walkthrough='pairs'; use one of"):
        task.chat_reference("pairs")
    assert "- otherwise, an even score gets 4 added;" in task.code_prompt()
    assert task.code_reference() == ("    result = []\n    for score in scores:\n        if score > 7:\n"
                                     "            result.append(score * 3)\n        elif score % 2 == 0:\n"
                                     "            result.append(score + 4)\n    return result\n")


_CALC = re.compile(r"<<([\d+\-*/ ()]+)=(-?\d+)>>(-?\d+)")


def _check_solution(solution: str) -> int:
    """Verify every calculator annotation and return the final '#### N' answer."""
    annotations = _CALC.findall(solution)
    assert annotations, solution
    for expr, value, shown in annotations:
        assert eval(expr) == int(value) == int(shown), (expr, value, shown)  # noqa: S307 - digits/ops only
    final = re.search(r"\n#### (-?\d+)$", solution)
    assert final, solution
    assert int(final.group(1)) == int(annotations[-1][1])
    return int(final.group(1))


def test_tiny_math_files_are_correct(tiny: tuple[Path, dict]) -> None:
    out, _ = tiny
    data = validate_data_dir(out)
    recs = [r for r in data["train"] + data["gsm8k"] if _kind(r) == "math"]
    assert len(recs) == 180 + TINY_N_EVAL
    for rec in recs:
        answer = _check_solution(rec.reference)
        assert answer > 0


# Independent re-computation of each template's answer from its parameters.
_SOLVE = {
    "shopping": lambda p: p["bill"] - (p["q1"] * p["p1"] + p["q2"] * p["p2"]),
    "work_rate": lambda p: (5 * p["h"] + p["h2"]) * p["r"] * p["w"],
    "travel": lambda p: p["v1"] * p["t1"] + p["v2"] * p["t2"],
    "ages": lambda p: p["k"] * p["b"] + p["b"] + (p["k"] * p["b"] - p["d"]) + 3 * p["y"],
    "sharing": lambda p: (p["n"] - p["g"]) / p["k"],
    "savings": lambda p: p["cost"] / (p["wage"] * p["h"] / p["q"]),
    "discount": lambda p: p["n"] * p["price"] * (100 - p["d"]) / 100,
    "harvest": lambda p: (p["a"] + p["a"] * p["m"] + p["a"] * p["m"] - p["x"]) * p["price"],
}


def test_math_templates_recomputed_independently() -> None:
    import random

    assert set(_SOLVE) == set(MATH_TEMPLATES)
    rng = random.Random(7)
    for template in sorted(MATH_TEMPLATES):
        for _ in range(200):
            prob = make_math_problem(rng, template)
            assert prob.template == template
            assert _SOLVE[template](prob.params) == prob.answer, (template, prob.params)
            assert _check_solution(prob.solution) == prob.answer
            assert prob.answer > 0
            for value in prob.params.values():  # every parameter is stated in the question
                assert str(value) in prob.question, (template, value, prob.question)


def test_tiny_validate_data_dir_errors(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    d = tmp_path / "copy"
    d.mkdir()
    for fname in [*DATA_FILES.values(), "manifest.json"]:
        (d / fname).write_bytes((out / fname).read_bytes())
    validate_data_dir(d, require_manifest=True)

    train = (d / "train.jsonl").read_bytes()
    (d / "train.jsonl").write_bytes(train + (d / "eval_gsm8k.jsonl").read_bytes().splitlines(True)[0])
    with pytest.raises(DataDirError, match=r"eval_gsm8k\.jsonl: field 'role'|train\.jsonl:\d+: field 'role'"):
        validate_data_dir(d)

    (d / "train.jsonl").write_bytes(train[: len(train) // 2].rsplit(b"\n", 1)[0] + b"\n")
    with pytest.raises(DataDirError, match="differs from manifest"):
        validate_data_dir(d)

    (d / "eval_humaneval.jsonl").unlink()
    with pytest.raises(DataDirError, match="missing eval_humaneval.jsonl"):
        validate_data_dir(d)
    with pytest.raises(DataDirError, match="not found"):
        validate_data_dir(tmp_path / "nowhere")


def test_tiny_leak_is_refused(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    data = validate_data_dir(out)
    leaked = PromptRecord("leak-0", "unit", "train", data["mt_bench"][0].turns, None)
    d = tmp_path / "leak"
    d.mkdir()
    for role, fname in DATA_FILES.items():
        write_prompts(d / fname, data[role] + ([leaked] if role == "train" else []))
    with pytest.raises(DataDirError, match="leak-0.*same prompt as eval record"):
        validate_data_dir(d)


def test_tiny_bad_parameters_are_clear_errors(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(TinyDataError, match="n_train and n_eval"):
        make_tiny_data(tmp_path / "x", seed=0, n_train=10, n_eval=0)
    with pytest.raises(TinyDataError, match="max_rules"):
        make_tiny_data(tmp_path / "x", seed=0, n_train=10, n_eval=5, max_rules=0)
    with pytest.raises(TinyDataError, match="mix"):
        make_tiny_data(tmp_path / "x", seed=0, n_train=10, n_eval=5, mix=(1, 1))
    assert not (tmp_path / "x").exists()
