"""The markdown reports, formatting only: report.md (a run, or its seeds pooled: the per-round table,
Q0-Q3 and "beats prompting?") and compare.md (the arms, their decisions and the null). The numbers come
from results.collect and compare.summarize; the answers are read off the intervals, never written by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .config import COHERENCE_HELD, NULL_ALPHA, REFERENCE
from .records import read_records, write_text
from .results import collect
from .rundir import BASELINES, round_key
from .stats import Difference, beats, intervals, seed_ci_text, verdict

# ---------------------------------------------------------------- formatting


def _f(x: float | None, nd: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def ci_text(m: dict | None, name: str, nd: int = 2, sign: bool = True, seeds: bool = False) -> str:
    """'value [lo, hi]' for measure `name` of a compare() result; seeds: add the t-interval over seeds
    when there is one (every interval an answer reads is shown)."""
    if not m:
        return "–"
    lo, hi = m[f"{name}_ci"]
    over = ""
    if seeds and f"{name}_seed_ci" in m:
        slo, shi = m[f"{name}_seed_ci"]
        over = f"; over seeds {_f(slo, nd, sign)} to {_f(shi, nd, sign)}"
    return f"{_f(m[name], nd, sign)} [{_f(lo, nd, sign)}, {_f(hi, nd, sign)}{over}]"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _gen_cell(gens: list[dict | None], key: str, nd: int = 2) -> str:
    vals = [g[key] for g in gens if g]
    return _f(_mean(vals), nd) if vals else "–"


def write_report(
    root: str | Path, stop_reason: str, run_dirs: list[Path] | None = None, peak_rss_gb: float | None = None
) -> Path:
    root = Path(root)
    c = collect(run_dirs or [root])
    L = _header(c, stop_reason, peak_rss_gb) + _baseline_lines(c) + _round_lines(c)
    L += ["", "![trajectory](trajectory.png)", "", "![profile](profile.png)", "", "## Answers", ""]
    L += answers(c)
    if len(c["seeds"]) == 1:  # the seed's own directory: a pooled one (seeds: [0]) has no rows of its own
        own = (run_dirs or [root])[0]
        L += _filter_section(own, c) + _demo_section(own, c)
    L += ["", "## Settings", "", "```yaml", yaml.safe_dump(c["config"], sort_keys=False).strip(), "```", ""]
    out = root / "report.md"
    write_text(out, "\n".join(L) + "\n")
    return out


def _header(c: dict[str, Any], stop_reason: str, peak_rss_gb: float | None) -> list[str]:
    t, base, cfg = c["target"], c["base"], c["config"]
    arrow = "down" if c["direction"] < 0 else "up"
    L = [f"# steerheal run: {c['persona']}", ""]
    L += [
        f"Model `{cfg.get('model') or 'bundled SmolLM2-135M-Instruct'}`; target foundation **{t}** (the persona should "
        f"move its nats {arrow}); vignettes: {base['settings']['source']} ({base['n']} rows, condition "
        f"{base['settings']['condition']}, think {base['settings']['think_tokens']}); seeds "
        f"{', '.join(map(str, c['seeds']))}. Stopped: {stop_reason}.",
        "",
    ]
    if peak_rss_gb:
        L += [f"Peak RSS of the last process: {peak_rss_gb:.2f} GB.", ""]
    return L + [
        "Every interval is a 95% paired bootstrap over vignettes (stratified by foundation) and, with several "
        "seeds, over seeds too; with several seeds a verdict also needs the t-interval over the seeds' own values to "
        "agree (three seeds resampled cannot show how far a fourth would land). **shift** = the persona-signed change "
        "of the target's nats against base (positive = the persona's way). **selectivity** = s − |s|·(1 − g), with "
        "s = shift − 0.1 × mean |Δ| of the other six foundations and g = min(1, pmass / base pmass)²: lower "
        "coherence never raises it. **pmass ratio** = coherence on the forced choice relative to base. "
        "**gen ppl / pass / distinct-2 / KL** = generation coherence on neutral prompts: perplexity under the base "
        "model, the filter's pass rate, distinct word bigrams, mean per-token KL(model ‖ base).",
        "",
    ]


def _baseline_lines(c: dict[str, Any]) -> list[str]:
    t, base, p = c["target"], c["base"], c["prompt"]
    nats_ci = ", ".join(_f(x) for x in base["foundations"][t].get("nats_ci", [math.nan] * 2))
    return [
        "## Baselines",
        "",
        f"base: {t} nats {_f(base['foundations'][t]['nats'])} [{nats_ci}], "
        f"pmass {_f(base['pmass'])} [{', '.join(_f(x) for x in base.get('pmass_ci', [math.nan] * 2))}], "
        f"top-1 {_f(base['accuracy'], 2)} [{', '.join(_f(x, 2) for x in base.get('accuracy_ci', [math.nan] * 2))}].",
        "",
        "| model | shift | selectivity | pmass ratio | gen ppl | gen pass | distinct-2 | KL to base |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | – | – | 1.00 | {_gen_cell(c['gen_base'], 'ppl', 1)} | {_gen_cell(c['gen_base'], 'pass_rate')} | "
        f"{_gen_cell(c['gen_base'], 'distinct2')} | {_gen_cell(c['gen_base'], 'kl_to_base', 3)} |",
        f"| prompting (persona as system prompt) | {ci_text(p, 'target_shift')} | {ci_text(p, 'selectivity')} | "
        f"{ci_text(p, 'pmass_ratio', sign=False)} | {_gen_cell(c['gen_prompt'], 'ppl', 1)} | "
        f"{_gen_cell(c['gen_prompt'], 'pass_rate')} | {_gen_cell(c['gen_prompt'], 'distinct2')} | "
        f"{_gen_cell(c['gen_prompt'], 'kl_to_base', 3)} |",
    ]


def _round_lines(c: dict[str, Any]) -> list[str]:
    L = [
        "",
        "## Rounds",
        "",
        "| round | model | dose | kept | shift | selectivity | pmass ratio | gen ppl | gen pass | distinct-2 | KL to base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c["rounds"]:
        kept = f"{_mean(r['kept_frac']):.0%}"
        for kind in ("steered", "healed"):
            m, g = r[kind], r[f"gen_{kind}"]
            if m is None:
                continue
            L.append(
                f"| {r['round']} | {kind} | {_f(_mean(r['coeff']), 2, False)} | {kept} | {ci_text(m, 'target_shift')} | "
                f"{ci_text(m, 'selectivity')} | {ci_text(m, 'pmass_ratio', sign=False)} | {_gen_cell(g, 'ppl', 1)} | "
                f"{_gen_cell(g, 'pass_rate')} | {_gen_cell(g, 'distinct2')} | {_gen_cell(g, 'kl_to_base', 3)} |"
            )
    return L


def answers(c: dict[str, Any]) -> list[str]:
    """Q0-Q3 and 'beats prompting?', each read off its interval."""
    rounds = c["rounds"]
    if not rounds:
        return ["- No round finished."]
    t = c["target"]
    r0 = rounds[0]["filter"][0]
    kept = ", ".join(f"{_mean(r['kept_frac']):.0%}" for r in rounds)
    why = ", ".join(f"{k} {v}" for k, v in r0["reasons"].items()) or "none"
    q0 = (
        f"**Q0 can we filter?** kept {kept} per round at the chosen dose; round 0 dropped "
        f"{r0['rows'] - r0['kept']} rows ({why}), median perplexity dropped "
        f"{_f(r0['median_ppl_dropped'], 1)} vs kept {_f(r0['median_ppl_kept'], 1)}."
    )
    healed = [r for r in rounds if r["healed"]]
    if not healed:
        return [f"- {q0}", "- No round was healed."]
    q1 = _q1(healed)
    last = healed[-1]["healed"]
    # "Held" = at or above COHERENCE_HELD, read like every verdict: the seeds' interval must agree.
    held = verdict(*([lo - COHERENCE_HELD, hi - COHERENCE_HELD] for lo, hi in intervals(last, "pmass_ratio")))
    q2 = (
        f"**Q2 coherent over the loop?** {held}: healed pmass ratio per round "
        f"{', '.join(ci_text(r['healed'], 'pmass_ratio', sign=False, seeds=True) for r in healed)} (held = intervals above {COHERENCE_HELD})."
    )
    steps = [r["step_vs_prev"] for r in healed if "step_vs_prev" in r]
    moved = verdict(*intervals(healed[0]["healed"], "target_shift"))
    step_txt = (
        ", ".join(
            f"{_f(s.difference, 2, True)} [{_f(s.difference_ci[0], 2, True)}, {_f(s.difference_ci[1], 2, True)}]"
            f"{seed_ci_text(s)} ({s.verdict})"
            for s in steps
        )
        or "only one round"
    )
    q3 = (
        f"**Q3 one direction?** round 0 moved {t} the persona's way: {moved} ({ci_text(healed[0]['healed'], 'target_shift', seeds=True)}); "
        f"each later round's extra shift: {step_txt}; cos(v_r, v_0) "
        f"{', '.join(_f(_mean(r['cos_v0']), 2) for r in rounds)}."
    )
    d = healed[-1]["heal_vs_prompt"]
    lo, hi = d.difference_ci
    q4 = (
        f"**Beats prompting?** {beats(str(d.verdict), verdict(*intervals(last, 'selectivity')))} "
        "(yes needs both the difference and "
        "the healed model's own selectivity above 0): selectivity of the last healed round minus the prompting baseline's = "
        f"{_f(d.difference, 2, True)} [{_f(lo, 2, True)}, {_f(hi, 2, True)}]{seed_ci_text(d)} (the coherence gate inside selectivity "
        f"compares them at matched coherence). Healed: {ci_text(last, 'selectivity', seeds=True)}; prompting: {ci_text(c['prompt'], 'selectivity')}."
    )
    return [f"- {q}" for q in (q0, q1, q2, q3, q4)]


def _q1(healed: list[dict[str, Any]]) -> str:
    """Q1 over the healed rounds that also have a raw-steered eval: did healing raise coherence?"""
    paired = [r for r in healed if "heal_vs_steer_pmass" in r]
    parts = [
        f"r{r['round']}: pmass ratio steered {ci_text(r['steered'], 'pmass_ratio', sign=False)} → healed "
        f"{ci_text(r['healed'], 'pmass_ratio', sign=False)}, difference {r['heal_vs_steer_pmass'].verdict}; "
        f"shift steered {ci_text(r['steered'], 'target_shift')} vs healed {ci_text(r['healed'], 'target_shift')}"
        for r in paired
    ]
    yes = sum(r["heal_vs_steer_pmass"].verdict == "yes" for r in paired)
    return (
        f"**Q1 can we heal?** healing raised coherence over raw steering (intervals above 0) in {yes}/{len(paired)} "
        "rounds. " + "; ".join(parts) + "."
    )


def _filter_section(root: Path, c: dict[str, Any]) -> list[str]:
    L = ["", "## Filter: what was dropped", ""]
    for r in c["rounds"]:
        fs = r["filter"][0]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(fs["reasons"].items(), key=lambda kv: -kv[1])) or "none"
        L.append(
            f"- round {r['round']}: kept {fs['kept']}/{fs['rows']}; dropped for {reasons}; median perplexity "
            f"kept {_f(fs['median_ppl_kept'], 1)} vs dropped {_f(fs['median_ppl_dropped'], 1)}; "
            f"median repetition kept {_f(fs['median_rep_kept'], 2)} vs dropped {_f(fs['median_rep_dropped'], 2)}"
        )
        rej = root / round_key(r["round"]) / "rejected.jsonl"
        for x in read_records(rej)[:2] if rej.is_file() else []:
            L.append(f"  - dropped ({', '.join(x.drop_reasons)}): “{x.completion[:160].replace(chr(10), ' ')}”")
    return L


def _demo_section(root: Path, c: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, list]] = []
    b = read_records(root / BASELINES / "demo.jsonl")
    rows += [
        ("base", [x for x in b if x.id.startswith("base")]),
        ("prompting", [x for x in b if x.id.startswith("prompt")]),
    ]
    for r in c["rounds"]:
        for kind in ("steered", "healed"):
            p = root / round_key(r["round"]) / f"demo_{kind}.jsonl"
            if p.is_file():
                rows.append((f"r{r['round']} {kind}", read_records(p)))
    out = [
        "",
        "## Demo generations (greedy, the same prompts every round)",
        "",
        "| model | prompt | completion |",
        "|---|---|---|",
    ]
    for label, recs in rows:
        for x in recs:
            text = x.completion.replace("\n", " ").replace("|", "\\|")
            user = x.messages[-1]["content"].replace("|", "\\|")
            out.append(f"| {label} | {user[:70]} | {text[:220]} |")
    return out


# ---------------------------------------------------------------- compare.md


def _null_word(p: dict[str, Any]) -> str:
    k, floor = p["k"], 1 / (p["k"] + 1)
    if p["above"]:
        return f"persona-specific (rank p {p['p_above']:.3f} of K = {k})"
    if p["below"]:
        return f"further the wrong way than random directions (rank p {p['p_below']:.3f} of K = {k})"
    reach = "" if floor <= NULL_ALPHA else f"; with K = {k} no p can reach {NULL_ALPHA} (the smallest is {floor:.2f})"
    return f"not distinguishable from a random direction (rank p {p['p_above']:.2f} of K = {k}{reach})"


def _seed_ci(m: dict, k: str) -> str:
    """The t-interval over seeds (the bootstrap's seed resampling is narrow with 3 seeds); '–' for one seed."""
    if f"{k}_seed_ci" not in m:
        return "–"
    lo, hi = m[f"{k}_seed_ci"]
    return f"[{lo:+.2f}, {hi:+.2f}]"


def _gen_mean(gens: list[dict], key: str) -> str:
    return f"{sum(x[key] for x in gens) / len(gens):.2f}" if gens else "–"


def _seed_text(numbers: dict[str, dict]) -> str:
    """The header's seeds: one list when every arm finished every round on the same seeds, else per arm,
    with how many seeds reached the last round (each row pools the seeds that reached it)."""
    seeds = {arm: ", ".join(map(str, c["seeds"])) for arm, c in numbers.items()}
    behind = {
        arm: c["rounds"][-1]
        for arm, c in numbers.items()
        if c["rounds"] and c["rounds"][-1]["n_seeds"] < len(c["seeds"])
    }
    if len(set(seeds.values())) == 1 and not behind:
        return f"seeds {seeds[next(iter(seeds))]}"
    parts = [
        f"{a} {s}" + (f" (round {behind[a]['round']}: {behind[a]['n_seeds']} of them)" if a in behind else "")
        for a, s in seeds.items()
    ]
    return "seeds per arm (unfinished runs pooled as far as they got): " + "; ".join(parts)


def render(summary: dict[str, Any], numbers: dict[str, dict]) -> str:
    first = next(iter(numbers.values()))
    t = first["target"]
    seed_text = _seed_text(numbers)
    L = [
        "# steerheal compare",
        "",
        f"Persona `{first['persona']}`, target **{t}**; {seed_text}; vignettes {first['base']['settings']['source']} "
        f"({first['base']['n']} rows). Intervals: 95% paired bootstrap over vignettes and seeds; a verdict also "
        "needs the t-interval over the seeds' own values to agree, and the arms set against the reference are "
        "read once more with Holm's correction over them.",
        "",
        "| arm | round | model | shift | selectivity | selectivity, t over seeds | pmass ratio | gen ppl | distinct-2 "
        "| KL to base | rows kept | min/round | k token passes/round (trained) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, c in numbers.items():
        for r in c["rounds"]:
            mins = sum(x["total"] for x in r["time_s"]) / max(1, len(r["time_s"])) / 60
            tok = r.get("tokens") or []
            passes = (
                f"{sum(t['forward'] for t in tok) / len(tok) / 1e3:.0f} ({sum(t['trained'] for t in tok) / len(tok) / 1e3:.0f})"
                if tok
                else "–"
            )
            # The rows the filter kept of those sampled this round (mean over seeds; the raw row's too).
            kept = f"{sum(r['kept_frac']) / len(r['kept_frac']):.0%}" if r.get("kept_frac") else "–"
            for kind in ("steered", "healed"):
                m, g = r[kind], [x for x in r[f"gen_{kind}"] if x]
                if m is None:
                    continue
                L.append(
                    f"| {arm} | {r['round']} | {'raw' if kind == 'steered' else 'healed'} | {ci_text(m, 'target_shift')} | "
                    f"{ci_text(m, 'selectivity')} | {_seed_ci(m, 'selectivity')} | {ci_text(m, 'pmass_ratio', sign=False)} | {_gen_mean(g, 'ppl')} | {_gen_mean(g, 'distinct2')} | "
                    f"{_gen_mean(g, 'kl_to_base')} | {kept} | {mins:.1f} | {passes} |"
                )
    L += ["", "![compare](compare.png)", ""]
    L += per_seed_lines(numbers)
    L += ["", f"## Verdict (computed from the intervals), {summary['protocol']} protocol", ""]
    L += verdict_lines(summary, t)
    for p, other in summary.get("protocols", {}).items():
        L += ["", f"## Verdict under the {p} protocol (the same trained models, scored again)", ""]
        L += verdict_lines(other, t)
    return "\n".join(L) + "\n"


def per_seed_lines(numbers: dict[str, dict]) -> list[str]:
    """Each seed's own point at its arm's last healed round: the values the t-interval over seeds is
    made of, so a reader sees whether one seed carries an arm. A seed that stopped earlier is named."""
    L = [
        "## Per seed, last healed round",
        "",
        "| arm | round | seed | shift | selectivity | pmass ratio | rows kept |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for arm, c in numbers.items():
        healed = [r for r in c["rounds"] if r["healed"]]
        if not healed:
            continue
        r, m = healed[-1], healed[-1]["healed"]
        rows = [(s, k) for s, h, k in zip(r["seed_ids"], r["seed_healed"], r["kept_frac"]) if h]
        for i, (s, kept) in enumerate(rows):
            L.append(
                f"| {arm} | {r['round']} | {s} | {m['target_shift_per_seed'][i]:+.2f} | "
                f"{m['selectivity_per_seed'][i]:+.2f} | {m['pmass_ratio_per_seed'][i]:.2f} | {kept:.0%} |"
            )
        healed_in = lambda x: {s for s, h in zip(x["seed_ids"], x["seed_healed"]) if h}  # noqa: E731
        for s in sorted(set(c["seeds"]) - {s for s, _ in rows}):
            last = [x["round"] for x in healed if s in healed_in(x)]
            notes.append(
                f"- {arm} seed {s}: "
                + (f"healed up to round {last[-1]} (stopped, or still running)" if last else "no healed round")
            )
    return L + ([""] + notes if notes else [])


def verdict_lines(summary: dict[str, Any], target: str) -> list[str]:
    out, ref = [], summary.get("reference", REFERENCE)
    null = summary.get("null")
    if null:
        shifts = [d["target_shift"] for d in null["draws"]]
        out.append(
            f"- Random null: {null['k']} norm-matched random directions at C = {null['coeff']:.3g} moved {target} "
            f"by {min(shifts):+.2f} to {max(shifts):+.2f} (persona-signed; mean {sum(shifts) / len(shifts):+.2f})."
        )
    for arm, e in summary["arms"].items():
        parts = [f"**{arm}**"]
        if e.last is not None and e.vs_prompting is not None:
            parts.append(
                f"last healed round: shift {ci_text(e.last, 'target_shift')}, selectivity {ci_text(e.last, 'selectivity')}"
            )
            vp = e.vs_prompting
            parts.append(
                f"beats prompting: {beats(str(vp.verdict), verdict(*intervals(e.last, 'selectivity')))} "
                f"(selectivity difference {vp.difference:+.2f} "
                f"[{vp.difference_ci[0]:+.2f}, {vp.difference_ci[1]:+.2f}]{seed_ci_text(vp)})"
            )
        for p, name in (
            (e.null_raw, "raw round 0 among the random directions"),
            (e.null_healed, "healed among the random arm's healed seeds"),
        ):
            if p is not None:
                where = f" (round {p['round']})" if "round" in p else ""
                z = f", z {p['z']:+.2f}" if math.isfinite(p["z"]) else ""  # no z from one draw
                parts.append(f"{name}{where}: percentile {p['percentile']:.0f}{z}, {_null_word(p)}")
        ad = e.reference_minus_arm
        if ad:
            d = ad.selectivity
            parts.append(
                f"{ref} minus {arm} (selectivity, round {ad.round}): {d.difference:+.2f} [{d.difference_ci[0]:+.2f}, "
                f"{d.difference_ci[1]:+.2f}]{seed_ci_text(d)}, {ref} better: {d.verdict}"
                + (
                    f" (Holm over the {d.holm_m} arms set against {ref}: p {d.seed_p_holm:.3f}, {d.verdict_holm})"
                    if d.seed_p_holm is not None
                    else ""
                )
                + (" (one seed on a side: the interval holds no seed-to-seed variance)" if min(ad.seeds) < 2 else "")
            )
            if d.decision_holm is not None:
                parts.append(decision_text(d, ref, arm))
            sh, pm = ad.arm_minus_reference["target_shift"], ad.arm_minus_reference["pmass_ratio"]
            parts.append(
                f"{arm} minus {ref}: shift {sh.difference:+.2f} [{sh.difference_ci[0]:+.2f}, "
                f"{sh.difference_ci[1]:+.2f}]{seed_ci_text(sh)}, pmass ratio {pm.difference:+.2f} "
                f"[{pm.difference_ci[0]:+.2f}, {pm.difference_ci[1]:+.2f}]{seed_ci_text(pm)}; "
                f"against {ref} (shift, coherence): {ad.front}"
            )
        out.append("- " + "; ".join(parts) + ".")
    return out


def decision_text(d: Difference, ref: str, arm: str) -> str:
    """The decision on selectivity after Holm, in words, and for an undecided one what the plan expects."""
    word, delta = d.decision_holm, d.delta
    assert word is not None and delta is not None, "read after compare.holm_family with a margin"
    said = {
        "better": f"{ref} better than {arm}",
        "worse": f"{ref} worse than {arm}",
        "equivalent": f"{ref} and {arm} equivalent within ±{delta:g} (TOST, Holm p {d.tost_p_holm:.3f})",
        "undecided": "undecided",
    }[word]
    plan = d.plan
    if word == "undecided" and plan:
        said += (
            f": the plan expects {plan['seeds_to_detect']} seeds per arm to detect ±{delta:g}, or "
            f"{plan['seeds_for_equivalence']} to show equivalence within it (now {plan['seeds']}; SD of the "
            f"{'paired differences' if plan['paired'] else 'seeds'} {plan['sd']:.3f}, read at its "
            f"{plan['sd_confidence']:.0%} upper bound {plan['sd_upper']:.3f})"
        )
    return f"**decision: {said}**"
