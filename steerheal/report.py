"""report.md: the per-round table, the baselines, and Q0-Q3 and "beats prompting?" in numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from .records import read_records, write_text


def _f(x: float | None, nd: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def off_target(nats: dict[str, float], base: dict[str, float], target: str) -> float:
    """Mean change of the other foundations' nats against base."""
    d = [nats[f] - base[f] for f in nats if f != target]
    return sum(d) / len(d)


def _nats(report: dict) -> dict[str, float]:
    return {f: v["nats"] for f, v in report["foundations"].items()}


def _demo_table(rows: list[tuple[str, list]]) -> str:
    out = []
    for label, recs in rows:
        for r in recs:
            text = r.completion.replace("\n", " ").replace("|", "\\|")
            user = r.messages[-1]["content"].replace("|", "\\|")
            out.append(f"| {label} | {user[:70]} | {text[:220]} |")
    return "| model | prompt | completion |\n|---|---|---|\n" + "\n".join(out)


def write_report(root: str | Path, stop_reason: str, peak_rss_gb: float | None = None) -> Path:
    root = Path(root)
    conf = yaml.safe_load((root / "config.yaml").read_text())
    cfg = conf["config"]
    base = json.loads((root / "baselines" / "base.json").read_text())
    prompt = json.loads((root / "baselines" / "prompt.json").read_text())
    rounds = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines() if x.strip()]
    target = rounds[0]["target"] if rounds else "authority"
    direction = rounds[0]["direction"] if rounds else -1
    tn = lambda rep: rep["foundations"][target]["nats"]  # noqa: E731
    b_t, p_t = tn(base), tn(prompt)
    arrow = "down" if direction < 0 else "up"

    L = [f"# steerheal run: {conf['persona']}", ""]
    L += [
        f"Model `{cfg.get('model') or 'bundled SmolLM2-135M-Instruct'}`; target foundation **{target}** "
        f"(the persona should move its nats {arrow}); vignettes: {base['settings']['source']} "
        f"({base['n']} rows, condition {base['settings']['condition']}, think {base['settings']['think_tokens']}). "
        f"Stopped: {stop_reason}.",
        "",
    ]
    steps = json.loads((root / "manifest.json").read_text())["steps"]
    total = sum(v.get("time_s", 0.0) for v in steps.values())
    L += [
        f"Wall time of all steps: {total / 60:.1f} min"
        + (f"; peak RSS of the last process: {peak_rss_gb:.2f} GB." if peak_rss_gb else "."),
        "",
    ]
    L += [
        "## Baselines",
        "",
        "| model | target nats | Δ vs base | off-target mean Δ | coherence (pmass) | top-1 acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep in (("base", base), ("prompting (persona as system prompt)", prompt)):
        L.append(
            f"| {name} | {_f(tn(rep))} | {_f(tn(rep) - b_t, sign=True)} | "
            f"{_f(off_target(_nats(rep), _nats(base), target), sign=True)} | {_f(rep['pmass'])} | {_f(rep['accuracy'], 2)} |"
        )
    L += [
        "",
        "## Rounds",
        "",
        "| round | dose | kept | steered target nats (Δ) | healed target nats (Δ) | healed off-target mean Δ | "
        "coherence steered → healed | cos(v_r, v_0) | heal val NLL (start → end) | heal val D mean / rmse | "
        "time: vector / dose / gen / filter / evals / heal (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        s, h, hi, t = r["steered"], r["healed"], r["heal"], r["time_s"]
        evals = t["eval_steered"] + t["eval_healed"] + t["demo_steered"] + t["demo_healed"]
        L.append(
            f"| {r['round']} | {r['coeff']:.3g} | {r['filter']['kept']}/{r['filter']['rows']} ({r['filter']['kept_frac']:.0%}) | "
            f"{_f(s['target_nats'])} ({_f(s['target_nats'] - b_t, sign=True)}) | "
            + (
                f"{_f(h['target_nats'])} ({_f(h['target_nats'] - b_t, sign=True)}) | "
                f"{_f(off_target(h['nats'], _nats(base), target), sign=True)} | "
                f"{_f(s['pmass'])} → {_f(h['pmass'])} | "
                if h
                else f"– | – | {_f(s['pmass'])} → – | "
            )
            + f"{_f(r['cos_v0'])} | "
            + (
                f"{_f(hi['val_nll_start'])} → {_f(hi['val_nll'])} | {_f(hi['val_D_mean'])} / {_f(hi['val_D_rmse'])} | "
                if hi
                else "– | – | "
            )
            + f"{t['vector']:.0f} / {t['dose']:.0f} / {t['generate']:.0f} / {t['filter']:.0f} / {evals:.0f} / {t['heal']:.0f} |"
        )
    L += ["", "![trajectory](trajectory.png)", "", "## Answers", ""]
    L += _answers(rounds, base, prompt, b_t, p_t, direction, target)
    L += ["", "## Filter: what was dropped", ""]
    for r in rounds:
        fs = r["filter"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(fs["reasons"].items(), key=lambda kv: -kv[1])) or "none"
        L.append(
            f"- round {r['round']}: kept {fs['kept']}/{fs['rows']}; dropped for {reasons}; median perplexity "
            f"kept {_f(fs['median_ppl_kept'], 1)} vs dropped {_f(fs['median_ppl_dropped'], 1)}; "
            f"median repetition kept {_f(fs['median_rep_kept'], 2)} vs dropped {_f(fs['median_rep_dropped'], 2)}"
        )
        rej = root / f"round_{r['round']:02d}" / "rejected.jsonl"
        for x in read_records(rej)[:2] if rej.is_file() else []:
            L.append(f"  - dropped ({', '.join(x.drop_reasons)}): “{x.completion[:160].replace(chr(10), ' ')}”")
    L += ["", "## Demo generations (greedy, the same prompts every round)", ""]
    demo_rows: list[tuple[str, list]] = []
    b = read_records(root / "baselines" / "demo.jsonl")
    demo_rows.append(("base", [x for x in b if x.id.startswith("base")]))
    demo_rows.append(("prompting", [x for x in b if x.id.startswith("prompt")]))
    for r in rounds:
        d = root / f"round_{r['round']:02d}"
        for kind in ("steered", "healed"):
            p = d / f"demo_{kind}.jsonl"
            if p.is_file():
                demo_rows.append((f"r{r['round']} {kind}", read_records(p)))
    L.append(_demo_table(demo_rows))
    L += ["", "## Settings", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    out = root / "report.md"
    write_text(out, "\n".join(L) + "\n")
    return out


def _answers(
    rounds: list[dict], base: dict, prompt: dict, b_t: float, p_t: float, direction: int, target: str
) -> list[str]:
    if not rounds:
        return ["No round finished."]
    healed = [r for r in rounds if r["healed"]]
    fracs = [r["filter"]["kept_frac"] for r in rounds]
    r0 = rounds[0]["filter"]
    q0 = (
        f"**Q0 can we filter?** kept {', '.join(f'{x:.0%}' for x in fracs)} per round at the chosen dose; dropped rows had "
        f"median perplexity {_f(r0['median_ppl_dropped'], 1)} vs {_f(r0['median_ppl_kept'], 1)} kept and median repetition "
        f"{_f(r0['median_rep_dropped'], 2)} vs {_f(r0['median_rep_kept'], 2)} (round 0)."
    )
    if healed:
        pairs = [
            (
                r["steered"]["pmass"],
                r["healed"]["pmass"],
                r["steered"]["target_nats"] - b_t,
                r["healed"]["target_nats"] - b_t,
            )
            for r in healed
        ]
        better = sum(1 for s, h, *_ in pairs if h > s)
        q1 = (
            f"**Q1 can we heal?** healed coherence beat raw steering in {better}/{len(pairs)} rounds: "
            + "; ".join(
                f"r{r['round']} pmass {s:.3f} → {h:.3f} at Δ{target} steered {ds:+.3f} vs healed {dh:+.3f}"
                for r, (s, h, ds, dh) in zip(healed, pairs)
            )
            + "."
        )
        pm = [r["healed"]["pmass"] for r in healed]
        q2 = (
            f"**Q2 coherent over the loop?** healed pmass per round {', '.join(f'{x:.3f}' for x in pm)} vs base "
            f"{base['pmass']:.3f} (min ratio {min(pm) / base['pmass']:.3f})."
        )
        tr = [r["healed"]["target_nats"] for r in healed]
        steps = [b - a for a, b in zip([b_t] + tr, tr)]
        along = sum(1 for s in steps if s * direction > 0)
        q3 = (
            f"**Q3 one direction?** healed {target} nats {_f(b_t)} (base) → {' → '.join(_f(x) for x in tr)}; "
            f"{along}/{len(steps)} steps moved the persona's way ({'down' if direction < 0 else 'up'}); "
            f"cos(v_r, v_0) {', '.join(_f(r['cos_v0'], 2) for r in rounds)}."
        )
        final, prompt_shift = tr[-1] - b_t, p_t - b_t
        off_h = off_target(healed[-1]["healed"]["nats"], _nats(base), target)
        off_p = off_target(_nats(prompt), _nats(base), target)
        further = final * direction > prompt_shift * direction
        # A bigger shift bought with broken coherence is no win: require 90% of the baseline's pmass.
        coherent = pm[-1] >= 0.9 * prompt["pmass"]
        verdict = "yes" if further and coherent else ("not at equal coherence" if further else "no")
        q4 = (
            f"**Beats prompting?** {verdict}: after {len(healed)} round(s) the healed model moved {target} "
            f"by {final:+.3f} nats at pmass {pm[-1]:.3f}; the persona as a system prompt moved it by "
            f"{prompt_shift:+.3f} at pmass {prompt['pmass']:.3f}. The other foundations' nats moved {off_h:+.3f} "
            f"on average (healed) vs {off_p:+.3f} (prompting)."
        )
    else:
        q1 = q2 = q3 = q4 = "No round was healed."
    return [f"- {q}" for q in (q0, q1, q2, q3, q4)]
