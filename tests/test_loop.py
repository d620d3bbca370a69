"""The loop on the tiny model: end to end, config handling, and resume after a real SIGKILL."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_RUN, tiny_cli
from safetensors.torch import load_file

from steerheal import SteerhealError
from steerheal.config import parse_set, resolve_config

TINY = tiny_cli("rounds=2")


def _cmd(model_dir, persona, out):
    return [
        sys.executable,
        "-m",
        "steerheal.cli",
        "loop",
        str(persona),
        "-o",
        str(out),
        "--model",
        str(model_dir),
        *TINY,
    ]


def _loop(model_dir, persona, out):
    return subprocess.run(_cmd(model_dir, persona, out), capture_output=True, text=True)


def _loop_killed_after(model_dir, persona, out, step):
    """Start the loop and SIGKILL it as soon as the manifest records `step`: a real kill, mid-run."""
    proc = subprocess.Popen(_cmd(model_dir, persona, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if manifest.is_file() and step in json.loads(manifest.read_text())["steps"]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait()


def _text(run_dir, rel):
    return (run_dir / rel).read_text().replace(str(run_dir), "RUN")


def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if k not in ("time_s", "at")}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def test_parse_set_and_resolve():
    assert parse_set(["heal.lam=0.5", "generate.n=64", "eval.vignettes=x.jsonl"]) == {
        "heal": {"lam": 0.5},
        "generate": {"n": 64},
        "eval": {"vignettes": "x.jsonl"},
    }
    cfg = resolve_config(None, parse_set(["filter.max_ppl=1e9"]))
    assert cfg.filter.max_ppl == 1e9 and cfg.rounds == 2
    assert resolve_config("full", {}).heal.rank == 32
    with pytest.raises(SteerhealError, match="unknown config key nope"):
        resolve_config(None, {"nope": 1})
    with pytest.raises(SteerhealError, match="unknown config key heal.rnk; did you mean rank"):
        resolve_config(None, {"heal": {"rnk": 4}})
    with pytest.raises(SteerhealError, match="KEY=VALUE"):
        parse_set(["lam"])


def test_loop_resumes_after_sigkill_to_the_same_result(tiny_model_dir, tmp_path):
    persona = "personas/anti_authority.yaml"
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _loop(tiny_model_dir, persona, full)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in (
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "trajectory.png",
        "report.md",
        "baselines/base.json",
        "baselines/prompt.json",
        "round_01/adapter/adapter_model.safetensors",
        "round_01/kept.jsonl",
        "round_01/eval_healed.json",
        "round_01/round.json",
    ):
        assert (full / f).is_file(), f
    report = (full / "report.md").read_text()
    assert "Q0 can we filter?" in report and "Beats prompting?" in report

    # killed for real in the middle of round 1 (after round 0's adapter exists), then resumed
    assert _loop_killed_after(tiny_model_dir, persona, killed, "round_01/generate") == -signal.SIGKILL
    done = json.loads((killed / "manifest.json").read_text())["steps"]
    assert "round_01/generate" in done and "round_01/done" not in done
    # A kill can land inside an atomic write and leave its temp beside the real file (never under the real
    # name: the manifest above parsed); the resume clears such temps.
    r = _loop(tiny_model_dir, persona, killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(killed.rglob("*.tmp"))
    assert "[round 1/2] vector" not in r.stderr  # finished steps were not redone

    for f in ("round_01/kept.jsonl", "round_01/eval_healed.json", "round_00/eval_steered.json", "baselines/base.json"):
        assert _text(killed, f) == _text(full, f), f
    metrics = lambda d: [
        _strip_times(json.loads(x.replace(str(d), "RUN"))) for x in (d / "metrics.jsonl").read_text().splitlines()
    ]  # noqa: E731
    assert metrics(killed) == metrics(full)
    a = load_file(str(full / "round_01/adapter/adapter_model.safetensors"))
    b = load_file(str(killed / "round_01/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # a changed config is refused with one line
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerheal.cli",
            "loop",
            persona,
            "-o",
            str(full),
            "--model",
            str(tiny_model_dir),
            *TINY,
            "--set",
            "generate.n=9",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "config changed" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_loop_filters_rows_and_stops_on_the_coherence_floor(tiny_model_dir, persona_file, tmp_path, monkeypatch):
    """The filter and the coherence stop switched on (TINY_RUN switches both off): every other completion
    is made a loop, which the repetition gate drops with its reason, the heal trains on the rest, and a
    floor above any coherence stops the loop after round 0 with the reason in round.json and the report."""
    import steerheal.loop as loop_mod
    from steerheal.records import read_records

    real = loop_mod.generate_records

    def forced(*a, **k):
        rows = real(*a, **k)
        for i, r in enumerate(rows):
            r.completion = "no no no no no no no no" if i % 2 else f"I would talk to my manager first, case {i}."
        return rows

    monkeypatch.setattr(loop_mod, "generate_records", forced)
    sets = [*TINY_RUN, "rounds=2", "filter.max_repetition=0.3", "filter.min_words=4", "pmass_floor=10"]
    cfg = resolve_config(None, parse_set([*sets, f"model={tiny_model_dir}"]))
    root = loop_mod.run_loop(persona_file, tmp_path / "run", cfg).root
    d = root / "round_00"
    kept, rejected = read_records(d / "kept.jsonl"), read_records(d / "rejected.jsonl")
    assert len(kept) == len(rejected) == 4
    assert all(r.drop_reasons == ["repetition"] for r in rejected) and all(not r.drop_reasons for r in kept)
    heal = json.loads((d / "adapter" / "heal.json").read_text())
    assert heal["rows"]["train"] + heal["rows"]["val"] == 4
    info = json.loads((d / "round.json").read_text())
    assert info["filter"]["reasons"] == {"repetition": 4} and info["below_floor"]
    assert "fell below the floor" in info["stop"] and not (root / "round_01").exists()
    assert "fell below the floor" in (root / "report.md").read_text()


def test_heal_alone_on_the_loops_kept_rows_gives_the_loops_adapter(tiny_model_dir, persona_file, tmp_path):
    """One set of defaults: `steerheal heal round_00/kept.jsonl` with no options but the keys the test run
    itself changed gives the loop's round-0 adapter, weight for weight (the loop's seed 0, round 0 heal)."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from steerheal.cli import app
    from steerheal.loop import run_loop

    cfg = resolve_config(None, parse_set([*TINY_RUN, "rounds=1", f"model={tiny_model_dir}"]))
    d = run_loop(persona_file, tmp_path / "run", cfg).root / "round_00"
    h = cfg.heal  # what TINY_RUN changed, as options; every other heal option keeps its default
    same = ["--rank", h.rank, "--alpha", h.alpha, "--epochs", h.epochs, "--min-rows", h.min_rows, "--lr", h.lr]
    args = ["heal", str(d / "kept.jsonl"), "-o", str(tmp_path / "alone"), "--model", str(tiny_model_dir)]
    r = CliRunner().invoke(app, [*args, *map(str, same), "--max-len", str(h.max_len), "--quiet"])
    assert r.exit_code == 0, r.output
    loop_w = load_file(d / "adapter" / "adapter_model.safetensors")
    alone = load_file(tmp_path / "alone" / "adapter_model.safetensors")
    assert loop_w.keys() == alone.keys() and all(torch.equal(loop_w[k], alone[k]) for k in loop_w)
    assert any(float(v.abs().max()) > 0 for k, v in alone.items() if "lora_B" in k)  # it trained


