"""Each step's share of a round's time, from a run directory's manifest (or several: seeds, arms).

    python benchmarks/bench_loop.py RUN_DIR [RUN_DIR ...]
    python benchmarks/bench_loop.py --run OUT [loop options...]   # run `steerheal loop` first, then report

Goal (arms issue): one 3-round run on classic 132 with n = 96 in ≤ 12 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from steerheal.rundir import Run


def shares(dirs: list[Path]) -> None:
    per_step: dict[str, float] = defaultdict(float)
    rounds, base = 0, 0.0
    for d in dirs:
        for manifest in sorted(d.rglob("manifest.json")):
            steps = json.loads(manifest.read_text())["steps"]
            for key, v in steps.items():
                where, _, name = key.partition("/")
                if where.startswith("round_"):
                    per_step[name] += v["time_s"]
                    rounds += name == "done"
                elif where == "baselines":
                    base += v["time_s"]
    total = sum(per_step.values())
    if not rounds:
        print("no finished round under", ", ".join(map(str, dirs)))
        return
    print(
        f"{rounds} finished round(s); mean {total / rounds / 60:.1f} min per round; baselines {base / 60:.1f} min in all"
    )
    for name, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        if name != "done":
            print(f"  {name:14s} {t / rounds:7.1f} s/round  {t / total:6.1%}")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--run"]:
        out = Path(args[1])
        subprocess.run(
            [sys.executable, "-m", "steerheal.cli", "loop", "personas/anti_authority.yaml", "-o", str(out), *args[2:]],
            check=True,
        )
        args = [str(out)]
    dirs = [Path(a) for a in args]
    for d in dirs:
        Run(d)  # fails early on a path that is not a directory
    shares(dirs)


if __name__ == "__main__":
    main()
