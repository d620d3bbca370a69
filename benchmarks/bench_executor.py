"""The executors side by side, on a tiny random Llama: a 2 arms x 2 seeds comparison, and a sweep of
2 bands x 2 coefficients (2 random directions each), each one step after another in one process, against
submitit's local executor with 2 workers of 1 thread each.

    python benchmarks/bench_executor.py

On 2 cores the win is small, and the point is elsewhere: the same command, with executor.cluster slurm,
runs every (arm, seed), or every sweep point, as a job of one array on a cluster. Prints the wall times
and their ratios.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import PERSONA_YAML, TINY_RUN, build_tiny_model  # noqa: E402  (the suite's tiny model)

from steerheal.compare import run_compare  # noqa: E402
from steerheal.config import parse_set, resolve_config  # noqa: E402
from steerheal.sweep import run_sweep  # noqa: E402

LOCAL = ["executor.kind=submitit", "executor.cluster=local", "executor.threads=1", "executor.array_parallelism=2"]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_executor_"))
    model = build_tiny_model(tmp / "model")
    persona = tmp / "persona.yaml"
    persona.write_text(PERSONA_YAML)
    sets = [*TINY_RUN, "rounds=2", "seeds=0,1", "dtype=fp32", f"model={model}"]
    work = {
        "compare, 2 arms x 2 seeds x 2 rounds": lambda out, cfg: run_compare(persona, out, cfg, ["steer", "prompt"], 0),
        "sweep, 2 bands x 2 C, 2 random each": lambda out, cfg: run_sweep(
            persona, out, cfg, ["0.25:0.5", "0.5:0.75"], [2.0, 8.0], 2
        ),
    }
    print("| tiny Llama, 2 cores | sequential | local executor (2 x 1 thread) | ratio |")
    print("|---|---|---|---|")
    for i, (what, fn) in enumerate(work.items()):
        secs = []
        for j, extra in enumerate(([], LOCAL)):
            t = time.perf_counter()
            fn(tmp / f"{i}_{j}", resolve_config(None, parse_set(sets + extra)))
            secs.append(time.perf_counter() - t)
        print(f"| {what} | {secs[0]:.1f} s | {secs[1]:.1f} s | {secs[1] / secs[0]:.2f}x |")


if __name__ == "__main__":
    main()
