"""The steer-heal loop: baselines, then rounds of vector → dose → generate → filter → eval →
heal → eval, resumable step by step, composed only of the functions the subcommands call.

Run directory:
  config.yaml  manifest.json  baselines/{base,prompt}.json  baselines/demo.jsonl
  round_XX/{vector.safetensors, dose.json, completions.jsonl, kept.jsonl, rejected.jsonl,
            eval_steered.json, demo_steered.jsonl, adapter/, eval_healed.json, demo_healed.jsonl, round.json}
  each eval also as <eval>.<protocol>.json for every protocol in eval.also
  metrics.jsonl  trajectory.png  report.md

A round reads top to bottom in round(): vector, dose, generate, filter, heal, measures, each a named,
resumable step. The arms differ only through config.ARM_TABLE and the Intervention they sample with.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import SteerhealError
from .coherence import generation_coherence, neutral_prompts
from .config import ARM_TABLE, Arm, GenerateConfig, HealConfig, RunConfig, heal_seed, round_seed
from .dose import choose_dose
from .evaluate import score_vignettes
from .filter import filter_records
from .filter import summary as filter_summary
from .generate import generate_records, use_backend
from .heal import heal
from .heal import launch as launch_heal
from .models import (
    BaseView,
    LoadedModel,
    TokenMeter,
    add_adapters,
    auto_dtype,
    describe_dtype,
    dtype_name,
    keep_base,
    load_model,
    merge_adapters,
    parse_layers,
    pick_device,
    pick_dtype,
    resolve,
)
from .online import Segment, run_segment
from .persona import Persona, load_persona
from .progress import log
from .records import Record, read_records, with_system, without_system, write_json, write_records
from .results import RoundRecord, read_rounds
from .rundir import (
    BASELINES,
    Run,
    check_resume,
    finished_adapters,
    model_fingerprint,
    protocol_path,
    remove_stale_temps,
    round_key,
    write_config,
    write_metrics,
)
from .vector import SteeringVector, extract
from .vignettes import Vignette, load_vignettes, vignettes_sha256

# The baselines are the same for every seed and arm of one config: computed once, then shared.
BASELINE_STEPS = tuple(f"{BASELINES}/{k}" for k in ("base", "prompt", "demo", "gen_base", "gen_prompt"))
BASELINE_FILES = tuple(
    f"{BASELINES}/{f}" for f in ("base.json", "prompt.json", "demo.jsonl", "gen_base.json", "gen_prompt.json")
)


def baseline_steps(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The baselines' steps and files, with base and prompt under each protocol of eval.also."""
    alt = [(f"{BASELINES}/{k}.{p}", f"{BASELINES}/{k}.{p}.json") for p in cfg.eval.also for k in ("base", "prompt")]
    return BASELINE_STEPS + tuple(s for s, _ in alt), BASELINE_FILES + tuple(f for _, f in alt)


METHOD_STEPS = ("vector", "random", "dose", "generate", "filter", "heal")  # the rest measure the model

# ---------------------------------------------------------------- the pieces of a round


def demo_records(lm: LoadedModel, persona: Persona, cfg: RunConfig, kind: str, **kw: Any) -> list[Record]:
    """Greedy completions of the persona's demo prompts: the same prompts for every model."""
    prompts = persona.demo or persona.generation[:4]
    greedy = GenerateConfig(
        n=len(prompts), max_new_tokens=cfg.demo_max_new_tokens, temperature=0.0, top_p=1.0, batch_size=len(prompts)
    )
    return generate_records(lm, persona.name, prompts, greedy, id_prefix=kind, **kw)


def eval_summary(report: dict, target: str) -> dict:
    """What round.json keeps of an eval: every foundation's nats, the target's, coherence and accuracy."""
    nats = {f: (float("nan") if v["nats"] is None else float(v["nats"])) for f, v in report["foundations"].items()}
    return {"target_nats": nats[target], "nats": nats, "pmass": report["pmass"], "accuracy": report["accuracy"]}


