"""Several arms, one report: does steer-heal beat prompt distillation, a random direction and
plain fine-tuning?

Each arm is a full loop per seed in out/<arm>/seed_S/, run seed by seed with every arm within a seed
(loop.run_seed), so a finished arm or seed is never rerun and a run stopped early leaves the arms paired. The random null: K random directions, norm-matched to the steer arm's
round-0 vector at its round-0 dose, each scored raw on the eval (null.json); every arm's
round-0 raw shift is placed among them, and each healed arm among the random arm's healed seeds, by
a rank p-value (a shift is persona-specific at p <= 0.05 the persona's way, which needs K >= 19).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import SteerhealError
from .cluster import Job, Unit, run_unit, run_unit_baselines, submit
from .config import ARMS, NULL_ALPHA, NULL_K_COMPARE, REFERENCE, DecideConfig, RunConfig, parse_set, with_overrides
from .evaluate import score_vignettes
from .loop import baseline_steps, pool_seeds, run_dtype, seed_run
from .models import load_model
from .plot import plot_compare
from .progress import log
from .records import write_json, write_text
from .report import render
from .results import ArmDifference, ArmSummary, RoundRecord, collect
from .rundir import BASELINES, Run, protocol_path, round_key
from .stats import (
    Difference,
    EvalRows,
    compare,
    decision,
    difference,
    holm,
    sd_upper,
    seeds_needed,
)
from .vector import SteeringVector
from .vignettes import load_vignettes

# A variant changes how a round runs, never what the shared baselines measure.
VARIANT_SECTIONS = ("arm", "vector", "dose", "generate", "filter", "heal", "online")


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """'decay:generate.steer=exp;generate.steer.tokens=16' → ('decay', its overrides). A variant is an arm
    of its own (its own directory and rows in the report), the steer arm unless it sets arm=..."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise SteerhealError(f"--variant {spec}: use NAME:KEY=VALUE[;KEY=VALUE], e.g. decay:generate.steer=exp")
    if name in ARMS or "/" in name:
        raise SteerhealError(f"--variant {spec}: name it something other than an arm ({', '.join(ARMS)}) or a path")
    over = parse_set([x.strip() for x in rest.split(";") if x.strip()])
    bad = [k for k in over if k not in VARIANT_SECTIONS]
    if bad:
        raise SteerhealError(
            f"--variant {name}: {', '.join(bad)} would change what the shared baselines measure; "
            f"a variant may set {', '.join(VARIANT_SECTIONS)}"
        )
    return name, over


def arm_config(cfg: RunConfig, arm: str, variants: dict[str, dict[str, Any]]) -> RunConfig:
    """The run's config for one arm or variant, checked as the arm's own (a rule may hold for one arm only)."""
    if arm in variants:
        out = with_overrides(dataclasses.replace(cfg, arm="steer"), variants[arm])
    else:
        out = dataclasses.replace(cfg, arm=arm)
    out.check()
    return out


def arm_dirs(out: Path, arm: str, cfg: RunConfig) -> list[Path]:
    root = out / arm
    return [seed_run(root, cfg, s)[0] for s in cfg.seeds] if cfg.seeds else [root]


