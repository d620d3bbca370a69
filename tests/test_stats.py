"""stats.py: the bootstrap on known distributions, pairing, seeds, and the selectivity formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steerheal import SteerhealError
from steerheal.config import FOUNDATIONS
from steerheal.stats import (
    EvalRows,
    bootstrap_mean_ci,
    compare,
    difference,
    holm,
    measurement_gap,
    t_interval,
    t_p_value,
    t_quantile,
    t_test,
    verdict,
)


def rows(logp: np.ndarray, pmass: np.ndarray, label: np.ndarray) -> EvalRows:
    return EvalRows([str(i) for i in range(len(label))], logp, pmass, label)


def uniform(n_per: int = 10, pmass: float = 0.2) -> EvalRows:
    label = np.repeat(np.arange(7), n_per)
    return rows(np.full((len(label), 7), math.log(1 / 7)), np.full(len(label), pmass), label)


def test_bootstrap_ci_of_a_normal_mean_has_the_textbook_width():
    x = np.random.default_rng(1).normal(0, 1, 400)
    lo, hi = bootstrap_mean_ci(x)
    assert (hi - lo) / 2 == pytest.approx(1.96 / math.sqrt(400), rel=0.15)
    assert lo < x.mean() < hi


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    hits = sum(
        lo <= 1.0 <= hi
        for lo, hi in (bootstrap_mean_ci(rng.exponential(1.0, 60), n_boot=400, seed=k) for k in range(200))
    )
    assert 0.86 <= hits / 200 <= 0.99  # percentile intervals under-cover a little on skewed data


def test_t_interval_known_values():
    lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.302653
    assert lo == pytest.approx(2 - 4.302653 / math.sqrt(3)) and hi == pytest.approx(2 + 4.302653 / math.sqrt(3))
    assert all(math.isnan(v) for v in t_interval([1.0]))


def test_verdict_reads_the_interval():
    assert (verdict([0.1, 0.5]), verdict([-0.5, -0.1]), verdict([-0.1, 0.2])) == ("yes", "no", "unclear")


def test_a_model_against_itself_moves_nothing_with_a_zero_width_ci():
    base = uniform()
    out = compare(base, [base], "authority", -1)
    assert out["target_shift"] == 0 and out["target_shift_ci"] == [0.0, 0.0] and out["selectivity"] == 0


def test_selectivity_formula_by_hand():
    base = uniform(pmass=0.2)
    logp = base.logp.copy()
    a, c = FOUNDATIONS.index("authority"), FOUNDATIONS.index("care")
    logp[base.label == a, a] -= 1.0  # authority down 1 nat (the persona's way for direction -1)
    logp[base.label == c, c] -= 0.6  # care down 0.6: off-target movement
    model = rows(logp, np.full(len(base.label), 0.1), base.label)  # half the base coherence
    out = compare(base, [model], "authority", -1)
    off = 0.6 / 6
    assert out["target_shift"] == pytest.approx(1.0)
    assert out["off_target"] == pytest.approx(off)
    assert out["coherence_gate"] == pytest.approx(0.25)
    assert out["selectivity"] == pytest.approx((1.0 - 0.1 * off) * 0.25)  # positive: scaled by the gate
    assert out["shift"]["care"] == pytest.approx(-0.6)
    lo, hi = out["target_shift_ci"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)  # every vignette moved by exactly 1


def _moved(base: EvalRows, target_shift: float, pmass: float) -> EvalRows:
    """base with authority moved by target_shift nats (persona-signed, direction -1) at the given pmass."""
    a = FOUNDATIONS.index("authority")
    logp = base.logp.copy()
    logp[base.label == a, a] -= target_shift
    return rows(logp, np.full(len(base.label), pmass), base.label)


def test_lower_coherence_never_raises_selectivity_of_either_sign():
    """A negative score (the wrong way) at half the base coherence: moralmaps' × coh² took −0.21 to −0.053,
    so a broken model looked less bad. The gate now takes away the share 1 − g of the score's size."""
    base = uniform(pmass=0.2)
    for shift in (-0.21, 0.3):
        sel = [compare(base, [_moved(base, shift, 0.2 * r)], "authority", -1)["selectivity"] for r in (1.0, 0.8, 0.5)]
        assert sel[0] == pytest.approx(shift)  # coherent: the raw score
        assert sel[0] > sel[1] > sel[2]  # less coherent, lower score, either sign
    worse = compare(base, [_moved(base, -0.21, 0.1)], "authority", -1)["selectivity"]
    assert worse == pytest.approx(-0.21 - 0.21 * (1 - 0.25))  # −0.3675, not −0.0525


