"""The persona YAML: load with yaml.safe_load, validate with errors naming file and key path."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import SteerhealError
from .config import FOUNDATIONS

MIN_PROMPTS = 8


@dataclass(frozen=True)
class Pair:
    pos: str
    neg: str


@dataclass
class Persona:
    name: str
    description: str
    target: str
    direction: int
    pairs: list[Pair]
    prompts: list[str]
    extract_prompts: list[str] = field(default_factory=list)
    generate_prompts: list[str] = field(default_factory=list)
    narration: list[str] = field(default_factory=list)
    demo: list[str] = field(default_factory=list)
    sha256: str = ""
    path: str = ""

    @property
    def extraction(self) -> list[str]:
        """User turns for vector extraction (its own list, else the shared prompts)."""
        return self.extract_prompts or self.prompts

    @property
    def generation(self) -> list[str]:
        """User turns for generation (its own list, else the shared prompts)."""
        return self.generate_prompts or self.prompts


def _str_list(data: dict, key: str, where: str, minimum: int = 0) -> list[str]:
    val = data.get(key, [])
    if val is None:
        val = []
    if not isinstance(val, list) or not all(isinstance(x, str) and x.strip() for x in val):
        raise SteerhealError(f"{where}: key '{key}' must be a list of non-empty strings")
    if len(val) < minimum:
        raise SteerhealError(f"{where}: key '{key}' needs at least {minimum} entries, has {len(val)}")
    return list(val)


REQUIRED_KEYS = ("name", "description", "target", "direction", "pairs", "prompts")
KEYS = (*REQUIRED_KEYS, "extract_prompts", "generate_prompts", "narration", "demo")


def _pairs(raw: Any, where: str) -> list[Pair]:
    if not isinstance(raw, list) or not raw:
        raise SteerhealError(f"{where}: key 'pairs' must be a non-empty list of {{pos, neg}} system prompts")
    pairs = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or set(p) != {"pos", "neg"}:
            raise SteerhealError(f"{where}: pairs[{i}] must have exactly the keys pos and neg")
        if not all(isinstance(p[k], str) and p[k].strip() for k in ("pos", "neg")):
            raise SteerhealError(f"{where}: pairs[{i}].pos and .neg must be non-empty strings")
        if p["pos"].strip() == p["neg"].strip():
            raise SteerhealError(f"{where}: pairs[{i}] pos and neg are identical; they must be opposites")
        pairs.append(Pair(p["pos"].strip(), p["neg"].strip()))
    return pairs


def parse_persona(data: Any, where: str, sha256: str = "") -> Persona:
    """Validate a parsed YAML document; `where` names the file in errors."""
    if not isinstance(data, dict):
        raise SteerhealError(
            f"{where}: the persona must be a YAML mapping with keys name, description, target, direction, pairs, prompts"
        )
    for key in REQUIRED_KEYS:
        if key not in data:
            raise SteerhealError(f"{where}: missing key '{key}' (see the persona schema in README.md)")
    for key in ("name", "description"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise SteerhealError(f"{where}: key '{key}' must be a non-empty string")
    target = str(data["target"]).lower()
    if target not in FOUNDATIONS:
        raise SteerhealError(f"{where}: key 'target' is '{data['target']}'; expected one of {', '.join(FOUNDATIONS)}")
    if data["direction"] not in (1, -1) or isinstance(data["direction"], bool):
        raise SteerhealError(f"{where}: key 'direction' must be +1 or -1 (which way the persona moves '{target}')")
    pairs = _pairs(data["pairs"], where)
    narration = _str_list(data, "narration", where)
    for i, pat in enumerate(narration):
        try:
            re.compile(pat)
        except re.error as e:
            raise SteerhealError(f"{where}: narration[{i}] is not a valid regex ({e})") from None
    unknown = set(data) - set(KEYS)
    if unknown:
        raise SteerhealError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return Persona(
        name=data["name"].strip(),
        description=data["description"].strip(),
        target=target,
        direction=int(data["direction"]),
        pairs=pairs,
        prompts=_str_list(data, "prompts", where, MIN_PROMPTS),
        extract_prompts=_str_list(data, "extract_prompts", where),
        generate_prompts=_str_list(data, "generate_prompts", where),
        narration=narration,
        demo=_str_list(data, "demo", where),
        sha256=sha256,
        path=where,
    )


def load_persona(path: str | Path) -> Persona:
    """Load and validate a persona YAML file."""
    p = Path(path)
    if not p.is_file():
        raise SteerhealError(f"{path}: no such persona file")
    raw = p.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SteerhealError(f"{path}{line}: malformed YAML ({problem}); fix the syntax there") from None
    return parse_persona(data, str(path), hashlib.sha256(raw).hexdigest())