def run_compare(
    persona_path: str | Path,
    out: str | Path,
    cfg: RunConfig,
    arms: list[str],
    null_k: int = NULL_K_COMPARE,
    force: bool = False,
    variants: dict[str, dict[str, Any]] | None = None,
    report_only: bool = False,
    reference: str | None = None,
) -> Path:
    """Run every arm and variant (resumably), the random null, and write compare.md, compare.png, compare.json.

    report_only: run nothing; report what is there (arms and seeds still running elsewhere are
    pooled over the seeds that have results, and the report lists them). reference: the arm every
    other one is set against (a variant such as constant-dose steer on the same code, say); by
    default steer, when it is among the arms."""
    variants = variants or {}
    arms, reference = check_arms(arms, variants, reference)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    # The baselines are computed once (by the first run to get there) and reused by every arm and seed,
    # also by a second compare process running other arms into the same directory.
    shared = next(
        (d for a in ARMS for d in arm_dirs(root, a, cfg) if all(Run(d).done(k) for k in baseline_steps(cfg)[0])), None
    )
    # Seed by seed, every arm within a seed: a run stopped early leaves arms paired on the seeds it finished.
    seeds: list[int | None] = [] if report_only else [*cfg.seeds] or [None]
    units = [
        Unit(str(persona_path), str(root / arm), arm_config(cfg, arm, variants), s, force, None)
        for s in seeds
        for arm in arms
    ]
    null = Job("the random null", null_step, (str(root), cfg, null_k)) if "steer" in arms and null_k else None
    if cfg.executor.kind == "local":
        run_here(units, shared, null, len(arms))
    elif units:
        submit_units(units, shared, null, cfg, root / "jobs")
        if not cfg.executor.wait:
            log("compare: jobs submitted. When they end, run this command again with --report-only to write the report")
            return root / "compare.md"
    for arm in arms if cfg.seeds else []:  # each arm's own report, pooled over the seeds it finished
        finished = [d for d in arm_dirs(root, arm, cfg) if (d / "report.md").is_file()]
        if finished:
            pool_seeds(persona_path, root / arm, arm_config(cfg, arm, variants), finished)
    summary, numbers = gather(root, cfg, arms, reference)
    write_json(root / "compare.json", summary)
    plot_compare(root, numbers)
    write_text(root / "compare.md", render(summary, numbers))
    log(f"compare report: {root / 'compare.md'}")
    return root / "compare.md"


def run_here(units: list[Unit], shared: Path | None, null: Job | None, n_arms: int) -> None:
    """The units one after another in this process (executor local); the null after the first seed."""
    for i, u in enumerate(units):
        seed = "" if u.seed is None else f" [seed {u.seed}] ({i // n_arms + 1}/{len(u.cfg.seeds) or 1})"
        log(f"[arm {Path(u.arm_root).name}]{seed}")
        one = run_unit(dataclasses.replace(u, shared=str(shared) if shared else None))
        shared = shared or Path(one)
        if i == n_arms - 1 and null is not None:
            null.fn(null.arg)


def submit_units(units: list[Unit], shared: Path | None, null: Job | None, cfg: RunConfig, folder: Path) -> list[Any]:
    """The units as jobs (executor submitit): the baselines job in the first unit's directory (adopted from
    `shared`, an earlier run's, where there is one), then the units, which adopt them, then the null."""
    first = dataclasses.replace(units[0], shared=str(shared) if shared else None)
    held = str(first.run()[0])
    array = [dataclasses.replace(u, shared=None if i == 0 else held) for i, u in enumerate(units)]
    return submit(
        Job(f"the baselines in {first.name}", run_unit_baselines, first),
        [Job(u.name, run_unit, u) for u in array],
        cfg.executor,
        folder,
        null,
    )


def null_step(job: tuple[str, RunConfig, int]) -> None:
    """The random null, a resumable step of the comparison's own directory (on a cluster, a job of its own)."""
    root, cfg, k = Path(job[0]), job[1], job[2]
    Run(root).step("null", lambda: write_json(root / "null.json", random_null(root, cfg, k)))


def check_arms(arms: list[str], variants: dict[str, dict[str, Any]], reference: str | None) -> tuple[list[str], str]:
    """The arms with the variants added, and the reference; an unknown arm or reference is refused."""
    arms = arms + [v for v in variants if v not in arms]
    bad = [a for a in arms if a not in ARMS and a not in variants]
    if bad:
        raise SteerhealError(f"--arms {','.join(bad)}: unknown; arms are {', '.join(ARMS)} (or a --variant)")
    if reference is not None and reference not in arms:
        raise SteerhealError(f"--reference {reference}: not among the arms ({', '.join(arms)}); add it to --arms")
    return arms, reference or REFERENCE


