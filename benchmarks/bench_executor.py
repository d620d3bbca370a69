"""compare's executors side by side: a 2 arms x 2 seeds comparison on a tiny random Llama, one unit after
another in one process, against submitit's local executor with 2 workers of 1 thread each.

    python benchmarks/bench_executor.py

On 2 cores the win is small, and the point is elsewhere: the same command, with executor.cluster slurm,
runs every (arm, seed) as a job of one array on a cluster. Prints both wall times and their ratio.
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

LOCAL = ["executor.kind=submitit", "executor.cluster=local", "executor.threads=1", "executor.array_parallelism=2"]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_executor_"))
    model = build_tiny_model(tmp / "model")
    persona = tmp / "persona.yaml"
    persona.write_text(PERSONA_YAML)
    sets = [*TINY_RUN, "rounds=2", "seeds=0,1", "dtype=fp32", f"model={model}"]
    secs = {}
    for name, extra in (("sequential", []), ("local executor", LOCAL)):
        t = time.perf_counter()
        run_compare(
            persona, tmp / name.replace(" ", "_"), resolve_config(None, parse_set(sets + extra)), ["steer", "prompt"], 0
        )
        secs[name] = time.perf_counter() - t
    print("| 2 arms x 2 seeds, tiny Llama, 2 rounds | wall time |")
    print("|---|---|")
    for name, s in secs.items():
        print(f"| {name} | {s:.1f} s |")
    print(f"local executor / sequential: {secs['local executor'] / secs['sequential']:.2f}x")


if __name__ == "__main__":
    main()
