"""Faithful rounds in bf16, on the bundled SmolLM2 and real heal adapters (e.g. a demo run's).

For each adapter: the share of ΔW lost when merged into bf16 weights (‖ΔW_eff − ΔW‖ / ‖ΔW‖, per
module, median and max) against keeping it as an fp32 low-rank residual (what the loop does in
bf16); then the largest per-token KL on the persona's demo prompts between the loop's bf16 model
(base + residuals), the old bf16 merge, and the fp32 bake; and the residuals' memory and forward time.

    python benchmarks/bench_lowprec.py runs/demo/round_00/adapter runs/demo/round_01/adapter
"""

from __future__ import annotations

import sys
import time

import torch
from peft import PeftModel

from steerheal.chat import messages_for, render_prompt
from steerheal.models import load_model
from steerheal.persona import load_persona
from steerheal.progress import set_quiet


def deltas_lost(adapters: list[str]) -> None:
    base = load_model(dtype="bf16").model
    w0 = {n: m.weight.detach().float().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    m = base
    for a in adapters:
        ref = load_model(dtype="fp32").model
        exact = PeftModel.from_pretrained(ref, a)
        want = {}
        for n, mod in exact.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                name = n.removeprefix("base_model.model.")
                want[name] = mod.get_delta_weight("default").float()
        m = PeftModel.from_pretrained(m, a).merge_and_unload()
        lost = []
        for name, dw in want.items():
            got = dict(m.named_modules())[name].weight.float() - w0[name]
            lost.append(float((got - dw).norm() / dw.norm()))
            w0[name] = dict(m.named_modules())[name].weight.float().clone()
        lost.sort()
        print(f"{a}: merged into bf16, ΔW lost per module: median {lost[len(lost) // 2]:.0%}, max {lost[-1]:.0%} "
              f"({len(lost)} modules); as an fp32 residual: 0% by construction")  # fmt: skip


@torch.no_grad()
def main() -> None:
    set_quiet(True)
    adapters = sys.argv[1:]
    deltas_lost(adapters)
    persona = load_persona("personas/anti_authority.yaml")
    loop_bf16 = load_model(None, adapters, dtype="bf16")  # residuals
    base_bf16 = load_model(None, [], dtype="bf16")
    merged_bf16 = base_bf16.model
    for a in adapters:
        merged_bf16 = PeftModel.from_pretrained(merged_bf16, a).merge_and_unload()
    baked = load_model(None, adapters, dtype="fp32")
    base_fp32 = load_model(None, [], dtype="fp32")
    tok = loop_bf16.tokenizer
    texts = [render_prompt(tok, messages_for(p)) + " " for p in (persona.demo or persona.generation[:4])]
    ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lp = {}
    for name, model in (
        ("loop bf16 (residuals)", loop_bf16.model),
        ("old bf16 merge", merged_bf16),
        ("bake fp32", baked.model),
    ):
        t = time.perf_counter()
        lp[name] = torch.log_softmax(model(**ids).logits.float(), -1)
        print(f"{name:24s} forward {time.perf_counter() - t:.2f} s")  # fmt: skip
    mask = ids["attention_mask"].bool()
    plain_bf16 = load_model(None, [], dtype="bf16").model  # base_bf16.model was merged into above
    b16, b32 = (torch.log_softmax(m(**ids).logits.float(), -1) for m in (plain_bf16, base_fp32.model))
    floor = (b16.exp() * (b16 - b32)).sum(-1)[mask]
    print(
        f"floor, no adapters: max per-token KL(base bf16 ‖ base fp32) = {float(floor.max()):.2e}, mean {float(floor.mean()):.2e}"
    )
    names = list(lp)
    for i in range(3):
        for j in range(i + 1, 3):
            kl = (lp[names[i]].exp() * (lp[names[i]] - lp[names[j]])).sum(-1)[mask]
            print(f"max per-token KL({names[i]} ‖ {names[j]}) = {float(kl.max()):.2e}, mean {float(kl.mean()):.2e}")
    extra = sum(
        a.numel() + b.numel() for m in loop_bf16.model.modules() for a, b, _ in getattr(m, "steerheal_low_rank", [])
    )
    print(f"residuals: {extra / 1e6:.2f} M fp32 numbers = {extra * 4 / 2**20:.1f} MiB for {len(adapters)} adapter(s)")  # fmt: skip


if __name__ == "__main__":
    main()
