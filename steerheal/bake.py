"""Bake: merge adapters, in order, into the base weights and save an ordinary HF checkpoint.

The merge runs in fp32 (load_model merges adapters into fp32 weights as it loads), so a baked
model is the same function as base + stacked adapters everywhere `--adapter` is accepted, also
when the loop ran in bf16 (there each adapter is an fp32 low-rank residual, see models.add_low_rank).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from . import SteerhealError, __version__
from .models import BUNDLED, load_model, pick_dtype
from .progress import log
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
    # Always merged in fp32: merged into bf16 weights, a small heal is mostly rounded away.
    lm = load_model(base_name, paths, device=device, dtype="fp32", trust_remote_code=trust_remote_code)
    if dtype not in (None, "auto", "fp32", "float32"):
        log(
            f"bake: --dtype {dtype} casts the merged weights after merging, which rounds away much of each "
            "adapter's ΔW (most of a small heal); the loop's model keeps it in fp32. Omit --dtype to ship that model."
        )
        lm.model.to(pick_dtype(lm.device, dtype))
    manifest: dict = {
        "base_model": base_name or BUNDLED,
        "adapters": [
            {"order": i, "path": str(Path(a).resolve()), "sha256": file_sha256(a)} for i, a in enumerate(paths)
        ],
        "steerheal_version": __version__,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }
    with atomic_path(out_dir) as tmp:
        lm.model.save_pretrained(tmp)
        tok = lm.tokenizer
        tok.padding_side = "left"
        tok.save_pretrained(tmp)
        manifest["time_s"] = round(time.perf_counter() - t0, 2)
        (tmp / "steerheal_bake.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
