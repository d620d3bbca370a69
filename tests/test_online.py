"""Online mode: a segment of sample → filter → one heal step per step is a round; it resumes after a kill
mid-segment to the same adapter, its reference trails the student as configured, and compute is counted."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN
from safetensors.torch import load_file

from steerheal import online
from steerheal.config import OnlineConfig, parse_set, resolve_config
from steerheal.loop import run_loop
from steerheal.models import TokenMeter


def _cfg(model_dir, *extra):
    over = [*TINY_RUN, "rounds=1", f"model={model_dir}", "online.enabled=true", "online.steps=3", "online.batch=4"]
    over.append("coherence_prompts=0")  # not what these tests are about; saves generation time
    return resolve_config(None, parse_set([*over, *extra]))


def _spy(monkeypatch, fail_at: int | None = None) -> list[dict]:
    """Record what each online step trains against (reference and student LoRA before the step); raise at
    step `fail_at`, as a kill there would leave it (the checkpoint is written after each step)."""
    calls: list[dict] = []
    real = online._train_step

    def spy(student, params, opt, ref, kept, seg):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        calls.append(
            {
                "ref": {n: t.clone() for n, t in ref.items()},
                "before": {n: p.detach().clone() for n, p in params.items()},
            }
        )
        calls[-1]["row"] = real(student, params, opt, ref, kept, seg)
        return calls[-1]["row"]

    monkeypatch.setattr(online, "_train_step", spy)
    return calls


def test_ref_step_trails_by_ref_every():
    assert [OnlineConfig(ref_every=2).ref_step(s) for s in range(5)] == [0, 0, 2, 2, 4]
    assert [OnlineConfig(ref_every=0).ref_step(s) for s in range(3)] == [0, 0, 0]


def check_reference(calls: list[dict], ref_every: int) -> None:
    """The reference each of 3 steps trained against, as online.ref_every says (ref_every 2 or 0)."""
    assert len(calls) == 3

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    assert not same(calls[2]["before"], calls[0]["before"])  # the student moved
    assert same(calls[1]["ref"], calls[0]["before"])  # within a window the reference stays put
    # at step 2 it catches up with the student (ref_every 2), or stays at the segment's start (0)
    assert same(calls[2]["ref"], calls[2]["before"] if ref_every == 2 else calls[0]["before"])
    # and the barrier reads those weights: D to the reference is ~0 exactly where it equals the student
    d = [c["row"]["D"] for c in calls]
    assert d[0] < 1e-4 and d[1] > 1e-4 and (d[2] < 1e-4 if ref_every == 2 else d[2] > 1e-4)


def test_the_reference_stays_at_the_segment_start_with_ref_every_0(tiny_model_dir, persona_file, tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    run_loop(persona_file, tmp_path / "run", _cfg(tiny_model_dir, "online.ref_every=0"))
    check_reference(calls, 0)


def test_a_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"fingerprint": "other", "step": 5}))
    assert online._load(tmp_path, {}, None, "mine")["step"] == 0


def test_online_resumes_after_a_kill_to_the_same_adapter(tiny_model_dir, persona_file, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, "online.ref_every=2", "heal.min_rows=100")
    whole = tmp_path / "whole"
    calls = _spy(monkeypatch)
    run_loop(persona_file, whole, cfg)
    check_reference(calls, 2)  # the reference catches up with the student every 2 steps
    monkeypatch.undo()

    _spy(monkeypatch, fail_at=2)  # killed during step 2: steps 0 and 1 are checkpointed
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_loop(persona_file, cut, cfg)
    state = json.loads((cut / "round_00" / "online" / "state.json").read_text())
    assert state["step"] == 2 and not (cut / "round_00" / "adapter").exists()
    assert any(k.startswith("exp_avg/") for k in load_file(cut / "round_00" / "online" / "state.safetensors"))
    monkeypatch.undo()
    run_loop(persona_file, cut, cfg)

    a = load_file(whole / "round_00" / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "round_00" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # it trained
    for rel in ("round_00/kept.jsonl", "round_00/rejected.jsonl"):
        assert (whole / rel).read_text() == (cut / rel).read_text()
    info = json.loads((cut / "round_00" / "round.json").read_text())
    heal = json.loads((cut / "round_00" / "adapter" / "heal.json").read_text())
    assert info["online"] and heal["steps"] == 3 and heal["sampled"] == 12
    assert info["tokens"]["trained"] > 0 and info["tokens"]["forward"] > info["tokens"]["trained"]
    # the steps run before the kill are counted: the same compute as the uninterrupted run
    assert info["tokens"] == json.loads((whole / "round_00" / "round.json").read_text())["tokens"]
    assert "fewer than heal.min_rows 100" in info["stop"]
    assert not (cut / "round_00" / "online").exists()  # the checkpoint goes once the adapter is written
    assert (cut / "report.md").is_file()


def test_token_meter_counts_forwards_and_training(tiny):
    model = tiny.model
    meter = TokenMeter(model)
    ids = torch.ones(2, 5, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids)
        assert meter.totals() == {"forward": 10, "trained": 0}
        model(input_ids=ids[:, :3])  # under autograd: counted as trained too
        assert meter.totals() == {"forward": 16, "trained": 6}
    finally:
        meter.close()
    model(input_ids=ids)
    assert meter.totals()["forward"] == 16
