"""bake: merged weights equal stacked adapters; the dir is a plain HF checkpoint; manifest; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from steerheal.cli import app
from steerheal.models import load_model
from steerheal.records import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


def random_adapter(model_dir: Path, out: Path, seed: int, layers: list[int] | None = None) -> Path:
    """A small LoRA with non-zero B (a fresh one would be the identity), saved as peft does."""
    from peft import LoraConfig, get_peft_model

    from steerheal.heal import lora_targets

    lm = load_model(str(model_dir))
    torch.manual_seed(seed)
    pm = get_peft_model(
        lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(lm.model, layers or [0, 1]))
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("adapters")
    return [random_adapter(tiny_model_dir, d / f"a{i}", seed=i, layers=[i, i + 1]) for i in range(3)]


IDS = torch.tensor([[1, 5, 9, 20, 30, 41, 7]])


def test_bake_equals_stacked_and_opens_plain(tiny_model_dir, adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerheal.bake import bake

    out = tmp_path / "baked"
    m = bake(str(tiny_model_dir), adapters, out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    AutoTokenizer.from_pretrained(out)
    stacked = load_model(str(tiny_model_dir), [str(a) for a in adapters])
    base = load_model(str(tiny_model_dir))
    with torch.no_grad():
        got, want, raw = plain(IDS).logits, stacked.model(IDS).logits, base.model(IDS).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, raw, atol=1e-3)  # the adapters did change the function
    meta = json.loads((out / "steerheal_bake.json").read_text())
    assert meta == {**m, "time_s": meta["time_s"]}
    assert [a["order"] for a in meta["adapters"]] == [0, 1, 2]
    assert [a["sha256"] for a in meta["adapters"]] == [file_sha256(a) for a in adapters]
    assert meta["base_model"] == str(tiny_model_dir)


def stack_unmerged(model_dir: Path, adapters: list[Path]):
    """One PeftModel with every adapter loaded and active at once (LoRA deltas add), nothing merged."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(str(model_dir)).model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return pm.eval()


def test_merged_equals_unmerged_stack(tiny_model_dir, adapters):
    """Merging in order == all adapters active unmerged: LoRA deltas are additive."""
    m = stack_unmerged(tiny_model_dir, adapters)
    stacked = load_model(str(tiny_model_dir), [str(a) for a in adapters]).model
    with torch.no_grad():
        assert torch.allclose(m(IDS).logits, stacked(IDS).logits, atol=1e-5)


def test_cli_bake(tiny_model_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    args = ["bake", "-o", str(out), "--model", str(tiny_model_dir)]
    for a in adapters:
        args += ["--adapter", str(a)]
    r = CliRunner().invoke(app, args + ["--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and (out / "steerheal_bake.json").is_file()


@pytest.mark.parametrize("case", ["none", "not_adapter"])
def test_cli_bake_refuses(tiny_model_dir, tmp_path, case):
    out = tmp_path / "merged"
    args = ["bake", "-o", str(out), "--model", str(tiny_model_dir), "--quiet"]
    if case == "not_adapter":
        args += ["--adapter", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "error" in lines[0]
    assert not out.exists()


def _vector(model_dir: Path, layers: list[int], seed: int = 0):
    from steerheal.vector import SteeringVector

    lm = load_model(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: torch.randn(lm.hidden_size, generator=g) for i in layers}, {"model": str(model_dir)})


def test_a_vector_baked_into_the_mlp_biases_equals_the_hook(tiny_model_dir, adapters, tmp_path):
    """A steerable checkpoint: base + adapters with C·v in down_proj's bias at each steered block gives the
    hook-steered model's logits, through the CLI, opened as a plain checkpoint (mlp_bias on)."""
    from transformers import AutoModelForCausalLM

    vec = _vector(tiny_model_dir, [1, 2])
    vec.save(tmp_path / "v.safetensors")
    out = tmp_path / "steerable"
    args = ["bake", "-o", str(out), "--model", str(tiny_model_dir), "--steer", str(tmp_path / "v.safetensors")]
    r = CliRunner().invoke(app, [*args, "--coeff", "3.5", "--adapter", str(adapters[0]), "--quiet"])
    assert r.exit_code == 0, r.output
    baked = AutoModelForCausalLM.from_pretrained(out).eval()
    assert baked.config.mlp_bias is True
    manifest = json.loads((out / "steerheal_bake.json").read_text())
    assert manifest["steer"]["coeff"] == 3.5 and manifest["steer"]["layers"] == [1, 2]
    ref = load_model(str(tiny_model_dir), [str(adapters[0])], dtype="fp32")
    with torch.no_grad():
        plain = ref.model(IDS).logits
        with vec.apply(ref.model, 3.5):
            hooked = ref.model(IDS).logits
        got = baked(IDS).logits
    assert (hooked - plain).abs().max() > 0.05  # steering moves the logits
    assert torch.allclose(got, hooked, atol=1e-5)


def test_baking_a_vector_is_refused_for_an_mlp_without_a_bias_switch(tiny_gpt2_dir, tmp_path):
    vec = _vector(tiny_gpt2_dir, [1])
    vec.save(tmp_path / "v.safetensors")
    args = [
        "bake",
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(tiny_gpt2_dir),
        "--steer",
        str(tmp_path / "v.safetensors"),
    ]
    r = CliRunner().invoke(app, [*args, "--coeff", "2", "--quiet"])
    assert r.exit_code == 2 and "no bias switch" in r.output and "hook" in r.output
    assert not (tmp_path / "out").exists()
