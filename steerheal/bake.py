"""Bake: merge adapters, in order, into the base weights and save an ordinary HF checkpoint.

load_model already merges adapters as it loads, so a baked model is, by construction, the
same function as base + stacked adapters everywhere `--adapter` is accepted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from . import SteerhealError, __version__
from .models import BUNDLED, load_model
from .records import atomic_path, file_sha256


def bake(
    base_name: str | None,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    device: str | None = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Merge `adapters` (round 0 first) into `base_name` and save to out_dir atomically; return the manifest."""
    if not adapters:
        raise SteerhealError("bake needs at least one --adapter (a directory from `steerheal heal`)")
    t0 = time.perf_counter()
    paths = [str(a) for a in adapters]
    lm = load_model(base_name, paths, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    manifest: dict = {
        "base_model": base_name or BUNDLED,
        "adapters": [
            {"order": i, "path": str(Path(a).resolve()), "sha256": file_sha256(a)} for i, a in enumerate(paths)
        ],
        "steerheal_version": __version__,
    }
    with atomic_path(out_dir) as tmp:
        lm.model.save_pretrained(tmp)
        tok = lm.tokenizer
        tok.padding_side = "left"
        tok.save_pretrained(tmp)
        manifest["time_s"] = round(time.perf_counter() - t0, 2)
        (tmp / "steerheal_bake.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
