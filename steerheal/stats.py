"""Uncertainty for every eval figure: paired, stratified bootstrap over vignettes, and over seeds.

The unit of resampling is the vignette (stratified by its labelled foundation, so each
foundation keeps its count), and a difference between two models always resamples the SAME
vignettes for both (paired). With several seeds, each bootstrap draw first resamples the seeds,
then the vignettes (a two-level bootstrap), so the interval carries both sources of noise.

Selectivity (the headline; after moralmaps): the raw score s = on-target shift − 0.1 × the mean
absolute shift of the other six foundations, then the coherence gate g = min(1, pmass / base pmass)²
takes away the share 1 − g of its size: selectivity = s − |s| (1 − g). A coherent model (g = 1)
keeps s; lower coherence always lowers the score, whether s is positive (toward 0) or negative
(further below it). (moralmaps' s × g pulls a negative score toward 0 as coherence falls, so a
broken model looked less bad.) The on-target shift is signed by the persona's direction, so
positive = moved the way the persona asks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist
from typing import Any

import numpy as np

from . import SteerhealError
from .config import FOUNDATIONS, OFF_TARGET_WEIGHT

N_BOOT = 2000
LEVEL = 0.95


@dataclass
class EvalRows:
    """One eval's per-vignette numbers: log p over the seven options, pmass, the labelled foundation."""

    ids: list[str]
    logp: np.ndarray  # [N, 7]
    pmass: np.ndarray  # [N]
    label: np.ndarray  # [N] index into FOUNDATIONS

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> EvalRows:
        rows = report.get("rows")
        if not rows:
            raise SteerhealError("an eval report without per-vignette rows cannot carry a CI; rerun the eval")
        logp = np.array([[r["logp"][f] for f in FOUNDATIONS] for r in rows], dtype=np.float64)
        return cls(
            [f"{r.get('condition', '')}/{r['id']}" for r in rows],
            logp,
            np.array([r["pmass"] for r in rows], dtype=np.float64),
            np.array([FOUNDATIONS.index(r["foundation"]) for r in rows]),
        )


@dataclass
class Difference:
    """measure(a) − measure(b), both against base, with its intervals (`difference`); a family of them read
    together (compare.holm_family) adds Holm's reading. In JSON, the fields that are set."""

    measure: str
    difference: float
    difference_ci: list[float]  # the paired bootstrap's 95% interval
    # With at least two seeds a side: each side's per-seed values, and the t-interval and p over the seeds
    per_seed: list[list[float]] | None = None
    seed_ci: list[float] | None = None
    seed_p: float | None = None
    seed_test: str | None = None  # "paired t" or "Welch t"
    seed_corr: float | None = None  # paired, over more than two seeds: the within-seed r
    verdict: str | None = None  # yes (a − b above 0 on every interval) or unclear
    # With a margin delta: the 90% intervals the two one-sided tests read, their p, and the decision
    delta: float | None = None
    difference_ci90: list[float] | None = None
    seed_ci90: list[float] | None = None
    tost_p: float | None = None
    decision: str | None = None
    # After Holm over a family of differences
    seed_p_holm: float | None = None
    holm_m: int | None = None
    verdict_holm: str | None = None
    tost_p_holm: float | None = None
    decision_holm: str | None = None
    plan: dict[str, Any] | None = None  # the seeds compare's plan expects it needs

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Difference:
        """Read back from JSON (compare.json holds other keys beside a difference's: they are left out)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def ci(draws: np.ndarray, level: float = LEVEL) -> list[float]:
    """Percentile interval of bootstrap draws along axis 0."""
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a], axis=0)
    return [float(lo), float(hi)]


def verdict(interval: Sequence[float], *more: Sequence[float] | None) -> str:
    """'yes' if the interval lies above 0, 'no' if below, 'unclear' if it holds 0. Further intervals
    (None skipped; in practice the t-interval over seeds) must agree, else 'unclear': with 3 seeds
    the bootstrap's seed resampling is far narrower than a t-interval over them."""
    given = [interval, *(m for m in more if m is not None and not any(math.isnan(v) for v in m))]
    words = {"yes" if lo > 0 else ("no" if hi < 0 else "unclear") for lo, hi in given}
    return words.pop() if len(words) == 1 else "unclear"


