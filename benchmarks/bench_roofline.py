"""Each step of a round against this machine's roofline, in fp32 and bf16 side by side.

First the machine: matmul GFLOP/s at the shapes the steps use (scoring and training run many tokens
through each weight; decoding runs a batch of 16 rows), and the memory bandwidth that bounds
decoding. Then each step on the bundled SmolLM2 in both dtypes (interleaved, so load on the machine
hits both alike): vector extraction, one dose probe, steered generation, the filter's scoring, one
heal step (KL barrier, cached reference) and the k-shot eval. For each step: the wall time, the
token passes in each dtype, the bf16/fp32 speed-up per token pass, the achieved GFLOP/s, and that as
a share of the bf16 matmul peak and of the step's own roofline: the least time it could take, each forward call bound either by the peak or by
reading every weight once at the measured bandwidth (see roofline_seconds).

FLOPs are counted, not estimated: torch's FlopCounterMode over one untimed run of each step (the
matmuls forward and backward, LoRA's included). It does not count CPU attention, so the achieved
figures are lower bounds, the more so where contexts are long (the k-shot eval).

    python benchmarks/bench_roofline.py [--dtypes fp32,bf16] [--reps 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from steerheal.config import EvalConfig, GenerateConfig, HealConfig
from steerheal.dose import steered_kl_p95
from steerheal.evaluate import score_vignettes
from steerheal.filter import completion_nlls
from steerheal.heal import attach_lora, batch_terms, encode_rows, reference_logprobs
from steerheal.logprobs import cat_logprobs, right_padded
from steerheal.models import LoadedModel, cpu_flags, load_model, pad_token_id, parse_layers
from steerheal.persona import load_persona
from steerheal.progress import set_quiet
from steerheal.vector import extract
from steerheal.vignettes import load_vignettes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (name, M tokens, K in, N out) at SmolLM2's widths (hidden 576, MLP 1536, vocabulary 49,152)
SHAPES = [
    ("scoring/training, MLP", 2048, 576, 1536),
    ("scoring/training, head", 1024, 576, 49152),
    ("decode, batch 16, MLP", 16, 576, 1536),
]


def matmul_gflops(m: int, k: int, n: int, dt: torch.dtype, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def bandwidth_gbs(mib: int = 512, seconds: float = 1.0) -> float:
    """Read bandwidth: a sum over a buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.sum()
        reps += 1
    return x.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9


