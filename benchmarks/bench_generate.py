"""Generation speed on the bundled SmolLM2, measured side by side in one run.

    python benchmarks/bench_generate.py [--tokens 32]

Prints: steered tokens/s at batch 16 vs batch 1 (target >= 5x), steered vs unsteered at
batch 16 (hook overhead, target <= 3%), the constant schedule's hook vs a bare add-C·v hook (the
hook before schedules and gates existed: no regression, target >= 0.97x), and a cached model
load vs the first GGUF conversion.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from steerheal import vector as vector_module
from steerheal.chat import messages_for
from steerheal.generate import complete
from steerheal.models import load_model, parse_layers
from steerheal.persona import load_persona
from steerheal.vector import extract


def bare_hook(coeff, v, state, first):
    """The steering hook as it was before schedules and the gate: one cached add of C·v."""
    cache = {}

    def hook(_mod, _inp, out):
        hs = out[0] if isinstance(out, tuple) else out
        key = (hs.device, hs.dtype)
        if key not in cache:
            cache[key] = coeff * v.to(device=hs.device, dtype=hs.dtype)
        hs = hs + cache[key]
        return (hs, *out[1:]) if isinstance(out, tuple) else hs

    return hook


def bare_tok_per_s(*args) -> float:
    real = vector_module._add_hook
    vector_module._add_hook = bare_hook
    try:
        return tok_per_s(*args)
    finally:
        vector_module._add_hook = real


def tok_per_s(lm, chats, vec, coeff, bs, tokens) -> float:
    t = time.perf_counter()
    complete(
        lm,
        chats,
        vector=vec,
        coeff=coeff,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        temperature=0,
        top_p=1.0,
        batch_size=bs,
    )
    return len(chats) * tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["STEERHEAL_CACHE"] = cache
        t = time.perf_counter()
        load_model()
        first = time.perf_counter() - t
        t = time.perf_counter()
        lm = load_model()
        cached = time.perf_counter() - t
    print(f"model load: first (GGUF conversion) {first:.1f} s, cached {cached:.2f} s  ({first / cached:.0f}x)")

    p = load_persona("personas/anti_authority.yaml")
    vec = extract(lm, p, parse_layers("0.45:0.55", lm.n_layers), max_prompts=4)
    chats = [messages_for(u) for u in p.prompts[:16]]
    tok_per_s(lm, chats[:4], vec, 4.0, 4, 4)  # warm-up

    b1, b16, plain, bare = [], [], [], []
    for _ in range(args.reps):  # interleaved, so drift in machine load hits all four alike
        b1.append(tok_per_s(lm, chats[:4], vec, 4.0, 1, args.tokens))
        b16.append(tok_per_s(lm, chats, vec, 4.0, 16, args.tokens))
        plain.append(tok_per_s(lm, chats, None, 0.0, 16, args.tokens))
        bare.append(bare_tok_per_s(lm, chats, vec, 4.0, 16, args.tokens))
    m1, m16, mp, mb = (statistics.median(x) for x in (b1, b16, plain, bare))
    print(f"steered batch 1:   {m1:7.1f} tok/s")
    print(f"steered batch 16:  {m16:7.1f} tok/s  -> {m16 / m1:.1f}x batch 1 (target >= 5x)")
    print(f"unsteered batch 16:{mp:7.1f} tok/s  -> hook overhead {100 * (mp / m16 - 1):+.1f}% (target <= 3%)")
    print(f"bare add-C·v hook: {mb:7.1f} tok/s  -> constant schedule at {m16 / mb:.3f}x of it (target >= 0.97x)")


if __name__ == "__main__":
    main()
