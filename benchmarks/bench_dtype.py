"""Does the science move with the dtype? bf16 against fp32 on the bundled SmolLM2.

    python benchmarks/bench_dtype.py eval [--vignettes PATH] [--protocol zero-shot|kshot] [--adapter DIR ...] [--fp32-head]
    python benchmarks/bench_dtype.py heal RUN
    python benchmarks/bench_dtype.py runs BF16_RUN FP32_RUN

Each mode holds more of the inputs fixed than the next:
`eval`: one model (the base, or the base with adapters kept as the loop keeps them) evaluated in both
dtypes: each foundation's nats and the pmass with their 95% bootstrap intervals, and the paired
difference bf16 − fp32 on the same vignettes (its interval holding 0 means the dtype's effect is
below what the eval resolves); the wall time of each.
`heal RUN`: the heal of RUN's round 0 on its kept rows, with its config, in both dtypes from the base
model; then the `eval` comparison of the two healed models. Same data, same seed: the heal's numerics.
`runs`: two whole runs of the same command in the two dtypes (loop run directories, or a compare arm's
seed directories): every round's shift, selectivity and pmass ratio side by side, whether the bf16
point lies inside the fp32 interval, the answers of both reports, and each run's time in the round
steps (the baselines left out: compare shares them between arms). Sampled completions diverge at the
first token a rounding flips, so a run's rows differ as they would under another seed: set the
difference against two fp32 runs with different seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch
import yaml

from steerheal.config import FOUNDATIONS, EvalConfig, RunConfig, from_dict
from steerheal.evaluate import score_vignettes
from steerheal.heal import heal
from steerheal.models import LoadedModel, add_adapters, keep_base, load_model, merge_adapters
from steerheal.persona import load_persona
from steerheal.progress import set_quiet
from steerheal.records import read_records
from steerheal.results import collect
from steerheal.stats import EvalRows, compare, measurement_gap, report_cis
from steerheal.vignettes import load_vignettes

MEASURES = ("target_shift", "selectivity", "pmass_ratio")
PERSONA = "personas/anti_authority.yaml"  # its target and direction sign the measures


def ci_text(value: float, interval: list[float]) -> str:
    return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"


def eval_models(models: dict[str, LoadedModel], cfg: EvalConfig) -> dict[str, dict]:
    """Each dtype's eval of what should be one function, and their paired difference; the reports."""
    rows = load_vignettes(cfg.vignettes, cfg.condition, cfg.limit, 0)
    protocol = cfg.protocol
    reports, seconds = {}, {}
    for dt, lm in models.items():
        t0 = time.perf_counter()
        reports[dt] = score_vignettes(lm, rows, cfg)
        seconds[dt] = time.perf_counter() - t0
        report_cis(reports[dt])
    print(f"{len(rows)} vignettes, {protocol}; eval {seconds['fp32']:.1f} s fp32, {seconds['bf16']:.1f} s bf16 "
          f"({seconds['fp32'] / seconds['bf16']:.2f}x)")  # fmt: skip
    # the paired shift per foundation; the target only signs target_shift, which is not printed here
    d = compare(EvalRows.from_report(reports["fp32"]), [EvalRows.from_report(reports["bf16"])], FOUNDATIONS[0], 1)
    print(f"{'foundation':10s} {'fp32 nats':>26s} {'bf16 nats':>26s} {'bf16 − fp32 (paired)':>28s}")
    for f in FOUNDATIONS:
        a, b = reports["fp32"]["foundations"][f], reports["bf16"]["foundations"][f]
        if not a["n"]:
            continue
        print(f"{f:10s} {ci_text(a['nats'], a['nats_ci']):>26s} {ci_text(b['nats'], b['nats_ci']):>26s} "
              f"{ci_text(d['shift'][f], d['shift_ci'][f]):>28s}")  # fmt: skip
    a, b = reports["fp32"], reports["bf16"]
    print(f"{'pmass':10s} {ci_text(a['pmass'], a['pmass_ci']):>26s} {ci_text(b['pmass'], b['pmass_ci']):>26s} "
          f"ratio {ci_text(d['pmass_ratio'], d['pmass_ratio_ci']):>22s}")  # fmt: skip
    gap = sum(abs(x["pmass"] - y["pmass"]) for x, y in zip(a["rows"], b["rows"])) / len(rows)
    print(f"mean |Δ pmass| per vignette {gap:.4f}")
    return reports


def print_gaps(base: dict[str, dict], model: dict[str, dict], persona: str = PERSONA) -> None:
    """The measures the report reads (model against its own dtype's base): bf16's minus fp32's, paired."""
    p = load_persona(persona)
    rows = {dt: (EvalRows.from_report(base[dt]), EvalRows.from_report(model[dt])) for dt in ("bf16", "fp32")}
    print("against each dtype's own base:  bf16 − fp32 (paired over vignettes)")
    for k in MEASURES:
        g = measurement_gap(rows["bf16"], rows["fp32"], p.target, p.direction, k)
        fp = compare(*rows["fp32"][:1], [rows["fp32"][1]], p.target, p.direction)
        print(f"  {k:13s} fp32 {ci_text(fp[k], fp[f'{k}_ci'])}   gap {ci_text(g.difference, g.difference_ci)}")


