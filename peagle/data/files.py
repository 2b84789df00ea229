"""Local dataset files as users have them: the rows of one file or of a sharded snapshot.

An offline cluster holds the paper's datasets as copies: a hub snapshot sharded into parquet
files (``data/train-00000-of-00003.parquet``), a project's own release (HumanEval's
``HumanEval.jsonl.gz``, FastChat's MT-Bench ``question.jsonl``), or a JSON export. This module
reads all of them without ``datasets``, so that every problem names the file and the 1-based
line (JSON Lines) or row (JSON arrays, parquet) where it is.

A ``data_files`` entry is a file, a directory (every data file under it, recursively, in path
order; hidden directories such as ``.cache`` are skipped), a glob (``snap/data/train-*.parquet``)
or a list of those, concatenated in order. Formats, by suffix: ``.jsonl``, ``.json`` (JSON Lines
or one JSON array of objects), ``.parquet``; ``.jsonl.gz`` and ``.json.gz`` are read through gzip.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SUFFIXES", "DataFileError", "Row", "resolve_data_files", "read_rows"]

SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_GLOB_CHARS = set("*?[")


class DataFileError(ValueError):
    """A dataset file is missing, unreadable, empty or holds a malformed row."""


@dataclass(frozen=True)
class Row:
    """One row and where it came from: ``where`` is ``"<file>: line N"`` or ``"<file>: row N"`` (1-based)."""

    data: Mapping[str, Any]
    where: str


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _under(directory: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in files if not f.startswith(".") and _suffix(Path(f))]
    return sorted(out, key=lambda p: p.relative_to(directory).as_posix())


def resolve_data_files(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                       key: str = "data.data_files") -> list[Path]:
    """The files a ``data_files`` entry names, in reading order; ``key`` names the setting in errors.

    Raises :class:`DataFileError` for an entry that matches nothing, a file of an unknown format,
    or a directory without data files.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    if not spec:
        raise DataFileError(f"{key}: an empty list names no file")
    known = ", ".join(SUFFIXES)
    paths: list[Path] = []
    for entry in spec:
        text = os.fspath(entry)
        if _GLOB_CHARS & set(text):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            found = [p for p in matched if _suffix(p)]
            if not found:
                raise DataFileError(f"{key}: the pattern {text!r} matches no file ending in one of {known}"
                                    + (f" (it matches {len(matched)} other files)" if matched else ""))
            paths += found
            continue
        path = Path(text)
        if path.is_dir():
            found = _under(path)
            if not found:
                raise DataFileError(f"{key}: the directory {path} holds no file ending in one of {known}")
            paths += found
        elif not path.exists():
            raise DataFileError(f"{key}: {path} not found; point it at an existing file, directory or glob")
        elif _suffix(path) is None:
            raise DataFileError(f"{key}: {path} is not a dataset file this suite reads; its name must end in "
                                f"one of {known}")
        else:
            paths.append(path)
    return paths


def _text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's `with`


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DataFileError(f"{where}: expected a JSON object (one record), got {type(value).__name__}")
    return value


def _json_rows(path: Path) -> Iterator[Row]:
    """JSON Lines, or one JSON array of objects (what ``datasets``' json builder also reads)."""
    try:
        with _text(path) as f:
            head = ""
            while not head:
                ch = f.read(1)
                if not ch:
                    break
                head = ch.strip()
            if head == "[":  # one array: parse the whole file
                try:
                    values = json.loads("[" + f.read())
                except json.JSONDecodeError as err:
                    raise DataFileError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); "
                                        "a truncated download? fetch the file again") from None
                for i, value in enumerate(values, 1):
                    yield Row(_object(value, f"{path}: row {i}"), f"{path}: row {i}")
                return
            f.seek(0)
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: line {lineno}"
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFileError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                                        "a truncated or partly written file? fetch it again") from None
                yield Row(_object(value, where), where)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataFileError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # comes with pandas/datasets; imported only for parquet files

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise DataFileError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            i += 1
            yield Row(value, f"{path}: row {i}")


def read_rows(paths: Sequence[Path]) -> Iterator[Row]:
    """Every row of ``paths`` in order (files from :func:`resolve_data_files`).

    Raises :class:`DataFileError` naming the file (and line or row) for unreadable or malformed
    content and for a file without a single row.
    """
    for path in paths:
        rows = _parquet_rows(path) if _suffix(path) == ".parquet" else _json_rows(path)
        n = 0
        for row in rows:
            n += 1
            yield row
        if n == 0:
            raise DataFileError(f"{path}: holds no rows (an empty file?)")
