"""report.md: the per-round table and Q0-Q3 and "beats prompting?", every figure with a 95% CI.

`collect` reads one run directory, or several (one per seed), and computes every number the
report and the plot show, with paired bootstrap intervals from stats.py; `write_report` only
formats them. The answers are read off the intervals (yes / no / unclear), never written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .records import read_records, write_text
from .rundir import protocol_path
from .stats import EvalRows, beats, compare, difference, intervals, seed_ci_text, verdict

# A coherence ratio (healed pmass / base pmass) at or above this counts as "coherence held".
COHERENCE_HELD = 0.9


def _json(p: Path) -> Any:
    return json.loads(p.read_text())


def _rows(p: Path) -> EvalRows:
    return EvalRows.from_report(_json(p))


def collect(run_dirs: list[Path], protocol: str | None = None) -> dict[str, Any]:
    """Every number of the report, pooled over the run directories (seeds) that share base and vignettes;
    `protocol`: the evals as scored under another protocol of eval.also (None: the run's own)."""
    at = lambda p: protocol_path(p, protocol)  # noqa: E731
    first = run_dirs[0]
    rounds_by_seed = [
        [_json(d / "round.json") for d in sorted(r.glob("round_*")) if (d / "round.json").is_file()] for r in run_dirs
    ]
    conf = yaml.safe_load((first / "config.yaml").read_text())
    base_rep = _json(at(first / "baselines" / "base.json"))
    base = EvalRows.from_report(base_rep)
    target, direction = conf["target"], int(conf["direction"])
    prompts = [_rows(at(r / "baselines" / "prompt.json")) for r in run_dirs]
    out: dict[str, Any] = {
        "persona": conf["persona"],
        "protocol": protocol or conf["config"].get("eval", {}).get("protocol"),
        "alt_protocol": protocol,  # the files read: None for the run's own
        "config": conf["config"],
        "target": target,
        "direction": direction,
        "seeds": [seed_of(r) for r in run_dirs],
        "base": base_rep,
        "prompt": compare(base, prompts, target, direction),
        "rounds": [],
    }
    n_rounds = max((len(x) for x in rounds_by_seed), default=0)
    prev_healed: list[EvalRows] | None = None
    for r in range(n_rounds):
        infos = [x[r] for x in rounds_by_seed if len(x) > r]
        dirs = [d / f"round_{r:02d}" for d, x in zip(run_dirs, rounds_by_seed) if len(x) > r]
        # steered_measures=first: no raw-steered eval after round 0
        steered = [_rows(at(d / "eval_steered.json")) for d in dirs if at(d / "eval_steered.json").is_file()]
        healed = [_rows(at(d / "eval_healed.json")) for d, i in zip(dirs, infos) if i["healed"]]
        seed_ids = [s for s, x in zip(out["seeds"], rounds_by_seed) if len(x) > r]
        row: dict[str, Any] = {
            "round": r,
            "n_seeds": len(infos),
            "seed_ids": seed_ids,  # aligned with coeff, kept_frac, ...
            "seed_healed": [bool(i["healed"]) for i in infos],  # the True ones, in order, are healed's per-seed values
            "coeff": [i["coeff"] for i in infos],
            "kept_frac": [i["filter"]["kept_frac"] for i in infos],
            "filter": [i["filter"] for i in infos],
            "cos_v0": [i["cos_v0"] for i in infos],
            "heal": [i["heal"] for i in infos if i["heal"]],
            "time_s": [i["time_s"] for i in infos],
            "tokens": [i["tokens"] for i in infos if "tokens" in i],  # rounds run before token counting have none
            "stop": [i.get("stop") for i in infos],
            "steered": compare(base, steered, target, direction) if steered else None,
            "healed": compare(base, healed, target, direction) if healed else None,
            "gen_steered": [i.get("gen_steered") for i in infos],
            "gen_healed": [i.get("gen_healed") for i in infos],
        }
        if healed:
            # Q1: does healing restore coherence compared with raw steering (paired, same vignettes)?
            if len(steered) == len(healed):
                row["heal_vs_steer_pmass"] = difference(
                    base, healed, steered, target, direction, "pmass_ratio", paired=True
                )
            row["heal_vs_prompt"] = difference(base, healed, prompts, target, direction, "selectivity")
            # Q3: did this round move the target further than the last one? Equal lengths mean the same
            # seeds in the same order: a seed that is not healed stops its loop, so the list only shrinks.
            if prev_healed:
                row["step_vs_prev"] = difference(
                    base, healed, prev_healed, target, direction, "target_shift", paired=len(healed) == len(prev_healed)
                )
            prev_healed = healed
        out["rounds"].append(row)
    out["gen_base"] = [_gen(r, "base") for r in run_dirs]
    out["gen_prompt"] = [_gen(r, "prompt") for r in run_dirs]
    return out


def seed_of(run_dir: Path) -> int:
    """The seed a run directory ran with (its config.yaml)."""
    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["config"]["seed"])