def test_more_coherent_than_base_is_not_rewarded():
    """The gate caps the pmass ratio at 1: a model surer of its answers than base scores its raw score."""
    base = uniform(pmass=0.2)
    for shift in (0.4, -0.4):
        out = compare(base, [_moved(base, shift, 0.3)], "authority", -1)
        assert out["pmass_ratio"] == pytest.approx(1.5) and out["coherence_gate"] == pytest.approx(1.0)
        assert out["selectivity"] == pytest.approx(shift)


def test_the_bootstrap_resamples_seeds_before_vignettes():
    """Two seeds a side that disagree (+1 and −1 nats) against two that agree: every vignette moves the
    same, so only the seed stage can widen the interval; averaging the seeds in every draw gives [0, 0]."""
    base = uniform()
    a = [_moved(base, x, 0.2) for x in (1.0, -1.0)]
    b = [_moved(base, 0.0, 0.2), _moved(base, 0.0, 0.2)]
    lo, hi = difference(base, a, b, "authority", -1, "target_shift", n_boot=400).difference_ci
    assert lo <= -0.9 and hi >= 0.9


def test_every_bootstrap_draw_keeps_each_foundations_count():
    from steerheal.stats import _stratified_draws

    label = np.array([0] * 3 + [1] * 1 + [2] * 9 + [3] * 2 + [4] * 5 + [5] * 4 + [6] * 7)
    draws = _stratified_draws(label, 300, np.random.default_rng(0))
    counts = np.stack([np.bincount(label[d], minlength=7) for d in draws])
    assert (counts == np.bincount(label)).all()
    # and the single vignette of foundation 1 is in every draw: its nats are never undefined
    base = rows(np.full((len(label), 7), math.log(1 / 7)), np.full(len(label), 0.2), label)
    out = compare(base, [base], "fairness", -1, n_boot=300)
    assert not any(math.isnan(v) for v in out["target_shift_ci"])


def test_tost_and_the_four_decisions():
    from steerheal.stats import decision, tost_p

    # TOST: p < 0.05 exactly when the 90% t-interval lies inside ±delta
    rng = np.random.default_rng(5)
    for _ in range(200):
        x = rng.normal(rng.uniform(-0.15, 0.15), 0.1, int(rng.integers(3, 12)))
        lo, hi = t_test(x, level=0.9)[0]
        assert (tost_p(x, None, 0.1) < 0.05) == (-0.1 < lo and hi < 0.1)
    base = uniform()
    same = [_moved(base, x, 0.2) for x in (0.30, 0.32, 0.31, 0.29, 0.30, 0.31)]
    near = [_moved(base, x, 0.2) for x in (0.31, 0.30, 0.32, 0.30, 0.29, 0.30)]
    far = [_moved(base, x + 0.3, 0.2) for x in (0.30, 0.32, 0.31, 0.29, 0.30, 0.31)]
    kw = dict(target="authority", direction=-1, measure="target_shift", paired=True, delta=0.1, n_boot=400)
    eq = difference(base, same, near, **kw)
    assert eq.decision == "equivalent"
    # TOST reads the 90% intervals (they were 95% ones by a slip): narrower than the 95%, and the seeds' one is
    # the 90% t-interval of the per-seed differences
    diffs = [x - y for x, y in zip(*eq.per_seed)]
    assert eq.seed_ci90 == pytest.approx(t_test(diffs, level=0.9)[0])
    assert eq.difference_ci90[1] - eq.difference_ci90[0] < eq.difference_ci[1] - eq.difference_ci[0]
    assert difference(base, far, same, **kw).decision == "better"
    assert difference(base, same, far, **kw).decision == "worse"
    wide = [_moved(base, x, 0.2) for x in (0.0, 0.6, 0.1, 0.5, 0.3, 0.3)]
    d = difference(base, wide, same, **kw)
    assert d.decision == "undecided" and d.tost_p > 0.05
    # Holm's p (from the family) can hold back a call the intervals alone would make
    assert decision(difference(base, far, same, **kw), p_holm=0.2, tost_holm=1.0) == "undecided"


