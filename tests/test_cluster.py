"""compare on a scheduler (cluster.py): every (arm, seed) a submitit job, the same results as one process."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import TINY_RUN

from steerheal.compare import run_compare
from steerheal.config import parse_set, resolve_config

pytest.importorskip("submitit")

# fp32 named: the jobs' processes see the CPU's own flags (auto: bf16 here), the suite's process none
SETS = [*TINY_RUN, "rounds=1", "seeds=0,1", "coherence_prompts=0", "dtype=fp32"]


def _summary(path):
    """compare.json without what may differ between executors: the seeds' wall time, and the executor."""
    s = json.loads(path.read_text())
    s.pop("seed_cost_s")
    for p in [s, *s["protocols"].values()]:
        for arm in p["arms"].values():
            arm.pop("config", None)
    return s


def test_jobs_on_the_local_executor_give_the_sequential_compare(tiny_model_dir, persona_file, tmp_path, one_thread):
    """2 arms x 2 seeds as four jobs in parallel processes (one thread each), and the random null as a job after
    them, write the compare.json that one process running them in order writes: the job order does not
    matter, the baselines are computed once."""
    cfg = resolve_config(None, parse_set([*SETS, f"model={tiny_model_dir}"]))
    run_compare(persona_file, tmp_path / "seq", cfg, ["steer", "prompt"], null_k=2)
    jobs = resolve_config(
        None,
        parse_set(
            [*SETS, f"model={tiny_model_dir}", "executor.kind=submitit", "executor.cluster=local", "executor.threads=1"]
        ),
    )
    run_compare(persona_file, tmp_path / "jobs", jobs, ["steer", "prompt"], null_k=2)
    assert _summary(tmp_path / "jobs" / "compare.json") == _summary(tmp_path / "seq" / "compare.json")
    assert json.loads((tmp_path / "jobs" / "null.json").read_text())["k"] == 2
    # the baselines job, four unit jobs and the null's; every unit adopted the baselines computed before them
    assert len(list((tmp_path / "jobs" / "jobs").glob("*_result.pkl"))) == 6
    for arm in ("steer", "prompt"):
        for s in (0, 1):
            steps = json.loads((tmp_path / "jobs" / arm / f"seed_{s}" / "manifest.json").read_text())["steps"]
            assert (arm, s) == ("steer", 0) or steps["baselines/base"]["shared_from"] == str(
                tmp_path / "jobs" / "steer" / "seed_0"
            )


