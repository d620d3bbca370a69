"""The loop on the tiny model: end to end, config handling, and resume after a real SIGKILL."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_cli
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
