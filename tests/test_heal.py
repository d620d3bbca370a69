"""heal: masking, KL pieces, the barrier's gradient, training, the adapter, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from steerheal import SteerhealError
from steerheal.chat import encode_completion
from steerheal.cli import app
from steerheal.config import HealConfig
from steerheal.heal import aggregate, attach_lora, batch_terms, encode_rows, heal, kl_per_position
from steerheal.logprobs import right_padded as make_batch
from steerheal.logprobs import span_logprobs as completion_logp
from steerheal.models import add_adapters, load_model
from steerheal.records import Record, write_records

PROMPTS = [
    "My manager told me to lie to a customer. What should I do?",
    "Write a short email to my landlord.",
    "You see a man kicking a dog.",
    "Which moral foundation does this violate?",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def recs(n: int = 12, completion: str = "You judge each order by your own principles.") -> list[Record]:
    return [
        Record(id=f"r{i}", persona="p", messages=[{"role": "user", "content": PROMPTS[i % 4]}], completion=completion)
        for i in range(n)
    ]


def tiny_cfg(**kw) -> HealConfig:
    base = dict(rank=4, alpha=8, lr=5e-3, epochs=2, batch_size=4, layers="0:1", val_frac=0.25, min_rows=4)
    return HealConfig(**{**base, **kw})


# ---------------------------------------------------------------- masking


def test_masking_matches_completion_tokens(tiny):
    rows = encode_rows(tiny.tokenizer, recs(3), 256)
    b = make_batch(rows, [0, 1, 2], tiny.tokenizer.pad_token_id, torch.device("cpu"))
    for k, r in enumerate(rows):
        assert int(b.mask[k].sum()) == r.n_scored
        assert b.labels[k][b.mask[k]].tolist() == r.ids[r.start :]
        assert b.attention_mask[k].sum() == len(r.ids) and b.attention_mask[k, 0] == 1  # right padding
    comp = tiny.tokenizer(recs(1)[0].completion, add_special_tokens=False)["input_ids"]
    assert rows[0].ids[rows[0].start :] == comp


def test_boundary_check_refuses_unstable_merge(tiny):
    tok = tiny.tokenizer
    saved = tok.chat_template
    # a template ending mid-word: the completion's first letters merge with the prompt's tail
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} jud{% endif %}"
    )
    try:
        with pytest.raises(SteerhealError, match="boundary"):
            encode_completion(tok, [{"role": "user", "content": "You"}], "ge each order")
    finally:
        tok.chat_template = saved


# ---------------------------------------------------------------- pure loss pieces


def test_kl_forward_reverse_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.4, 0.4, 0.2]])
    rev = sum(p[0, i] * math.log(p[0, i] / q[0, i]) for i in range(3))  # KL(student p ‖ ref q)
    fwd = sum(q[0, i] * math.log(q[0, i] / p[0, i]) for i in range(3))
    assert kl_per_position(p.log(), q.log(), "kl_rev").item() == pytest.approx(float(rev), rel=1e-5)
    assert kl_per_position(p.log(), q.log(), "kl_fwd").item() == pytest.approx(float(fwd), rel=1e-5)


def test_rmse_vs_mean_spiky_and_flat():
    mask = torch.ones(1, 8, dtype=torch.bool)
    flat = torch.full((1, 8), 0.4)
    spiky = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.2, 0.0, 0.0, 0.0]])  # same mean 0.4
    assert aggregate(flat, mask, "rmse").item() == pytest.approx(aggregate(flat, mask, "mean").item(), rel=1e-5)
    assert aggregate(spiky, mask, "mean").item() == pytest.approx(0.4)
    assert aggregate(spiky, mask, "rmse").item() == pytest.approx(math.sqrt(3.2**2 / 8), rel=1e-5)
    assert aggregate(spiky, mask, "rmse") > aggregate(spiky, mask, "mean")
    assert aggregate(spiky, mask, "max").item() == pytest.approx(3.2)
    # masked positions are ignored
    m2 = torch.tensor([[True] * 4 + [False] * 4])
    assert aggregate(spiky, m2, "rmse").item() == pytest.approx(0.0, abs=1e-5)


def test_every_aggregation_ignores_masked_positions_row_by_row():
    """Rows of a batch with different real lengths: padding holding huge values never leaks in."""
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4, 99.0, 99.0], [1.0, 2.0, 99.0, 99.0, 99.0, 99.0], [99.0] * 6])
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4, [False] * 6])
    want = {
        "mean": [0.25, 1.5, 0.0],
        "rmse": [math.sqrt((0.01 + 0.04 + 0.09 + 0.16) / 4), math.sqrt(2.5), 0.0],
        "max": [0.4, 2.0, 0.0],
        "p95": [float(torch.quantile(torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.95)), 1.95, 0.0],
    }
    for agg, values in want.items():
        assert aggregate(kl, mask, agg).tolist() == pytest.approx(values, abs=1e-5), agg


def test_kl_of_model_with_itself_is_zero(tiny):
    rows = encode_rows(tiny.tokenizer, recs(4), 256)
    b = make_batch(rows, [0, 1, 2, 3], tiny.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp = completion_logp(tiny.model, b)
    for d in ("kl_rev", "kl_fwd"):
        assert kl_per_position(lp, lp, d).abs().max().item() < 1e-6


def _lora_grads(pm, b, ref, cfg):
    pm.zero_grad(set_to_none=True)
    loss, _, d = batch_terms(pm, b, ref, cfg)
    loss.backward()
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}, d


def test_barrier_below_tau_gives_nll_gradient(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    rows = encode_rows(lm.tokenizer, recs(4), 256)
    b = make_batch(rows, [0, 1, 2, 3], lm.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ref = completion_logp(lm.model, b)
    pm, _ = attach_lora(lm.model, tiny_cfg())
    torch.manual_seed(1)
    with torch.no_grad():  # move the student away from the reference so D > 0
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    g_nll, _ = _lora_grads(pm, b, None, tiny_cfg(reg="nll"))
    g_low, d = _lora_grads(pm, b, ref, tiny_cfg(tau=1e6, lam=0.3))
    assert (d > 1e-4).all()
    for n in g_nll:
        assert torch.allclose(g_nll[n], g_low[n], atol=1e-7)
    g_on, d = _lora_grads(pm, b, ref, tiny_cfg(tau=0.0, lam=0.3))
    assert any(not torch.allclose(g_nll[n], g_on[n], atol=1e-6) for n in g_nll)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("reg,agg,cache", [("kl_rev", "rmse", 2.0), ("kl_fwd", "p95", 0.0), ("nll", "mean", 2.0)])
def test_heal_lowers_nll_and_round_trips(tiny_model_dir, tmp_path, reg, agg, cache):
    from peft import PeftModel

    lm = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out = tmp_path / "adapter"
    s = heal(lm, recs(12), tiny_cfg(reg=reg, agg=agg, ref_cache_gb=cache, epochs=3), out)
    assert s["train_nll"] < s["train_nll_start"] - 0.1
    assert s["ref_cache"] == (reg != "nll" and cache > 0)
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "heal.json"} <= {
        p.name for p in out.iterdir()
    }
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == s["steps"] and {"loss", "fit", "D", "barrier_active", "lr"} <= set(log[0])
    assert json.loads((out / "heal.json").read_text())["data_sha256"] == s["data_sha256"]
    # heal leaves lm.model as it was: a plain model with the same weights
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # round trip: the saved adapter reproduces the trained model's NLL
    pm = PeftModel.from_pretrained(load_model(str(tiny_model_dir)).model, str(out)).eval()
    rows = encode_rows(lm.tokenizer, recs(12), 256)
    b = make_batch(rows, list(range(12)), lm.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        _, nll, _ = batch_terms(pm, b, None, tiny_cfg(reg="nll"))
    n_train, n_val = s["rows"]["train"], s["rows"]["val"]
    mix = (s["train_nll"] * n_train + s["val_nll"] * n_val) / 12  # all rows have the same length
    assert float(nll) == pytest.approx(mix, rel=1e-3)


def test_heal_merge_and_determinism(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    s1 = heal(lm, recs(8), tiny_cfg(epochs=1), tmp_path / "a")
    add_adapters(lm, [tmp_path / "a"])
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.adapters == [str(tmp_path / "a")]
    ref = load_model(str(tiny_model_dir), [str(tmp_path / "a")])
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, ref.model(ids).logits, atol=1e-5)
    s2 = heal(load_model(str(tiny_model_dir)), recs(8), tiny_cfg(epochs=1), tmp_path / "b")
    assert s1["train_nll"] == pytest.approx(s2["train_nll"], rel=1e-6)


def test_ref_base_with_history(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    heal(lm, recs(8), tiny_cfg(epochs=1, lr=2e-2), tmp_path / "r0")
    base = load_model(str(tiny_model_dir))
    s = heal(base, recs(8), tiny_cfg(epochs=1, ref="base"), tmp_path / "r1", history=[str(tmp_path / "r0")])
    assert s["history"] == [str(tmp_path / "r0")] and s["ref_cache"]
    assert base.adapters == [str(tmp_path / "r0")]
    with pytest.raises(SteerhealError, match="ref-cache-gb"):
        heal(
            load_model(str(tiny_model_dir)),
            recs(8),
            tiny_cfg(ref="base", ref_cache_gb=0.0),
            tmp_path / "r2",
            history=[str(tmp_path / "r0")],
        )
    assert not (tmp_path / "r2").exists()


# ---------------------------------------------------------------- refusals (CLI: exit 2, one line, nothing written)


def _cli_refuses(tmp_path, tiny_model_dir, records, *extra, match):
    data = tmp_path / "kept.jsonl"
    write_records(records, data)
    out = tmp_path / "adapter"
    r = CliRunner().invoke(
        app,
        [
            "heal",
            str(data),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--rank",
            "4",
            "--layers",
            "0:1",
            "--quiet",
            *extra,
        ],
    )
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and match in lines[0], r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]


def test_refuses_too_few_rows(tmp_path, tiny_model_dir):
    _cli_refuses(tmp_path, tiny_model_dir, recs(5), match="fewer than --min-rows 8")


def test_refuses_empty_completion(tmp_path, tiny_model_dir):
    rs = recs(10)
    rs[3].completion = "  "
    _cli_refuses(tmp_path, tiny_model_dir, rs, match="empty completion (first: r3)")


def test_refuses_nan_loss(tmp_path, tiny_model_dir):
    _cli_refuses(tmp_path, tiny_model_dir, recs(10), "--lr", "1e30", "--epochs", "3", match="loss is nan")


def test_cli_heal_writes_adapter(tmp_path, tiny_model_dir):
    data = tmp_path / "kept.jsonl"
    write_records(recs(8), data)
    r = CliRunner().invoke(
        app,
        [
            "heal",
            str(data),
            "-o",
            str(tmp_path / "ad"),
            "--model",
            str(tiny_model_dir),
            "--rank",
            "4",
            "--alpha",
            "8",
            "--layers",
            "0:1",
            "--epochs",
            "1",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ad" / "heal.json").read_text())
    assert s["config"]["rank"] == 4 and s["config"]["reg"] == "kl_rev"


# ---------------------------------------------------------------- bundled model


@pytest.mark.smoke
def test_smoke_bundled_heal_then_bake(tmp_path):
    from transformers import AutoModelForCausalLM

    from steerheal.bake import bake

    lm = load_model()
    rs = recs(8, completion="Rules earn respect only when they are just.")
    s = heal(lm, rs, HealConfig(rank=4, alpha=8, epochs=1, batch_size=4, max_len=64, layers="0.4:0.6"), tmp_path / "ad")
    assert math.isfinite(s["val_nll"]) and s["steps"] == 2
    bake(None, [tmp_path / "ad"], tmp_path / "baked")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "baked")
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = load_model(None, [str(tmp_path / "ad")], dtype="fp32")  # the bake is an fp32 merge
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref.model(ids).logits, atol=1e-4)


def test_heal_with_a_top_k_reference_cache(tiny_model_dir, tmp_path):
    """A top-16 cache is smaller than the full-vocabulary one, and its D is a close lower bound of it."""
    s = {}
    for k in (0, 16):
        lm = load_model(str(tiny_model_dir))
        s[k] = heal(lm, recs(12), tiny_cfg(ref_top_k=k, epochs=2), tmp_path / f"k{k}")
        assert (
            s[k]["ref_cache"] and json.loads((tmp_path / f"k{k}" / "heal.json").read_text())["config"]["ref_top_k"] == k
        )
    assert s[16]["ref_cache_gb"] < s[0]["ref_cache_gb"] / 10
    assert 0 < s[16]["val_D_mean"] <= s[0]["val_D_mean"] * 1.05


def test_cached_reference_equals_the_reference_recomputed_through_peft(tiny_model_dir):
    """The reference cached before the LoRA is attached is what the student's own model gives with its
    adapter disabled, after training has moved the adapter: both kinds of Reference agree."""
    from steerheal.heal import AdapterOffReference, CachedReference, reference_logprobs

    lm = load_model(str(tiny_model_dir))
    rows = encode_rows(lm.tokenizer, recs(6), 256)
    pad = lm.tokenizer.pad_token_id
    cache = reference_logprobs(lm.model, rows, pad, top_k=0)
    pm, _ = attach_lora(lm.model, tiny_cfg())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: the student now differs from the reference
    pm.train()
    cached, fly = CachedReference(cache, 0.0), AdapterOffReference(pm)
    b = make_batch(rows, [4, 0, 2], pad, torch.device("cpu"))
    want = fly.logprobs(b)
    got = cached.logprobs(b)
    assert torch.allclose(got, want, atol=1e-5)  # type: ignore[arg-type]
    assert pm.training  # recomputing left the student in train mode
    with torch.no_grad():
        student = completion_logp(pm, b)
    assert (student - want).abs().max() > 1e-3  # and the adapter is really on for the student


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, tmp_path):
    """heal.checkpoint recomputes activations in backward: the same losses and the same adapter."""
    from steerheal.models import decoder_layers

    calls = {}

    def counted(lm, key):  # forward calls of block 0's MLP (inside the checkpointed forward: recomputed)
        calls[key] = 0
        decoder_layers(lm.model)[0].mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__(key, calls[key] + 1))
        return lm

    a = heal(counted(load_model(str(tiny_model_dir)), "plain"), recs(8), tiny_cfg(epochs=1), tmp_path / "a")
    lm = counted(load_model(str(tiny_model_dir)), "checkpoint")
    b = heal(lm, recs(8), tiny_cfg(epochs=1, checkpoint=True), tmp_path / "b")
    assert calls["checkpoint"] == calls["plain"] + a["steps"]  # one micro-batch a step, recomputed in backward
    assert b["train_nll"] == pytest.approx(a["train_nll"], rel=1e-5) and b["val_D_rmse"] == pytest.approx(
        a["val_D_rmse"], rel=1e-4, abs=1e-7
    )
    new_name = hasattr(type(lm.model), "is_activation_checkpointing")  # transformers 5's name
    assert not getattr(lm.model, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing")


def test_two_ddp_processes_heal_the_adapter_one_process_heals(tmp_path, tiny_model_dir):
    """`accelerate launch` with 2 CPU processes (gloo): each takes half of every step's micro-batches and the
    gradients are summed, so the adapter is the one a single process trains with the same global batch
    (2 micro-batches of 2 per step). A sum of two halves is the sum either way, so it matches exactly."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from steerheal.heal import accelerate_launch

    data = tmp_path / "kept.jsonl"
    write_records(recs(12), data)
    args = ["heal", str(data), "--model", str(tiny_model_dir), "--rank", "4", "--alpha", "8", "--epochs", "2"]
    args += ["--batch-size", "2", "--grad-accum", "2", "--val-frac", "0.2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "steerheal.cli", *args, "-o", str(tmp_path / "one")], env=env)
    launch = accelerate_launch(2)  # --multi_gpu: accelerate's torchrun launcher, CPUs included
    two = subprocess.run([*launch, "-m", "steerheal.cli", *args, "-o", str(tmp_path / "two")], env=env)
    assert one.returncode == 0 and two.returncode == 0
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # it trained
    logs = [(tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("one", "two")]
    steps = [[json.loads(x) for x in rows] for rows in logs]
    assert len(steps[0]) == len(steps[1]) and all(x["loss"] == pytest.approx(y["loss"]) for x, y in zip(*steps))


def test_two_sharded_processes_heal_the_adapter_one_process_heals(tmp_path, tiny_model_dir):
    """--processes 2 --shard: FSDP2 (fully_shard, gloo on 2 CPU processes) splits every weight, base and LoRA,
    over the processes, and the adapter is the single process's up to float rounding: FSDP sums the
    gradients itself, and the clipped norm (clipping every step here) is summed from the shards' (measured
    max difference 7.5e-9 on weights of 1e-3). heal.json's per-process parameter counts prove the sharding:
    a silent fall back to DDP would record none."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "kept.jsonl"
    write_records(recs(12), data)
    args = ["heal", str(data), "--model", str(tiny_model_dir), "--rank", "4", "--alpha", "8", "--epochs", "2"]
    args += ["--batch-size", "2", "--grad-accum", "2", "--val-frac", "0.2", "--max-grad-norm", "0.1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "steerheal.cli", *args]
    one = subprocess.run([*cli, "-o", str(tmp_path / "one")], env=env)
    two = subprocess.run([*cli, "-o", str(tmp_path / "two"), "--processes", "2", "--shard"], env=env)
    ddp = subprocess.run([*cli, "-o", str(tmp_path / "ddp"), "--processes", "2"], env=env)
    assert one.returncode == 0 and two.returncode == 0 and ddp.returncode == 0
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 1e-4 for k, v in b.items() if "lora_B" in k)  # it trained
    h1, h2 = (json.loads((tmp_path / d / "heal.json").read_text()) for d in ("one", "two"))
    # an odd number of micro-batches an epoch: each epoch's last step has one, and the second process runs a
    # zero-weight one to keep the collectives in step (else it would hang)
    assert math.ceil(h2["rows"]["train"] / 2) % 2 == 1
    # ... which heal.json's token passes leave out: DDP (no repeat) passes as many
    assert h2["tokens"] == json.loads((tmp_path / "ddp" / "heal.json").read_text())["tokens"]
    assert h2["val_nll"] == pytest.approx(h1["val_nll"], rel=1e-6) and "shard" not in h1
    s = h2["shard"]
    for whole, each in ((s["params"], s["params_per_process"]), (s["lora_params"], s["lora_per_process"])):
        assert len(each) == 2 and sum(each) == whole and all(abs(n - whole / 2) <= 0.05 * whole for n in each)


def test_the_launched_heal_passes_shard_on_and_shard_needs_processes(tmp_path, monkeypatch):
    """heal.shard reaches the launched heal (the loop's heal step launches through heal.launch); a sharded heal on
    one process is refused, by the CLI and by a run config, rather than run unsharded."""
    import subprocess

    from steerheal.config import parse_set, resolve_config
    from steerheal.heal import launch

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    for shard in (True, False):
        launch(tmp_path / "kept.jsonl", tmp_path / "ad", HealConfig(processes=2, shard=shard), "m", [], "fp32", "cpu")
    assert "--shard" in seen[0] and "--no-shard" not in seen[0] and "--no-shard" in seen[1]
    r = CliRunner().invoke(app, ["heal", str(tmp_path / "kept.jsonl"), "-o", str(tmp_path / "x"), "--shard"])
    assert r.exit_code == 2 and "--processes 2 or more" in r.output
    with pytest.raises(SteerhealError, match="heal.processes 2 or more"):
        resolve_config(None, parse_set(["heal.shard=true"]))
    from torch.distributed.fsdp import FSDPModule

    from steerheal.heal import check_processes

    check_processes(HealConfig(processes=2, grad_accum=2, shard=True))
    monkeypatch.delattr(FSDPModule, "set_force_sum_reduction_for_comms")  # an older torch's FSDP2
    with pytest.raises(SteerhealError, match="heal.shard needs torch 2.8 or newer"):
        check_processes(HealConfig(processes=2, grad_accum=2, shard=True))
    assert resolve_config(None, parse_set(["heal.shard=true", "heal.processes=2"])).heal.shard


def test_the_launched_heal_gets_every_setting_and_the_models_flags(tmp_path, monkeypatch):
    """heal.launch passes every heal setting on, and the model's flags (trust_remote_code was once dropped)."""
    import subprocess

    from steerheal.heal import launch

    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    cfg = HealConfig(processes=2, grad_accum=2, tau=0.2, checkpoint=True)
    launch(tmp_path / "kept.jsonl", tmp_path / "ad", cfg, "m", ["a0", "a1"], "bf16", "cpu", trust_remote_code=True)
    cmd = seen["cmd"]
    assert "--num_processes=2" in cmd and cmd[cmd.index("heal") + 1] == str(tmp_path / "kept.jsonl")
    for flag in ("--tau=0.2", "--grad-accum=2", "--checkpoint", "--model=m", "--adapter=a0", "--adapter=a1"):
        assert flag in cmd, flag
    assert (
        "--dtype=bf16" in cmd
        and "--trust-remote-code" in cmd
        and not any("processes" in c for c in cmd[cmd.index("heal") :])
    )


@pytest.mark.parametrize("shard", [False, True])
def test_a_nan_loss_on_two_processes_stops_both_with_one_line(tmp_path, tiny_model_dir, shard):
    """A non-finite loss on 2 processes (DDP, or sharded, where a process that broke off would leave the other
    waiting in a collective): every process stops at the same step, nothing is written, the launch ends (a
    hang would hit the timeout), and the user reads one line: the processes' error and the launch's log."""
    import subprocess
    import sys

    data = tmp_path / "kept.jsonl"
    write_records(recs(10), data)
    args = ["heal", str(data), "-o", str(tmp_path / "ad"), "--model", str(tiny_model_dir), "--rank", "4"]
    args += ["--lr", "1e30", "--epochs", "3", "--batch-size", "2", "--grad-accum", "2", "--processes", "2"]
    args += ["--shard"] if shard else []
    r = subprocess.run([sys.executable, "-m", "steerheal.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr  # the launcher's own report stays in its log
    said = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(said) == 1 and "the heal on 2 processes failed: step" in said[0] and "loss is nan" in said[0]
    launch_log = tmp_path / "ad.launch.log"
    assert str(launch_log) in said[0] and launch_log.read_text().count("loss is nan") == 2  # both, same step
    assert not (tmp_path / "ad").exists()
