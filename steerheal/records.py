"""JSONL completion records and atomic file writes: the data that flows between steps."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from . import SteerhealError


@dataclass
class Record:
    """One completion: the chat that prompted it, the text, and how it was made."""

    id: str
    persona: str
    messages: list[dict[str, str]]
    completion: str
    coeff: float = 0.0
    layers: list[int] = field(default_factory=list)
    seed: int | None = None
    model: str = ""
    steer: dict[str, Any] = field(default_factory=dict)  # C's schedule and gate while sampling (generate.steer)
    scores: dict[str, float] = field(default_factory=dict)
    drop_reasons: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


REQUIRED = ("id", "messages", "completion")


def without_system(rec: Record) -> Record:
    """The record with its system turn dropped: prompt arms train without the prompt (context distillation)."""
    return replace(rec, messages=[m for m in rec.messages if m["role"] != "system"])


def with_system(rec: Record, system: str) -> Record:
    """The record read in the prompted context (the Prompt Baking teacher's)."""
    return replace(rec, messages=[{"role": "system", "content": system}, *rec.messages])


def json_object(line: str, where: str, required: tuple[str, ...], what: str) -> dict:
    """One JSONL line as a dict with the required keys; errors name `where` ('file:line').

    Shared by every JSONL reader (records, vignettes), so their errors read alike.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SteerhealError(f"{where}: not valid JSON ({e.msg}); each line must be one {what}") from None
    if not isinstance(obj, dict):
        raise SteerhealError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SteerhealError(f"{where}: {what} lacks {', '.join(missing)} (needs {', '.join(required)})")
    return obj


def parse_record(line: str, where: str) -> Record:
    """Parse one JSONL line; `where` is 'file:line' for the error message."""
    obj = json_object(line, where, REQUIRED, "record")
    msgs = obj["messages"]
    if not (
        isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
    ):
        raise SteerhealError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if not isinstance(obj["completion"], str):
        raise SteerhealError(f"{where}: 'completion' must be a string")
    known = {k: obj[k] for k in Record.__dataclass_fields__ if k in obj}
    known.setdefault("persona", "")
    return Record(**known)


def read_records(path: str | Path) -> list[Record]:
    """Read records from a JSONL file, or from stdin when path is '-'."""
    name = "<stdin>" if str(path) == "-" else str(path)
    if str(path) == "-":
        lines: Iterable[str] = sys.stdin
    else:
        p = Path(path)
        if not p.is_file():
            raise SteerhealError(f"{name}: no such file; give a JSONL file of records or '-' for stdin")
        lines = p.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            out.append(parse_record(line, f"{name}:{i}"))
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it into place only if the block succeeds.

    A killed or failed step never leaves a half-written artifact under the real name.
    Works for files and directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / ".replaced")  # aside, not deleted, until the new one is in place
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """JSON, atomically; typed results (a dataclass with to_dict) as their dicts."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_to_dict) + "\n")


def _to_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_records(records: Iterable[Record], path: str | Path | None, stream: IO[str] | None = None) -> None:
    """Write records to `path` atomically, or to `stream` (stdout) when path is None or '-'."""
    text = "".join(r.to_json() + "\n" for r in records)
    if path is None or str(path) == "-":
        (stream or sys.stdout).write(text)
        (stream or sys.stdout).flush()
    else:
        write_text(path, text)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files in sorted order."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
