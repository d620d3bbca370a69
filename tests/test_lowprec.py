"""Faithful rounds in bf16 (bf16 works on CPU): merging a small heal into bf16 weights rounds most
of it away, so in low precision each adapter stays a frozen fp32 low-rank residual, and bake merges
in fp32. The loop's model, a reload with the adapters and the baked checkpoint are one function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steerheal.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def small_adapter(model_dir: Path, out: Path, std: float = 2e-5) -> Path:
    """A LoRA whose ΔW is far below a bf16 ulp of the weights, like a real heal's."""
    from peft import LoraConfig, get_peft_model

    from steerheal.heal import lora_targets

    lm = load_model(str(model_dir))
    torch.manual_seed(0)
    pm = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(lm.model, [0, 1])))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    pm.save_pretrained(out)
    return out


def adapter_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / r) · B A per module, in fp32, straight from the adapter file."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(adapter / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    return {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale
        * sd[k.replace("lora_A", "lora_B")]
        @ sd[k]
        for k in sd
        if k.endswith("lora_A.weight")
    }


def effective_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight a module applies, in fp32: its stored weight plus any low-rank residuals kept beside it."""
    mod = model.get_submodule(name)
    w = mod.weight.detach().float().clone()
    for a, b, scale in getattr(mod, "steerheal_low_rank", []):
        w += scale * b @ a
    return w


def test_an_adapter_loaded_in_bf16_keeps_its_whole_delta(tiny_model_dir, tmp_path):
    adapter = small_adapter(tiny_model_dir, tmp_path / "a")
    base = load_model(str(tiny_model_dir), dtype="bf16")
    healed = load_model(str(tiny_model_dir), [str(adapter)], dtype="bf16")
    for name, want in adapter_deltas(adapter).items():
        got = effective_weight(healed.model, name) - effective_weight(base.model, name)
        loss = float((got - want).norm() / want.norm())
        assert loss <= 0.01, f"{name}: {loss:.0%} of ΔW lost"  # merged into bf16 weights: about 100% lost


def test_the_loop_model_a_reload_and_the_bake_are_one_function_in_bf16(tiny_model_dir, tmp_path):
    from steerheal.bake import bake
    from steerheal.config import HealConfig
    from steerheal.heal import heal
    from steerheal.records import Record

    recs = [
        Record(
            id=str(i), persona="", messages=[{"role": "user", "content": f"Say hi {i}."}], completion="Hello, friend."
        )
        for i in range(8)
    ]
    lm = load_model(str(tiny_model_dir), dtype="bf16")
    cfg = HealConfig(rank=4, alpha=8, lr=1e-3, epochs=1, min_rows=4, layers="0:1", batch_size=4)
    heal(lm, recs, cfg, tmp_path / "a", merge=True)  # what the loop does after each round
    reload = load_model(str(tiny_model_dir), [str(tmp_path / "a")], dtype="bf16")  # generate -a ...
    bake(str(tiny_model_dir), [tmp_path / "a"], tmp_path / "baked")
    baked = load_model(str(tmp_path / "baked"))
    assert next(baked.model.parameters()).dtype == torch.float32  # merged and saved in fp32

    base = load_model(str(tiny_model_dir), dtype="bf16")
    for name, want in adapter_deltas(tmp_path / "a").items():  # the loop's model kept the whole heal
        got = effective_weight(lm.model, name) - effective_weight(base.model, name)
        assert float((got - want).norm() / want.norm()) <= 0.01

    ids = lm.tokenizer(["Say hi to the world, my friend.", "What is the weather?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        lp = [torch.log_softmax(m.model(**ids).logits.float(), -1) for m in (lm, reload, baked)]
    mask = ids["attention_mask"].bool()
    for i in range(3):
        for j in range(i + 1, 3):
            kl = (lp[i].exp() * (lp[i] - lp[j])).sum(-1)[mask]
            assert float(kl.max()) <= 1e-3, (i, j, float(kl.max()))


def test_device_auto_spreads_over_several_gpus_only(monkeypatch):
    from steerheal import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert models.spread_over_gpus(None) and models.spread_over_gpus("auto")
    assert not models.spread_over_gpus("cuda:1") and not models.spread_over_gpus("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not models.spread_over_gpus("auto")


def test_a_model_placed_by_accelerate_loads_and_runs(tiny_model_dir, monkeypatch):
    """The device_map="auto" path (here accelerate places every layer on the CPU) gives the same model."""
    import transformers

    from steerheal import models

    plain = models.load_model(str(tiny_model_dir))
    orig, asked = transformers.AutoModelForCausalLM.from_pretrained, []

    def spy(*a, **k):
        asked.append(k.get("device_map"))
        return orig(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(models, "spread_over_gpus", lambda device: True)
    placed = models.load_model(str(tiny_model_dir))
    assert asked == ["auto"]
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.allclose(placed.model(ids).logits, plain.model(ids).logits, atol=1e-6)


def test_the_loop_judges_by_its_own_weights_with_the_residuals_off(tiny_model_dir, persona_file, tmp_path):
    """In fp32 too the loop keeps its adapters as residuals, so the base that judges coherence is the same
    weights with them switched off: equal to a fresh base model, with no second copy in memory."""
    from conftest import TINY_RUN

    from steerheal.config import parse_set, resolve_config
    from steerheal.loop import open_loop, run_loop
    from steerheal.models import BaseView

    cfg = resolve_config(None, parse_set([*TINY_RUN, "rounds=1", f"model={tiny_model_dir}"]))
    run_loop(persona_file, tmp_path / "run", cfg)
    loop = open_loop(persona_file, tmp_path / "run", cfg, force=False)  # resumed: round 0's adapter loaded
    judge = loop.judge()
    assert isinstance(judge.model, BaseView)
    assert next(judge.model.parameters()).data_ptr() == next(loop.lm.model.parameters()).data_ptr()
    adapter = str(tmp_path / "run" / "round_00" / "adapter")
    ids = torch.tensor([[1, 5, 9, 20, 30, 7]])
    with torch.no_grad():
        base = load_model(str(tiny_model_dir)).model(ids).logits
        merged = load_model(str(tiny_model_dir), [adapter]).model(ids).logits
        seen_by_judge, current = judge.model(ids).logits, loop.lm.model(ids).logits
    assert torch.allclose(seen_by_judge, base, atol=1e-5)
    assert torch.allclose(current, merged, atol=1e-4) and (current - base).abs().max() > 1e-3