def test_the_plans_seed_count_has_the_power_it_promises():
    """seeds_needed against simulation: at a true paired difference of delta, a paired t at α/m rejects
    about `power` of the time with that many seeds; at 0, TOST shows equivalence about `power` of the time."""
    from steerheal.stats import sd_upper, seeds_needed, tost_p

    rng = np.random.default_rng(7)
    n = seeds_needed(0.2, 0.2, 0.05, 0.8, m=2)
    hits = np.mean([t_test(rng.normal(0.2, 0.2, n))[1] < 0.025 for _ in range(1500)])
    assert 0.76 <= hits <= 0.9 and n == seeds_needed(0.2, 0.2, 0.05, 0.8, m=2)
    assert np.mean([t_test(rng.normal(0.2, 0.2, n - 2))[1] < 0.025 for _ in range(1500)]) < hits
    n_eq = seeds_needed(0.2, 0.2, 0.05, 0.8, equivalence=True)
    eq = np.mean([tost_p(rng.normal(0.0, 0.2, n_eq), None, 0.2) < 0.05 for _ in range(1500)])
    assert 0.76 <= eq <= 0.9
    # unpaired needs more: twice the variance per comparison at the same per-arm SD
    assert seeds_needed(0.2, 0.16, 0.05, 0.8, paired=False) > seeds_needed(0.2, 0.16, 0.05, 0.8)
    # the SD's upper confidence bound (scipy: chi2.ppf(0.2, 2) = 0.4463, chi2.ppf(0.2, 9) = 5.3801)
    assert sd_upper(1.0, 3, 0.8) == pytest.approx(math.sqrt(2 / 0.4463), rel=0.01)
    assert sd_upper(1.0, 10, 0.8) == pytest.approx(math.sqrt(9 / 5.3801), rel=0.01)


def test_paired_interval_is_narrower_than_the_spread_between_vignettes():
    rng = np.random.default_rng(3)
    base = uniform(n_per=20)
    base.logp = base.logp + rng.normal(0, 1.0, base.logp.shape)  # vignettes differ a lot
    model = rows(base.logp - 0.2 + rng.normal(0, 0.05, base.logp.shape), base.pmass, base.label)
    out = compare(base, [model], "authority", -1)
    lo, hi = out["target_shift_ci"]
    assert lo > 0.1 and hi < 0.3  # pairing removes the vignette-to-vignette spread


def test_seeds_pool_and_get_their_own_interval():
    base = uniform()
    models = []
    for shift in (0.5, 1.0, 1.5):
        logp = base.logp.copy()
        logp[:, FOUNDATIONS.index("authority")] -= shift
        models.append(rows(logp, base.pmass, base.label))
    out = compare(base, models, "authority", -1)
    assert out["target_shift"] == pytest.approx(1.0)
    assert out["target_shift_per_seed"] == pytest.approx([0.5, 1.0, 1.5])
    lo, hi = out["target_shift_seed_ci"]
    assert lo == pytest.approx(1 - 4.303 * 0.5 / math.sqrt(3), rel=1e-3)
    blo, bhi = out["target_shift_ci"]  # seed resampling alone spreads the pooled value over [0.5, 1.5]
    assert 0.5 - 1e-9 <= blo < 0.9 and 1.1 < bhi <= 1.5 + 1e-9


def test_difference_between_arms_and_mismatched_vignettes():
    base = uniform()
    strong, weak = (
        rows(base.logp - np.eye(7)[FOUNDATIONS.index("authority")] * s, base.pmass, base.label) for s in (1.0, 0.2)
    )
    d = difference(base, [strong], [weak], "authority", -1)
    assert d.difference == pytest.approx(0.8) and d.verdict == "yes"
    other = rows(base.logp[:-1], base.pmass[:-1], base.label[:-1])
    with pytest.raises(SteerhealError, match="same vignettes"):
        compare(base, [other], "authority", -1)


