"""The loop on the tiny model: end to end, config handling, and resume after a real SIGKILL."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from steerheal import SteerhealError
from steerheal.loop import parse_set, resolve_config

TINY = ["--set", "rounds=2", "--set", "extract_max_prompts=3", "--set", "probe_n=4", "--set", "bisect_steps=1",
        "--set", "n=8", "--set", "max_new_tokens=6", "--set", "demo_max_new_tokens=4", "--set", "pmass_floor=0",
        "--set", "filter.max_ppl=1e9", "--set", "filter.max_repetition=1.01", "--set", "filter.min_words=0",
        "--set", "heal.rank=4", "--set", "heal.alpha=8", "--set", "heal.epochs=1", "--set", "heal.min_rows=4",
        "--set", "heal.max_len=256", "--set", "heal.lr=1e-2", "--set", "eval.limit=7"]


def _loop(model_dir, persona, out, kill_after=None):
    env = {**os.environ}
    if kill_after:
        env["STEERHEAL_TEST_KILL_AFTER"] = kill_after
    return subprocess.run([sys.executable, "-m", "steerheal.cli", "loop", str(persona), "-o", str(out),
                           "--model", str(model_dir), *TINY], capture_output=True, text=True, env=env)


def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if k not in ("time_s", "at")}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def test_parse_set_and_resolve():
    assert parse_set(["heal.lam=0.5", "n=64", "eval.vignettes=x.jsonl"]) == {
        "heal": {"lam": 0.5}, "n": 64, "eval": {"vignettes": "x.jsonl"}}
    cfg = resolve_config(None, parse_set(["filter.max_ppl=1e9"]))
    assert cfg["filter"]["max_ppl"] == 1e9 and cfg["rounds"] == 2
    assert resolve_config("full", {})["heal"]["rank"] == 32
    with pytest.raises(SteerhealError, match="unknown config key"):
        resolve_config(None, {"nope": 1})
    with pytest.raises(SteerhealError, match="unknown heal option"):
        resolve_config(None, {"heal": {"rnk": 4}})
    with pytest.raises(SteerhealError, match="KEY=VALUE"):
        parse_set(["lam"])


def test_loop_resumes_after_sigkill_to_the_same_result(tiny_model_dir, tmp_path):
    persona = "personas/anti_authority.yaml"
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _loop(tiny_model_dir, persona, full)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("config.yaml", "manifest.json", "metrics.jsonl", "trajectory.png", "report.md",
              "baselines/base.json", "baselines/prompt.json", "round_01/adapter/adapter_model.safetensors",
              "round_01/kept.jsonl", "round_01/eval_healed.json", "round_01/round.json"):
        assert (full / f).is_file(), f
    report = (full / "report.md").read_text()
    assert "Q0 can we filter?" in report and "Beats prompting?" in report

    # killed for real in the middle of round 1 (after round 0's adapter exists), then resumed
    r = _loop(tiny_model_dir, persona, killed, kill_after="round_01/generate")
    assert r.returncode == -9
    done = json.loads((killed / "manifest.json").read_text())["steps"]
    assert "round_01/generate" in done and "round_01/filter" not in done
    assert not list(killed.rglob("*.tmp"))  # nothing half-written
    r = _loop(tiny_model_dir, persona, killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[round 1/2] vector" not in r.stderr  # finished steps were not redone

    for f in ("round_01/kept.jsonl", "round_01/eval_healed.json", "round_01/eval_steered.json", "baselines/base.json"):
        same = lambda d: (d / f).read_text().replace(str(d), "RUN")  # noqa: E731
        assert same(killed) == same(full), f
    metrics = lambda d: [_strip_times(json.loads(x.replace(str(d), "RUN"))) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert metrics(killed) == metrics(full)
    a = load_file(str(full / "round_01/adapter/adapter_model.safetensors"))
    b = load_file(str(killed / "round_01/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # a changed config is refused with one line
    r = subprocess.run([sys.executable, "-m", "steerheal.cli", "loop", persona, "-o", str(full), "--model",
                        str(tiny_model_dir), *TINY, "--set", "n=9"], capture_output=True, text=True)
    assert r.returncode == 2 and "config changed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