# ---------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Intervention:
    """What an arm applies while it samples and is measured raw: C·v added, or the persona as a system prompt."""

    vector: SteeringVector | None = None
    coeff: float = 0.0
    system: str | None = None

    @property
    def kw(self) -> dict[str, Any]:
        """As the keyword arguments of generate_records, score_vignettes and the coherence measure."""
        return {"system": self.system} if self.system is not None else {"vector": self.vector, "coeff": self.coeff}


@dataclass
class LoopResult:
    root: Path
    rounds_done: int
    stop_reason: str


@dataclass
class Loop:
    """Everything a round needs: the run directory, the persona, the config, the current model, the vignettes."""

    run: Run
    persona: Persona
    cfg: RunConfig
    lm: LoadedModel
    vignettes: list[Vignette]
    baselines_from: Path | None = None  # a finished run of the same config whose baselines to reuse
    meter: TokenMeter | None = None  # token passes per step (the unit of equal compute)
    _judge: LoadedModel | None = None

    def judge(self) -> LoadedModel:
        """The unchanged base model, which judges generation coherence: the current model with its residual
        adapters switched off (no second copy), or with --ref base (its heal trains over the same modules
        while reading the base) the base loaded once more."""
        if self._judge is None:
            c = self.cfg
            if c.heal.ref == "base":
                self._judge = load_model(
                    c.model, [], device=c.device, dtype=c.dtype, trust_remote_code=c.trust_remote_code
                )
            else:
                self._judge = LoadedModel(BaseView(lambda: self.lm.model), self.lm.tokenizer, self.lm.name)
        return self._judge

    def coherence(self, path: Path, **kw: Any) -> None:
        """Generation coherence of the current model (steered or prompted through kw) on the neutral prompts."""
        n = self.cfg.coherence_prompts
        res = (
            generation_coherence(
                self.lm,
                self.judge(),
                neutral_prompts(n),
                max_new_tokens=self.cfg.demo_max_new_tokens,
                seed=self.cfg.seed,
                filter_cfg=self.cfg.filter,
                **kw,
            )
            if n > 0
            else {"skipped": True}
        )
        write_json(path, res)

    def rdir(self, r: int) -> Path:
        return self.run.root / round_key(r)

    def finished_adapters(self) -> list[str]:
        return finished_adapters(self.run, self.cfg.rounds)

    def eval(self, protocol: str | None = None, **kw: Any) -> dict:
        """The current model (steered or prompted through kw) on the vignettes, under the run's protocol or another."""
        cfg = self.cfg.eval if protocol is None else dataclasses.replace(self.cfg.eval, protocol=protocol, also=[])
        return score_vignettes(self.lm, self.vignettes, cfg, **kw)

    def evals(self, step: Callable[[str, Callable[[], None]], None], name: str, path: Path, **kw: Any) -> None:
        """An eval step under the run's protocol, then one under each protocol of eval.also (<name>.<protocol>)."""
        for p in [None, *self.cfg.eval.also]:
            step(name if p is None else f"{name}.{p}", functools.partial(self._eval_to, protocol_path(path, p), p, kw))

    def _eval_to(self, path: Path, protocol: str | None, kw: dict[str, Any]) -> None:
        write_json(path, self.eval(protocol, **kw))

    def baselines(self) -> None:
        """The base model and the prompting baseline (the persona's first pos prompt as a system prompt)."""
        run, d, system = self.run, self.run.root / BASELINES, self.persona.pairs[0].pos
        if self.baselines_from is not None:  # a shift is read against a base in its own dtype
            theirs, ours = run_dtype(self.baselines_from, self.cfg.device), run_dtype(run.root, self.cfg.device)
            if theirs != ours:
                raise SteerhealError(
                    f"{self.baselines_from}: its baselines ran in {theirs} and this run in {ours}; "
                    f"share baselines within one dtype (--dtype {theirs}) or give this run its own"
                )
        steps, files = baseline_steps(self.cfg)
        if self.baselines_from is not None and run.adopt(Run(self.baselines_from), steps, files):
            log(f"[baselines] shared from {self.baselines_from}")
        if not all(run.done(k) for k in steps):
            log("[baselines] base model and the prompting baseline (persona as system prompt)")
        m = self.meter
        step = lambda name, fn: run.step(f"{BASELINES}/{name}", fn, m)  # noqa: E731
        self.evals(step, "base", d / "base.json")
        self.evals(step, "prompt", d / "prompt.json", system=system)
        run.step(
            f"{BASELINES}/demo",
            lambda: write_records(
                demo_records(self.lm, self.persona, self.cfg, "base")
                + demo_records(self.lm, self.persona, self.cfg, "prompt", system=system),
                d / "demo.jsonl",
            ),
            m,
        )
        run.step(f"{BASELINES}/gen_base", lambda: self.coherence(d / "gen_base.json"), m)
        run.step(f"{BASELINES}/gen_prompt", lambda: self.coherence(d / "gen_prompt.json", system=system), m)

    def round(self, r: int) -> str | None:
        """Run (or resume) round r; the stop reason, if the loop should stop after it."""
        if self.run.done(f"{round_key(r)}/done"):
            return RoundRecord.read(self.rdir(r) / "round.json").stop
        log(f"[round {r + 1}/{self.cfg.rounds}]{self._eta(r)}")
        act = self.intervention(r, self.vector(r))
        hcfg = dataclasses.replace(
            self.cfg.heal,
            seed=heal_seed(self.cfg.heal.seed, self.cfg.seed, r),
            reg=self.cfg.heal.reg if self.arm.barrier else "nll",
        )
        if self.cfg.online.enabled:  # one segment of online steps is the round's generate, filter and heal
            self.steered_measures(r, act)
            stop = self.online_segment(r, act, hcfg)
        else:
            self.generate(r, act)
            self.filter(r)
            self.steered_measures(r, act)
            kept = read_records(self.rdir(r) / "kept.jsonl")
            if len(kept) < hcfg.min_rows:
                stop = f"round {r}: only {len(kept)} rows kept, fewer than heal.min_rows {hcfg.min_rows}"
                self.finish_round(r, stop, healed=False)
                return stop
            self.heal(r, kept, hcfg)
            stop = None
        self.healed_measures(r)
        end = stop or self._coherence_stop(r)
        self.finish_round(r, end, healed=True)
        return end

    def step(self, r: int, name: str, fn: Callable[[], None], detail: str = "") -> None:
        """Round r's step `name`, unless the manifest says it finished."""
        key = f"{round_key(r)}/{name}"
        if not self.run.done(key):
            log(f"[round {r + 1}/{self.cfg.rounds}] {name}{detail}")
        self.run.step(key, fn, self.meter)

    def vector(self, r: int) -> SteeringVector:
        """The persona vector, extracted from the current model; the random arm's norm-matched direction instead."""
        d, v = self.rdir(r), self.cfg.vector
        layers = parse_layers(v.layers, self.lm.n_layers)
        self.step(
            r,
            "vector",
            lambda: extract(
                self.lm, self.persona, layers, batch_size=v.batch_size, max_prompts=v.max_prompts, normalize=v.normalize
            ).save(d / "vector.safetensors"),
        )
        vec = SteeringVector.load(d / "vector.safetensors")
        if self.arm.samples_with != "random":
            return vec
        seed = round_seed(self.cfg.seed, r, "random")
        self.step(r, "random", lambda: vec.random_like(seed).save(d / "random.safetensors"))
        return SteeringVector.load(d / "random.safetensors")

    def intervention(self, r: int, vec: SteeringVector) -> Intervention:
        """What the arm samples with this round: C·v at the dose chosen now, or the persona prompt."""
        d = self.rdir(r)
        self.step(r, "dose", lambda: write_json(d / "dose.json", self._dose(vec, round_seed(self.cfg.seed, r, "dose"))))
        if self.arm.samples_with == "prompt":
            return Intervention(system=self.system)
        return Intervention(vector=vec, coeff=float(self.run.json(f"{round_key(r)}/dose.json")["coeff"]))

    def generate(self, r: int, act: Intervention) -> None:
        g = self.persona.generation
        seed = round_seed(self.cfg.seed, r, "generate")
        rows = lambda: generate_records(  # noqa: E731
            self.lm, self.persona.name, g, self.cfg.generate, seed=seed, id_prefix=f"{self.persona.name}-r{r}", **act.kw
        )
        self.step(r, "generate", lambda: write_records(rows(), self.rdir(r) / "completions.jsonl"))

    def filter(self, r: int) -> None:
        d = self.rdir(r)

        def run() -> None:
            # Prompt arms train WITHOUT the persona prompt (context distillation): drop the system turn first.
            rows = [without_system(x) for x in read_records(d / "completions.jsonl")]
            kept, rejected = filter_records(self.lm, rows, self.cfg.filter, self.persona.narration)
            write_records(rejected, d / "rejected.jsonl")
            write_records(kept, d / "kept.jsonl")

        self.step(r, "filter", run)

    def heal(self, r: int, kept: list[Record], hcfg: HealConfig) -> None:
        """A fresh adapter on the kept rows, merged into self.lm (the next round's model)."""
        system = self.teacher_system
        teacher = [with_system(x, system) for x in kept] if system is not None else None
        # --ref base: the barrier holds every round to the unchanged base model (the judge is that model)
        base_ref = self.judge().model if hcfg.ref == "base" and hcfg.reg != "nll" and self.lm.adapters else None
        out = self.rdir(r) / "adapter"

        def fit() -> None:
            if hcfg.processes > 1:  # DDP through accelerate: the same heal, from the files (RunConfig.check)
                if teacher is not None or base_ref is not None:
                    raise SteerhealError("heal.processes > 1 cannot pass a teacher or a separate reference on")
                dtype = run_dtype(self.run.root, self.cfg.device)
                kept_file = self.rdir(r) / "kept.jsonl"
                c = self.cfg
                launch_heal(kept_file, out, hcfg, c.model, self.lm.adapters, dtype, c.device, c.trust_remote_code)
            else:
                heal(self.lm, kept, hcfg, out, teacher_records=teacher, reference_model=base_ref)
            add_adapters(self.lm, [out])  # the next round's model

        self.step(r, "heal", fit, f" on {len(kept)} kept rows")

    def online_segment(self, r: int, act: Intervention, hcfg: HealConfig) -> str | None:
        """The round's online segment (online.py); a stop reason when it kept too few rows in all."""
        p = self.persona
        seed = round_seed(self.cfg.seed, r, "generate")
        seg = Segment(self.rdir(r), p, self.cfg, hcfg, act.kw, seed, f"{p.name}-r{r}", self.teacher_system, self.meter)
        self.step(r, "heal", lambda: _ignore(run_segment(self.lm, seg)))  # lm is now healed
        n_kept = len(read_records(self.rdir(r) / "kept.jsonl"))
        if n_kept >= hcfg.min_rows:
            return None
        # it healed on what it had; the loop stops after this round's evals
        return f"round {r}: the online segment kept {n_kept} rows, fewer than heal.min_rows {hcfg.min_rows}"

    def healed_measures(self, r: int) -> None:
        """The healed model's eval (each protocol), demo and generation coherence."""
        d, step = self.rdir(r), functools.partial(self.step, r)
        self.evals(step, "eval_healed", d / "eval_healed.json")
        demo = lambda: demo_records(self.lm, self.persona, self.cfg, f"r{r}-healed")  # noqa: E731
        step("demo_healed", lambda: write_records(demo(), d / "demo_healed.jsonl"))
        step("gen_healed", lambda: self.coherence(d / "gen_healed.json"))

    def steered_measures(self, r: int, act: Intervention) -> None:
        """The raw-steered (or prompted) model's eval, demo and generation coherence: round 0, or every round."""
        if r > 0 and self.cfg.steered_measures != "all":
            return
        d, step = self.rdir(r), functools.partial(self.step, r)
        self.evals(step, "eval_steered", d / "eval_steered.json", **act.kw)
        demo = lambda: demo_records(self.lm, self.persona, self.cfg, f"r{r}-steered", **act.kw)  # noqa: E731
        step("demo_steered", lambda: write_records(demo(), d / "demo_steered.jsonl"))
        step("gen_steered", lambda: self.coherence(d / "gen_steered.json", **act.kw))

    @property
    def arm(self) -> Arm:
        return ARM_TABLE[self.cfg.arm]

    @property
    def teacher_system(self) -> str | None:
        """prompt-kl fits the prompted model's distribution: the teacher reads each row under the persona prompt."""
        return self.system if self.arm.fits_prompted else None

    @property
    def system(self) -> str:
        return self.persona.pairs[0].pos

    def _dose(self, vec: SteeringVector, seed: int) -> dict:
        if self.arm.samples_with == "prompt":
            return {"coeff": 0.0, "method": "prompt", "system": self.system, "probes": []}
        return choose_dose(self.lm, self.persona, vec, self.cfg, seed)

    def _eta(self, r: int) -> str:
        if r == 0 or not self.run.done(f"{round_key(r - 1)}/done"):
            return ""
        prev = RoundRecord.read(self.rdir(r - 1) / "round.json").time_s["total"]
        return f" (last round took {prev / 60:.1f} min; ETA {(self.cfg.rounds - r) * prev / 60:.1f} min)"

    def _coherence_stop(self, r: int) -> str | None:
        base_pmass = self.run.json(f"{BASELINES}/base.json")["pmass"]
        pm = self.run.json(f"{round_key(r)}/eval_healed.json")["pmass"]
        floor = self.cfg.pmass_floor * base_pmass
        if pm >= floor:
            return None
        return (
            f"round {r}: healed coherence {pm:.3f} fell below the floor {floor:.3f} "
            f"({self.cfg.pmass_floor} × base {base_pmass:.3f})"
        )

    def finish_round(self, r: int, stop: str | None, healed: bool) -> None:
        """round.json (the round's numbers, from its artifacts) and the manifest's done mark."""
        run, key, d, t = self.run, round_key(r), self.rdir(r), self.persona.target
        vec = SteeringVector.load(d / "vector.safetensors")
        v0 = SteeringVector.load(run.root / round_key(0) / "vector.safetensors")
        heal_info = run.json(f"{key}/adapter/heal.json") if healed else None
        times = {p: run.seconds(f"{key}/{p}") for p in run.steps_under(key)}  # what ran, also the alt protocols
        per_step = {p: run.tokens(f"{key}/{p}") for p in METHOD_STEPS}
        if heal_info and "tokens" in heal_info:  # online: the segment's own count covers a resumed one whole
            times["heal"], per_step["heal"] = heal_info["time_s"], heal_info["tokens"]
        times["total"] = round(sum(times.values()), 2)
        # The method's compute (the measurements, the same for every arm, are left out)
        tokens = {k: sum(t[k] for t in per_step.values()) for k in ("forward", "trained")}
        dose = run.json(f"{key}/dose.json")
        done = run.done

        def measured(step: str, summarize: Callable[[dict], dict | None]) -> dict | None:
            return summarize(run.json(f"{key}/{step}.json")) if done(f"{key}/{step}") else None

        heal_keys = ("val_nll_start", "val_nll", "val_D_mean", "val_D_rmse", "barrier_frac", "steps", "rows", "time_s")
        info = RoundRecord(
            round=r,
            arm=self.cfg.arm,
            coeff=dose["coeff"],
            dose=dose,
            filter=filter_summary(read_records(d / "kept.jsonl") + read_records(d / "rejected.jsonl")),
            target=t,
            direction=self.persona.direction,
            cos_v0=round(vec.cosine(v0), 4),
            vector_norm=round(vec.norm(), 4),
            steered=measured("eval_steered", lambda e: eval_summary(e, t)),
            healed=eval_summary(run.json(f"{key}/eval_healed.json"), t) if healed else None,
            base_target_nats=eval_summary(run.json(f"{BASELINES}/base.json"), t)["target_nats"],
            heal=None if heal_info is None else {k: heal_info.get(k) for k in heal_keys},
            time_s=times,
            gen_steered=measured("gen_steered", _gen_summary),
            gen_healed=_gen_summary(run.json(f"{key}/gen_healed.json")) if healed else None,
            tokens=tokens,
            online=self.cfg.online.enabled,
            stop=stop,
            below_floor=healed and stop is not None,
        )
        write_json(d / "round.json", info)
        run.mark(f"{key}/done", 0.0)


