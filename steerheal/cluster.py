"""Jobs on a scheduler, through submitit: Slurm on a cluster, or a process per job on this machine
(executor.cluster local). compare submits a job per (arm, seed), sweep a job per (band, coefficient).

A job is the same call the in-process path makes, into the same run directory, so its resume rules are
the run's own: a job that dies is resubmitted by running the same command again, and it starts at its
first unfinished step. Every submission has the same shape: one job for the steps the others share
(compare's baselines, sweep's base and vectors), then an array of jobs that use them, then, optionally,
one job that needs them all (compare's random null); the submitting process writes the report, which
needs no model.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import SteerhealError
from .config import ExecutorConfig, RunConfig
from .progress import log


@dataclass
class Job:
    """What one job runs: fn(arg), both pickled into the job (fn module-level), and its name in errors."""

    name: str
    fn: Callable[[Any], Any]
    arg: Any


def call(job: Job, threads: int | None = None) -> Any:
    """A job's entry point: torch's thread count, then the work."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return job.fn(job.arg)


@dataclass
class Unit:
    """compare's unit: one arm at one seed (None: a run without seeds), with everything its job needs."""

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


def run_unit(unit: Unit) -> str:
    """The unit's loop, resumed where it stopped. Returns its run directory."""
    from .loop import run_loop

    shared = Path(unit.shared) if unit.shared else None
    return str(run_loop(unit.persona, *unit.run(), unit.force, shared).root)


def run_unit_baselines(unit: Unit) -> str:
    """The baselines every unit adopts, computed once in the first unit's directory (or adopted there from an
    earlier run of the same comparison, unit.shared)."""
    from .loop import run_baselines

    return str(run_baselines(unit.persona, *unit.run(), unit.force, Path(unit.shared) if unit.shared else None))


def submit(first: Job, array: list[Job], ex: ExecutorConfig, folder: Path, last: Job | None = None) -> list[Any]:
    """`first`, then one array job of `array` (which use what it wrote: on the same kind of node, so in the same
    dtype), then `last`. Waits for each when ex.wait; else Slurm starts each part once the one before it has
    succeeded (dependencies). Logs and job files go to folder. Returns the submitted jobs, in that order."""
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
    with _submitting(ex):
        head = executor.submit(call, first, ex.threads)
    log(f"submitted {first.name} as job {head.job_id} ({ex.cluster}); logs in {folder}")
    if ex.wait:
        _results(folder, [(first, head)])
    else:
        _after(executor, head.job_id)
    jobs = [head, *_array(executor, array, ex, folder)]
    if last is not None:
        if not ex.wait:  # Slurm: an array job's id stands for all its tasks
            _after(executor, jobs[-1].job_id.split("_")[0])
        with _submitting(ex):
            jobs.append(executor.submit(call, last, ex.threads))
        log(f"submitted {last.name} as job {jobs[-1].job_id}")
        if ex.wait:
            _results(folder, [(last, jobs[-1])])
    return jobs


@contextmanager
def _submitting(ex: ExecutorConfig) -> Iterator[None]:
    """A refused submission (no sbatch here; Slurm's partition, QOS or array-size limits) as one line."""
    try:
        yield
    except (OSError, subprocess.CalledProcessError) as e:
        raise SteerhealError(
            f"submitting to {ex.cluster} failed: {str(e).strip().splitlines()[-1][:300]}; check executor.partition "
            "and the other executor settings, or use --set executor.cluster=local / --executor local"
        ) from None


def _array(executor: Any, array: list[Job], ex: ExecutorConfig, folder: Path) -> list[Any]:
    if ex.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=ex.array_parallelism)
    # Slurm runs at most array_parallelism of the array at once; submitit's local processes have no such cap,
    # so there the jobs go in waves of that many (local always waits: ExecutorConfig.check).
    wave = ex.array_parallelism if ex.cluster == "local" else max(1, len(array))
    jobs: list[Any] = []
    for i in range(0, len(array), wave):
        part = array[i : i + wave]
        with _submitting(ex):
            jobs += executor.map_array(call, part, [ex.threads] * len(part))
        log(f"submitted {len(part)} jobs: {', '.join(str(j.job_id) for j in jobs[i:])}")
        if ex.wait:
            _results(folder, list(zip(part, jobs[i:])))
    return jobs


def _after(executor: Any, job_id: str) -> None:
    """The next submission starts once job_id has succeeded (Slurm)."""
    # kill-on-invalid-dep: a job whose predecessor failed leaves the queue instead of pending forever
    executor.update_parameters(
        slurm_additional_parameters={"dependency": f"afterok:{job_id}", "kill-on-invalid-dep": "yes"}
    )


def _results(folder: Path, jobs: list[tuple[Job, Any]]) -> None:
    """Wait for the jobs; any that failed, named with its error's last line, in one error."""
    failed = []
    for job, handle in jobs:
        try:
            handle.result()
        except Exception as e:  # a job's error, raised here: name the job, keep the others' results
            failed.append(f"{job.name} ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})")
    if failed:
        raise SteerhealError(
            f"{len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}. Logs: {folder}. Run the same command "
            "again: every job resumes at its first unfinished step"
        )