def beats(difference: str, own: str) -> str:
    """Does a model beat a rival, given the verdicts on the difference and on the model's own value?
    'yes' only when both are 'yes': a model that does not move the trait the persona's way beats
    nothing, however much less wrong than the rival it is. 'no' when either is 'no'."""
    if "no" in (difference, own):
        return "no"
    return "yes" if difference == own == "yes" else "unclear"


def intervals(m: dict[str, Any], k: str) -> list[list[float]]:
    """A measure's bootstrap interval, and its t-interval over seeds when there are several: what a
    verdict on it reads (`verdict(*intervals(m, k))`)."""
    return [m[f"{k}_ci"]] + ([m[f"{k}_seed_ci"]] if f"{k}_seed_ci" in m else [])


def seed_ci_text(d: Difference) -> str:
    """'; over seeds lo to hi (Welch t, 3 vs 3)' for a difference with an interval over seeds, else ''."""
    if d.seed_ci is None or d.per_seed is None:
        return ""
    lo, hi = d.seed_ci
    n_a, n_b = len(d.per_seed[0]), len(d.per_seed[1])
    how = f"{n_a} paired seeds" if d.seed_test == "paired t" else f"{n_a} vs {n_b}"
    corr = f", within-seed r {d.seed_corr:+.2f}" if d.seed_corr is not None else ""
    return f"; over seeds {lo:+.2f} to {hi:+.2f} ({d.seed_test}, {how}{corr})"


def _stratified_draws(label: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, N] row indices: each row of the draw resamples every foundation's vignettes within it."""
    cols = []
    for k in range(len(FOUNDATIONS)):
        members = np.flatnonzero(label == k)
        if len(members):
            cols.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(cols, axis=1)