def test_beats_needs_the_difference_and_the_models_own_value_above_zero():
    from steerheal.stats import beats

    assert beats("yes", "yes") == "yes"
    assert beats("yes", verdict([-0.09, -0.02])) == "no"  # less wrong than the rival is not a win (demo, 2026-11-29)
    assert beats("yes", "unclear") == "unclear"
    assert beats("unclear", "yes") == "unclear"
    assert beats("no", "yes") == "no"


def test_a_verdict_needs_every_interval_to_agree():
    assert verdict([0.1, 0.5], [0.2, 0.9]) == "yes"
    assert verdict([0.1, 0.5], [-0.4, 1.2]) == "unclear"
    assert verdict([-0.5, -0.1], None, [float("nan")] * 2) == "no"  # absent or undefined intervals are skipped


def welch(a: list[float], b: list[float]) -> list[float]:
    return t_test(a, b)[0]


def test_welch_interval_known_values():
    lo, hi = welch([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # var/n 1/3 each: df 4, t 2.776445
    assert lo == pytest.approx(1 - 2.776445 * math.sqrt(2 / 3)) and hi == pytest.approx(1 + 2.776445 * math.sqrt(2 / 3))
    # A side with no spread leaves the one-sample t-interval of the other.
    assert welch([1.0, 2.0, 3.0], [0.5, 0.5]) == pytest.approx([v - 0.5 for v in t_interval([1.0, 2.0, 3.0])])
    # Fractional df as it is: var/n 1/3 and 1 give df = (4/3)^2 / (1/18 + 1) = 32/19, t_975(32/19) = 5.17623
    # and p 0.49210 (scipy), where flooring df to 1 gave 12.706.
    (lo, hi), p = t_test([1.0, 2.0, 3.0], [0.0, 2.0])
    assert hi - 1 == pytest.approx(5.1762316 * math.sqrt(4 / 3), rel=1e-6) and p == pytest.approx(0.4920963, abs=1e-6)


def test_welch_df_that_is_an_integer_in_exact_arithmetic_is_not_floored_below_it():
    """var/n 1/300 a side: df is exactly 4, but floats to 3.9999999999999996; flooring it gave t(3) and
    p 0.035 against scipy's 0.0213."""
    (lo, hi), p = t_test([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert p == pytest.approx(0.02131164, abs=1e-7)
    assert hi == pytest.approx(-0.3 + 2.776445 * math.sqrt(2 / 300), rel=1e-6)


def test_t_p_value_matches_the_quantile_table_and_known_values():
    # Published two-sided 5% quantiles of t(k) (odd and even closed forms), and the quantile the intervals use.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 60: 2.000, 120: 1.980}
    assert [t_p_value(q, k) for k, q in table.items()] == pytest.approx([0.05] * len(table), abs=2e-4)
    assert [t_quantile(0.975, k) for k in table] == pytest.approx(list(table.values()), abs=1e-3)
    assert t_p_value(0.0, 3) == pytest.approx(1.0) and t_p_value(-3.182, 3) == pytest.approx(0.05, abs=2e-4)
    assert t_p_value(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert t_p_value(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6))  # t(2): P(|T| <= t) = t / sqrt(2 + t^2)
    # Fractional df (Welch's), against scipy.stats.t: two-sided p and quantiles.
    known_p = {(2.0, 4.5): 0.1082579072, (1.3, 1.68): 0.3435830367, (3.0, 2.9): 0.0602047655, (2.5, 30.5): 0.0180162459}
    assert [t_p_value(t, df) for t, df in known_p] == pytest.approx(list(known_p.values()), abs=1e-9)
    assert t_quantile(0.975, 2.9) == pytest.approx(3.2454380624, abs=1e-8)
    assert t_quantile(0.95, 4.5) == pytest.approx(2.0655758889, abs=1e-8)
    assert t_quantile(0.8, 7.25) == pytest.approx(0.8940501331, abs=1e-8)
    (lo, hi), p = t_test([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert p == pytest.approx(t_p_value(1 / math.sqrt(2 / 3), 4))
    # One side with no spread: the one-sample t of the other, df 2 (scipy: 0.1217).
    assert t_test([1.0, 2.0, 3.0], [0.5, 0.5])[1] == pytest.approx(0.12169, abs=1e-5)
    # The interval leaves 0 exactly when p < 0.05, one-sample and Welch, on both sides of the line.
    rng = np.random.default_rng(3)
    called = []
    for _ in range(300):
        a, b = rng.normal(1.0, 1.0, 3), rng.normal(0.0, 1.0, int(rng.integers(2, 6)))
        for (lo, hi), p in (t_test(a, b), t_test(a)):
            assert (lo > 0 or hi < 0) == (p < 0.05)
            called.append(p < 0.05)
    assert 0.1 < np.mean(called) < 0.9


def test_holm_adjusts_step_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.02]) == pytest.approx([0.02])  # a family of one is not adjusted
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_three_seeds_that_disagree_do_not_make_a_difference_certain():
    # Seeds at +0.1, +0.5, +0.9: resampling three seeds never goes below +0.1, so the bootstrap alone
    # calls the difference; the t-interval over the seeds spans 0, and the verdict must say unclear.
    base = uniform()
    a = FOUNDATIONS.index("authority")
    seeds = [rows(base.logp - np.eye(7)[a] * s, base.pmass, base.label) for s in (0.1, 0.5, 0.9)]
    d = difference(base, seeds, [base, base, base], "authority", -1, "target_shift")
    assert d.difference_ci[0] > 0
    assert d.per_seed[0] == pytest.approx([0.1, 0.5, 0.9]) and d.seed_test == "Welch t"
    assert d.seed_ci == pytest.approx(t_interval([0.1, 0.5, 0.9]))
    assert d.verdict == "unclear" and d.seed_p > 0.05
    # Paired seeds (two rounds of the same runs): the t-interval of the per-seed differences.
    later = [rows(m.logp - np.eye(7)[a] * 0.3, m.pmass, m.label) for m in seeds]
    p = difference(base, later, seeds, "authority", -1, "target_shift", paired=True)
    assert p.seed_test == "paired t" and p.seed_ci == pytest.approx([0.3, 0.3]) and p.verdict == "yes"
    # With spread in the per-seed differences, the paired p is the one-sample t of those differences.
    later = [rows(m.logp - np.eye(7)[a] * x, m.pmass, m.label) for m, x in zip(seeds, (0.2, 0.3, 0.7))]
    p = difference(base, later, seeds, "authority", -1, "target_shift", paired=True)
    assert p.seed_p == pytest.approx(t_test([0.2, 0.3, 0.7])[1]) and 0.05 < p.seed_p < 0.2


def test_a_measurement_gap_cancels_what_a_way_of_measuring_adds_to_base_and_model_alike():
    """One model measured two ways (bf16 and fp32): an offset on every eval cancels in the shift; a
    change in the model's own shift shows, with an interval that excludes 0 only when it is resolved."""
    rng = np.random.default_rng(3)
    base = uniform()
    base = rows(base.logp + rng.normal(0, 0.3, base.logp.shape), base.pmass, base.label)
    auth = np.eye(7)[FOUNDATIONS.index("authority")]
    model = rows(base.logp - 0.5 * auth + rng.normal(0, 0.05, base.logp.shape), base.pmass, base.label)
    offset = rng.normal(0, 0.2, base.logp.shape)  # what the other way adds, vignette by vignette, to both
    same = measurement_gap(
        (rows(base.logp + offset, base.pmass, base.label), rows(model.logp + offset, model.pmass, model.label)),
        (base, model),
        "authority",
        -1,
        "target_shift",
    )
    assert same.difference == pytest.approx(0.0, abs=1e-12)
    assert same.difference_ci[0] <= 0 <= same.difference_ci[1]
    weaker = rows(model.logp + 0.3 * auth, model.pmass, model.label)  # the other way sees less of the shift
    gap = measurement_gap((base, weaker), (base, model), "authority", -1, "target_shift")
    assert gap.difference == pytest.approx(-0.3)
    assert gap.difference_ci[1] < 0
    with pytest.raises(SteerhealError, match="same vignettes"):
        measurement_gap(
            (base, rows(model.logp[:-1], model.pmass[:-1], model.label[:-1])), (base, model), "authority", -1
        )