def gather(root: Path, cfg: RunConfig, arms: list[str], reference: str) -> tuple[dict[str, Any], dict[str, dict]]:
    """What the arms have so far (seeds pooled as far as each got): the summary under the run's own protocol,
    with one more per protocol of eval.also, and the collected numbers."""
    started = {arm: [d for d in arm_dirs(root, arm, cfg) if Run(d).done(f"{round_key(0)}/done")] for arm in arms}
    if not any(started.values()):
        raise SteerhealError(f"{root}: no arm has finished a round yet; nothing to report")
    numbers = {arm: collect(dirs) for arm, dirs in started.items() if dirs}
    if reference in arms and reference not in numbers:
        log(f"compare: {reference} has no finished round yet, so no arm is set against it")
    summary = summarize(root, numbers, cfg, reference)
    # The same trained models read under each protocol of eval.also (the null is the run's own protocol's);
    # runs made without it (an older config) have no such files, and the protocol is left out.
    dirs_all = [d for dirs in started.values() for d in dirs]
    scored = [
        p for p in cfg.eval.also if all(protocol_path(d / BASELINES / "base.json", p).is_file() for d in dirs_all)
    ]
    for p in sorted(set(cfg.eval.also) - set(scored)):
        log(f"compare: not every run was scored under {p} (eval.also); its decisions are left out")
    summary["protocols"] = {
        p: summarize(root, {arm: collect(dirs, p) for arm, dirs in started.items() if dirs}, cfg, reference, null=False)
        for p in scored
    }
    summary["seed_cost_s"] = {arm: seed_cost(dirs) for arm, dirs in started.items() if dirs}
    return summary, numbers


def seed_cost(dirs: list[Path]) -> float | None:
    """Mean seconds a finished seed took (every step in its manifest; shared baselines count 0)."""
    done = [Run(d) for d in dirs if (d / "report.md").is_file()]
    secs = [sum(float(x.get("time_s", 0.0)) for x in r.manifest["steps"].values()) for r in done]
    return sum(secs) / len(secs) if secs else None


