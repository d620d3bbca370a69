"""The two dose rules side by side on the bundled SmolLM2, round 0 of the demo: time to choose,
the coefficient chosen, and what it does (the steered eval's shift, selectivity and pmass ratio
with 95% CIs, and the filter's keep rate on a fresh batch), plus the p95 KL each coefficient gives.

    python benchmarks/bench_dose.py [--vignettes PATH] [--kl-target 1.0] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from steerheal.config import resolve_config
from steerheal.dose import choose_dose, steered_kl_p95
from steerheal.evaluate import score_vignettes
from steerheal.filter import filter_records
from steerheal.generate import generate_records
from steerheal.models import load_model, parse_layers
from steerheal.persona import load_persona
from steerheal.progress import set_quiet
from steerheal.stats import EvalRows, compare
from steerheal.vector import extract
from steerheal.vignettes import load_vignettes


def _fmt(m: dict, k: str) -> str:
    return f"{m[k]:+.2f} [{m[k + '_ci'][0]:+.2f}, {m[k + '_ci'][1]:+.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vignettes", default=None)
    ap.add_argument("--kl-target", type=float, default=1.0)
    ap.add_argument("--seeds", default="0,1")
    a = ap.parse_args()
    set_quiet(True)
    torch.manual_seed(0)
    persona = load_persona("personas/anti_authority.yaml")
    cfg = resolve_config(None, {"eval": {"vignettes": a.vignettes}})
    lm = load_model()
    vec = extract(lm, persona, parse_layers(cfg.vector.layers, lm.n_layers), max_prompts=cfg.vector.max_prompts)
    vigs = load_vignettes(a.vignettes)
    base = score_vignettes(lm, vigs, cfg.eval)
    print(f"{len(vigs)} vignettes; base pmass {base['pmass']:.3f}")
    for seed in [int(s) for s in a.seeds.split(",")]:
        for method in ("keep", "kl"):
            c = dataclasses.replace(cfg, dose=dataclasses.replace(cfg.dose, method=method, kl_target=a.kl_target))
            t = time.perf_counter()
            dose = choose_dose(lm, persona, vec, c, seed + 500)
            secs = time.perf_counter() - t
            coeff = dose["coeff"]
            kl = steered_kl_p95(lm, persona.generation[: cfg.dose.probe_n], vec, coeff, cfg.dose.kl_tokens)
            recs = generate_records(
                lm, persona.name, persona.generation, cfg.generate, vector=vec, coeff=coeff, seed=seed
            )
            kept, _ = filter_records(lm, recs, cfg.filter, persona.narration)
            ev = score_vignettes(lm, vigs, cfg.eval, vector=vec, coeff=coeff)
            m = compare(EvalRows.from_report(base), [EvalRows.from_report(ev)], persona.target, persona.direction)
            print(
                f"seed {seed} {method:4s}: {secs:5.1f} s to choose, {len(dose['probes'])} probes, C {coeff:.3g}, "
                f"p95 KL {kl:.2f}, keeps {len(kept) / len(recs):.0%} of {len(recs)}; shift {_fmt(m, 'target_shift')}, "
                f"selectivity {_fmt(m, 'selectivity')}, pmass ratio {_fmt(m, 'pmass_ratio')}"
            )


if __name__ == "__main__":
    main()
