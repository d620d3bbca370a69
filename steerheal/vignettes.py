"""Vignette sources for the eval: a tinymfv-schema JSONL path, `tinymfv:<set>` (downloaded at a
pinned commit and checked against its sha256), an importable tinymfv package, or the package's
own demo set. `--limit` takes a balanced sample, never a prefix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import SteerhealError
from .config import CONDITIONS, FOUNDATIONS
from .progress import log
from .records import atomic_path, json_object

# tinymfv at a pinned commit; sha256 of the files we know (from shared/tinymfv/SHA256SUMS).
TINYMFV_COMMIT = "ab4fcd2"
TINYMFV_URL = "https://raw.githubusercontent.com/wassname/tinymfv/{commit}/data/vignettes_{set}_{condition}.jsonl"
TINYMFV_SETS = ("classic", "scifi", "ai-actor")
TINYMFV_SHA256 = {
    "vignettes_classic_other_violate.jsonl": "68c275c23475c688d40b1826b7133fe9239e1472c51cd4839f99f5dcdd53940c",
    "vignettes_classic_self_violate.jsonl": "16e2a4bcb928fa6c572b473ace8c880e367a36cc75be635bfc18a6c804b4ce2a",
}
DEMO = Path(__file__).parent / "data" / "demo_vignettes.jsonl"

# tinymfv's coarse labels and human_ column suffixes → our lower-case names.
_ALIASES = {f: f for f in FOUNDATIONS} | {"social norms": "social", "socialnorms": "social", "social_norms": "social"}


@dataclass
class Vignette:
    """One scene: its id, the foundation it was written to violate, and human rater percentages if any."""

    id: str
    foundation: str
    text: str
    human: dict[str, float] = field(default_factory=dict)
    condition: str = ""

    @property
    def modal(self) -> str:
        """The human modal label (argmax of human_*), else the written label."""
        if self.human:
            return max(FOUNDATIONS, key=lambda f: self.human.get(f, 0.0))
        return self.foundation


def parse_vignettes(lines: Sequence[str], where: str, condition: str = "") -> list[Vignette]:
    """Parse tinymfv-schema JSONL lines; errors name `where`:line and the problem."""
    out: list[Vignette] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        loc = f"{where}:{n}"
        obj = json_object(line, loc, ("id", "foundation_coarse", "text"), "vignette")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise SteerhealError(f"{loc}: 'text' must be a non-empty string")
        fnd = _ALIASES.get(str(obj["foundation_coarse"]).strip().lower())
        if fnd is None:
            raise SteerhealError(
                f"{loc}: foundation_coarse '{obj['foundation_coarse']}' is not one of "
                "Care, Fairness, Loyalty, Authority, Sanctity, Liberty, Social Norms"
            )
        human: dict[str, float] = {}
        for k, v in obj.items():
            if not k.startswith("human_"):
                continue
            name = _ALIASES.get(k[len("human_") :].lower())
            if name is None:
                raise SteerhealError(
                    f"{loc}: unknown column '{k}'; human_ columns are human_Care ... human_SocialNorms"
                )
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SteerhealError(f"{loc}: '{k}' must be a non-negative number (percent of raters), got {v!r}")
            human[name] = float(v)
        if human and sum(human.values()) <= 0:
            human = {}  # no rater chose anything: fall back to the written label
        vid = str(obj["id"])
        key = f"{condition}/{vid}"
        if key in seen:
            raise SteerhealError(f"{loc}: duplicate id '{vid}'; ids must be unique")
        seen.add(key)
        out.append(Vignette(vid, fnd, obj["text"].strip(), human, condition))
    if not out:
        raise SteerhealError(f"{where}: no vignettes in the file")
    return out


def read_vignette_file(path: str | Path, condition: str = "") -> list[Vignette]:
    p = Path(path)
    if not p.is_file():
        raise SteerhealError(
            f"{path}: no such vignette file; give a tinymfv-schema JSONL, tinymfv:classic, or omit --vignettes for the demo set"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SteerhealError(f"{path}: not UTF-8 text; give a JSONL file") from None
    return parse_vignettes(text.splitlines(), str(path), condition)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_tinymfv(set_name: str, condition: str) -> Path:
    """The tinymfv file for (set, condition): an importable tinymfv package's copy, else the cache, else download."""
    fname = f"vignettes_{set_name}_{condition}.jsonl"
    spec = importlib.util.find_spec("tinymfv")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            hits = sorted(Path(root).rglob(fname))
            if hits:
                return hits[0]
    from .models import cache_dir

    target = cache_dir() / "vignettes" / TINYMFV_COMMIT / fname
    known = TINYMFV_SHA256.get(fname)
    if target.is_file():
        if known is None or _sha256(target.read_bytes()) == known:
            return target
        log(f"steerheal: {target} fails its sha256 check; downloading it again")
    url = TINYMFV_URL.format(commit=TINYMFV_COMMIT, set=set_name, condition=condition)
    log(f"steerheal: downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise SteerhealError(f"could not download {url} ({reason}); pass a local path with --vignettes") from None
    digest = _sha256(data)
    if known is not None and digest != known:
        raise SteerhealError(
            f"{url}: sha256 {digest} does not match the pinned {known}; the download is corrupt "
            "or the source changed; pass a local path with --vignettes"
        )
    if known is None:
        log(f"steerheal: {fname} sha256 {digest} (unverified: no known digest for this set)")

    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def balanced_sample(vigs: list[Vignette], limit: int | None, seed: int = 0) -> list[Vignette]:
    """`limit` vignettes, round-robin over foundations, each foundation shuffled by `seed`. Never a prefix."""
    if limit is None or limit >= len(vigs):
        return list(vigs)
    if limit < 1:
        raise SteerhealError(f"--limit {limit}: must be at least 1")
    rng = random.Random(seed)
    groups = []
    for f in FOUNDATIONS:
        g = [v for v in vigs if v.foundation == f]
        rng.shuffle(g)
        if g:
            groups.append(g)
    out: list[Vignette] = []
    i = 0
    while len(out) < limit:
        for g in groups:
            if i < len(g) and len(out) < limit:
                out.append(g[i])
        i += 1
    return out


def load_vignettes(
    source: str | None, condition: str = "other_violate", limit: int | None = None, seed: int = 0
) -> list[Vignette]:
    """Vignettes from a JSONL path, `tinymfv:<set>`, or (None) the package's demo set; balanced `limit`."""
    if condition not in CONDITIONS:
        raise SteerhealError(f"--condition {condition}: use other_violate, self_violate or both")
    if source is None or source == "demo":
        vigs = read_vignette_file(DEMO)
    elif source.startswith("tinymfv:"):
        set_name = source.split(":", 1)[1]
        if set_name not in TINYMFV_SETS:
            raise SteerhealError(
                f"--vignettes {source}: unknown set; use tinymfv:classic, tinymfv:scifi or tinymfv:ai-actor"
            )
        conds = ["other_violate", "self_violate"] if condition == "both" else [condition]
        vigs = [v for c in conds for v in read_vignette_file(fetch_tinymfv(set_name, c), c)]
    else:
        vigs = read_vignette_file(source)
    return balanced_sample(vigs, limit, seed)


def vignettes_sha256(vigs: list[Vignette]) -> str:
    """A hash of exactly the rows evaluated (ids, labels, text), for the report."""
    h = hashlib.sha256()
    for v in vigs:
        h.update(json.dumps([v.condition, v.id, v.foundation, v.text], ensure_ascii=False).encode())
    return h.hexdigest()