def linear_weights(model: nn.Module) -> int:
    """Weights that take part in a matmul per token: every Linear (the tied head included once)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


class CallCounter:
    """The tokens of each forward call through the model: each call reads every weight once."""

    def __init__(self, model: Any):
        self.tokens: list[int] = []
        model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, _mod: nn.Module, args: tuple, _out: Any) -> None:
        self.tokens.append(int(args[0].numel()))


def roofline_seconds(flops: float, tokens: list[int], weight_bytes: float, peak: float, bw: float) -> float:
    """The least time the step could take: each call at its own bound, max(its FLOPs / peak, the
    weights / bandwidth), its FLOPs the counted total shared out by its tokens (prompt tokens skip the
    output layer, so this moves a little of a prompt's work onto decode steps). A decode step of 16 rows
    is bound by the bandwidth, a prompt of hundreds of tokens by the peak."""
    per_token = flops / max(1, sum(tokens))
    return sum(max(per_token * t / (peak * 1e9), weight_bytes / (bw * 1e9)) for t in tokens)


def steps(lm: LoadedModel, persona: Any) -> dict[str, Callable[[], object]]:
    """The round's steps at demo-like sizes, each a closure that runs once."""
    layers = parse_layers("0.45:0.55", lm.n_layers)
    vec = extract(lm, persona, layers, max_prompts=16)
    prompts = persona.generation[:16]
    gen_cfg = GenerateConfig(n=16, max_new_tokens=40, batch_size=16)
    from steerheal.generate import generate_records

    recs = generate_records(lm, persona.name, prompts, gen_cfg, vector=vec, coeff=2.5, seed=0)
    hcfg = HealConfig(batch_size=4, max_len=160, tau=0.1, rank=16, alpha=32)
    rows = encode_rows(lm.tokenizer, recs, hcfg.max_len)
    pad = pad_token_id(lm.tokenizer)
    ref = reference_logprobs(lm.model, rows, pad, hcfg.ref_top_k)
    vignettes = load_vignettes(None, limit=14)

    def heal_step() -> None:
        pm, _ = attach_lora(lm.model, hcfg)
        try:
            params = [p for p in pm.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=hcfg.lr)
            pm.train()
            for s in range(0, 8, 4):
                idx = list(range(s, s + 4))
                b = right_padded(rows, idx, pad, lm.device)
                loss, _, _ = batch_terms(pm, b, cat_logprobs([ref[i] for i in idx], lm.device), hcfg)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            lm.model = pm.unload().eval()
            for p in lm.model.parameters():
                p.requires_grad_(False)

    return {
        "vector (16 prompts)": lambda: extract(lm, persona, layers, max_prompts=16),
        "dose probe (8 x 20 tok)": lambda: steered_kl_p95(lm, prompts[:8], vec, 2.5, 20),
        "generate (16 x 40 tok)": lambda: generate_records(
            lm, persona.name, prompts, gen_cfg, vector=vec, coeff=2.5, seed=1
        ),
        "filter (16 rows)": lambda: completion_nlls(lm, recs, 256, 16),
        "heal (2 steps x 4 rows)": heal_step,
        "eval (k-shot, 14 x 2)": lambda: score_vignettes(lm, vignettes, EvalConfig()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    set_quiet(True)
    dtypes = a.dtypes.split(",")
    flags = sorted(cpu_flags() & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"})
    print(f"threads {torch.get_num_threads()}; CPU flags: {', '.join(flags) or 'none of the bf16 ones'}")

    peak: dict[str, float] = {}
    print("\nmatmul GFLOP/s        " + "".join(f"{d:>9s}" for d in dtypes) + "   ratio")
    for name, m, k, n in SHAPES:
        g = {d: matmul_gflops(m, k, n, DTYPES[d]) for d in dtypes}
        for d in dtypes:
            peak[d] = max(peak.get(d, 0.0), g[d])
        ratio = f"{g['bf16'] / g['fp32']:6.1f}x" if {"fp32", "bf16"} <= set(g) else ""
        print(f"{name:24s}" + "".join(f"{g[d]:9.0f}" for d in dtypes) + f"  {ratio}")
    bw = bandwidth_gbs()
    print(f"memory read bandwidth {bw:.1f} GB/s")

    persona = load_persona("personas/anti_authority.yaml")
    models = {d: load_model(device="cpu", dtype=d) for d in dtypes}
    counters = {d: CallCounter(models[d].model) for d in dtypes}
    runs = {d: steps(models[d], persona) for d in dtypes}
    weights = linear_weights(models[dtypes[0]].model)
    work: dict[str, dict[str, tuple[int, list[int]]]] = {d: {} for d in dtypes}  # (FLOPs, tokens per call)
    for s in runs[dtypes[0]]:
        for d in dtypes:  # the untimed first run of each step counts its work (and warms it up)
            counters[d].tokens = []
            with FlopCounterMode(display=False) as flops:
                runs[d][s]()
            work[d][s] = (flops.get_total_flops(), counters[d].tokens)
    times: dict[str, dict[str, list[float]]] = {d: {s: [] for s in runs[d]} for d in dtypes}
    for _ in range(a.reps):
        for s in runs[dtypes[0]]:
            for d in dtypes:  # interleaved: both dtypes see the same load on the machine
                t0 = time.perf_counter()
                runs[d][s]()
                times[d][s].append(time.perf_counter() - t0)

    print(f"\nsteps on the bundled SmolLM2 ({weights / 1e6:.0f} M linear weights), median of {a.reps}")
    print(
        f"{'step':26s} "
        + " ".join(f"{d + ' s':>8s}" for d in dtypes)
        + "  tokens (each dtype)  speed-up  GFLOP/s  %peak  %roofline"
    )
    furthest = ("", 2.0)
    for s in runs[dtypes[0]]:
        med = {d: statistics.median(times[d][s]) for d in dtypes}
        d = dtypes[-1]
        flops, tokens = work[d][s]
        achieved = flops / med[d] / 1e9
        weight_bytes = weights * torch.finfo(DTYPES[d]).bits // 8
        share = roofline_seconds(flops, tokens, weight_bytes, peak[d], bw) / med[d]
        if share < furthest[1]:
            furthest = (s, share)
        # per token pass: sampled completions may end at EOS sooner in one dtype than in the other
        n = {x: sum(work[x][s][1]) for x in dtypes}
        both = {"fp32", "bf16"} <= set(med)
        speed = f"{med['fp32'] / n['fp32'] / (med['bf16'] / n['bf16']):7.2f}x" if both else ""
        print(
            f"{s:26s} "
            + " ".join(f"{med[x]:8.2f}" for x in dtypes)
            + f"  {'/'.join(str(n[x]) for x in dtypes):>19s}"
            + f"  {speed:>8s} {achieved:8.0f} {achieved / peak[d]:6.0%} {share:9.0%}"
        )
    print(f"\n(GFLOP/s and shares for {dtypes[-1]}; peak = its best matmul above)")
    print(f"furthest from its roofline: {furthest[0]} ({furthest[1]:.0%})")


if __name__ == "__main__":
    main()
