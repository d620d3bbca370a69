"""Benchmark `eval` on the bundled SmolLM2: vignettes/s batched vs one row at a time, and 132 × 2 wall time.

usage: STEERHEAL_CACHE=/tmp/shcache python benchmarks/bench_eval.py [VIGNETTES.jsonl] [--rows 28]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from steerheal.config import EvalConfig
from steerheal.evaluate import score_vignettes
from steerheal.models import load_model
from steerheal.progress import set_quiet
from steerheal.vignettes import load_vignettes

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "tinymfv" / "vignettes_classic_other_violate.jsonl"


def evaluate(lm, vigs, batch_size: int = 16, **kw) -> dict:
    return score_vignettes(lm, vigs, EvalConfig(batch_size=batch_size), **kw)


def timed(lm, vigs, **kw) -> tuple[float, dict]:
    t = time.perf_counter()
    rep = evaluate(lm, vigs, **kw)
    return time.perf_counter() - t, rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("vignettes", nargs="?", default=str(DEFAULT))
    ap.add_argument("--rows", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    set_quiet(True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    lm = load_model()
    allv = load_vignettes(a.vignettes)
    sub = load_vignettes(a.vignettes, limit=a.rows)
    evaluate(lm, sub[:2])  # warm-up
    runs = {
        "one row at a time (batch 1, no prefix cache)": dict(batch_size=1, prefix_cache=False),
        f"batched {a.batch_size}, no prefix cache": dict(batch_size=a.batch_size, prefix_cache=False),
        f"batched {a.batch_size} + shared-prefix KV cache (default)": dict(batch_size=a.batch_size, prefix_cache=True),
    }
    gqa_off = "batched + prefix cache, K/V copied per head (TRANSFORMERS_SDPA_FORCE_GQA=0)"
    runs[gqa_off] = dict(batch_size=a.batch_size, prefix_cache=True)
    res = {}
    for name, kw in runs.items():
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "0" if name == gqa_off else "1"
        s, rep = timed(lm, sub, **kw)
        res[name] = (s, rep)
        print(
            f"{name:55s} {len(sub)} rows × 2 frames: {s:6.1f} s  {len(sub) / s:6.2f} vignettes/s  pmass {rep['pmass']:.4f}"
        )
    base = res[next(iter(runs))]
    for name, (s, rep) in list(res.items())[1:]:
        dp = max(abs(x["pmass"] - y["pmass"]) for x, y in zip(rep["rows"], base[1]["rows"]))
        print(f"speed-up of '{name}' over one at a time: {base[0] / s:.2f}x (max |Δpmass| {dp:.1e})")
    default = f"batched {a.batch_size} + shared-prefix KV cache (default)"
    print(f"SDPA's own GQA over copying K/V per head: {res[gqa_off][0] / res[default][0]:.2f}x")
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    s, rep = timed(lm, allv, batch_size=a.batch_size)
    print(
        f"all {len(allv)} vignettes × 2 frames (default settings): {s:.1f} s  ({len(allv) / s:.2f} vignettes/s; target ≤ 60 s)"
    )


if __name__ == "__main__":
    main()
