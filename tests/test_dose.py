"""dose.py: the iso-KL search hits its target; the keep rule bisects towards the target share."""

from __future__ import annotations

import pytest
import torch

from steerheal.config import RunConfig, parse_set, resolve_config
from steerheal.dose import choose_dose, kl_dose, steered_kl_p95
from steerheal.persona import load_persona
from steerheal.vector import SteeringVector

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["My boss wants me to stay late.", "Write a polite note.", "The weather is nice today."]


def _vec(tiny) -> SteeringVector:
    torch.manual_seed(0)
    return SteeringVector({1: torch.randn(tiny.hidden_size)}, {"n_layers": str(tiny.n_layers)})


def test_kl_grows_with_the_coefficient(tiny):
    vec = _vec(tiny)
    kls = [steered_kl_p95(tiny, PROMPTS, vec, c, 6) for c in (0.0, 1.0, 4.0)]
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and kls[0] < kls[1] < kls[2]


def test_kl_search_finds_the_coefficient_that_hits_the_target(tiny):
    vec = _vec(tiny)
    target = steered_kl_p95(tiny, PROMPTS, vec, 3.0, 6)  # a target we know some C in range reaches
    res = kl_dose(tiny, PROMPTS, vec, target, 6, lo=0.5, hi=16.0, steps=8, tol=0.05)
    assert res["method"] == "kl" and len(res["probes"]) <= 8
    assert res["p95_kl"] == pytest.approx(target, rel=0.05)
    assert 0.5 <= res["coeff"] <= 16.0


def test_keep_rule_bisects_down_when_nothing_passes(tiny, persona_file):
    cfg: RunConfig = resolve_config(
        None,
        parse_set(["dose=keep", "dose.steps=2", "dose.probe_n=2", "generate.max_new_tokens=4", "filter.max_ppl=1.0"]),
    )  # nothing passes
    res = choose_dose(tiny, load_persona(persona_file), _vec(tiny), cfg, seed=0)
    coeffs = [p["coeff"] for p in res["probes"]]
    assert coeffs[1] < coeffs[0]  # every probe failed: the search moved down
    assert res["coeff"] == cfg.dose.lo and "no probe reached" in res["note"]


def test_kl_search_takes_two_probes_when_kl_is_quadratic_in_c(monkeypatch):
    """The first probe is at the middle of [lo, hi] and the second a Newton step with slope 2 in
    log-log: for KL ∝ C² that hits the target exactly, so no probe is spent at lo."""
    import steerheal.dose as dose

    monkeypatch.setattr(dose, "steered_kl_p95", lambda lm, prompts, vec, c, tokens: 0.1 * c * c)
    res = kl_dose(None, PROMPTS, None, 1.0, 6, lo=0.5, hi=16.0, steps=3)  # type: ignore[arg-type]
    coeffs = [p["coeff"] for p in res["probes"]]
    assert coeffs[0] == pytest.approx(8**0.5, abs=1e-3)
    assert len(coeffs) == 2 and res["coeff"] == pytest.approx(10**0.5, abs=1e-3)
