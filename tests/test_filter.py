import math

import pytest

from steerheal.config import FilterConfig
from steerheal.filter import DEFAULT_NARRATION, REFUSAL, filter_records, matches_any, perplexity, repetition, summary
from steerheal.records import Record

NORMAL = (
    "I would talk to my manager first and explain why I think the plan could hurt customers, then offer another way."
)


def test_repetition_scores_loops_high():
    assert repetition(NORMAL) < 0.15
    assert repetition("the the the the the the the the the the") > 0.9
    assert repetition("no way. no way. no way. no way. no way. no way.") > 0.3
    assert repetition("") == 0.0


def test_narration_and_refusal_patterns():
    assert matches_any("As someone who values principle, I refuse.", DEFAULT_NARRATION)
    assert not matches_any(NORMAL, DEFAULT_NARRATION)
    assert matches_any("I'm sorry, but I can't help with that.", REFUSAL)
    assert matches_any("As an AI language model, I cannot do that.", REFUSAL)
    assert not matches_any(NORMAL, REFUSAL)


def test_perplexity_tail():
    import torch

    nll = torch.tensor([0.0, 0.0, 0.0, 4.0])
    assert perplexity(nll, tail=True) == pytest.approx(math.exp(4.0))
    assert perplexity(nll, tail=False) == pytest.approx(math.exp(1.0))


def _rec(i, text):
    return Record(id=str(i), persona="p", messages=[{"role": "user", "content": "What should I do?"}], completion=text)


def test_filter_records_reasons(tiny):
    recs = [
        _rec(0, NORMAL),
        _rec(1, "the the the the the the the the the the the the"),
        _rec(2, "ok"),
        _rec(3, "As someone who sticks to principle, " + NORMAL),
        _rec(4, "I'm sorry, but I can't help with that request at all."),
    ]
    kept, dropped = filter_records(tiny, recs, FilterConfig(max_ppl=1e9))
    reasons = {r.id: r.drop_reasons for r in recs}
    assert reasons["0"] == [] and "repetition" in reasons["1"] and "too_short" in reasons["2"]
    assert "narration" in reasons["3"] and "refusal" in reasons["4"]
    assert [r.id for r in kept] == ["0"] and len(dropped) == 4
    assert all(r.scores["ppl"] > 1 for r in recs)
    s = summary(recs)
    assert s["rows"] == 5 and s["kept"] == 1 and s["reasons"]["repetition"] == 1


def test_perplexity_gate_uses_reference_model(tiny):
    recs = [_rec(0, NORMAL)]
    filter_records(tiny, recs, FilterConfig(max_ppl=1.0))  # a random model: nothing is that predictable
    assert recs[0].drop_reasons == ["perplexity"]
