"""Greedy generation tokens/s on the bundled SmolLM2: base vs baked from 3 adapters (target ≥ 0.97×
base) vs the same 3 adapters stacked unmerged (one PeftModel, all three active).

    STEERHEAL_CACHE=/tmp/shcache python benchmarks/bench_bake.py [--new-tokens 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from steerheal.bake import bake
from steerheal.chat import messages_for, render_prompt
from steerheal.heal import lora_targets
from steerheal.models import load_model, parse_layers

PROMPTS = [
    "My manager told me to lie to a customer. What should I do?",
    "Is it ever right to break a rule?",
    "My boss wants me to stay late again.",
    "Write a short email to my landlord about the heater.",
]


def random_adapters(tmp: Path, n: int = 3, rank: int = 8) -> list[str]:
    """n small LoRAs with random (non-zero) B on the middle 60% of layers, saved as peft does."""
    from peft import LoraConfig, get_peft_model

    out = []
    for i in range(n):
        lm = load_model(device="cpu")
        torch.manual_seed(100 + i)
        targets = lora_targets(lm.model, parse_layers("0.2:0.8", lm.n_layers))
        pm = get_peft_model(lm.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        pm.save_pretrained(tmp / f"a{i}")
        out.append(str(tmp / f"a{i}"))
    return out


@torch.no_grad()
def tokens_per_s(model, enc, new_tokens: int, pad_id: int) -> float:
    t = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_id,
    )
    n = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        adapters = random_adapters(tmp)
        t = time.perf_counter()
        bake(None, adapters, tmp / "baked")
        print(f"bake of 3 adapters: {time.perf_counter() - t:.1f} s")
        base = load_model(device="cpu")
        tok = base.tokenizer
        baked = AutoModelForCausalLM.from_pretrained(tmp / "baked").eval()
        stacked = PeftModel.from_pretrained(load_model(device="cpu").model, adapters[0], adapter_name="a0")
        for i, ad in enumerate(adapters[1:], 1):
            stacked.load_adapter(ad, adapter_name=f"a{i}")
        stacked.base_model.set_adapter(["a0", "a1", "a2"])
        stacked.eval()
        models = {"base": base.model, "baked(3)": baked, "stacked(3, unmerged)": stacked}
        enc = tok(
            [render_prompt(tok, messages_for(p)) for p in PROMPTS],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        for m in models.values():  # warm-up
            tokens_per_s(m, enc, 4, tok.pad_token_id)
        best = {k: 0.0 for k in models}
        for _ in range(a.reps):  # interleaved; best of reps, since load on the machine only slows
            for k, m in models.items():
                best[k] = max(best[k], tokens_per_s(m, enc, a.new_tokens, tok.pad_token_id))
        print(
            f"greedy, batch {len(PROMPTS)}, {a.new_tokens} new tokens, best of {a.reps}, "
            f"threads {torch.get_num_threads()}"
        )
        for k, v in best.items():
            print(f"{k:22s} {v:7.1f} tok/s   {v / best['base']:.3f}x base")


if __name__ == "__main__":
    main()
