"""generate.backend vllm against hf: greedy fp32 completions agree token for token, unsteered, steered,
after a change of C and after a healed round is merged; a loop round gives the same kept rows and adapter.

Needs vLLM: runs in the venv scripts/setup_vllm.sh makes (`.ci/run` does), skipped elsewhere. One engine
per model for the module (starting one compiles the model: about a minute here)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, build_tiny_model
from safetensors.torch import load_file

pytest.importorskip("vllm")

from steerheal.config import parse_set, resolve_config  # noqa: E402
from steerheal.generate import complete, use_backend  # noqa: E402
from steerheal.models import BUNDLED, add_adapters, load_model  # noqa: E402
from steerheal.vector import SteeringVector  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", autouse=True)
def _stop_engines():
    from steerheal import vllm_backend

    yield
    vllm_backend.shutdown()


PROMPTS = [
    "My manager told me to lie to a customer. What should I do?",
    "Write a short email to my landlord about the broken heater.",
    "You see a man kicking a dog. Is that wrong?",
    "The weather is nice today. Any plans?",
    "Which moral foundation does cheating at cards violate?",
    "My boss wants me to skip the safety check.",
]


def _both(lm, vector=None, coeff=0.0, tokens=24):
    """The same greedy completions through hf and through the engine."""
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    kw = dict(vector=vector, coeff=coeff, max_new_tokens=tokens, temperature=0.0, top_p=1.0, batch_size=len(chats))
    engine, lm.engine = lm.engine, None
    hf = complete(lm, chats, **kw)
    lm.engine = engine
    return hf, complete(lm, chats, **kw)


def _vector(lm, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = {i: torch.randn(lm.hidden_size, generator=g) for i in layers}
    return SteeringVector({i: v / v.norm() for i, v in dirs.items()}, {"model": lm.name})


def _random_adapter(lm, path, seed=0):
    """A saved LoRA with nonzero B (a trained one's shape), without a training run."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(path)
    lm.model = pm.unload()  # the LoRA modules out again: add_adapters applies the saved one


def _parity_walk(lm, vec, coeffs, tmp_path):
    """Unsteered, steered at each C in turn (each a change the engine must follow), back to 0, then merged."""
    use_backend(lm, "vllm")
    pushes = lm.engine.pushes
    for c in [0.0, *coeffs, 0.0]:
        hf, vl = _both(lm, vec, c)
        assert vl == hf, f"C={c}"
        assert any(hf), "empty completions prove nothing"
    assert lm.engine.pushes == pushes + len(coeffs) + 1  # each change of C once, nothing else
    steered, plain = _both(lm, vec, coeffs[0])[0], _both(lm)[0]
    assert steered != plain  # the steering is strong enough to show
    _random_adapter(lm, tmp_path / "adapter")
    add_adapters(lm, [tmp_path / "adapter"])
    hf, vl = _both(lm)
    assert vl == hf and hf != plain  # the engine serves the merged round, which changed the completions
    hf, vl = _both(lm, vec, coeffs[0])
    assert vl == hf


def test_tiny_llama_greedy_parity(tmp_path):
    # head_dim 32: vLLM's CPU attention has no kernel for the suite's usual 16; seed 3 completes in visible text
    model_dir = build_tiny_model(tmp_path / "tiny128", hidden=128, seed=3)
    lm = load_model(str(model_dir), dtype="fp32")
    _parity_walk(lm, _vector(lm, [1, 2]), [6.0, -4.0], tmp_path)


@pytest.mark.smoke
def test_bundled_smollm2_greedy_parity(tmp_path):
    lm = load_model(BUNDLED, dtype="fp32")
    _parity_walk(lm, _vector(lm, [13, 14, 15, 16]), [4.0, 8.0], tmp_path)


def test_a_loop_round_on_vllm_keeps_the_same_rows_and_trains_the_same_adapter(persona_file, tmp_path):
    """Greedy sampling: the hf and vllm loops keep the same completions and heal the same adapter."""
    from steerheal.loop import run_loop
    from steerheal.records import read_records

    model_dir = build_tiny_model(tmp_path / "tiny128", hidden=128, seed=3)
    sets = [*TINY_RUN, "rounds=1", "generate.temperature=0", "generate.max_new_tokens=12", f"model={model_dir}"]
    out = {}
    for backend in ("hf", "vllm"):
        cfg = resolve_config(None, parse_set([*sets, f"generate.backend={backend}"]))
        out[backend] = run_loop(persona_file, tmp_path / backend, cfg).root / "round_00"
    rows = {b: [(r.id, r.completion) for r in read_records(d / "kept.jsonl")] for b, d in out.items()}
    assert rows["vllm"] == rows["hf"] and rows["hf"]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in out.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    coeffs = [json.loads((d / "round.json").read_text())["coeff"] for d in out.values()]
    assert coeffs[0] == coeffs[1]
    # vLLM's token passes never reach the loop's model: the engine counts them (prompt + completion)
    steps = {b: json.loads((d.parent / "manifest.json").read_text())["steps"] for b, d in out.items()}
    assert (
        0
        < steps["vllm"]["round_00/generate"]["tokens"]["forward"]
        <= steps["hf"]["round_00/generate"]["tokens"]["forward"]
    )
