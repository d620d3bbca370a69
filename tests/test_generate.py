import torch

from steerheal.config import GenerateConfig
from steerheal.generate import generate_records
from steerheal.vector import SteeringVector


def G(n, **kw):
    return GenerateConfig(**{"n": n, "top_p": 1.0, "batch_size": 16, **kw})


PROMPTS = ["My boss wants me to stay late.", "Write a polite note.", "The weather is nice today."]


def test_coeff_zero_equals_plain_generation(tiny):
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 10})
    plain = generate_records(tiny, "p", PROMPTS, G(5, max_new_tokens=8, batch_size=2), seed=3)
    zero = generate_records(tiny, "p", PROMPTS, G(5, max_new_tokens=8, batch_size=2), vector=vec, coeff=0.0, seed=3)
    assert [r.completion for r in plain] == [r.completion for r in zero]


def test_steering_changes_output_and_records(tiny):
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 50})
    plain = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=8, temperature=0))
    steered = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=8, temperature=0), vector=vec, coeff=4.0)
    assert [r.completion for r in plain] != [r.completion for r in steered]
    r = steered[0]
    assert r.coeff == 4.0 and r.layers == [1] and r.messages == [{"role": "user", "content": PROMPTS[0]}]
    assert len({x.id for x in steered}) == 3


def test_batched_greedy_matches_one_at_a_time(tiny):
    """Left padding must not change what a prompt generates."""
    one = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=6, temperature=0, batch_size=1))
    many = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=6, temperature=0, batch_size=3))
    assert [r.completion for r in one] == [r.completion for r in many]


def test_system_prompt_is_recorded(tiny):
    recs = generate_records(tiny, "p", PROMPTS, G(2, max_new_tokens=4), system="Be principled.")
    assert recs[0].messages[0] == {"role": "system", "content": "Be principled."}
