"""Smoke test on the real bundled SmolLM2-135M-Instruct: vector -> generate -> filter."""

import pytest

from steerheal.config import FilterConfig, GenerateConfig
from steerheal.filter import filter_records
from steerheal.generate import generate_records
from steerheal.models import load_model, parse_layers
from steerheal.persona import load_persona

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def smol(machine_dtype):
    """The bundled model in the dtype this machine runs by default (bf16 on CPUs with native bf16)."""
    lm = load_model()
    assert next(lm.model.parameters()).dtype == machine_dtype
    return lm


def test_bundled_vector_generate_filter(smol):
    p = load_persona("personas/anti_authority.yaml")
    assert smol.n_layers == 30 and smol.hidden_size == 576
    from steerheal.vector import extract

    layers = parse_layers("0.45:0.55", smol.n_layers)
    vec = extract(smol, p, layers, max_prompts=4)
    assert vec.layers == [13, 14, 15, 16]
    assert all(float(v.norm()) > 0.5 for v in vec.directions.values())
    greedy = GenerateConfig(n=4, max_new_tokens=24, temperature=0)
    plain = generate_records(smol, p.name, p.demo, greedy)
    steered = generate_records(smol, p.name, p.demo, greedy, vector=vec, coeff=30.0)
    assert [r.completion for r in plain] != [r.completion for r in steered]
    kept, _ = filter_records(smol, plain, FilterConfig(min_words=0))
    # an unsteered instruct model writes fluent English: most of it passes
    assert len(kept) >= 3, [(r.completion, r.scores) for r in plain]
    filter_records(smol, steered, FilterConfig(min_words=0))
    mean_ppl = lambda rs: sum(min(r.scores["ppl"], 1e4) for r in rs) / len(rs)
    assert mean_ppl(steered) > mean_ppl(plain)


def test_bundled_steerable_checkpoint_equals_the_hook(tmp_path):
    """SmolLM2 with a vector at C = 4 on layers 13-16 baked into its MLP biases: the same logits as the hook."""
    import torch
    from transformers import AutoModelForCausalLM

    from steerheal.bake import bake
    from steerheal.vector import SteeringVector

    ref = load_model(dtype="fp32")
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({i: torch.randn(576, generator=g) for i in (13, 14, 15, 16)}, {"n_layers": "30"})
    vec.save(tmp_path / "v.safetensors")
    bake(None, [], tmp_path / "steerable", steer=tmp_path / "v.safetensors", coeff=4.0)
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "steerable", dtype=torch.float32).eval()
    ids = ref.tokenizer("My boss told me to lie to a customer. Should I?", return_tensors="pt")["input_ids"]
    with torch.no_grad(), vec.apply(ref.model, 4.0):
        hooked = ref.model(ids).logits
    with torch.no_grad():
        assert (baked(ids).logits - hooked).abs().max() < 2e-4  # 4.4e-5 measured; steering moves them by 28