def write_plan(
    out: str | Path, cfg: RunConfig, arms: list[str], variants: dict[str, dict[str, Any]], reference: str | None
) -> Path:
    """plan.md and plan.json: for each difference against the reference, the seeds per arm the decision
    needs (from the seeds so far), and the wall time of the seeds still to run at the measured cost of a
    seed. Runs nothing."""
    arms, reference = check_arms(arms, variants, reference)
    root = Path(out)
    summary, _ = gather(root, cfg, arms, reference)
    cost = summary["seed_cost_s"]
    per_seed = sum(c for c in cost.values() if c) if all(cost.get(a) for a in arms) else None
    rows, L = [], []
    for protocol, summ in [(summary["protocol"], summary), *summary["protocols"].items()]:
        family = {a: e.reference_minus_arm for a, e in summ["arms"].items() if e.reference_minus_arm}
        for arm, d in family.items():
            diffs = {"selectivity": d.selectivity} | {
                f"{arm} minus {reference}: {m}": x for m, x in d.arm_minus_reference.items()
            }
            for name, x in diffs.items():
                e = plan_entry(x, cfg.decide, len(family))
                if e is None:
                    continue
                now = x.decision_holm or x.decision  # selectivity is read after Holm
                need = max(e["seeds_to_detect"], e["seeds_for_equivalence"]) if now == "undecided" else e["seeds"]
                more = max(0, need - e["seeds"])
                rows.append(
                    {"protocol": protocol, "arm": arm, "measure": name, "decision": now}
                    | e
                    | {"more_seeds": more, "more_hours": more * per_seed / 3600 if per_seed else None}
                )
    L = [
        "# steerheal compare --plan",
        "",
        f"From the seeds so far in {root}: for each difference against {reference}, the SD over seeds (of the "
        f"per-seed paired differences where the arms share seeds), read at its {cfg.decide.sd_confidence:.0%} "
        f"upper confidence bound; the seeds per arm for {cfg.decide.power:.0%} power to detect ±delta (two-sided "
        "t at 5% / m, Holm's first step over the m arms set against the reference) or to show equivalence "
        "within ±delta when the truth is 0 (two one-sided tests at 5% / m). An undecided difference needs the "
        "larger of the two; the hours are for the seeds still to run, every arm, at the measured cost of a seed"
        + (f" ({per_seed / 60:.1f} min for all arms)." if per_seed else " (no seed of every arm has finished yet)."),
        "",
        "| protocol | arm | difference | now | seeds | SD | SD upper | delta | to detect | for equivalence | more seeds | more hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hours = "–" if r["more_hours"] is None else f"{r['more_hours']:.1f}"
        L.append(
            f"| {r['protocol']} | {r['arm']} | {r['measure']} | {r['decision']} | {r['seeds']}{' paired' if r['paired'] else ''} | "
            f"{r['sd']:.3f} | {r['sd_upper']:.3f} | {r['delta']:g} | {r['seeds_to_detect']} | "
            f"{r['seeds_for_equivalence']} | {r['more_seeds']} | {hours} |"
        )
    if not rows:
        L.append("| – | – | no difference has three seeds a side yet | | | | | | | | | |")
    write_json(root / "plan.json", {"seed_cost_s": cost, "rows": rows, "decide": dataclasses.asdict(cfg.decide)})
    write_text(root / "plan.md", "\n".join(L) + "\n")
    log(f"compare plan: {root / 'plan.md'}")
    return root / "plan.md"


def random_null(root: Path, cfg: RunConfig, k: int) -> dict[str, Any]:
    """K norm-matched random directions at the steer arm's round-0 dose, each evaluated raw against base."""
    first = arm_dirs(root, "steer", cfg)[0]
    v0 = SteeringVector.load(first / round_key(0) / "vector.safetensors")
    coeff = float(Run(first).json(f"{round_key(0)}/dose.json")["coeff"])
    dtype = run_dtype(first, cfg.device)  # the base it is read against ran in this dtype
    lm = load_model(cfg.model, [], device=cfg.device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    vigs = load_vignettes(cfg.eval.vignettes, cfg.eval.condition, cfg.eval.limit, 0)
    base = EvalRows.from_report(Run(first).json(f"{BASELINES}/base.json"))
    persona = RoundRecord.read(first / round_key(0) / "round.json")
    draws = []
    for i in range(k):
        rep = score_vignettes(lm, vigs, cfg.eval, vector=v0.random_like(10_000 + i), coeff=coeff)
        m = compare(base, [EvalRows.from_report(rep)], persona.target, persona.direction)
        draws.append({k2: m[k2] for k2 in ("target_shift", "selectivity", "pmass_ratio")})
        log(f"  random null {i + 1}/{k}: shift {m['target_shift']:+.3f}, pmass ratio {m['pmass_ratio']:.3f}")
    return {"k": k, "coeff": coeff, "vector_norm": v0.norm(), "draws": draws}


def place(value: float, null: list[float]) -> dict[str, Any]:
    """Where `value` falls among K null draws: rank p-values each way, p = (1 + #draws at least as far that
    way) / (K + 1), exact under the null for any K (the central 95% of a handful of draws, read as a
    quantile, fired for a random direction ~12% of the time at K = 8). Percentile and z for reading."""
    x = np.asarray(null, dtype=np.float64)
    k = len(x)
    sd = float(x.std(ddof=1)) if k > 1 else float("nan")
    p_above, p_below = (1 + int((x >= value).sum())) / (k + 1), (1 + int((x <= value).sum())) / (k + 1)
    return {
        "k": k,
        "percentile": float((x < value).mean() * 100),
        "z": (value - float(x.mean())) / sd if sd > 0 else math.nan,
        "p_above": p_above,
        "p_below": p_below,
        "above": p_above <= NULL_ALPHA,  # persona-specific: beyond the null the persona's way
        "below": p_below <= NULL_ALPHA,
    }


def summarize(
    root: Path, numbers: dict[str, dict], cfg: RunConfig, reference: str, null: bool = True
) -> dict[str, Any]:
    """Per arm: the last healed round against base, against the prompting baseline and against the
    reference arm (selectivity, shift and pmass ratio, paired), and its round-0 raw shift placed in the
    random null (`null`: when the numbers are under the protocol the null was scored in)."""
    draws = Run(root).json("null.json") if null and (root / "null.json").is_file() else None
    out: dict[str, Any] = {"protocol": next(iter(numbers.values()))["protocol"], "arms": {}, "null": draws}
    for arm, c in numbers.items():
        healed = [r for r in c["rounds"] if r["healed"]]
        entry = ArmSummary(len(c["rounds"]), len(healed))
        if healed:
            entry.last = {
                k: healed[-1]["healed"][k]
                for k in (
                    "target_shift",
                    "target_shift_ci",
                    "selectivity",
                    "selectivity_ci",
                    "selectivity_seed_ci",
                    "pmass_ratio",
                    "pmass_ratio_ci",
                )
                if k in healed[-1]["healed"]  # a seed interval needs two seeds
            }
            entry.vs_prompting = healed[-1]["heal_vs_prompt"]
        # The null is directions at the steer arm's round-0 C: only an arm that steered at that C is placed in it
        # (not the prompt arms, nor the random arm, whose own dose rule picks another C).
        if draws and c["rounds"] and all(abs(x - draws["coeff"]) < 1e-3 for x in c["rounds"][0]["coeff"]):
            shifts = [d["target_shift"] for d in draws["draws"]]
            entry.null_raw = place(c["rounds"][0]["steered"]["target_shift"], shifts)
        # Healed, like for like: the arm's mean healed shift among the random arm's healed seeds (each seed
        # its own random direction, distilled and healed the same way), at the arm's last healed round.
        rnd = numbers.get("random")
        if arm != "random" and rnd and healed:
            r = healed[-1]["round"]
            same = [x for x in rnd["rounds"] if x["round"] == r and x["healed"]]
            if same:
                entry.null_healed = place(
                    healed[-1]["healed"]["target_shift"], same[0]["healed"]["target_shift_per_seed"]
                ) | {"round": r}
        out["arms"][arm] = entry
    out["reference"] = reference
    if reference in numbers:
        for arm in numbers:
            if arm != reference:
                out["arms"][arm].reference_minus_arm = _arm_difference(root, cfg, reference, arm, numbers)
    holm_family(out["arms"], cfg.decide)
    return out


def holm_family(arms: dict[str, ArmSummary], decide: DecideConfig | None = None) -> None:
    """Several arms against one reference: Holm over that family keeps the chance of any false "better"
    (and, for the TOST p's, of any false "equivalent") at 5%, which each verdict alone does not. Adds
    seed_p_holm, holm_m, verdict_holm, and with decide the decision after Holm and the plan's seeds, in
    place. An arm with one seed has no seed test: it counts in the family with p = 1, so it is never called
    after Holm."""
    family = [e.reference_minus_arm.selectivity for e in arms.values() if e.reference_minus_arm]
    tost = holm([_p(d.tost_p) for d in family])
    for d, p, q in zip(family, holm([_p(d.seed_p) for d in family]), tost):
        d.seed_p_holm, d.holm_m, d.verdict_holm = p, len(family), d.verdict if p < 0.05 else "unclear"
        if decide is not None and d.delta is not None:
            d.tost_p_holm, d.decision_holm, d.plan = q, decision(d, p, q), plan_entry(d, decide, len(family))


def _p(p: float | None) -> float:
    return 1.0 if p is None or math.isnan(p) else p


def plan_entry(d: Difference, decide: DecideConfig, m: int) -> dict[str, Any] | None:
    """Seeds per arm the difference needs, from its seeds so far: the SD of the per-seed differences (paired)
    or of the arms' values (Welch), read at its upper confidence bound, for the power to detect ±delta or
    to show equivalence within ±delta, Holm's family of m included. None with fewer than three seeds."""
    if d.per_seed is None or d.delta is None or min(len(x) for x in d.per_seed) < 3:
        return None
    va, vb = d.per_seed
    paired = d.seed_test == "paired t"
    if paired:
        values, n = [x - y for x, y in zip(va, vb)], len(va)
        sd = float(np.std(values, ddof=1))
    else:
        n = min(len(va), len(vb))
        sd = float(math.sqrt((np.var(va, ddof=1) + np.var(vb, ddof=1)) / 2))
    ucl = sd_upper(sd, n, decide.sd_confidence)
    delta = d.delta
    need = lambda eq: seeds_needed(ucl, delta, 0.05, decide.power, m, eq, paired)  # noqa: E731
    return {
        "seeds": n,
        "paired": paired,
        "sd": sd,
        "sd_upper": ucl,
        "sd_confidence": decide.sd_confidence,
        "power": decide.power,
        "delta": delta,
        "seeds_to_detect": need(False),
        "seeds_for_equivalence": need(True),
    }


def _arm_difference(root: Path, cfg: RunConfig, a: str, b: str, numbers: dict[str, dict]) -> ArmDifference | None:
    """Selectivity of arm a minus arm b at the last healed round both reached (a partial run is not set
    against a finished one's later round), paired over vignettes, and over seeds where both arms ran the
    seed (common random numbers: the paired t over those seeds; Welch over all seeds when fewer than two
    are shared)."""
    both = {r["round"] for r in numbers[a]["rounds"] if r["healed"]}
    both &= {r["round"] for r in numbers[b]["rounds"] if r["healed"]}
    if not both:
        return None
    last = max(both)
    c = numbers[a]
    base = EvalRows.from_report(c["base"])

    def healed(arm: str) -> dict[int, EvalRows]:
        # A seed counts once its round.json is written (as in the table), not when its eval lands mid-round.
        out = {}
        for s, d in zip(cfg.seeds or [cfg.seed], arm_dirs(root, arm, cfg)):
            rd = d / round_key(last)
            if (rd / "round.json").is_file() and RoundRecord.read(rd / "round.json").healed:
                path = protocol_path(rd / "eval_healed.json", c.get("alt_protocol"))
                out[s] = EvalRows.from_report(json.loads(path.read_text()))
        return out

    ha, hb = healed(a), healed(b)
    shared = sorted(set(ha) & set(hb))
    paired = len(shared) >= 2
    ra, rb = ([h[s] for s in shared] for h in (ha, hb)) if paired else (list(ha.values()), list(hb.values()))
    margin = cfg.decide.margin
    d = difference(base, ra, rb, c["target"], c["direction"], "selectivity", paired=paired, delta=margin("selectivity"))
    # The Pareto question (shift against coherence), arm b minus arm a on each axis.
    axes = {
        m: difference(base, rb, ra, c["target"], c["direction"], m, paired=paired, delta=margin(m))
        for m in ("target_shift", "pmass_ratio")
    }
    front = pareto_word(str(axes["target_shift"].verdict), str(axes["pmass_ratio"].verdict))
    return ArmDifference(last, [len(ra), len(rb)], shared if paired else [], d, axes, front)


def pareto_word(shift: str, coherence: str) -> str:
    """How an arm stands against the reference's point on (shift, coherence), from the verdicts of arm − reference.
    Only a win on one axis with no loss on the other moves the front; an unclear axis is named."""
    if shift == coherence:
        return {"yes": "beyond (better on both)", "no": "behind (worse on both)"}.get(shift, "unclear")
    if {shift, coherence} == {"yes", "no"}:
        return "trade-off"
    axis = "shift" if shift != "unclear" else "coherence"
    other = "coherence" if axis == "shift" else "shift"
    word = "better" if "yes" in (shift, coherence) else "worse"
    return f"{word} on {axis}, {other} unclear"
