"""Pareto curves instead of single points: where, if anywhere, is the persona vector specific?

Raw steering (no heal) swept over layer bands × coefficients; at every point the real vector is
scored beside K random directions norm-matched to it (same layers, same per-layer norms, same
coefficient), and its target shift is placed in that null (z-score, outside the null's range?).
The prompt is swept by strength: no prompt, the first pair's pos prompt, every pair's pos prompt
together. Each eval is one resumable step, so a killed sweep goes on where it stopped; with executor submitit
each point is a job (cluster.py).

Out: sweep.json (every point, with CIs and its place in the null), sweep.md, sweep.png.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import SteerhealError
from .cluster import Job, submit
from .config import MIN_PMASS_RATIO, NULL_K_SWEEP, RunConfig
from .evaluate import score_vignettes
from .loop import run_inputs
from .models import LoadedModel, load_model, parse_layers
from .persona import Persona, load_persona
from .progress import log
from .records import write_json, write_text
from .report import ci_text
from .rundir import Run, check_resume, write_config
from .stats import EvalRows, compare
from .vector import SteeringVector, extract
from .vignettes import Vignette, load_vignettes

# The settings every eval of a sweep shares (config.yaml; a resume with others is refused).
SHARED_SETTINGS = ("model", "trust_remote_code", "vector", "eval")
KEYS = ("target_shift", "target_shift_ci", "selectivity", "selectivity_ci", "pmass_ratio", "pmass_ratio_ci")


@dataclass
class Sweep:
    """One sweep's directory and settings; its steps run here or as jobs (executor submitit), and read back
    without a model. The model is loaded only when a step has to run, so a finished sweep reports at once."""

    persona_path: str
    root: Path
    cfg: RunConfig
    bands: list[str]
    coeffs: list[float]
    null_k: int = NULL_K_SWEEP
    force: bool = False

    @cached_property
    def lm(self) -> LoadedModel:
        c = self.cfg
        return load_model(c.model, [], device=c.device, dtype=c.dtype, trust_remote_code=c.trust_remote_code)

    @cached_property
    def persona(self) -> Persona:
        return load_persona(self.persona_path)

    @cached_property
    def vignettes(self) -> list[Vignette]:
        e = self.cfg.eval
        return load_vignettes(e.vignettes, e.condition, e.limit, 0)

    def __getstate__(self) -> dict[str, Any]:  # a job loads its own model
        return {k: v for k, v in self.__dict__.items() if k != "lm"}

    def points(self) -> list[tuple[str, float]]:
        return [(band, c) for band in self.bands for c in self.coeffs]

    def scored(self, key: str, **kw: Any) -> None:
        """One eval as a resumable step: base (no kw), a prompt (system=), a vector at a coefficient."""

        def run() -> None:
            write_json(self.root / f"{key}.json", score_vignettes(self.lm, self.vignettes, self.cfg.eval, **kw))

        Run(self.root).step(key, run)

    def vector(self, band: str) -> SteeringVector:
        v, key = self.cfg.vector, f"band_{band}/vector"
        path = self.root / f"{key}.safetensors"

        def run() -> None:
            layers = parse_layers(band, self.lm.n_layers)
            extract(self.lm, self.persona, layers, v.normalize, v.batch_size, v.max_prompts).save(path)

        Run(self.root).step(key, run)
        return SteeringVector.load(path)

    def prepare(self) -> None:
        """The steps every point reads: base, the prompt strengths, each band's vector. First the resume
        check, where the model will run (a job's node may pick another dtype than the submitting one)."""
        inputs = run_inputs(self.cfg, self.vignettes)
        # bands, coefficients and null_k may grow; what every eval in the directory shares may not change
        settings = {k: v for k, v in self.cfg.to_dict().items() if k in SHARED_SETTINGS}
        check_resume(Run(self.root), settings, self.persona, inputs, self.force)
        write_config(self.root, settings, self.persona, self.persona_path, inputs)
        log("[sweep] base and prompt strengths")
        self.scored("base")
        for name, text in self.prompts().items():
            self.scored(f"prompt_{name}", system=text)
        for band in self.bands:
            self.vector(band)

    def prompts(self) -> dict[str, str]:
        """Prompt strength: the first pair's pos prompt, then every pair's pos prompt together."""
        pairs = self.persona.pairs
        return {"first": pairs[0].pos, "all": "\n".join(p.pos for p in pairs)}

    def point(self, band: str, c: float) -> None:
        """One (band, coefficient): the real vector and its K norm-matched random directions."""
        vec = self.vector(band)
        log(f"[sweep] band {band} (layers {vec.layers[0]}-{vec.layers[-1]}), C = {c:g}")
        self.scored(f"band_{band}/c{c:g}_real", vector=vec, coeff=c)
        for i in range(self.null_k):
            self.scored(f"band_{band}/c{c:g}_random{i}", vector=vec.random_like(20_000 + i), coeff=c)

    def report(self) -> Path:
        """sweep.json, sweep.md and sweep.png from the finished steps; no model needed."""
        run = Run(self.root)
        keys = ["base", *(f"prompt_{n}" for n in self.prompts())] + [
            f"band_{b}/c{c:g}_{kind}"
            for b, c in self.points()
            for kind in ["real", *(f"random{i}" for i in range(self.null_k))]
        ]
        missing = [k for k in keys if not run.done(k)]
        if missing:
            raise SteerhealError(
                f"{self.root}: {len(missing)} of the sweep's {len(keys)} evals are unfinished (first: {missing[0]}); "
                "wait for jobs still running, or run the sweep again without --report-only"
            )
        base = EvalRows.from_report(run.json("base.json"))
        t, sign = self.persona.target, self.persona.direction

        def point(key: str) -> dict[str, Any]:
            m = compare(base, [EvalRows.from_report(run.json(f"{key}.json"))], t, sign)
            return {k: m[k] for k in KEYS}

        summary: dict[str, Any] = {"target": t, "null_k": self.null_k, "prompt": {"none": None}, "bands": {}}
        summary["prompt"] |= {name: point(f"prompt_{name}") for name in self.prompts()}
        for band in self.bands:
            vec = SteeringVector.load(self.root / f"band_{band}/vector.safetensors")
            points = []
            for c in self.coeffs:
                real = point(f"band_{band}/c{c:g}_real")
                null = [point(f"band_{band}/c{c:g}_random{i}") for i in range(self.null_k)]
                points.append({"coeff": c, "real": real, "null": null, **specificity(real, null)})
            summary["bands"][band] = {"layers": vec.layers, "norm": vec.norm(), "points": points}
        summary["most_specific"] = most_specific(summary)
        write_json(self.root / "sweep.json", summary)
        write_text(self.root / "sweep.md", render(summary))
        plot_sweep(self.root, summary)
        log(f"sweep report: {self.root / 'sweep.md'}")
        return self.root / "sweep.md"


def prepare_job(sweep: Sweep) -> None:
    sweep.prepare()


def point_job(job: tuple[Sweep, str, float]) -> None:
    job[0].point(job[1], job[2])


def run_sweep(
    persona_path: str | Path,
    out: str | Path,
    cfg: RunConfig,
    bands: list[str],
    coeffs: list[float],
    null_k: int = NULL_K_SWEEP,
    report_only: bool = False,
    force: bool = False,
) -> Path:
    """Score every (band, coefficient) point, real and K random, and every prompt strength; write the report.
    With executor submitit: a job for the shared steps, then a job per point; the report once they end.
    report_only: run nothing (no model), report the finished steps, or name what is missing."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(str(persona_path), root, cfg, bands, coeffs, null_k, force)
    if report_only:
        return sweep.report()
    if cfg.executor.kind == "local":
        sweep.prepare()
        for band, c in sweep.points():
            sweep.point(band, c)
    else:
        jobs = [Job(f"band {b}, C = {c:g}", point_job, (sweep, b, c)) for b, c in sweep.points()]
        submit(Job("the sweep's base, prompts and vectors", prepare_job, sweep), jobs, cfg.executor, root / "jobs")
        if not cfg.executor.wait:
            log("sweep: jobs submitted. When they end, run this command again with --report-only to write the report")
            return root / "sweep.md"
    return sweep.report()


def specificity(real: dict[str, Any], null: list[dict[str, Any]]) -> dict[str, Any]:
    """The real shift against the null's shifts at the same norm: z, and whether it lies beyond every draw;
    and the same for selectivity, apart (a random push toward a default answer can move the target too)."""
    return _beyond(real, null, "target_shift") | {"selectivity": _beyond(real, null, "selectivity")}


def _beyond(real: dict[str, Any], null: list[dict[str, Any]], key: str) -> dict[str, Any]:
    x = np.asarray([d[key] for d in null], dtype=np.float64)
    if len(x) == 0:
        return {"z": math.nan, "beyond_null": False}
    sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    z = (real[key] - float(x.mean())) / sd if sd > 0 else math.nan
    return {
        "z": z,
        "null_mean": float(x.mean()),
        "null_range": [float(x.min()), float(x.max())],
        "beyond_null": bool(real[key] > x.max()),
    }


def most_specific(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The coherent point (pmass ratio ≥ MIN_PMASS_RATIO) whose real shift stands furthest above its null."""
    cands = [
        {
            "band": band,
            "coeff": p["coeff"],
            "z": p["z"],
            "beyond_null": p["beyond_null"],
            "selectivity_null": p.get("selectivity"),
            **p["real"],
        }
        for band, b in summary["bands"].items()
        for p in b["points"]
        if p["real"]["pmass_ratio"] >= MIN_PMASS_RATIO and not math.isnan(p["z"])
    ]
    return max(cands, key=lambda c: c["z"]) if cands else None


def render(s: dict[str, Any]) -> str:
    t = s["target"]
    L = [
        "# steerheal sweep: raw steering across layer bands and coefficients, against a random null",
        "",
        f"Target **{t}** (shift persona-signed, nats; 95% paired bootstrap CIs over vignettes). At each point "
        f"{s['null_k']} random directions with the real vector's per-layer norms, at the same coefficient, form the null; "
        "z = (real − null mean) / null SD, for the shift and, apart, for selectivity (a random push toward a "
        "default answer can move the target as well).",
        "",
        "| band | C | real shift | selectivity | pmass ratio | null shifts (min … max) | z | beyond every draw "
        "| null selectivities (min … max) | z | beyond every draw |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for band, b in s["bands"].items():
        for p in b["points"]:
            r = p["real"]
            L.append(
                f"| {band} | {p['coeff']:g} | {ci_text(r, 'target_shift')} | {ci_text(r, 'selectivity')} | "
                f"{r['pmass_ratio']:.2f} | {_null_cells(p)} | {_null_cells(p.get('selectivity'))} |"
            )
    L += ["", "| prompt strength | shift | selectivity | pmass ratio |", "|---|---|---|---|"]
    L.append("| none | +0.00 | +0.00 | 1.00 |")
    for name, m in s["prompt"].items():
        if m:
            L.append(
                f"| {name} pos prompt(s) | {ci_text(m, 'target_shift')} | {ci_text(m, 'selectivity')} | {m['pmass_ratio']:.2f} |"
            )
    best = s["most_specific"]
    L += ["", "![sweep](sweep.png)", ""]
    if best is None:
        L.append(f"- No point kept pmass ratio ≥ {MIN_PMASS_RATIO} with a usable null: nothing to choose from.")
    else:
        where = f"band {best['band']} at C = {best['coeff']:g}"
        specific = "beyond every random draw" if best["beyond_null"] else "inside the random spread"
        L.append(
            f"- Most specific coherent point: {where}, shift {ci_text(best, 'target_shift')}, z {best['z']:+.1f}, {specific}."
        )
        sel = best.get("selectivity_null")
        if sel and "null_range" in sel:
            lo, hi = sel["null_range"]
            inside = "beyond every random draw" if sel["beyond_null"] else "inside the random spread"
            L.append(
                f"- Its selectivity, {ci_text(best, 'selectivity')}, against the null's {lo:+.2f} … {hi:+.2f}: "
                f"z {sel['z']:+.1f}, {inside}."
            )
        if not best["beyond_null"]:
            L.append(
                "- So the real vector is specific nowhere on this grid: a random direction of the same norm does as much."
            )
    return "\n".join(L) + "\n"


def _null_cells(place: dict[str, Any] | None) -> str:
    """'min … max | z | yes/no' for a point's place in its null ('–' where there is none)."""
    if not place or "null_range" not in place:
        return "– | – | –"
    lo, hi = place["null_range"]
    return f"{lo:+.2f} … {hi:+.2f} | {place['z']:+.1f} | {'yes' if place['beyond_null'] else 'no'}"


def plot_sweep(root: Path, s: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([1.0], [0.0], marker="*", s=200, c="black", zorder=5, label="base")
    for j, (band, b) in enumerate(s["bands"].items()):
        pts = b["points"]
        ax.plot(
            [p["real"]["pmass_ratio"] for p in pts],
            [p["real"]["target_shift"] for p in pts],
            "o-",
            color=f"C{j}",
            label=f"persona vector, band {band}",
        )
        for p in pts:
            ax.scatter(
                [d["pmass_ratio"] for d in p["null"]],
                [d["target_shift"] for d in p["null"]],
                marker="x",
                color=f"C{j}",
                alpha=0.45,
                s=25,
            )
    for name, m in s["prompt"].items():
        if m:
            ax.scatter([m["pmass_ratio"]], [m["target_shift"]], marker="s", color="tab:blue", s=50)
            ax.annotate(name, (m["pmass_ratio"], m["target_shift"]), fontsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("coherence: pmass / base pmass")
    ax.set_ylabel(f"{s['target']} shift, persona-signed (nats)")
    ax.set_title("raw steering by band (lines: coefficients rising; x: random, same norm)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "sweep.png", dpi=120)
    plt.close(fig)
