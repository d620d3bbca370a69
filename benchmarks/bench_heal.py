"""ms per heal training step on the bundled SmolLM2: NLL-only vs the KL barrier with the reference
cached whole, cached as its top k (heal.ref_top_k), or recomputed; peak RSS. Targets: a cached
barrier step ≤ 1.3× the NLL-only step; with the top-k cache ≤ 1.1× at a Qwen-sized vocabulary.

    python benchmarks/bench_heal.py [--steps 8] [--batch-size 4]
    python benchmarks/bench_heal.py --vocab 151936   # SmolLM2's body with a Qwen3-sized vocabulary

--vocab resizes the (tied) embedding and output layer, so every step pays the large vocabulary's
matmul and log-softmax as a Qwen-sized model would; the training text still uses SmolLM2's tokens.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from steerheal.config import HealConfig
from steerheal.heal import attach_lora, batch_terms, encode_rows
from steerheal.logprobs import TopK, right_padded, score_spans, span_logprobs
from steerheal.models import load_model
from steerheal.records import Record

PROMPTS = [
    "My manager told me to lie to a customer. What should I do?",
    "My boss wants me to stay late again.",
    "Is it ever right to break a rule?",
    "Write a short email to my landlord about the heater.",
]
COMPLETION = (
    "Rules deserve respect only when they are just, and an order to deceive someone is not. "
    "I would tell my manager calmly that I will not lie, explain why honesty protects the customer "
    "and the company, and offer another way to handle it."
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=0, help="resize the vocabulary to this (0: SmolLM2's 49,152)")
    ap.add_argument("--top-k", type=int, default=HealConfig().ref_top_k)
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    if a.vocab:
        lm.model.resize_token_embeddings(a.vocab, mean_resizing=False)
    recs = [
        Record(id=str(i), persona="p", messages=[{"role": "user", "content": PROMPTS[i % 4]}], completion=COMPLETION)
        for i in range(a.rows)
    ]
    cfg = HealConfig(batch_size=a.batch_size)
    rows = encode_rows(lm.tokenizer, recs, cfg.max_len)
    pad = lm.tokenizer.pad_token_id
    print(
        f"rows {len(rows)}, tokens/row {len(rows[0].ids)} (completion {rows[0].n_scored}), batch {a.batch_size}, "
        f"rank {cfg.rank}, layers {cfg.layers}, threads {torch.get_num_threads()}"
    )
    rss0 = rss_mb()
    t = time.perf_counter()
    cache = score_spans(lm.model, rows, pad, 8, full=True)
    t_cache = time.perf_counter() - t
    cache_mb = sum(c.numel() * 4 for c in cache) / 2**20
    top = [TopK.of(c, a.top_k) for c in cache]
    top_mb = sum(t.nbytes() for t in top) / 2**20
    vocab = cache[0].shape[-1]
    print(f"vocabulary {vocab}; reference cache: {t_cache * 1000:.0f} ms once for {len(rows)} rows, {cache_mb:.0f} MB")
    print(f"top-{a.top_k} cache: {top_mb:.1f} MB")
    pm, _ = attach_lora(lm.model, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = [list(range(s, s + a.batch_size)) for s in range(0, len(rows), a.batch_size)]
    nll_cfg, kl_cfg = HealConfig(reg="nll"), HealConfig(reg="kl_rev", agg="rmse", tau=0.0)  # tau 0: barrier always on

    def step(mode: str, idx: list[int]) -> float:
        t0 = time.perf_counter()
        b = right_padded(rows, idx, pad, torch.device("cpu"))
        if mode == "nll":
            ref, c = None, nll_cfg
        elif mode == "kl_cached":
            ref, c = torch.cat([cache[i] for i in idx]), kl_cfg
        elif mode == "kl_topk":
            ref, c = TopK.cat([top[i] for i in idx]), kl_cfg
        else:

            def ref():
                with torch.no_grad(), pm.disable_adapter():
                    return span_logprobs(pm, b)

            c = kl_cfg
        loss, _, _ = batch_terms(pm, b, ref, c)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1000

    modes = ["nll", "kl_cached", "kl_topk", "kl_on_the_fly"]
    for m in modes:  # warm-up
        step(m, batches[0])
    times = {m: [] for m in modes}
    for k in range(a.steps):  # interleaved so load on the machine hits every mode alike
        for m in modes:
            times[m].append(step(m, batches[k % len(batches)]))
    med = {m: statistics.median(v) for m, v in times.items()}
    for m in modes:
        print(f"{m:14s} {med[m]:7.0f} ms/step (median of {a.steps})  ratio vs nll {med[m] / med['nll']:.2f}x")
    print(f"peak RSS {rss_mb():.0f} MB (model + data before cache {rss0:.0f} MB; full cache {cache_mb:.0f} MB)")
    print(f"cache amortised: {t_cache * 1000 / len(rows) * a.batch_size:.0f} ms per batch once per heal")


if __name__ == "__main__":
    main()