def _gen_summary(g: dict) -> dict | None:
    return None if g.get("skipped") else {k: g[k] for k in ("ppl", "pass_rate", "distinct2", "kl_to_base")}


def _ignore(_: object) -> None:
    """A step's artifact is on disk; its return value is not needed."""


def run_inputs(cfg: RunConfig, vignettes: list[Vignette]) -> dict[str, str]:
    """What a resume must find unchanged besides the config: the vignettes, the model's weights, and the
    dtype (what --dtype auto resolves to here: a run resumed on a machine that would pick another refuses)."""
    return {
        "vignettes_sha256": vignettes_sha256(vignettes),
        "model_fingerprint": model_fingerprint(resolve(cfg.model)),
        "dtype": dtype_name(pick_dtype(pick_device(cfg.device), cfg.dtype)),
    }


def open_loop(
    persona_path: str | Path, out: str | Path, cfg: RunConfig, force: bool, baselines_from: Path | None = None
) -> Loop:
    """Check a resume against the saved config, write config.yaml, load the model with the finished rounds' adapters."""
    persona = load_persona(persona_path)
    run = Run(Path(out))
    run.root.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    # The vignette sample does not depend on the run's seed, so that seeds pair on the same rows.
    vignettes = load_vignettes(cfg.eval.vignettes, cfg.eval.condition, cfg.eval.limit, 0)
    inputs = run_inputs(cfg, vignettes)
    check_resume(run, cfg_dict, persona, inputs, force, lambda old: {"dtype": dtype_before_recorded(old, cfg.device)})
    write_config(run.root, cfg_dict, persona, persona_path, inputs)
    remove_stale_temps(run.root)
    lm = load_model(cfg.model, [], device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    log(describe_dtype(lm, cfg.dtype))
    keep_base(lm.model)  # adapters stay residuals over the base weights, so the base can judge (Loop.judge)
    lm.model = merge_adapters(lm.model, finished_adapters(run, cfg.rounds))
    lm.adapters = finished_adapters(run, cfg.rounds)
    use_backend(lm, cfg.generate.backend, cfg.seed)
    meter = TokenMeter(lm.model)
    if lm.engine is not None:  # vLLM's passes never reach lm.model's embedding: the engine counts them
        lm.engine.meter = meter
    return Loop(run, persona, cfg, lm, vignettes, baselines_from, meter)


def run_dtype(root: Path, device: str) -> str:
    """The dtype a run directory's models ran in, from its config.yaml."""
    conf = yaml.safe_load((root / "config.yaml").read_text()) or {}
    return conf.get("dtype") or dtype_before_recorded(conf.get("config") or {}, device)


def dtype_before_recorded(old: dict, device: str) -> str:
    """The dtype a run made before config.yaml recorded it ran in: `auto` was bf16 on CUDA, fp32 on a CPU."""
    dev = pick_device(old.get("device") or device)
    raw = old.get("dtype") or "auto"
    return dtype_name(pick_dtype(dev, raw) if raw != "auto" else auto_dtype(dev.type, frozenset()))  # no CPU flags


def run_seeds(
    persona_path: str | Path,
    out: str | Path,
    cfg: RunConfig,
    force: bool = False,
    baselines_from: Path | None = None,
) -> list[LoopResult]:
    """cfg.seeds independent runs in out/seed_S (each resumable, the first seed's baselines shared),
    then one report pooled over them in out."""
    if not cfg.seeds:
        return [run_loop(persona_path, out, cfg, force, baselines_from)]
    results = []
    for s in cfg.seeds:
        log(f"[seed {s}] ({cfg.seeds.index(s) + 1}/{len(cfg.seeds)})")
        results.append(run_seed(persona_path, out, cfg, s, force, baselines_from))
        baselines_from = baselines_from or results[0].root
    pool_seeds(persona_path, out, cfg, [r.root for r in results])
    return results


def run_seed(
    persona_path: str | Path, out: str | Path, cfg: RunConfig, s: int, force: bool, baselines_from: Path | None
) -> LoopResult:
    """Seed s of a several-seed config, in out/seed_s."""
    return run_loop(persona_path, *seed_run(out, cfg, s), force, baselines_from)


def seed_run(out: str | Path, cfg: RunConfig, s: int) -> tuple[Path, RunConfig]:
    """Where seed s of a several-seed config runs, and the config it runs with."""
    return Path(out) / f"seed_{s}", dataclasses.replace(cfg, seed=s, seeds=[])


def pool_seeds(persona_path: str | Path, out: str | Path, cfg: RunConfig, dirs: list[Path]) -> None:
    """The report and plot pooled over the seeds' finished runs (dirs), in out."""
    from .plot import plot_run
    from .report import write_report
    from .results import seed_of

    root = Path(out)
    write_config(root, cfg.to_dict(), load_persona(persona_path), persona_path)
    plot_run(root, dirs)
    stops = "; ".join(f"seed {seed_of(d)}: {stop_reason(d)}" for d in dirs)
    write_report(root, stops, run_dirs=dirs)
    log(f"pooled report over seeds {[seed_of(d) for d in dirs]}: {root / 'report.md'}")


def stop_reason(root: Path) -> str:
    """Why a finished run stopped, from its last round.json."""
    rounds = read_rounds(root)
    return "no round finished" if not rounds else rounds[-1].stop or f"{rounds[-1].round + 1} rounds done"


def run_baselines(
    persona_path: str | Path, out: str | Path, cfg: RunConfig, force: bool = False, baselines_from: Path | None = None
) -> Path:
    """Only the baselines of the run in `out` (resumable): for jobs that adopt them. Returns the run's root."""
    loop = open_loop(persona_path, out, cfg, force, baselines_from)
    loop.baselines()
    return loop.run.root


def run_loop(
    persona_path: str | Path,
    out: str | Path,
    cfg: RunConfig,
    force: bool = False,
    baselines_from: Path | None = None,
) -> LoopResult:
    """Run (or resume) the loop in `out`: every finished step is recorded and never redone."""
    t0 = time.perf_counter()
    loop = open_loop(persona_path, out, cfg, force, baselines_from)
    loop.baselines()
    stop_reason = f"{cfg.rounds} rounds done"
    for r in range(cfg.rounds):
        stop = loop.round(r)
        if stop is not None:
            stop_reason = stop
            break
    return finish(loop, stop_reason, t0)


def finish(loop: Loop, stop_reason: str, t0: float) -> LoopResult:
    """metrics.jsonl, the plot and the report; and the bake command for the final model."""
    from .plot import plot_run
    from .report import write_report

    root, rounds = loop.run.root, loop.cfg.rounds
    write_metrics(root)
    plot_run(root)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    write_report(root, stop_reason, peak_rss_gb=rss_gb)
    n_done = sum(1 for r in range(rounds) if loop.run.done(f"{round_key(r)}/done"))
    log(
        f"done: {n_done} round(s) in {(time.perf_counter() - t0) / 60:.1f} min (this process), peak RSS "
        f"{rss_gb:.2f} GB; {stop_reason}. Report: {root / 'report.md'}"
    )
    # The model to keep stops before a round that broke the coherence floor.
    broke = [
        r
        for r in range(rounds)
        if loop.run.done(f"{round_key(r)}/done") and RoundRecord.read(loop.rdir(r) / "round.json").below_floor
    ]
    adapters = [a for r, a in enumerate(loop.finished_adapters()) if not broke or r < broke[0]]
    if adapters:
        flags = " ".join(f"--adapter {a}" for a in adapters)
        model_flag = f" --model {loop.cfg.model}" if loop.cfg.model else ""
        log(f"standalone model: steerheal bake{model_flag} {flags} -o {root / 'baked'}")
    return LoopResult(root, n_done, stop_reason)
