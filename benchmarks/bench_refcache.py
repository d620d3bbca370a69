"""The reference cache kept as top-k log-probs instead of the whole vocabulary, on a demo heal
(KL over the top k plus one bucket for the rest, heal.topk_kl):
the barrier D (per sequence, kl_rev, rmse and mean) of the healed model against the reference,
computed with the full reference and with top-k, and the cache size of each.

    python benchmarks/bench_refcache.py runs/demo/round_00   # a round directory: kept.jsonl + adapter/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from steerheal.heal import _per_position, aggregate, encode_rows, kl_per_position, reference_logprobs, topk_kl
from steerheal.logprobs import TopK, right_padded, span_logprobs
from steerheal.models import load_model
from steerheal.progress import set_quiet
from steerheal.records import read_records


@torch.no_grad()
def main() -> None:
    set_quiet(True)
    d = Path(sys.argv[1])
    ref = load_model()  # the reference of round 0: the base
    student = load_model(None, [str(d / "adapter")])  # the healed model
    rows = encode_rows(ref.tokenizer, read_records(d / "kept.jsonl"), 160)
    pad = ref.tokenizer.pad_token_id
    full = reference_logprobs(ref.model, rows, pad, 0)
    print(
        f"{len(rows)} rows, {sum(r.n_scored for r in rows)} tokens; full cache {sum(x.numel() * 4 for x in full) / 2**20:.1f} MiB"
    )
    results: dict[int, dict[str, torch.Tensor]] = {}
    for k in (0, 256, 1024, 4096):
        cache = full if k == 0 else [TopK.of(x, k) for x in full]
        dm, dr = [], []
        for s in range(0, len(rows), 8):
            b = right_padded(rows, list(range(s, min(s + 8, len(rows)))), pad, student.device)
            lp = span_logprobs(student.model, b)
            if k:
                kl = _per_position(topk_kl(lp, TopK.cat([cache[i] for i in b.rows]), "kl_rev"), b.mask)
            else:
                r = torch.cat([cache[i] for i in b.rows])
                kl = _per_position(kl_per_position(lp, r, "kl_rev"), b.mask)
            dm.append(aggregate(kl, b.mask, "mean"))
            dr.append(aggregate(kl, b.mask, "rmse"))
        results[k] = {"mean": torch.cat(dm), "rmse": torch.cat(dr)}
        size = sum(c.nbytes() for c in cache) if k else sum(x.numel() * 4 for x in full)
        line = f"k={k or 'V':>5}: cache {size / 2**20:7.2f} MiB; D rmse {float(results[k]['rmse'].mean()):.4f}, D mean {float(results[k]['mean'].mean()):.4f}"
        if k:
            for agg in ("rmse", "mean"):
                rel = (results[k][agg] - results[0][agg]).abs() / results[0][agg].clamp_min(1e-9)
                line += f"; {agg}: mean rel. error {float(rel.mean()):.2%}, max {float(rel.max()):.2%}"
        print(line)


if __name__ == "__main__":
    main()