def _nats(logp: np.ndarray, label: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[B, 7] diagonal nats (mean log p[f] over rows labelled f) for each draw of row indices [B, N]."""
    lab = label[idx]  # [B, N]
    out = np.full((idx.shape[0], len(FOUNDATIONS)), np.nan)
    for k in range(len(FOUNDATIONS)):
        m = lab == k
        n = m.sum(1)
        if n.all():
            out[:, k] = np.where(m, logp[idx, k], 0.0).sum(1) / n
    return out


def _measures(base: EvalRows, model: EvalRows, idx: np.ndarray, target: int, direction: int) -> dict[str, np.ndarray]:
    """Every paired measure of `model` against `base` for draws idx [B, N] (the identity draw gives the point)."""
    d_nats = _nats(model.logp, model.label, idx) - _nats(base.logp, base.label, idx)  # [B, 7]
    on = direction * d_nats[:, target]
    others = [k for k in range(len(FOUNDATIONS)) if k != target]
    off = np.nanmean(np.abs(d_nats[:, others]), axis=1)
    pm_b, pm_m = base.pmass[idx].mean(1), model.pmass[idx].mean(1)
    gate = np.minimum(1.0, pm_m / pm_b) ** 2
    return {
        "shift": d_nats,
        "target_shift": on,
        "off_target": off,
        "pmass": pm_m,
        "pmass_ratio": pm_m / pm_b,
        "coherence_gate": gate,
        "selectivity": gated(on - OFF_TARGET_WEIGHT * off, gate),
    }


def gated(score: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """The score less the share 1 − gate of its size: never raised by lower coherence, of either sign."""
    return score - np.abs(score) * (1.0 - gate)


def compare(
    base: EvalRows, models: Sequence[EvalRows], target: str, direction: int, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """Paired measures of a model (one EvalRows per seed) against base, each with a 95% CI.

    Point values are means over seeds on all vignettes; intervals come from the two-level
    bootstrap (seeds, then vignettes within each foundation). `<name>_per_seed` lists each seed's
    own point value; with more than one seed, `<name>_seed_ci` is the t-interval over them.
    """
    if not models:
        raise SteerhealError("nothing to compare: no model evals")
    for m in models:
        if m.ids != base.ids:
            raise SteerhealError(
                "the evals were not run on the same vignettes in the same order; "
                "rerun them with the same --vignettes, --condition and --limit"
            )
    t = FOUNDATIONS.index(target)
    rng = np.random.default_rng(seed)
    ident = np.arange(len(base.ids))[None, :]
    draws = _stratified_draws(base.label, n_boot, rng)
    seed_draws = rng.integers(0, len(models), size=(n_boot, len(models)))
    per_model_point = [_measures(base, m, ident, t, direction) for m in models]
    per_model_boot = [_measures(base, m, draws, t, direction) for m in models]
    out: dict[str, Any] = {
        "n_seeds": len(models),
        "n_vignettes": len(base.ids),
        "target": target,
        "direction": direction,
    }
    for name in per_model_point[0]:
        point = np.mean([p[name][0] for p in per_model_point], axis=0)
        boot = np.stack([b[name] for b in per_model_boot])  # [S, B, ...]
        pooled = boot[seed_draws, np.arange(n_boot)[:, None]].mean(1)  # [B, ...]: resample seeds, then average
        if name == "shift":
            out["shift"] = {f: float(point[k]) for k, f in enumerate(FOUNDATIONS)}
            out["shift_ci"] = {f: ci(pooled[:, k]) for k, f in enumerate(FOUNDATIONS)}
            continue
        out[name] = float(point)
        out[f"{name}_ci"] = ci(pooled)
        out[f"{name}_per_seed"] = vals = [float(p[name][0]) for p in per_model_point]
        if len(models) > 1:
            out[f"{name}_seed_ci"] = t_interval(vals)
    return out


def difference(
    base: EvalRows,
    a: Sequence[EvalRows],
    b: Sequence[EvalRows],
    target: str,
    direction: int,
    measure: str = "selectivity",
    n_boot: int = N_BOOT,
    seed: int = 0,
    paired: bool = False,
    delta: float | None = None,
) -> Difference:
    """measure(a) − measure(b), both against base, on the same vignette draws: 'does a beat b?' with a CI.

    With at least two seeds a side, `seed_ci` is the t-interval of the difference over the seeds'
    point values (`paired`: a[i] and b[i] are the same seed's run, as for two rounds of one loop, or two
    arms of one seed; otherwise Welch), and the verdict needs it and the bootstrap interval to agree.
    With one seed on a side there is no such interval and the verdict rests on the bootstrap (compare.md
    says so). `delta`: also test equivalence within ±delta (two one-sided tests at 5%: the 90%
    intervals inside ±delta), and give a `decision`: better, worse, equivalent or undecided."""
    t = FOUNDATIONS.index(target)
    rng = np.random.default_rng(seed)
    draws = _stratified_draws(base.label, n_boot, rng)
    ident = np.arange(len(base.ids))[None, :]
    paired = paired and len(a) == len(b)

    def pooled(models: Sequence[EvalRows], pick: np.ndarray) -> tuple[list[float], np.ndarray]:
        pts = [float(_measures(base, m, ident, t, direction)[measure][0]) for m in models]
        boot = np.stack([_measures(base, m, draws, t, direction)[measure] for m in models])  # [S, B]
        return pts, boot[pick, np.arange(n_boot)[:, None]].mean(1)

    pick_a = rng.integers(0, len(a), size=(n_boot, len(a)))
    # Paired seeds are resampled together: the same seed's two runs stay side by side in every draw.
    pick_b = pick_a if paired else rng.integers(0, len(b), size=(n_boot, len(b)))
    va, ba = pooled(a, pick_a)
    vb, bb = pooled(b, pick_b)
    out = Difference(measure, float(np.mean(va) - np.mean(vb)), ci(ba - bb))
    seeds: tuple[list[float], list[float] | None] = ([x - y for x, y in zip(va, vb)], None) if paired else (va, vb)
    if len(a) > 1 and len(b) > 1:
        # The seeds' own interval: resampling 3 seeds cannot see how far a fourth would land.
        out.per_seed = [va, vb]
        out.seed_ci, out.seed_p = t_test(*seeds)
        out.seed_test = "paired t" if paired else "Welch t"
        if paired and len(va) > 2 and np.std(va) > 0 and np.std(vb) > 0:
            # How much pairing buys: var(a − b) = var a + var b − 2 r sd a sd b.
            out.seed_corr = float(np.corrcoef(va, vb)[0, 1])
    out.verdict = verdict(out.difference_ci, out.seed_ci)
    if delta is not None:
        out.delta = delta
        tost_level = 1 - 2 * (1 - LEVEL)  # two one-sided tests at 5% read the 90% interval
        out.difference_ci90 = ci(ba - bb, tost_level)
        if out.seed_ci is not None:
            out.seed_ci90 = t_test(*seeds, level=tost_level)[0]
            out.tost_p = tost_p(*seeds, delta)
        out.decision = decision(out)
    return out


DECISIONS = ("better", "worse", "equivalent", "undecided")


def decision(d: Difference, p_holm: float | None = None, tost_holm: float | None = None) -> str:
    """One of DECISIONS for a difference from `difference(..., delta=)`: better or worse when every 95%
    interval leaves 0 on that side (and, given, Holm's p of the seed test is below 5%); equivalent when
    every 90% interval (two one-sided tests at 5%) lies inside ±delta (and, given, Holm's TOST p is below
    5%); else undecided. A small but resolved difference is both; better or worse is read first."""
    v = verdict(d.difference_ci, d.seed_ci)
    if v != "unclear" and (p_holm is None or p_holm < 1 - LEVEL):
        return "better" if v == "yes" else "worse"
    delta = d.delta
    assert delta is not None and d.difference_ci90 is not None, "a decision needs difference(..., delta=)"
    inside = all(-delta < lo and hi < delta for lo, hi in [d.difference_ci90, d.seed_ci90 or [0.0, 0.0]])
    if inside and (tost_holm is None or tost_holm < 1 - LEVEL):
        return "equivalent"
    return "undecided"


def measurement_gap(
    a: tuple[EvalRows, EvalRows],
    b: tuple[EvalRows, EvalRows],
    target: str,
    direction: int,
    measure: str = "selectivity",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Difference:
    """measure(a's model against a's base) − measure(b's against b's), each pair (base, model), on the same
    vignette draws: one model measured two ways (two dtypes, two protocols). Whatever each way adds to
    base and model alike cancels; the interval says whether what is left is resolved."""
    for base, model in (a, b):
        if not (base.ids == model.ids == a[0].ids):
            raise SteerhealError("the evals were not run on the same vignettes in the same order")
    t = FOUNDATIONS.index(target)
    draws = _stratified_draws(a[0].label, n_boot, np.random.default_rng(seed))
    ident = np.arange(len(a[0].ids))[None, :]
    point = _measures(*a, ident, t, direction)[measure][0] - _measures(*b, ident, t, direction)[measure][0]
    boot = _measures(*a, draws, t, direction)[measure] - _measures(*b, draws, t, direction)[measure]
    return Difference(measure, float(point), ci(boot))


def sd_upper(sd: float, n: int, confidence: float) -> float:
    """One-sided upper confidence bound of a standard deviation estimated from n values: sd · sqrt((n − 1) /
    χ²_{1−confidence}(n − 1)), the χ² quantile by Wilson–Hilferty (within 1% of the exact one from n = 3).
    Three seeds' SD has 2 df: its 80% upper bound is 2.1 times the estimate."""
    k = n - 1
    z = NormalDist().inv_cdf(1 - confidence)
    chi = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return sd * math.sqrt(k / chi) if chi > 0 else math.inf


def seeds_needed(
    sd: float, delta: float, alpha: float, power: float, m: int = 1, equivalence: bool = False, paired: bool = True
) -> int:
    """Seeds per arm for `power`: to detect a true difference of ±delta (two-sided t at α/m, the first and
    strictest step of Holm over m comparisons) or, with `equivalence`, to show equivalence within ±delta
    when the truth is 0 (two one-sided t tests at α/m). `sd`: of the per-seed paired differences, or of one
    arm's values when not paired (then both arms count, df 2(n − 1))."""

    def enough(n: int) -> bool:
        df, se = (n - 1.0, sd / math.sqrt(n)) if paired else (2.0 * (n - 1), sd * math.sqrt(2 / n))
        if equivalence:
            return (t_quantile(1 - alpha / m, df) + t_quantile(1 - (1 - power) / 2, df)) * se <= delta
        return (t_quantile(1 - alpha / (2 * m), df) + t_quantile(power, df)) * se <= delta

    if sd == 0:
        return 2
    hi = 2
    while not enough(hi):  # doubling, then bisection: each check costs two t quantiles
        hi *= 2
        if hi > 1 << 20:
            return hi
    lo = hi // 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return max(2, hi)


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of independent values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    return ci(x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz),
    on the side where it converges fast; no scipy."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_p_value(t: float, df: float) -> float:
    """Two-sided P(|T| > |t|) for Student's t with df degrees of freedom, fractional df included (Welch's):
    I_{df/(df+t²)}(df/2, 1/2)."""
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2))
    return _betainc(df / 2, 0.5, df / (df + t * t))


