"""The run directory: its manifest of finished steps, config.yaml, the resume check, metrics.jsonl.

A step is marked in manifest.json only after its artifact is renamed into place, so a killed
run resumes at the first unfinished step and never redoes a finished one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import SteerhealError, __version__
from .config import as_ran
from .persona import Persona
from .records import write_json, write_text

if TYPE_CHECKING:
    from .models import TokenMeter

# The run directory's layout: every module names a round's directory, and the baselines', through these.
BASELINES = "baselines"
ROUND_GLOB = "round_*"


def round_key(r: int) -> str:
    """Round r's directory (and its steps' manifest prefix): round_00, round_01, ..."""
    return f"round_{r:02d}"


# Config keys not compared as written on resume: rounds may change; dtype is compared as resolved
# (the `dtype` input), since `auto` is bf16 on one CPU and fp32 on another; decide only reads results;
# executor only says where the units run.
RESUMABLE_KEYS = ("rounds", "dtype", "decide", "executor")


class Run:
    """The run directory and its manifest of finished steps (written atomically after each)."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {"steps": {}}

    def done(self, step: str) -> bool:
        return step in self.manifest["steps"]

    def mark(self, step: str, seconds: float, tokens: dict[str, int] | None = None) -> None:
        entry: dict[str, Any] = {"time_s": round(seconds, 2), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if tokens is not None:
            entry["tokens"] = tokens
        self._write({step: entry})

    def _write(self, entries: dict[str, Any]) -> None:
        """Add finished steps to the manifest on disk, under a lock: other processes (a sweep's point jobs,
        compare's null job) mark steps in the same manifest, so each mark merges into what they wrote."""
        with _locked(self.root / ".manifest.lock"):
            on_disk = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {"steps": {}}
            on_disk["steps"].update(entries)
            self.manifest = on_disk
            write_json(self.manifest_path, self.manifest)

    def steps_under(self, prefix: str) -> list[str]:
        """The finished steps under `prefix/` (a round's key), by name, in the order they finished."""
        return [k.split("/", 1)[1] for k in self.manifest["steps"] if k.startswith(prefix + "/")]

    def seconds(self, step: str) -> float:
        return float(self.manifest["steps"].get(step, {}).get("time_s", 0.0))

    def tokens(self, step: str) -> dict[str, int]:
        """The step's token passes (TokenMeter), zero for a step run without a meter."""
        return self.manifest["steps"].get(step, {}).get("tokens", {"forward": 0, "trained": 0})

    def step(self, key: str, fn: Callable[[], None], meter: TokenMeter | None = None) -> None:
        """Run fn unless the step is already finished; fn writes its artifacts atomically."""
        if self.done(key):
            return
        t, before = time.perf_counter(), meter.totals() if meter else {}
        fn()
        used = {k: v - before[k] for k, v in meter.totals().items()} if meter else None
        self.mark(key, time.perf_counter() - t, used)

    def json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    def adopt(self, src: Run, steps: tuple[str, ...], files: tuple[str, ...]) -> bool:
        """Take finished `steps` (and their `files`) from another run instead of recomputing them: the
        baselines are the same for every seed and arm. False, and nothing copied, unless src has them all."""
        if not all(src.done(s) for s in steps) or all(self.done(s) for s in steps):
            return False
        for rel in files:
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_text(self.root / rel, (src.root / rel).read_text())
        self._write({s: {**src.manifest["steps"][s], "time_s": 0.0, "shared_from": str(src.root)} for s in steps})
        return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on path (flock: local disks, NFS v4, Lustre mounted with -o flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:
            raise SteerhealError(
                f"{path.parent}: this filesystem refuses file locks ({e.strerror}); put the run directory on a "
                "local disk or NFS v4, or mount Lustre with -o flock"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _meta() -> dict:
    import peft
    import torch
    import transformers

    git = lambda *a: subprocess.run(  # noqa: E731
        ["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
    ).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        # a commit reproduces the code only when nothing of the package differs from it
        dirty = bool(git("status", "--porcelain", "--", ".")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return {
        "steerheal": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "peft": str(peft.__version__),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def check_resume(
    run: Run,
    cfg: dict,
    persona: Persona,
    inputs: dict[str, str],
    force: bool,
    unrecorded: Callable[[dict], dict[str, str]] | None = None,
) -> None:
    """Refuse to resume when the config, the persona, the vignettes, the model weights or the dtype changed.

    `unrecorded(old config)`: what a run made before an input was recorded had for it (its dtype).
    With --force the run goes on, and the old config.yaml is kept beside it (config.replaced-<time>.yaml).
    """
    path = run.root / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    recorded = old.get("config") or {}
    # keys added since the run was made count as it ran them (config.as_ran), so an older run resumes
    old_cfg = {k: v for k, v in as_ran(recorded).items() if k not in RESUMABLE_KEYS and (k in recorded or k in cfg)}
    new_cfg = {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS}
    keys = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    changed = [f"config changed ({', '.join(keys)})"] if keys else []
    if old.get("persona_sha256") != persona.sha256:
        changed.append("persona file changed")
    old = {**(unrecorded(old.get("config") or {}) if unrecorded else {}), **old}
    for key, value in inputs.items():
        if key in old and old[key] != value:
            changed.append(f"{key.replace('_', ' ')} changed")
    if changed and not force:
        raise SteerhealError(
            f"{run.root}: the {', the '.join(changed)} since this run started; "
            "use a new -o directory, or --force to continue with the new config"
        )
    if changed:
        os.replace(path, run.root / f"config.replaced-{time.strftime('%Y%m%dT%H%M%S')}.yaml")


def remove_stale_temps(root: Path) -> int:
    """Temp files and directories that a killed process left behind (atomic writes never finished)."""
    stale = [p for p in root.rglob(".*.tmp")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


def model_fingerprint(path: str) -> str:
    """A cheap fingerprint of local weights: config.json, and each weight file's name, size and first MiB.
    A hub id is taken at its word (its snapshot is immutable by revision)."""
    p = Path(path)
    if not p.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for f in sorted(p.glob("config.json")) + sorted(p.glob("*.safetensors")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
    return h.hexdigest()


def finished_adapters(run: Run, rounds: int) -> list[str]:
    """The adapters of the rounds whose heal finished, in order: the current model is base + these."""
    return [str(run.root / round_key(r) / "adapter") for r in range(rounds) if run.done(f"{round_key(r)}/heal")]


def protocol_path(path: Path, protocol: str | None) -> Path:
    """An eval file as scored under another protocol (eval.also): eval_healed.json → eval_healed.kshot.json.
    None: the run's own protocol, the file itself."""
    return path if protocol is None else path.with_name(f"{path.stem}.{protocol}{path.suffix}")


def write_config(
    root: Path, cfg: dict, persona: Persona, persona_path: str | Path, inputs: dict[str, str] | None = None
) -> None:
    """config.yaml: the resolved config, the persona (path, sha256, target), the inputs' fingerprints
    (vignettes, model weights) and the package versions."""
    write_text(
        root / "config.yaml",
        yaml.safe_dump(
            {
                "config": cfg,
                "persona": str(persona_path),
                "persona_sha256": persona.sha256,
                "target": persona.target,
                "direction": persona.direction,
                **(inputs or {}),
                "versions": _meta(),
            },
            sort_keys=False,
        ),
    )


def write_metrics(root: Path) -> None:
    rows = [
        json.loads((d / "round.json").read_text())
        for d in sorted(root.glob(ROUND_GLOB))
        if (d / "round.json").is_file()
    ]
    write_text(root / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
