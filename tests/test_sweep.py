"""sweep: raw steering over bands × coefficients against a norm-matched random null, and prompt strength."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import TINY_RUN, tiny_cli

from steerheal.sweep import most_specific, specificity


def _pt(shift: float, pmass: float = 1.0, sel: float = 0.0) -> dict:
    return {"target_shift": shift, "pmass_ratio": pmass, "selectivity": sel}


def test_specificity_places_the_real_shift_in_the_null():
    s = specificity(_pt(3.0), [_pt(0.0), _pt(1.0), _pt(2.0)])
    assert s["z"] == 2.0 and s["beyond_null"] and s["null_range"] == [0.0, 2.0]
    inside = specificity(_pt(1.5), [_pt(0.0), _pt(1.0), _pt(2.0)])
    assert not inside["beyond_null"] and 0 < inside["z"] < 1
    assert math.isnan(specificity(_pt(1.0), [])["z"])


def test_specificity_places_selectivity_too():
    """A random push toward a default answer can move the target as far as the real vector (the sweep found
    one draw at selectivity +0.81 where the real vector had +0.52): selectivity is placed in the null apart."""
    s = specificity(_pt(3.0, sel=0.5), [_pt(0.0, sel=0.8), _pt(1.0, sel=0.2), _pt(2.0, sel=-0.4)])
    assert s["beyond_null"] and not s["selectivity"]["beyond_null"]
    assert s["selectivity"]["null_range"] == [-0.4, 0.8] and 0 < s["selectivity"]["z"] < 1


def test_most_specific_skips_incoherent_points():
    def point(c, shift, pmass, z):
        return {"coeff": c, "real": _pt(shift, pmass), "z": z, "beyond_null": z > 2}

    s = {
        "bands": {
            "a": {"points": [point(2, 0.5, 0.9, 1.0), point(8, 3.0, 0.2, 9.0)]},
            "b": {"points": [point(4, 1.0, 0.8, 3.0)]},
        }
    }
    best = most_specific(s)
    assert best is not None and (best["band"], best["coeff"]) == ("b", 4)  # the z = 9 point has lost coherence


def test_sweep_on_the_tiny_model_resumes_and_reports(tiny_model_dir, persona_file, tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "steerheal.cli", "sweep", str(persona_file), "-o", str(out), "--model",
        str(tiny_model_dir), "--bands", "0.25:0.5,0.5:0.75", "--coeffs", "2,8", "--null-k", "2", *tiny_cli(),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "sweep.json").read_text())
    assert list(s["bands"]) == ["0.25:0.5", "0.5:0.75"] and set(s["prompt"]) == {"none", "first", "all"}
    for b in s["bands"].values():
        assert [p["coeff"] for p in b["points"]] == [2.0, 8.0]
        for p in b["points"]:
            assert len(p["null"]) == 2 and p["real"]["target_shift"] not in [d["target_shift"] for d in p["null"]]
            assert p["real"]["target_shift_ci"][0] <= p["real"]["target_shift"] <= p["real"]["target_shift_ci"][1]
    md = (out / "sweep.md").read_text()
    assert "| 0.5:0.75 | 8 |" in md and "all pos prompt(s)" in md and (out / "sweep.png").is_file()
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert len(steps) == 1 + 2 + 2 * (1 + 2 * 3)  # base, 2 prompts, per band: vector + 2 coeffs × (real + 2 random)
    r2 = subprocess.run(cmd, capture_output=True, text=True)
    assert r2.returncode == 0 and json.loads((out / "manifest.json").read_text())["steps"] == steps  # nothing redone
    (out / "sweep.json").unlink()
    r3 = subprocess.run([*cmd, "--report-only", "--model", str(out / "no_such_model")], capture_output=True, text=True)
    assert r3.returncode == 0 and json.loads((out / "sweep.json").read_text()) == s  # no model needed


def test_sweep_points_as_jobs_give_the_sequential_sweep_and_report_without_a_model(
    tiny_model_dir, persona_file, tmp_path, one_thread, monkeypatch
):
    """executor submitit (local processes, one thread each): the shared steps as one job, then a job per
    (band, coefficient), all marking one manifest; sweep.json equals the one process's. Run again in this
    process, a finished sweep writes its report without loading a model."""
    pytest.importorskip("submitit")
    import steerheal.sweep as sweep_mod
    from steerheal.config import parse_set, resolve_config

    sets = [*TINY_RUN, f"model={tiny_model_dir}", "dtype=fp32"]  # the jobs' processes see the CPU's flags
    args = (["0.25:0.5", "0.5:0.75"], [2.0, 8.0], 2)
    sweep_mod.run_sweep(persona_file, tmp_path / "seq", resolve_config(None, parse_set(sets)), *args)
    jobs = ["executor.kind=submitit", "executor.cluster=local", "executor.threads=1", "executor.array_parallelism=2"]
    cfg = resolve_config(None, parse_set([*sets, *jobs]))
    sweep_mod.run_sweep(persona_file, tmp_path / "jobs", cfg, *args)
    seq, par = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("seq", "jobs"))
    assert par == seq
    assert len(list((tmp_path / "jobs" / "jobs").glob("*_result.pkl"))) == 1 + 4  # shared steps, 4 points
    manifest = json.loads((tmp_path / "jobs" / "manifest.json").read_text())["steps"]
    assert len(manifest) == 1 + 2 + 2 * (1 + 2 * 3)  # every job's steps, none lost to another's write

    def no_model(*a, **k):
        raise AssertionError("a finished sweep loaded a model")

    monkeypatch.setattr(sweep_mod, "load_model", no_model)
    (tmp_path / "jobs" / "sweep.md").unlink()
    sweep_mod.run_sweep(persona_file, tmp_path / "jobs", resolve_config(None, parse_set(sets)), *args)  # here
    assert (tmp_path / "jobs" / "sweep.md").is_file()


def test_an_unfinished_sweep_names_what_is_missing(tiny_model_dir, persona_file, tmp_path):
    from steerheal import SteerhealError
    from steerheal.config import parse_set, resolve_config
    from steerheal.sweep import run_sweep

    cfg = resolve_config(None, parse_set([*TINY_RUN, f"model={tiny_model_dir}"]))
    with pytest.raises(SteerhealError, match=r"13 of the sweep's 13 evals are unfinished \(first: base\)"):
        run_sweep(persona_file, tmp_path, cfg, ["0.25:0.5"], [2.0, 8.0], 4, report_only=True)
    assert not (tmp_path / "manifest.json").exists()  # --report-only ran nothing


def test_a_sweep_resumed_with_other_eval_settings_is_refused(tiny_model_dir, persona_file, tmp_path):
    """config.yaml records what every eval of a sweep shares (model, vector, eval; the vignettes, weights and
    dtype): a resume with other eval settings or another dtype is refused before anything runs, unless
    --force; more coefficients are a resume."""
    from steerheal import SteerhealError
    from steerheal.config import parse_set, resolve_config
    from steerheal.sweep import run_sweep

    sets = [*TINY_RUN, f"model={tiny_model_dir}", "dtype=fp32"]
    run_sweep(persona_file, tmp_path, resolve_config(None, parse_set(sets)), ["0.25:0.5"], [2.0], 0)
    steps = json.loads((tmp_path / "manifest.json").read_text())["steps"]
    for change, says in ((["eval.limit=5"], r"config changed \(eval\)"), (["dtype=bf16"], "dtype changed")):
        with pytest.raises(SteerhealError, match=says):
            run_sweep(persona_file, tmp_path, resolve_config(None, parse_set([*sets, *change])), ["0.25:0.5"], [2.0], 0)
        assert json.loads((tmp_path / "manifest.json").read_text())["steps"] == steps  # nothing ran
    cfg = resolve_config(None, parse_set([*sets, "heal.lr=1e-3"]))  # a setting no sweep eval reads
    run_sweep(persona_file, tmp_path, cfg, ["0.25:0.5"], [2.0, 4.0], 0)  # and one more coefficient
    assert "band_0.25:0.5/c4_real" in json.loads((tmp_path / "manifest.json").read_text())["steps"]
    run_sweep(
        persona_file,
        tmp_path,
        resolve_config(None, parse_set([*sets, "eval.limit=5"])),
        ["0.25:0.5"],
        [2.0],
        0,
        force=True,
    )
