"""coherence.py: distinct-2 by hand; the measures on the tiny model move when the model is steered."""

from __future__ import annotations

import pytest
import torch

from steerheal.coherence import distinct2, generation_coherence, neutral_prompts
from steerheal.vector import SteeringVector

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distinct2_by_hand():
    assert distinct2(["a b c d"]) == 1.0
    assert distinct2(["a b a b a b"]) == pytest.approx(2 / 5)  # ab, ba, ab, ba, ab
    assert distinct2(["the same template", "the same template"]) == pytest.approx(2 / 4)


def test_neutral_prompts_are_the_projects_own():
    ps = neutral_prompts()
    assert len(ps) >= 20 and neutral_prompts(5) == ps[:5]


def test_unsteered_model_matches_its_judge_and_steering_moves_every_measure(tiny):
    prompts = neutral_prompts(4)
    plain = generation_coherence(tiny, tiny, prompts, max_new_tokens=8)
    assert plain["kl_to_base"] == pytest.approx(0.0, abs=1e-5) and plain["n"] == 8
    torch.manual_seed(0)
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 20}, {"n_layers": str(tiny.n_layers)})
    steered = generation_coherence(tiny, tiny, prompts, vector=vec, coeff=4.0, max_new_tokens=8)
    assert steered["kl_to_base"] > 1e-3  # the unsteered model scores < 1e-5
    assert steered["ppl"] != plain["ppl"]
    prompted = generation_coherence(tiny, tiny, prompts, system="Answer as a pirate.", max_new_tokens=8)
    assert prompted["kl_to_base"] > 0  # the judge reads the completion without the system prompt


def test_one_base_pass_gives_the_filters_nlls_and_the_kl(tiny):
    """judge_completions' base NLLs equal the filter's own scoring (it used to run base three times)."""
    from steerheal.chat import messages_for
    from steerheal.coherence import judge_completions
    from steerheal.filter import completion_nlls
    from steerheal.records import Record

    chats = [messages_for(p) for p in neutral_prompts(3)]
    texts = ["a short reply here", "another one, longer than the first reply", "x"]
    nlls, kl = judge_completions(tiny, tiny, chats, chats, texts, lambda: torch.no_grad(), 512)
    recs = [Record(id=str(i), persona="", messages=c, completion=t) for i, (c, t) in enumerate(zip(chats, texts))]
    want = completion_nlls(tiny, recs, 512, 16)
    assert [len(x) for x in nlls] == [len(x) for x in want]
    for a, b in zip(nlls, want):
        assert torch.allclose(a, b, atol=1e-4)
    assert kl == pytest.approx(0.0, abs=1e-6)