@functools.cache
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile t_p(df) for p in (0.5, 1), from t_p_value itself (so an interval leaves 0
    exactly when its test rejects)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):  # bisect for P(T > t) = 1 − p
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_value(mid, df) / 2 > 1 - p else (lo, mid)
    return hi


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: a family of m tests at 5% family-wise error."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def _t_parts(a: Sequence[float], b: Sequence[float] | None) -> tuple[float, float, float] | None:
    """(mean difference, its variance, df): one-sample, or Welch–Satterthwaite; None with fewer than two a side."""
    x = np.asarray(a, dtype=np.float64)
    y = None if b is None else np.asarray(b, dtype=np.float64)
    if len(x) < 2 or (y is not None and len(y) < 2):
        return None
    vx = x.var(ddof=1) / len(x)
    if y is None:
        return float(x.mean()), vx, len(x) - 1.0
    vy = y.var(ddof=1) / len(y)
    var = vx + vy
    df = var**2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1)) if var > 0 else 1.0
    return float(x.mean() - y.mean()), var, df


def t_test(a: Sequence[float], b: Sequence[float] | None = None, level: float = LEVEL) -> tuple[list[float], float]:
    """t-interval (95% by default) and two-sided p of mean(a), or of mean(a) − mean(b) by Welch (Welch–
    Satterthwaite df, fractional) for two small independent samples such as two arms' seeds. A side with
    no spread (a deterministic baseline copied per seed) leaves the one-sample t of the other; nan with
    fewer than two a side."""
    parts = _t_parts(a, b)
    if parts is None:
        return [float("nan"), float("nan")], float("nan")
    d, var, df = parts
    if var == 0:  # no spread anywhere: the difference is exact
        return [d, d], float(abs(d) < 1e-12)
    se, q = math.sqrt(var), t_quantile(1 - (1 - level) / 2, df)
    return [d - q * se, d + q * se], t_p_value(d / se, df)


