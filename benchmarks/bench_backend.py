"""Sampling on the hf backend against vLLM, side by side in one run, on the bundled SmolLM2.

    .venv-vllm/bin/python benchmarks/bench_backend.py [--dtype fp32] [--tokens 64]

Run it in the vLLM venv (scripts/setup_vllm.sh). Prints, for each of the loop's batch sizes (8: the
dose probes and generation coherence; 32: the loop's completions), steered tokens/s on each backend
and their ratio; the engine's start-up time; and the break-even: how many completions a process must
sample before vLLM's start-up has paid for itself. Every completion is forced to the full length
(min_new_tokens), so both backends generate the same number of tokens.
"""

from __future__ import annotations

import argparse
import time

from steerheal.chat import messages_for
from steerheal.generate import complete, use_backend
from steerheal.models import load_model, parse_layers
from steerheal.persona import load_persona
from steerheal.vector import extract


def seconds(lm, chats, vec, coeff, tokens) -> float:
    t = time.perf_counter()
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0, top_p=0.95, batch_size=len(chats))
    complete(lm, chats, vector=vec, coeff=coeff, desc="bench", **kw)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    lm = load_model(None, dtype=a.dtype)
    persona = load_persona("personas/anti_authority.yaml")
    vec = extract(lm, persona, parse_layers("0.45:0.55", lm.n_layers), max_prompts=8)
    prompts = persona.generation
    t = time.perf_counter()
    use_backend(lm, "vllm")
    start, engine = time.perf_counter() - t, lm.engine
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    print(f"bundled SmolLM2-135M, {dtype}, {a.tokens} tokens per completion, steered at C = 4")
    print(f"vllm engine start: {start:.1f} s")
    print("| batch | hf tok/s | vllm tok/s | vllm / hf | break-even completions |")
    print("|---|---|---|---|---|")
    for bs in (int(b) for b in a.batches.split(",")):
        chats = [messages_for(prompts[i % len(prompts)]) for i in range(bs)]
        best = {}
        for backend in ("hf", "vllm"):
            lm.engine = engine if backend == "vllm" else None
            seconds(lm, chats[:2], vec, 4.0, 4)  # warm-up: the first call pays one-off costs
            best[backend] = min(seconds(lm, chats, vec, 4.0, a.tokens) for _ in range(a.repeats))
        hf, vl = (bs * a.tokens / best[b] for b in ("hf", "vllm"))
        saved = (best["hf"] - best["vllm"]) / bs  # seconds saved per completion
        even = f"{start / saved:.0f}" if saved > 0 else "never"
        print(f"| {bs} | {hf:.1f} | {vl:.1f} | {vl / hf:.2f}x | {even} |")


if __name__ == "__main__":  # vLLM starts its engine in processes that import this file again
    main()
