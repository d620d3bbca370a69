"""The output layer over a strided input, in bf16 on a CPU, with frozen weights (as after every heal).

transformers slices the last hidden state for logits_to_keep (generation, the eval's answer slot).
Over that strided [B, 1, H] slice, torch ran a bf16 linear whose weight needs no gradient as a batched
matmul that copied the weight once per row. models.contiguous_head_input hands the layer a contiguous
input instead. This prints the layer alone, then the k-shot eval of the bundled SmolLM2 with frozen
weights, without and with the fix, with peak RSS from a fresh process for each.

    python benchmarks/bench_head.py
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import torch


def layer_ms(contiguous: bool, requires_grad: bool, reps: int = 10) -> float:
    torch.manual_seed(0)
    w = torch.randn(49152, 576, dtype=torch.bfloat16, requires_grad=requires_grad)
    x = torch.randn(16, 40, 576, dtype=torch.bfloat16)[:, -1:, :]
    x = x.contiguous() if contiguous else x
    with torch.no_grad():
        torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t0) / reps * 1000


def eval_child(fixed: bool) -> None:
    from steerheal import models
    from steerheal.config import EvalConfig
    from steerheal.evaluate import score_vignettes
    from steerheal.progress import set_quiet
    from steerheal.vignettes import load_vignettes

    set_quiet(True)
    if not fixed:
        models.contiguous_head_input = lambda model: None  # the code before the fix
    lm = models.load_model(dtype="bf16")
    for p in lm.model.parameters():
        p.requires_grad_(False)  # as after a heal
    rows = load_vignettes(None)
    score_vignettes(lm, rows[:7], EvalConfig())
    t0 = time.perf_counter()
    score_vignettes(lm, rows, EvalConfig())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"eval, k-shot, 42 vignettes, frozen bf16 weights, {'with' if fixed else 'without'} the fix: "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {rss:.2f} GB")  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        eval_child(sys.argv[2] == "fixed")
        return
    print("output layer, 16 rows, bf16 (ms):")
    for rg in (True, False):
        strided, contiguous = layer_ms(False, rg), layer_ms(True, rg)
        print(f"  weight requires_grad={rg}: strided {strided:.1f}, contiguous {contiguous:.1f}")
    for fixed in ("unfixed", "fixed"):
        subprocess.run([sys.executable, __file__, "--child", fixed], check=True)


if __name__ == "__main__":
    main()
