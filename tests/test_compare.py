"""compare: every arm a resumable loop, the random null, one report; resumes after a real SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import tiny_cli

from steerheal.compare import place

TINY = tiny_cli("rounds=1")


def test_place_in_the_null():
    null = [float(x) for x in range(100)]
    p = place(120.0, null)
    assert p["percentile"] == 100 and p["outside"] and p["z"] > 1.5
    q = place(50.0, null)
    assert 49 <= q["percentile"] <= 51 and not q["outside"] and abs(q["z"]) < 0.1
    low = place(-20.0, null)  # far the wrong way: outside, but not persona-specific
    assert low["outside"] and not low["above"] and p["above"]


def test_compare_runs_arms_resumes_after_sigkill_and_reports(tiny_model_dir, persona_file, tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "-m",
        "steerheal.cli",
        "compare",
        str(persona_file),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--arms",
        "steer,random,prompt",
        "--null-k",
        "3",
        *TINY,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "random" / "manifest.json"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # kill once the second arm has started
        if manifest.is_file() and "baselines/base" in json.loads(manifest.read_text())["steps"]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL
    steer_steps = json.loads((out / "steer" / "manifest.json").read_text())["steps"]
    assert "round_00/done" in steer_steps and not (out / "compare.md").exists()

    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "steer" / "manifest.json").read_text())["steps"] == steer_steps  # not rerun
    assert "[round 1/1] vector" in r.stderr  # the killed arm went on
    for arm in ("random", "prompt"):  # the baselines were computed once, by the first arm
        base = json.loads((out / arm / "manifest.json").read_text())["steps"]["baselines/base"]
        assert base["shared_from"] == str(out / "steer")
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["arms"]) == {"steer", "random", "prompt"} and len(summary["null"]["draws"]) == 3
    assert "null_raw" in summary["arms"]["steer"] and "steer_minus_arm" in summary["arms"]["random"]
    md = (out / "compare.md").read_text()
    assert "| random | 0 | healed |" in md and "random null" in md.lower() and (out / "compare.png").is_file()
