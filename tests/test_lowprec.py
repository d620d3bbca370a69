"""Faithful rounds in bf16 (bf16 works on CPU): merging a small heal into bf16 weights rounds most
of it away, so in low precision each adapter stays a frozen fp32 low-rank residual, and bake merges
in fp32. The loop's model, a reload with the adapters and the baked checkpoint are one function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steerheal.models import add_adapters, load_model

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
    heal(lm, recs, cfg, tmp_path / "a")
    add_adapters(lm, [tmp_path / "a"])  # what the loop does after each round
    reload = load_model(str(tiny_model_dir), [str(tmp_path / "a")], dtype="bf16")  # generate -a ...
    bake(str(tiny_model_dir), [tmp_path / "a"], tmp_path / "baked")
    baked = load_model(str(tmp_path / "baked"), dtype="fp32")
    saved = load_file(tmp_path / "baked" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # merged and saved in fp32

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


# ---------------------------------------------------------------- --dtype auto on CPUs with bf16 matrix units


@pytest.mark.parametrize(
    ("device", "flags", "want"),
    [
        ("cpu", {"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # AMD Zen 4, Intel Cooper Lake
        ("cpu", {"avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),  # Intel Sapphire Rapids
        ("cpu", {"avx2", "avx512f", "avx512bw"}, torch.float32),  # AVX-512 without bf16: emulated, slower
        ("cpu", set(), torch.float32),  # no flags to read (macOS, Windows, an Arm board)
        ("cuda", set(), torch.bfloat16),
        ("mps", {"avx512_bf16"}, torch.float32),
    ],
)
def test_auto_dtype_follows_the_cpus_native_bf16_units(device, flags, want):
    from steerheal.models import auto_dtype

    assert auto_dtype(device, frozenset(flags)) == want


def test_cpu_flags_are_read_from_cpuinfo_and_an_explicit_dtype_wins(tmp_path, monkeypatch, real_cpu_flags):
    from steerheal import models

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n\n")
    assert real_cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16", "avx2"}
    assert real_cpu_flags(tmp_path / "missing") == frozenset()
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert models.pick_dtype(cpu) == models.pick_dtype(cpu, "auto") == torch.bfloat16
    assert models.pick_dtype(cpu, "fp32") == torch.float32
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset({"avx2"}))
    assert models.pick_dtype(cpu, "auto") == torch.float32
    assert models.pick_dtype(cpu, "bf16") == torch.bfloat16


def test_bf16_and_fp32_agree_on_log_probs_and_greedy_tokens(tiny_model_dir):
    """The same weights cast once to bf16: next-token distributions within a small KL of fp32's, and the
    same greedy completion wherever fp32's top token leads by more than bf16's rounding can move it."""
    from steerheal.chat import messages_for, render_prompt

    lms = {d: load_model(str(tiny_model_dir), dtype=d) for d in ("fp32", "bf16")}
    assert next(lms["bf16"].model.parameters()).dtype == torch.bfloat16
    ids = lms["fp32"].tokenizer(
        ["You see a man kicking a dog.", "Write a short email"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        lp = {d: torch.log_softmax(m.model(**ids).logits.float(), -1) for d, m in lms.items()}
    kl = (lp["fp32"].exp() * (lp["fp32"] - lp["bf16"])).sum(-1)[ids["attention_mask"].bool()]
    assert float(kl.max()) < 1e-3, float(kl.max())
    assert float((lp["fp32"] - lp["bf16"]).abs().max()) < 0.05

    # fp32's greedy completion, read by both: bf16 picks the same token wherever fp32's choice is clear
    # (a margin no bf16 rounding can close; a near-tie may fall either way on another CPU's kernels)
    tok = lms["fp32"].tokenizer
    text = render_prompt(tok, messages_for("Is it ever right to break a rule?"))
    prompt = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ids = lms["fp32"].model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        logits = {d: m.model(ids).logits[0, prompt.shape[1] - 1 : -1].float() for d, m in lms.items()}
    top2 = logits["fp32"].topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05
    assert clear.sum() >= 8, "too few clear choices to compare"
    assert torch.equal(logits["bf16"].argmax(-1)[clear], logits["fp32"].argmax(-1)[clear])
    assert torch.equal(logits["fp32"].argmax(-1), ids[0, prompt.shape[1] :])  # the reads are the completion's


def test_heal_trains_fp32_lora_over_a_bf16_base(tiny_model_dir, tmp_path):
    """The base stays bf16 and frozen; the LoRA's parameters, their gradients and the saved adapter are fp32."""
    from steerheal.config import HealConfig
    from steerheal.heal import attach_lora, heal
    from steerheal.records import Record

    lm = load_model(str(tiny_model_dir), dtype="bf16")
    cfg = HealConfig(rank=4, alpha=8, lr=1e-3, epochs=1, min_rows=4, layers="0:1", batch_size=4)
    pm, _ = attach_lora(lm.model, cfg)
    trainable = {n: p.dtype for n, p in pm.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in pm.parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert frozen == {torch.bfloat16}
    lm.model = pm.unload()

    recs = [
        Record(
            id=str(i), persona="", messages=[{"role": "user", "content": f"Say hi {i}."}], completion="Hello, friend."
        )
        for i in range(8)
    ]
    summary = heal(lm, recs, cfg, tmp_path / "a")
    assert summary["train_nll"] < summary["train_nll_start"]  # it learned, through bf16 activations
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_the_output_layer_is_handed_a_contiguous_input(tiny_model_dir):
    """transformers slices the last position for logits_to_keep (generation, the eval's answer slot); over a
    strided input torch's CPU bf16 linear copied the head's weight once per row when no gradient was kept
    (after a heal): a k-shot eval ran 1.4x slower and peaked 0.4 GB higher (benchmarks/bench_head.py)."""
    lm = load_model(str(tiny_model_dir), dtype="bf16")
    for p in lm.model.parameters():
        p.requires_grad_(False)  # as after a heal
    seen: list[bool] = []
    lm.model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
    with torch.no_grad():
        out = lm.model(torch.tensor([[1, 5, 9, 20]] * 3), logits_to_keep=1).logits
        full = lm.model(torch.tensor([[1, 5, 9, 20]] * 3)).logits
    assert seen == [True, True]
    assert torch.equal(out[:, -1], full[:, -1])
    fp32 = load_model(str(tiny_model_dir), dtype="fp32")  # fp32 keeps its path exactly as it was
    assert not fp32.model.get_output_embeddings()._forward_pre_hooks


def test_a_run_refuses_to_resume_in_another_dtype(tiny_model_dir, persona_file, tmp_path, monkeypatch):
    """config.yaml records the dtype `auto` resolved to; a run made before it did (no `dtype`) ran fp32 on a
    CPU. Resuming with `auto` on a CPU with bf16 units would switch dtype mid-run: refused, one line."""
    import yaml
    from conftest import TINY_RUN

    from steerheal import SteerhealError, models
    from steerheal.config import parse_set, resolve_config
    from steerheal.loop import open_loop, run_loop

    cfg = resolve_config(None, parse_set([*TINY_RUN, "rounds=1", f"model={tiny_model_dir}"]))
    run_loop(persona_file, tmp_path / "run", cfg)
    conf = tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(conf.read_text())["dtype"] == "fp32"
    with pytest.raises(SteerhealError, match="dtype changed"):
        open_loop(
            persona_file,
            tmp_path / "run",
            resolve_config(None, {**parse_set(TINY_RUN), "dtype": "bf16", "model": str(tiny_model_dir)}),
            force=False,
        )
    open_loop(persona_file, tmp_path / "run", cfg, force=False)  # the same dtype resumes

    old = yaml.safe_load(conf.read_text())
    del old["dtype"]  # as written before the dtype was recorded
    conf.write_text(yaml.safe_dump(old, sort_keys=False))
    monkeypatch.setattr(models, "cpu_flags", lambda *a: frozenset({"avx512_bf16"}))
    with pytest.raises(SteerhealError, match="dtype changed"):
        open_loop(persona_file, tmp_path / "run", cfg, force=False)
    open_loop(
        persona_file,
        tmp_path / "run",
        resolve_config(None, {**parse_set(TINY_RUN), "dtype": "fp32", "model": str(tiny_model_dir)}),
        force=False,
    )


def test_baselines_are_shared_only_within_one_dtype(tiny_model_dir, persona_file, tmp_path):
    """A shift is read against the base in its own dtype (bf16 offsets cancel only there): a run in bf16
    refuses baselines an fp32 run computed, in one line."""
    from conftest import TINY_RUN

    from steerheal import SteerhealError
    from steerheal.config import parse_set, resolve_config
    from steerheal.loop import open_loop, run_loop

    sets = [*TINY_RUN, "rounds=1", f"model={tiny_model_dir}"]
    first = run_loop(persona_file, tmp_path / "fp32", resolve_config(None, parse_set(sets))).root
    bf16 = resolve_config(None, parse_set([*sets, "dtype=bf16"]))
    with pytest.raises(SteerhealError, match="baselines ran in fp32 and this run in bf16"):
        open_loop(persona_file, tmp_path / "bf16", bf16, force=False, baselines_from=first).baselines()
