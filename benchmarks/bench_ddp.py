"""The heal on 1 process, on 2 DDP processes and on 2 sharded ones (FSDP2, `--shard`), side by side in one run.

    python benchmarks/bench_ddp.py [--rows 32]

On the bundled SmolLM2: `--rows` unsteered completions from `steerheal generate` (the demo's length),
then the same heal (the demo's settings: micro-batches of 2, two per step) by one process with 2 torch
threads, by two DDP processes and by two sharded processes (each holding half of every weight) with 1
thread each. Prints the wall times, their ratios to one process, and how far each adapter is from the
single process's. On 2 cores the processes only split the same cores; on several GPUs each takes its
share of every step's rows on its own device.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from steerheal.heal import accelerate_launch


def timed(cmd: list[str], threads: int) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    cli = [sys.executable, "-m", "steerheal.cli"]
    kept = tmp / "kept.jsonl"
    subprocess.run(
        [*cli, "generate", "personas/anti_authority.yaml", "-n", str(a.rows), "-o", str(kept), "-q"], check=True
    )
    heal = ["heal", str(kept), "-q", "--batch-size", "2", "--grad-accum", "2"]  # two micro-batches a step
    launch = [*accelerate_launch(2), "-m", "steerheal.cli"]
    one = timed([*cli, *heal, "-o", str(tmp / "one")], 2)
    two = timed([*launch, *heal, "-o", str(tmp / "two")], 1)
    shard = timed([*launch, *heal, "--shard", "-o", str(tmp / "shard")], 1)
    x = load_file(tmp / "one" / "adapter_model.safetensors")
    print(f"| heal of {a.rows} rows, bundled SmolLM2 | wall time (process start and model load included) | vs 1 |")
    print("|---|---|---|")
    print(f"| 1 process, 2 threads | {one:.1f} s | |")
    for name, d, t in (("2 DDP processes", "two", two), ("2 sharded processes (FSDP2)", "shard", shard)):
        y = load_file(tmp / d / "adapter_model.safetensors")
        gap = max(float((x[k] - y[k]).abs().max()) for k in x)
        same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        print(f"| {name}, 1 thread each | {t:.1f} s | {t / one:.2f}x; adapter equal: {same} (max diff {gap:.1e}) |")


if __name__ == "__main__":
    main()
