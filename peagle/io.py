"""Small file helpers shared by every stage: atomic writes and checksums.

Every writer in the suite writes to a temporary file in the destination directory and renames it
into place (ARCHITECTURE.md), so a crashed or interrupted stage never leaves a half-written file
under the final name that a later stage (or Snakemake) would take for complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "sha256_bytes",
    "sha256_file",
]


def _temp_sibling(dest: Path) -> Path:
    # Same directory as the destination so os.replace is a rename within one filesystem (atomic);
    # a leading dot keeps globbing tools from picking it up as a real output.
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a not-yet-existing temporary path next to ``dest``; rename it onto ``dest`` on success.

    The caller creates the file (``torch.save(obj, tmp)``, ``safetensors.save_file(t, tmp)``,
    ...). If the body raises, the temporary file is deleted and ``dest`` is left untouched.
    Files only: renaming onto an existing non-empty directory is not atomic on POSIX.
    """
    dest = Path(dest)
    if mkdir:
        dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        raise IsADirectoryError(f"peagle.io.atomic_path: destination {dest} is a directory; pass a file path")
    tmp = _temp_sibling(dest)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"peagle.io.atomic_path: the writer did not create {tmp} (destination {dest})")
        os.replace(tmp, dest)
    except BaseException:
        # BaseException too: a KeyboardInterrupt must not leave a stray temp file behind.
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically (fsync'd before the rename); return ``dest``."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        # "xb" honours the umask (unlike mkstemp's 0600), so outputs get normal permissions.
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return dest


def atomic_write_text(dest: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``dest`` atomically; newlines are written as given (no platform translation)."""
    return atomic_write_bytes(dest, text.encode(encoding))


def atomic_write_json(
    dest: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) atomically.

    ``sort_keys`` defaults to True so that equal objects give byte-identical files (checksums).
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(dest, text + "\n")


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError, missing: str = "missing",
              fix: str = "") -> Any:
    """Parse a JSON file; a missing or malformed file raises ``error`` naming the file (and ``fix``)."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}{tail}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err}){tail}") from None


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (shards can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; on success it replaces ``path`` (old one removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the final dir should read like any other output
    try:
        yield tmp
        if path.exists():
            # Move the old dir aside first so ``path`` is never half-written.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
