"""The steer-heal loop: baselines, then rounds of vector → dose → generate → filter → eval →
heal → eval, resumable step by step, composed only of the functions the subcommands call.

Run directory:
  config.yaml  manifest.json  baselines/{base,prompt}.json  baselines/demo.jsonl
  round_XX/{vector.safetensors, dose.json, completions.jsonl, kept.jsonl, rejected.jsonl,
            eval_steered.json, adapter/, eval_healed.json, demo.jsonl, round.json}
  metrics.jsonl  trajectory.png  report.md
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from . import SteerhealError, __version__
from .filter import FilterConfig, filter_records, summary as filter_summary
from .generate import generate_records
from .heal import HealConfig, heal
from .models import LoadedModel, load_model, parse_layers
from .persona import Persona, load_persona
from .progress import log
from .records import Record, read_records, write_json, write_records, write_text
from .vector import SteeringVector, extract

# Keys that may change on resume without invalidating the finished steps.
RESUMABLE_KEYS = ("rounds",)


# ---------------------------------------------------------------- config


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(name: str) -> dict:
    try:
        text = resources.files("steerheal").joinpath(f"presets/{name}.yaml").read_text()
    except FileNotFoundError:
        raise SteerhealError(f"--config {name}: no such preset or file; presets are demo and full") from None
    return yaml.safe_load(text)


def parse_set(items: list[str]) -> dict:
    """--set heal.lam=0.5 --set n=64 → nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SteerhealError(f"--set {item}: use KEY=VALUE, e.g. --set heal.lam=0.5")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(val)
    return out