def test_slurm_gets_one_array_job_with_the_resources_asked_for(tiny_model_dir, persona_file, tmp_path, monkeypatch):
    """The submissions submitit sends to Slurm, recorded by a stand-in sbatch: the baselines job, one array of
    the four units (at most 2 at once) once it has succeeded, and the null once the array has, each on the
    partition and with the GPUs and time asked for, each running steerheal's job."""
    from steerheal.cluster import Job, Unit
    from steerheal.compare import null_step, submit_units

    bin_dir, record, count = tmp_path / "bin", tmp_path / "sbatch.txt", tmp_path / "last_id"
    bin_dir.mkdir()
    # a new job id per submission (4242, 4243, ...), so each dependency names the job it waits on
    sbatch = f'n=$(cat {count} 2>/dev/null || echo 4241); n=$((n+1)); echo $n > {count}\ncat "$1" >> {record}\necho "Submitted batch job $n"'
    for name, body in (("sbatch", sbatch), ("srun", "exit 0")):
        tool = bin_dir / name  # submitit checks for srun before it submits
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    over = ["executor.kind=submitit", "executor.partition=gpu", "executor.gpus_per_job=1", "executor.wait=false"]
    cfg = resolve_config(None, parse_set([*SETS, f"model={tiny_model_dir}", *over, "executor.array_parallelism=2"]))
    cfg.executor.timeout_min = 90
    units = [
        Unit(str(persona_file), str(tmp_path / a), cfg, s, False, None) for s in (0, 1) for a in ("steer", "prompt")
    ]
    null = Job("the random null", null_step, (str(tmp_path), cfg, 3))
    jobs = submit_units(units, None, null, cfg, tmp_path / "jobs")
    base, array, last = record.read_text().split("#!/bin/bash")[1:]  # the baselines, the units, the null
    assert [j.job_id for j in jobs] == ["4242", *(f"4243_{i}" for i in range(4)), "4244"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=90"):
        assert line in base and line in array and line in last, line
    assert "#SBATCH --array=0-3%2" in array and "--array" not in base + last
    assert "--dependency" not in base
    assert "#SBATCH --dependency=afterok:4242\n" in array  # the units wait on the baselines job
    assert "#SBATCH --dependency=afterok:4243\n" in last  # the null on the whole array
    assert "#SBATCH --kill-on-invalid-dep=yes" in array and "#SBATCH --kill-on-invalid-dep=yes" in last
    assert all("submitit.core._submit" in s for s in (base, array, last))


def test_a_failed_job_is_named_and_the_same_command_resumes_it(tiny_model_dir, persona_file, tmp_path, one_thread):
    """A unit whose job fails (here: its directory holds another run's config, which the resume check
    refuses) is named in one error; the other units finish. Run again once the cause is gone, only the
    failed unit runs: the finished ones are not redone."""
    from steerheal import SteerhealError

    sets = [*SETS, f"model={tiny_model_dir}", "executor.kind=submitit", "executor.cluster=local", "executor.threads=1"]
    cfg = resolve_config(None, parse_set(sets))
    out = tmp_path / "cmp"
    bad = out / "prompt" / "seed_1"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("config: {rounds: 7}\n")
    with pytest.raises(SteerhealError, match=r"1 of 4 jobs failed: prompt/seed_1 .*Run the same command again"):
        run_compare(persona_file, out, cfg, ["steer", "prompt"], null_k=0)
    done = {u: (out / u / "manifest.json").read_text() for u in ("steer/seed_0", "steer/seed_1", "prompt/seed_0")}
    (bad / "config.yaml").unlink()
    run_compare(persona_file, out, cfg, ["steer", "prompt"], null_k=0)
    assert {u: (out / u / "manifest.json").read_text() for u in done} == done  # not rerun
    assert (bad / "round_00" / "round.json").is_file() and (out / "compare.md").is_file()


@pytest.mark.parametrize(
    "sets, says",
    [
        (["executor.array_parallelism=0"], "at least 1"),
        (["executor.cluster=local", "executor.wait=false"], "needs Slurm"),
        (["heal.processes=2", "arm=prompt-kl"], "heal.processes 2"),
        (["heal.processes=2", "heal.grad_accum=3"], "multiple of 2"),
    ],
)
def test_executor_and_process_settings_that_cannot_work_are_refused(sets, says):
    from steerheal import SteerhealError
    from steerheal.heal import check_processes

    with pytest.raises(SteerhealError, match=says):
        cfg = resolve_config(None, parse_set(["executor.kind=submitit", *sets]))
        check_processes(cfg.heal)


def test_compare_checks_each_arms_own_config(tmp_path, persona_file):
    """A rule that holds for one arm only (no DDP heal for prompt-kl) is checked per arm, before anything runs."""
    from steerheal import SteerhealError

    cfg = resolve_config(None, parse_set([*SETS, "heal.processes=2", "heal.grad_accum=2"]))
    with pytest.raises(SteerhealError, match="prompt-kl"):
        run_compare(persona_file, tmp_path / "c", cfg, ["steer", "prompt-kl"], null_k=0)
    assert not (tmp_path / "c" / "steer").exists()


def test_slurm_missing_is_one_line(tmp_path, persona_file, monkeypatch):
    """No sbatch on this machine: the submission fails with one line that says what to do."""
    from steerheal import SteerhealError
    from steerheal.cluster import Unit
    from steerheal.compare import submit_units

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # submitit looks for srun first; sbatch stays missing
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    cfg = resolve_config(None, parse_set([*SETS, "executor.kind=submitit"]))
    with pytest.raises(SteerhealError, match="submitting to slurm failed"):
        submit_units([Unit(str(persona_file), str(tmp_path / "steer"), cfg, 0, False, None)], None, None, cfg, tmp_path)