def test_the_loop_heals_on_two_processes_as_on_one(tiny_model_dir, persona_file, tmp_path):
    """heal.processes 2: the loop launches its heal under accelerate (DDP, 2 CPU processes) and gets the
    adapter its own process trains (the global batch the same: micro-batches of 2, two per step); with
    heal.shard too (FSDP2), the same adapter up to float rounding, each process holding half the weights."""
    from steerheal.loop import run_loop

    sets = [*TINY_RUN, "rounds=1", f"model={tiny_model_dir}", "heal.batch_size=2", "heal.grad_accum=2"]
    out = {}
    for name, extra in (("one", []), ("ddp", ["heal.processes=2"]), ("shard", ["heal.processes=2", "heal.shard=true"])):
        cfg = resolve_config(None, parse_set([*sets, *extra]))
        out[name] = run_loop(persona_file, tmp_path / name, cfg).root / "round_00" / "adapter"
    a, b, c = (load_file(d / "adapter_model.safetensors") for d in out.values())
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], c[k], rtol=0, atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in c.items() if "lora_B" in k)  # it trained
    shard = json.loads((out["shard"] / "heal.json").read_text())["shard"]
    each, whole = shard["params_per_process"], shard["params"]
    assert len(each) == 2 and sum(each) == whole and min(each) > 0.45 * whole
    # the launched heal counts its own token passes (the parent's meter sees none): the same trained tokens
    trained = [json.loads((d.parent / "round.json").read_text())["tokens"]["trained"] for d in out.values()]
    assert trained[0] == trained[1] == trained[2] > 0
    with pytest.raises(SteerhealError, match="heal.processes 2"):
        resolve_config(None, parse_set([*sets, "heal.processes=2", "arm=prompt-kl"]))