def _coerce(key: str, value: Any, like: Any) -> Any:
    """YAML reads 1e9 as a string and 3 as an int: cast to the type of the default."""
    if value is None or like is None or isinstance(like, str):
        return value
    try:
        if isinstance(like, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return type(like)(float(value)) if isinstance(like, int) and not isinstance(value, int) else type(like)(value)
    except (TypeError, ValueError):
        raise SteerhealError(f"config key {key}: {value!r} is not a {type(like).__name__}") from None


def resolve_config(config: str | None, overrides: dict) -> dict:
    """The demo preset, then a preset name or run YAML, then command-line overrides; validated."""
    cfg = preset("demo")
    if config:
        p = Path(config)
        if p.is_file():
            try:
                user = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise SteerhealError(f"{config}: malformed YAML ({getattr(e, 'problem', e)})") from None
            if not isinstance(user, dict):
                raise SteerhealError(f"{config}: a run config must be a YAML mapping")
        else:
            user = preset(config)
        cfg = _deep_merge(cfg, user)
    cfg = _deep_merge(cfg, overrides)
    known = set(preset("demo")) | {"model", "device", "dtype", "trust_remote_code"}
    unknown = set(cfg) - known
    if unknown:
        raise SteerhealError(f"unknown config key(s): {', '.join(sorted(unknown))}; see steerheal/presets/demo.yaml")
    for section, cls in (("filter", FilterConfig), ("heal", HealConfig)):
        bad = set(cfg.get(section) or {}) - set(cls.__dataclass_fields__)
        if bad:
            raise SteerhealError(f"unknown {section} option(s): {', '.join(sorted(bad))}")
        cfg[section] = {k: _coerce(f"{section}.{k}", v, getattr(cls(), k)) for k, v in (cfg[section] or {}).items()}
    for k, v in preset("demo").items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and cfg.get(k) is not None:
            cfg[k] = _coerce(k, cfg[k], v)
    HealConfig(**cfg["heal"]).check()
    if int(cfg["rounds"]) < 1:
        raise SteerhealError("rounds must be at least 1")
    return cfg


# ---------------------------------------------------------------- run directory and manifest


class Run:
    """The run directory and its manifest of finished steps (written atomically after each)."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {"steps": {}}

    def done(self, step: str) -> bool:
        return step in self.manifest["steps"]

    def mark(self, step: str, seconds: float) -> None:
        self.manifest["steps"][step] = {"time_s": round(seconds, 2), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.manifest_path, self.manifest)

    def seconds(self, step: str) -> float:
        return float(self.manifest["steps"].get(step, {}).get("time_s", 0.0))

    def step(self, key: str, fn: Callable[[], None]) -> None:
        """Run fn unless the step is already finished; fn writes its artifacts atomically."""
        if self.done(key):
            return
        t = time.perf_counter()
        fn()
        self.mark(key, time.perf_counter() - t)


def _meta() -> dict:
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"steerheal": __version__, "torch": str(torch.__version__), "transformers": str(transformers.__version__),
            "peft": str(peft.__version__), "git_commit": commit}


def _check_resume(run: Run, cfg: dict, persona: Persona, force: bool) -> None:
    path = run.root / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    old_cfg = {k: v for k, v in (old.get("config") or {}).items() if k not in RESUMABLE_KEYS}
    new_cfg = {k: v for k, v in cfg.items() if k not in RESUMABLE_KEYS}
    changed = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if old.get("persona_sha256") != persona.sha256:
        changed.append("persona file")
    if changed and not force:
        raise SteerhealError(f"{run.root}: the config changed since this run started ({', '.join(changed)}); "
                             "use a new -o directory, or --force to continue with the new config")


# ---------------------------------------------------------------- the pieces of a round


def choose_dose(lm: LoadedModel, persona: Persona, vec: SteeringVector, cfg: dict, seed: int) -> dict:
    """Bisect the coefficient on a log scale until about target_keep of a probe batch passes the filter."""
    if cfg.get("coeff") is not None:
        return {"coeff": float(cfg["coeff"]), "method": "fixed", "probes": []}
    lo, hi, target = float(cfg["coeff_lo"]), float(cfg["coeff_hi"]), float(cfg["target_keep"])
    fcfg = FilterConfig(**cfg["filter"])
    probes, best = [], None
    for i in range(int(cfg["bisect_steps"])):
        c = math.sqrt(lo * hi)
        recs = generate_records(lm, persona.name, persona.generation, int(cfg["probe_n"]), vector=vec, coeff=c,
                                max_new_tokens=int(cfg["max_new_tokens"]), temperature=float(cfg["temperature"]),
                                top_p=float(cfg["top_p"]), seed=seed + i, batch_size=int(cfg["gen_batch_size"]))
        kept, _ = filter_records(lm, recs, fcfg, persona.narration)
        frac = len(kept) / len(recs)
        probes.append({"coeff": round(c, 4), "kept_frac": frac})
        log(f"  dose probe {i + 1}/{cfg['bisect_steps']}: coeff {c:.3g} keeps {frac:.0%}")
        if frac >= target:
            lo, best = c, c  # coherent enough: push harder
        else:
            hi = c
    coeff = best if best is not None else lo
    return {"coeff": round(coeff, 4), "method": "bisect", "target_keep": target, "probes": probes,
            "note": None if best is not None else f"no probe reached {target:.0%} kept; using coeff_lo"}


def run_eval(lm: LoadedModel, vignettes: list, cfg: dict, **kw: Any) -> dict:
    from .evaluate import evaluate

    e = cfg["eval"]
    return evaluate(lm, vignettes, think_tokens=int(e.get("think_tokens") or 0), batch_size=int(e.get("batch_size") or 16),
                    source=e.get("vignettes"), condition=e.get("condition") or "other_violate", **kw)


def demo_records(lm: LoadedModel, persona: Persona, cfg: dict, kind: str, **kw: Any) -> list[Record]:
    prompts = persona.demo or persona.generation[:4]
    recs = generate_records(lm, persona.name, prompts, len(prompts), temperature=0.0,
                            max_new_tokens=int(cfg["demo_max_new_tokens"]), batch_size=len(prompts),
                            id_prefix=kind, **kw)
    return recs


def nats(report: dict, foundation: str) -> float:
    v = report["foundations"][foundation]["nats"]
    return float("nan") if v is None else float(v)


# ---------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    root: Path
    rounds_done: int
    stop_reason: str


def run_loop(persona_path: str | Path, out: str | Path, cfg: dict, force: bool = False) -> LoopResult:
    """Run (or resume) the loop in `out`: every finished step is recorded and never redone."""
    from .evaluate import load_vignettes

    persona = load_persona(persona_path)
    run = Run(Path(out))
    run.root.mkdir(parents=True, exist_ok=True)
    _check_resume(run, cfg, persona, force)
    write_text(run.root / "config.yaml", yaml.safe_dump(
        {"config": cfg, "persona": str(persona_path), "persona_sha256": persona.sha256, "versions": _meta()},
        sort_keys=False))
    e = cfg["eval"]
    vignettes = load_vignettes(e.get("vignettes"), e.get("condition") or "other_violate", e.get("limit"), int(cfg["seed"]))
    fcfg = FilterConfig(**cfg["filter"])
    load = dict(device=cfg.get("device"), dtype=cfg.get("dtype"), trust_remote_code=bool(cfg.get("trust_remote_code")))
    rd = lambda r: run.root / f"round_{r:02d}"  # noqa: E731
    finished_adapters = lambda: [str(rd(r) / "adapter") for r in range(int(cfg["rounds"]))  # noqa: E731
                                 if run.done(f"round_{r:02d}/heal")]

    def checkpoint(key: str) -> None:
        # The resume test kills the process for real (SIGKILL) right after a chosen step.
        if os.environ.get("STEERHEAL_TEST_KILL_AFTER") == key:
            os.kill(os.getpid(), signal.SIGKILL)

    lm = load_model(cfg.get("model"), finished_adapters(), **load)
    rounds = int(cfg["rounds"])
    t_loop = time.perf_counter()
    stop_reason = f"{rounds} rounds done"
    # ---- baselines on the base model (always finished before round 0 starts)
    base_dir = run.root / "baselines"
    if not all(run.done(f"baselines/{k}") for k in ("base", "prompt", "demo")):
        log("[baselines] base model and the prompting baseline (persona as system prompt)")
    run.step("baselines/base", lambda: write_json(base_dir / "base.json", run_eval(lm, vignettes, cfg)))
    system = persona.pairs[0].pos
    run.step("baselines/prompt", lambda: write_json(base_dir / "prompt.json", run_eval(lm, vignettes, cfg, system=system)))
    run.step("baselines/demo", lambda: write_records(
        demo_records(lm, persona, cfg, "base") + demo_records(lm, persona, cfg, "prompt", system=system),
        base_dir / "demo.jsonl"))
    checkpoint("baselines")
    base_pmass = json.loads((base_dir / "base.json").read_text())["pmass"]

    for r in range(rounds):
        d, key = rd(r), f"round_{r:02d}"
        if run.done(f"{key}/done"):
            info = json.loads((d / "round.json").read_text())
            if info.get("stop"):
                stop_reason = info["stop"]
                break
            continue
        eta = ""
        if r > 0 and run.done(f"round_{r - 1:02d}/done"):
            prev = json.loads((rd(r - 1) / "round.json").read_text())["time_s"]["total"]
            eta = f" (last round took {prev / 60:.1f} min; ETA {(rounds - r) * prev / 60:.1f} min)"
        log(f"[round {r + 1}/{rounds}]{eta}")
        seed = int(cfg["seed"]) + 1000 * r

        def phase(name: str, fn: Callable[[], None]) -> None:
            if not run.done(f"{key}/{name}"):
                log(f"[round {r + 1}/{rounds}] {name}")
            run.step(f"{key}/{name}", fn)
            checkpoint(f"{key}/{name}")

        layers = parse_layers(cfg["layers"], lm.n_layers)
        phase("vector", lambda: extract(lm, persona, layers, max_prompts=cfg.get("extract_max_prompts")).save(d / "vector.safetensors"))
        vec = SteeringVector.load(d / "vector.safetensors")
        phase("dose", lambda: write_json(d / "dose.json", choose_dose(lm, persona, vec, cfg, seed + 500)))
        coeff = float(json.loads((d / "dose.json").read_text())["coeff"])
        gen = dict(max_new_tokens=int(cfg["max_new_tokens"]), temperature=float(cfg["temperature"]),
                   top_p=float(cfg["top_p"]), batch_size=int(cfg["gen_batch_size"]))
        phase("generate", lambda: write_records(generate_records(
            lm, persona.name, persona.generation, int(cfg["n"]), vector=vec, coeff=coeff, seed=seed,
            id_prefix=f"{persona.name}-r{r}", **gen), d / "completions.jsonl"))

        def do_filter() -> None:
            kept, rejected = filter_records(lm, read_records(d / "completions.jsonl"), fcfg, persona.narration)
            write_records(rejected, d / "rejected.jsonl")
            write_records(kept, d / "kept.jsonl")

        phase("filter", do_filter)
        phase("eval_steered", lambda: write_json(d / "eval_steered.json", run_eval(lm, vignettes, cfg, vector=vec, coeff=coeff)))
        phase("demo_steered", lambda: write_records(demo_records(lm, persona, cfg, f"r{r}-steered", vector=vec, coeff=coeff),
                                                    d / "demo_steered.jsonl"))
        kept = read_records(d / "kept.jsonl")
        hcfg = HealConfig(**{**cfg["heal"], "seed": int(cfg["heal"].get("seed", 0)) + r})
        if len(kept) < hcfg.min_rows:
            stop_reason = f"round {r}: only {len(kept)} rows kept, fewer than heal.min_rows {hcfg.min_rows}"
            _finish_round(run, r, d, key, persona, stop_reason, healed=False)
            break
        if not run.done(f"{key}/heal"):
            log(f"[round {r + 1}/{rounds}] heal on {len(kept)} kept rows")
            t = time.perf_counter()
            heal(lm, kept, hcfg, d / "adapter", merge=True)  # lm is now the healed model
            run.mark(f"{key}/heal", time.perf_counter() - t)
            checkpoint(f"{key}/heal")
        phase("eval_healed", lambda: write_json(d / "eval_healed.json", run_eval(lm, vignettes, cfg)))
        phase("demo_healed", lambda: write_records(demo_records(lm, persona, cfg, f"r{r}-healed"), d / "demo_healed.jsonl"))
        pm = json.loads((d / "eval_healed.json").read_text())["pmass"]
        floor = float(cfg["pmass_floor"]) * base_pmass
        stop = (f"round {r}: healed coherence {pm:.3f} fell below the floor {floor:.3f} "
                f"({cfg['pmass_floor']} × base {base_pmass:.3f})") if pm < floor else None
        _finish_round(run, r, d, key, persona, stop, healed=True)
        if stop:
            stop_reason = stop
            break
    write_metrics(run.root)
    from .plot import plot_run
    from .report import write_report

    plot_run(run.root)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    write_report(run.root, stop_reason, peak_rss_gb=rss_gb)
    n_done = sum(1 for r in range(rounds) if run.done(f"round_{r:02d}/done"))
    log(f"done: {n_done} round(s) in {(time.perf_counter() - t_loop) / 60:.1f} min (this process), peak RSS "
        f"{rss_gb:.2f} GB; {stop_reason}. Report: {run.root / 'report.md'}")
    adapters = finished_adapters()
    if adapters:
        flags = " ".join(f"--adapter {a}" for a in adapters)
        model_flag = f" --model {cfg['model']}" if cfg.get("model") else ""
        log(f"standalone model: steerheal bake{model_flag} {flags} -o {run.root / 'baked'}")
    return LoopResult(run.root, n_done, stop_reason)


def _finish_round(run: Run, r: int, d: Path, key: str, persona: Persona, stop: str | None, healed: bool) -> None:
    """round.json (the round's numbers, from its artifacts) and the manifest's done mark."""
    base = json.loads((run.root / "baselines" / "base.json").read_text())
    steered = json.loads((d / "eval_steered.json").read_text())
    healed_ev = json.loads((d / "eval_healed.json").read_text()) if healed else None
    heal_info = json.loads((d / "adapter" / "heal.json").read_text()) if healed else None
    dose = json.loads((d / "dose.json").read_text())
    vec = SteeringVector.load(d / "vector.safetensors")
    v0 = SteeringVector.load(run.root / "round_00" / "vector.safetensors")
    fs = filter_summary(read_records(d / "kept.jsonl") + read_records(d / "rejected.jsonl"))
    t = persona.target
    phases = ("vector", "dose", "generate", "filter", "eval_steered", "demo_steered", "heal", "eval_healed", "demo_healed")
    times = {p: run.seconds(f"{key}/{p}") for p in phases}
    times["total"] = round(sum(times.values()), 2)
    info = {
        "round": r, "coeff": dose["coeff"], "dose": dose, "filter": fs,
        "target": t, "direction": persona.direction,
        "cos_v0": round(vec.cosine(v0), 4), "vector_norm": round(sum(float(v.norm()) ** 2 for v in vec.directions.values()) ** 0.5, 4),
        "steered": {"target_nats": nats(steered, t), "care_nats": nats(steered, "care"), "authority_nats": nats(steered, "authority"),
                    "pmass": steered["pmass"], "accuracy": steered["accuracy"]},
        "healed": None if not healed else {
            "target_nats": nats(healed_ev, t), "care_nats": nats(healed_ev, "care"), "authority_nats": nats(healed_ev, "authority"),
            "pmass": healed_ev["pmass"], "accuracy": healed_ev["accuracy"]},
        "base_target_nats": nats(base, t),
        "heal": None if not healed else {k: heal_info.get(k) for k in ("val_nll_start", "val_nll", "val_D_mean", "val_D_rmse",
                                                                      "barrier_frac", "steps", "rows", "time_s")},
        "time_s": times, "stop": stop,
    }
    write_json(d / "round.json", info)
    run.mark(f"{key}/done", 0.0)


def write_metrics(root: Path) -> None:
    rows = []
    for d in sorted(root.glob("round_*")):
        if (d / "round.json").is_file():
            rows.append(json.loads((d / "round.json").read_text()))
    write_text(root / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