def tost_p(a: Sequence[float], b: Sequence[float] | None, delta: float) -> float:
    """Two one-sided tests: p for "the mean difference lies within ±delta" (equivalence), the larger of the
    two one-sided p's; it is below α exactly when the (1 − 2α) t-interval lies inside ±delta."""
    parts = _t_parts(a, b)
    if parts is None:
        return float("nan")
    d, var, df = parts
    if var == 0:
        return float(abs(d) >= delta)
    se = math.sqrt(var)
    one_sided = lambda t: t_p_value(t, df) / 2 if t > 0 else 1 - t_p_value(t, df) / 2  # noqa: E731  P(T > t)
    return max(one_sided((d + delta) / se), one_sided((delta - d) / se))


def t_interval(values: Sequence[float]) -> list[float]:
    """95% t-interval of the mean of a few independent values (seeds); nan with fewer than two."""
    return t_test(values)[0]


def report_cis(report: dict[str, Any], n_boot: int = N_BOOT, seed: int = 0) -> None:
    """Add `<name>_ci` beside each figure of one eval report, in place (bootstrap over its vignettes)."""
    rows = EvalRows.from_report(report)
    rng = np.random.default_rng(seed)
    draws = _stratified_draws(rows.label, n_boot, rng)
    nats = _nats(rows.logp, rows.label, draws)
    p = np.exp(rows.logp)
    for k, f in enumerate(FOUNDATIONS):
        entry = report["foundations"][f]
        if entry["n"]:
            entry["nats_ci"] = ci(nats[:, k])
        entry["profile_ci"] = ci(p[draws, k].mean(1))
    report["pmass_ci"] = ci(rows.pmass[draws].mean(1))
    modal = np.array([FOUNDATIONS.index(r["modal"]) for r in report["rows"]])
    correct = (rows.logp.argmax(1) == modal).astype(np.float64)
    report["accuracy_ci"] = ci(correct[draws].mean(1))