def loop_model(dtype: str, adapters: list[str], fp32_head: bool = False) -> LoadedModel:
    """The bundled model with adapters kept as the loop keeps them (residuals over the base). fp32_head:
    the output layer untied and run in fp32 over the body's last hidden state (is the head the cause?)."""
    lm = load_model(device="cpu", dtype=dtype)
    keep_base(lm.model)
    lm.model = merge_adapters(lm.model, adapters)
    if fp32_head:
        old = lm.model.get_output_embeddings()
        head = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        head.weight = torch.nn.Parameter(old.weight.detach().float(), requires_grad=False)
        head.register_forward_pre_hook(lambda _m, a: (a[0].float(), *a[1:]))
        lm.model.set_output_embeddings(head)
    return lm


def heal_parity(run: Path) -> None:
    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = from_dict(RunConfig, saved["config"])
    rows = read_records(run / "round_00" / "kept.jsonl")
    base = eval_models({dt: loop_model(dt, []) for dt in ("fp32", "bf16")}, cfg.eval)
    models = {}
    for dt in ("fp32", "bf16"):
        lm = loop_model(dt, [])
        out = Path(tempfile.mkdtemp()) / "adapter"
        s = heal(lm, rows, cfg.heal, out)
        add_adapters(lm, [out])
        print(f"{dt}: heal {s['time_s']:.1f} s; train NLL {s['train_nll_start']:.4f} → {s['train_nll']:.4f}, "
              f"val NLL {s['val_nll_start']:.4f} → {s['val_nll']:.4f}, val D mean {s['val_D_mean']:.4f}, "
              f"barrier active {s['barrier_frac']:.0%} of {s['steps']} steps")  # fmt: skip
        models[dt] = lm
    print_gaps(base, eval_models(models, cfg.eval), saved["persona"])


def answers(run: Path) -> list[str]:
    text = (run / "report.md").read_text()
    return [line for line in text.splitlines() if line.startswith("- **") and "?**" in line]


def verdict_words(line: str) -> str:
    """The answer without its numbers: what must not move with the dtype."""
    return re.sub(r"\[[^\]]*\]|[-+−]?\d[\d.,/]*%?", "#", line.split("?**", 1)[1]).strip()


def round_seconds(run: Path) -> float:
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    return sum(v["time_s"] for k, v in steps.items() if k.startswith("round_"))


def run_parity(a: Path, b: Path) -> None:
    ca, cb = collect([a]), collect([b])
    print(f"A = {a}\nB = {b}\n")
    print(f"{'round':5s} {'model':8s} {'measure':13s} {'A':>26s} {'B':>26s}  A's point in B's CI")
    worst = ("", 0.0)
    for ra, rb in zip(ca["rounds"], cb["rounds"]):
        for model in ("steered", "healed"):
            ma, mb = ra.get(model), rb.get(model)
            if not ma or not mb:
                continue
            for k in MEASURES:
                lo, hi = mb[f"{k}_ci"]
                inside = lo <= ma[k] <= hi
                half = max(1e-9, (hi - lo) / 2)
                if abs(ma[k] - mb[k]) / half > worst[1]:
                    worst = (f"round {ra['round']} {model} {k}: {ma[k] - mb[k]:+.3f}", abs(ma[k] - mb[k]) / half)
                print(f"{ra['round']:<5d} {model:8s} {k:13s} {ci_text(ma[k], ma[f'{k}_ci']):>26s} "
                      f"{ci_text(mb[k], mb[f'{k}_ci']):>26s}  {'yes' if inside else 'NO'}")  # fmt: skip
        kept = (ra["kept_frac"][0], rb["kept_frac"][0])
        print(
            f"{ra['round']:<5d} dose C {ra['coeff'][0]:.3f} vs {rb['coeff'][0]:.3f}; kept {kept[0]:.0%} vs {kept[1]:.0%}"
        )
    print(f"\nlargest difference against B's half-interval: {worst[0]} ({worst[1]:.2f} of it)")
    print("\nanswers (numbers masked):")
    same = True
    for la, lb in zip(answers(a), answers(b)):
        wa, wb = verdict_words(la), verdict_words(lb)
        same &= wa == wb
        print(f"  A: {wa}\n  B: {wb}" if wa != wb else f"  same: {wa}")
    print("every answer the same" if same else "answers DIFFER")
    ta, tb = round_seconds(a), round_seconds(b)
    print(f"\nround steps: A {ta / 60:.1f} min, B {tb / 60:.1f} min, A/B = {ta / tb:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--vignettes", default=None)
    e.add_argument("--protocol", default=EvalConfig().protocol)
    e.add_argument("--adapter", action="append", default=[])
    e.add_argument("--fp32-head", action="store_true", help="bf16 body, fp32 output layer")
    h = sub.add_parser("heal")
    h.add_argument("run", type=Path)
    r = sub.add_parser("runs")
    r.add_argument("bf16_run", type=Path)
    r.add_argument("fp32_run", type=Path)
    args = ap.parse_args()
    set_quiet(True)
    if args.cmd == "eval":
        cfg = EvalConfig(vignettes=args.vignettes, protocol=args.protocol)
        base = eval_models({dt: loop_model(dt, [], args.fp32_head and dt == "bf16") for dt in ("fp32", "bf16")}, cfg)
        if args.adapter:
            models = {dt: loop_model(dt, args.adapter) for dt in ("fp32", "bf16")}
            print_gaps(base, eval_models(models, cfg))
    elif args.cmd == "heal":
        heal_parity(args.run)
    else:
        run_parity(args.bf16_run, args.fp32_run)


if __name__ == "__main__":
    main()
