"""compare's units (one arm, one seed) as jobs on a scheduler, through submitit: Slurm on a cluster, or a
process per job on this machine (executor.cluster local).

A job is the same call the local executor makes (loop.run_loop or run_seed) into the same run directory,
so its resume rules are the loop's: a job that dies is resubmitted by running the same command again,
and it starts at its first unfinished step. The baselines are computed once, before the jobs, and
adopted by each; the null and the report come after them, in the submitting process.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import SteerhealError
from .config import ExecutorConfig, RunConfig
from .progress import log


@dataclass
class Unit:
    """One arm at one seed (None: a run without seeds), with everything its job needs."""

    persona: str
    arm_root: str  # the arm's directory; the seed's is arm_root/seed_S
    cfg: RunConfig  # the arm's config
    seed: int | None
    force: bool
    shared: str | None  # the run whose baselines it adopts

    @property
    def name(self) -> str:
        return f"{Path(self.arm_root).name}" + ("" if self.seed is None else f"/seed_{self.seed}")

    def run(self) -> tuple[Path, RunConfig]:
        """Its run directory and the config it runs with (loop.seed_run for a seed)."""
        from .loop import seed_run

        return (Path(self.arm_root), self.cfg) if self.seed is None else seed_run(self.arm_root, self.cfg, self.seed)


def run_unit(unit: Unit, threads: int | None = None) -> str:
    """A job: the unit's loop, resumed where it stopped. Returns its run directory."""
    from .loop import run_loop

    _threads(threads)
    shared = Path(unit.shared) if unit.shared else None
    return str(run_loop(unit.persona, *unit.run(), unit.force, shared).root)


def run_unit_baselines(unit: Unit, threads: int | None = None) -> str:
    """A job: the baselines every unit adopts, computed once in the first unit's directory (or adopted there
    from an earlier run of the same comparison, unit.shared)."""
    from .loop import run_baselines

    _threads(threads)
    return str(run_baselines(unit.persona, *unit.run(), unit.force, Path(unit.shared) if unit.shared else None))


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def submit(units: list[Unit], ex: ExecutorConfig, folder: Path) -> list[Any]:
    """A job for the shared baselines, then one array with a job per unit, which adopt them (on the same kind
    of node, so in the same dtype). Waits for the jobs when ex.wait; else Slurm starts the array once the
    baselines job has succeeded. Logs and job files go to folder."""
    try:
        import submitit
    except ImportError:
        raise SteerhealError(
            "executor.kind submitit needs submitit: pip install 'steerheal[cluster]' (or executor.kind local)"
        ) from None
    executor = submitit.AutoExecutor(folder=folder, cluster=ex.cluster)
    params: dict[str, Any] = {"name": "steerheal", "timeout_min": ex.timeout_min, "gpus_per_node": ex.gpus_per_job}
    if ex.cluster == "slurm":
        params |= {"slurm_partition": ex.partition} if ex.partition else {}
        params |= {"cpus_per_task": ex.cpus_per_job} if ex.cpus_per_job else {}
    executor.update_parameters(**params)
    first = units[0]
    try:
        base = executor.submit(run_unit_baselines, first, ex.threads)
    except (OSError, subprocess.CalledProcessError) as e:  # no sbatch here, or Slurm refused the job
        raise SteerhealError(
            f"submitting to {ex.cluster} failed: {str(e).strip().splitlines()[-1][:300]}; check executor.partition "
            "and the other executor settings, or use --set executor.cluster=local / --executor local"
        ) from None
    log(f"submitted the baselines job {base.job_id} ({ex.cluster}); logs in {folder}")
    if ex.wait:
        _results(folder, [(f"baselines in {first.name}", base)])
    elif ex.cluster == "slurm":
        executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{base.job_id}"})
    if ex.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=ex.array_parallelism)
    shared = str(first.run()[0])
    units = [replace(u, shared=None if i == 0 else shared) for i, u in enumerate(units)]
    # Slurm runs at most array_parallelism of the array at once; submitit's local processes have no such cap,
    # so there the units go in waves of that many (local always waits: ExecutorConfig.check).
    wave = ex.array_parallelism if ex.cluster == "local" else len(units)
    jobs = []
    for i in range(0, len(units), wave):
        part = units[i : i + wave]
        jobs += executor.map_array(run_unit, part, [ex.threads] * len(part))
        log(f"submitted {len(part)} unit jobs: {', '.join(str(j.job_id) for j in jobs[i:])}")
        if ex.wait:
            _results(folder, [(u.name, j) for u, j in zip(part, jobs[i:])])
    return [base, *jobs]


def _results(folder: Path, jobs: list[tuple[str, Any]]) -> None:
    """Wait for the jobs; any that failed, named with its error's last line, in one error."""
    failed = []
    for name, job in jobs:
        try:
            job.result()
        except Exception as e:  # a job's error, raised here: name the unit, keep the others' results
            failed.append(f"{name} ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})")
    if failed:
        raise SteerhealError(
            f"{len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}. Logs: {folder}. Run the same command "
            "again: every unit resumes at its first unfinished step"
        )
