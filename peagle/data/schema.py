"""The prompt record (ARCHITECTURE.md, "Prompt records") and its JSONL reader/writer.

One JSON object per line::

    {"id": "gsm8k-test-00017", "source": "openai/gsm8k", "role": "gsm8k",
     "turns": ["first user turn", "optional second turn"], "reference": "answer or null"}

Reading is strict: unknown keys, wrong types, unknown roles and duplicate ids are errors that
name the file, the line number and the field, because a silently mis-read prompt file poisons
every later stage (responses, hidden states, acceptance numbers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peagle.io import atomic_write_bytes, sha256_bytes

__all__ = [
    "ROLES",
    "EVAL_ROLES",
    "FIELDS",
    "PromptRecord",
    "SchemaError",
    "read_prompts",
    "write_prompts",
    "records_to_jsonl",
]

ROLES: tuple[str, ...] = ("train", "mt_bench", "humaneval", "gsm8k")
EVAL_ROLES: tuple[str, ...] = ("mt_bench", "humaneval", "gsm8k")
FIELDS: tuple[str, ...] = ("id", "source", "role", "turns", "reference")


class SchemaError(ValueError):
    """A prompt record or prompt file does not follow the schema."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``turns[0]`` is what the target is prompted with; ``reference`` is optional."""

    id: str
    source: str
    role: str
    turns: tuple[str, ...]
    reference: str | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen to a tuple so records stay hashable.
        if isinstance(self.turns, list):
            object.__setattr__(self, "turns", tuple(self.turns))
        problem = _validate_fields(self.id, self.source, self.role, self.turns, self.reference)
        if problem is not None:
            field, msg = problem
            raise SchemaError(f"PromptRecord field '{field}': {msg}")

    @property
    def prompt(self) -> str:
        """The first user turn (the text the target is prompted with)."""
        return self.turns[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the contract's key order."""
        return {
            "id": self.id,
            "source": self.source,
            "role": self.role,
            "turns": list(self.turns),
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> PromptRecord:
        """Build a record from a parsed JSON object; raises :class:`SchemaError` naming the field."""
        if not isinstance(obj, Mapping):
            raise SchemaError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise SchemaError(f"field '{missing[0]}': missing (a record needs all of {', '.join(FIELDS)})")
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise SchemaError(f"field '{unknown[0]}': unknown field (allowed: {', '.join(FIELDS)})")
        turns = obj["turns"]
        if not isinstance(turns, list):
            raise SchemaError(f"field 'turns': must be a JSON list of strings, got {type(turns).__name__}")
        return cls(id=obj["id"], source=obj["source"], role=obj["role"], turns=tuple(turns), reference=obj["reference"])


def _validate_fields(
    id_: Any, source: Any, role: Any, turns: Any, reference: Any
) -> tuple[str, str] | None:
    """Return ``(field, message)`` for the first violation, or None."""
    if not isinstance(id_, str) or not id_.strip():
        return "id", f"must be a non-empty string, got {id_!r}"
    if any(c in id_ for c in "\n\r\t"):
        return "id", f"must not contain whitespace control characters, got {id_!r}"
    if not isinstance(source, str) or not source.strip():
        return "source", f"must be a non-empty string, got {source!r}"
    if not isinstance(role, str) or role not in ROLES:
        return "role", f"unknown role {role!r}; must be one of {', '.join(ROLES)}"
    if not isinstance(turns, tuple) or len(turns) == 0:
        return "turns", "must be a non-empty list of strings"
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            return "turns", f"turns[{i}] must be a string, got {type(turn).__name__}"
    if not turns[0].strip():
        return "turns", "turns[0] (the prompt) must not be blank"
    if reference is not None and not isinstance(reference, str):
        return "reference", f"must be a string or null, got {type(reference).__name__}"
    return None


def read_prompts(path: str | os.PathLike[str], *, expect_role: str | None = None) -> list[PromptRecord]:
    """Read a prompt JSONL file strictly.

    Blank lines are skipped; a file with no records is an error. Errors (:class:`SchemaError`)
    name the file, line number and field.
    With ``expect_role`` every record must carry that role (an eval file holding training prompts
    would silently measure the wrong thing).
    """
    path = Path(path)
    if expect_role is not None and expect_role not in ROLES:
        raise ValueError(f"read_prompts: expect_role {expect_role!r} is not one of {', '.join(ROLES)}")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: prompt file not found (create it with `python -m peagle data ...` or fix the path)"
        )
    records: list[PromptRecord] = []
    first_line_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SchemaError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            try:
                rec = PromptRecord.from_dict(obj)
            except SchemaError as exc:
                msg = str(exc).removeprefix("PromptRecord ")
                raise SchemaError(f"{path}:{lineno}: {msg}") from None
            if rec.id in first_line_of:
                raise SchemaError(
                    f"{path}:{lineno}: field 'id': duplicate id {rec.id!r} (first seen on line {first_line_of[rec.id]})"
                )
            if expect_role is not None and rec.role != expect_role:
                raise SchemaError(
                    f"{path}:{lineno}: field 'role': expected {expect_role!r} in this file, got {rec.role!r}"
                )
            first_line_of[rec.id] = lineno
            records.append(rec)
    if not records:
        # An empty set would only fail later (a mean over no prompts is nan in the results JSON).
        raise SchemaError(
            f"{path}: no prompts (empty file); re-run the data rule (`python -m peagle data`) or point "
            "the stage at a non-empty prompt file"
        )
    return records


def records_to_jsonl(records: Iterable[PromptRecord]) -> bytes:
    """Serialise records to JSONL bytes (contract key order, UTF-8, one record per line).

    Raises :class:`SchemaError` on a non-record item or a duplicate id.
    """
    seen: set[str] = set()
    lines: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, PromptRecord):
            raise SchemaError(f"write_prompts: item {i} is a {type(rec).__name__}, not a PromptRecord")
        if rec.id in seen:
            raise SchemaError(f"write_prompts: item {i} field 'id': duplicate id {rec.id!r}")
        seen.add(rec.id)
        # ensure_ascii=False keeps the file readable; JSON escapes embedded newlines, so one
        # record is always exactly one line.
        lines.append(json.dumps(rec.to_dict(), ensure_ascii=False))
    return ("\n".join(lines) + "\n" if lines else "").encode("utf-8")


def write_prompts(path: str | os.PathLike[str], records: Iterable[PromptRecord]) -> str:
    """Write records to ``path`` atomically (temp file + rename); return the file's sha256."""
    data = records_to_jsonl(records)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)
