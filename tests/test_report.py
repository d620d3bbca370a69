"""report.answers: each answer reads every interval it has (the bootstrap and, with seeds, the t over them)."""

from __future__ import annotations

from steerheal.report import answers
from steerheal.stats import Difference


def numbers(pmass_seed_ci: list[float]) -> dict:
    healed = {
        "target_shift": 0.3,
        "target_shift_ci": [0.2, 0.4],
        "target_shift_seed_ci": [0.1, 0.5],
        "selectivity": 0.2,
        "selectivity_ci": [0.1, 0.3],
        "selectivity_seed_ci": [0.05, 0.35],
        "pmass_ratio": 0.95,
        "pmass_ratio_ci": [0.93, 0.97],  # the bootstrap alone says coherence held (>= 0.9)
        "pmass_ratio_seed_ci": pmass_seed_ci,
    }
    fs = {"rows": 32, "kept": 30, "reasons": {"perplexity": 2}, "median_ppl_dropped": 60.0, "median_ppl_kept": 10.0}
    diff = Difference("selectivity", 0.1, [0.05, 0.15], verdict="yes")
    return {
        "target": "authority",
        "seeds": [0, 1, 2],
        "prompt": {"selectivity": 0.1, "selectivity_ci": [0.05, 0.15]},
        "rounds": [
            {"round": 0, "filter": [fs], "kept_frac": [0.94], "cos_v0": [1.0], "healed": healed, "heal_vs_prompt": diff}
        ],
    }


def test_coherence_held_needs_the_seeds_interval_too():
    q2 = lambda c: next(a for a in answers(c) if "Q2" in a)  # noqa: E731
    assert "**Q2 coherent over the loop?** yes" in q2(numbers([0.91, 0.99]))
    # Three seeds that disagree: the t-interval over them reaches below 0.9, so "held" is not shown.
    assert "**Q2 coherent over the loop?** unclear" in q2(numbers([0.80, 1.10]))


def test_each_answer_shows_the_seed_interval_it_reads():
    """Q2, Q3's first step and the healed selectivity print the t over seeds beside the bootstrap, so
    an "unclear" next to a bootstrap interval that clears 0 is explained on the page."""
    text = "\n".join(answers(numbers([0.80, 1.10])))
    assert "0.95 [0.93, 0.97; over seeds 0.80 to 1.10]" in text
    assert "+0.30 [+0.20, +0.40; over seeds +0.10 to +0.50]" in text
    assert "Healed: +0.20 [+0.10, +0.30; over seeds +0.05 to +0.35]" in text


def _line(c: dict, q: str) -> str:
    return next(a for a in answers(c) if q in a)


def test_q1_counts_the_rounds_where_healing_raised_coherence():
    c = numbers([0.91, 0.99])
    steered = {"pmass_ratio": 0.5, "pmass_ratio_ci": [0.45, 0.55], "target_shift": 0.6, "target_shift_ci": [0.5, 0.7]}
    up = Difference("pmass_ratio", 0.45, [0.4, 0.5], verdict="yes")
    flat = Difference("pmass_ratio", 0.0, [-0.1, 0.1], verdict="unclear")
    r0 = c["rounds"][0] | {"steered": steered, "heal_vs_steer_pmass": up}
    r1 = r0 | {
        "round": 1,
        "heal_vs_steer_pmass": flat,
        "step_vs_prev": Difference("target_shift", 0.0, [-0.1, 0.1], verdict="unclear"),
    }
    c["rounds"] = [r0, r1]
    q1 = _line(c, "Q1")
    assert "in 1/2 rounds" in q1 and "pmass ratio steered 0.50 [0.45, 0.55] → healed 0.95" in q1
    assert "each later round's extra shift: +0.00 [-0.10, +0.10] (unclear)" in _line(c, "Q3")


def test_beats_prompting_needs_the_difference_and_the_healed_selectivity():
    c = numbers([0.91, 0.99])
    assert "**Beats prompting?** yes" in _line(c, "Beats prompting")
    healed = c["rounds"][0]["healed"]
    c["rounds"][0]["healed"] = healed | {"selectivity_ci": [-0.1, 0.3]}  # its own selectivity not above 0
    assert "**Beats prompting?** unclear" in _line(c, "Beats prompting")
    c["rounds"][0]["heal_vs_prompt"] = Difference("selectivity", -0.2, [-0.3, -0.1], verdict="no")
    assert "**Beats prompting?** no" in _line(c, "Beats prompting")


def test_q3_reads_the_first_healed_shift_the_persona_way_or_not():
    c = numbers([0.91, 0.99])
    assert "round 0 moved authority the persona's way: yes" in _line(c, "Q3")
    h = c["rounds"][0]["healed"]
    c["rounds"][0]["healed"] = h | {"target_shift_ci": [-0.4, -0.2], "target_shift_seed_ci": [-0.5, -0.1]}
    assert "round 0 moved authority the persona's way: no" in _line(c, "Q3")


def test_an_unhealed_run_says_so_after_q0():
    c = numbers([0.91, 0.99])
    c["rounds"][0]["healed"] = None
    out = answers(c)
    assert out[-1] == "- No round was healed." and "kept 94% per round" in out[0] and "perplexity 2" in out[0]