def _gen(run_dir: Path, name: str) -> dict | None:
    p = run_dir / "baselines" / f"gen_{name}.json"
    g = _json(p) if p.is_file() else None
    return None if not g or g.get("skipped") else g


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
    t, base = c["target"], c["base"]
    arrow = "down" if c["direction"] < 0 else "up"
    cfg = c["config"]
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
    L += [
        "Every interval is a 95% paired bootstrap over vignettes (stratified by foundation) and, with several "
        "seeds, over seeds too; with several seeds a verdict also needs the t-interval over the seeds' own values to "
        "agree (three seeds resampled cannot show how far a fourth would land). **shift** = the persona-signed change of the target's nats against base (positive = "
        "the persona's way). **selectivity** = (shift − 0.1 × mean |Δ| of the other six foundations) × "
        "min(1, pmass / base pmass)². **pmass ratio** = coherence on the forced choice relative to base. "
        "**gen ppl / pass / distinct-2 / KL** = generation coherence on neutral prompts: perplexity under the base "
        "model, the filter's pass rate, distinct word bigrams, mean per-token KL(model ‖ base).",
        "",
    ]
    L += [
        "## Baselines",
        "",
        f"base: {t} nats {_f(base['foundations'][t]['nats'])} [{', '.join(_f(x) for x in base['foundations'][t].get('nats_ci', [math.nan] * 2))}], "
        f"pmass {_f(base['pmass'])} [{', '.join(_f(x) for x in base.get('pmass_ci', [math.nan] * 2))}], "
        f"top-1 {_f(base['accuracy'], 2)} [{', '.join(_f(x, 2) for x in base.get('accuracy_ci', [math.nan] * 2))}].",
        "",
    ]
    L += [
        "| model | shift | selectivity | pmass ratio | gen ppl | gen pass | distinct-2 | KL to base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    L.append(
        f"| base | – | – | 1.00 | {_gen_cell(c['gen_base'], 'ppl', 1)} | {_gen_cell(c['gen_base'], 'pass_rate')} | "
        f"{_gen_cell(c['gen_base'], 'distinct2')} | {_gen_cell(c['gen_base'], 'kl_to_base', 3)} |"
    )
    p = c["prompt"]
    L.append(
        f"| prompting (persona as system prompt) | {ci_text(p, 'target_shift')} | {ci_text(p, 'selectivity')} | "
        f"{ci_text(p, 'pmass_ratio', sign=False)} | {_gen_cell(c['gen_prompt'], 'ppl', 1)} | "
        f"{_gen_cell(c['gen_prompt'], 'pass_rate')} | {_gen_cell(c['gen_prompt'], 'distinct2')} | "
        f"{_gen_cell(c['gen_prompt'], 'kl_to_base', 3)} |"
    )
    L += [
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
    L += ["", "![trajectory](trajectory.png)", "", "![profile](profile.png)", "", "## Answers", ""]
    L += answers(c)
    if len(c["seeds"]) == 1:  # the seed's own directory: a pooled one (seeds: [0]) has no rows of its own
        own = (run_dirs or [root])[0]
        L += _filter_section(own, c) + _demo_section(own, c)
    L += ["", "## Settings", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    out = root / "report.md"
    write_text(out, "\n".join(L) + "\n")
    return out


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
    paired = [r for r in healed if "heal_vs_steer_pmass" in r]  # rounds with a raw-steered eval
    q1_parts = [
        f"r{r['round']}: pmass ratio steered {ci_text(r['steered'], 'pmass_ratio', sign=False)} → healed "
        f"{ci_text(r['healed'], 'pmass_ratio', sign=False)}, difference {r['heal_vs_steer_pmass']['verdict']}; "
        f"shift steered {ci_text(r['steered'], 'target_shift')} vs healed {ci_text(r['healed'], 'target_shift')}"
        for r in paired
    ]
    q1_yes = sum(r["heal_vs_steer_pmass"]["verdict"] == "yes" for r in paired)
    q1 = (
        f"**Q1 can we heal?** healing raised coherence over raw steering (intervals above 0) in {q1_yes}/{len(paired)} rounds. "
        + "; ".join(q1_parts)
        + "."
    )
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
            f"{_f(s['difference'], 2, True)} [{_f(s['difference_ci'][0], 2, True)}, {_f(s['difference_ci'][1], 2, True)}]"
            f"{seed_ci_text(s)} ({s['verdict']})"
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
    lo, hi = d["difference_ci"]
    q4 = (
        f"**Beats prompting?** {beats(d['verdict'], verdict(*intervals(last, 'selectivity')))} "
        "(yes needs both the difference and "
        "the healed model's own selectivity above 0): selectivity of the last healed round minus the prompting baseline's = "
        f"{_f(d['difference'], 2, True)} [{_f(lo, 2, True)}, {_f(hi, 2, True)}]{seed_ci_text(d)} (the coherence gate inside selectivity "
        f"compares them at matched coherence). Healed: {ci_text(last, 'selectivity', seeds=True)}; prompting: {ci_text(c['prompt'], 'selectivity')}."
    )
    return [f"- {q}" for q in (q0, q1, q2, q3, q4)]


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
        rej = root / f"round_{r['round']:02d}" / "rejected.jsonl"
        for x in read_records(rej)[:2] if rej.is_file() else []:
            L.append(f"  - dropped ({', '.join(x.drop_reasons)}): “{x.completion[:160].replace(chr(10), ' ')}”")
    return L


def _demo_section(root: Path, c: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, list]] = []
    b = read_records(root / "baselines" / "demo.jsonl")
    rows += [
        ("base", [x for x in b if x.id.startswith("base")]),
        ("prompting", [x for x in b if x.id.startswith("prompt")]),
    ]
    for r in c["rounds"]:
        for kind in ("steered", "healed"):
            p = root / f"round_{r['round']:02d}" / f"demo_{kind}.jsonl"
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
