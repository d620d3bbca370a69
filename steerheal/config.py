"""Typed configs: the one source of every default.

Each step's options are a dataclass. The CLI options take their defaults from these
classes, the YAML presets only override them, and `--set key=value` is checked against
them (an unknown key gets the nearest valid one as a hint).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import SteerhealError

FOUNDATIONS: tuple[str, ...] = ("care", "fairness", "loyalty", "authority", "sanctity", "liberty", "social")

REGS = ("kl_rev", "kl_fwd", "nll")
# Random directions in the nulls: compare's (at the round-0 dose; a rank p-value needs K >= 19 to reach
# 0.05) and sweep's (at every grid point: a z and "beyond every draw", read as descriptive).
NULL_K_COMPARE = 19
NULL_K_SWEEP = 5
NULL_ALPHA = 0.05  # a shift is persona-specific when its rank p among the null's draws is at most this
REFERENCE = "steer"  # the arm compare sets every other one against, unless --reference says otherwise
# Selectivity's off-target penalty: 0.1 × the mean |Δnats| of the other six foundations (moralmaps' sel_gated).
OFF_TARGET_WEIGHT = 0.1
# A healed pmass ratio at or above this counts as "coherence held" (Q2): the prototype's "coherent" bar, 0.95
# of a 0.976 base, read as a ratio.
COHERENCE_HELD = 0.9
# sweep: a point counts as a candidate only while the forced choice still answers (pmass ratio at least this).
MIN_PMASS_RATIO = 0.5
SWEEP_BANDS = "0.2:0.3,0.45:0.55,0.7:0.8"  # early, middle and late bands of the same width
SWEEP_COEFFS = "2,4,8"  # a doubling ladder around the iso-KL dose on SmolLM2 (C 2.6)
# dose.method kl: the d log KL / d log C assumed before two probes give a secant (KL grows about as C²).
KL_DOSE_SLOPE = 2.0
AGGS = ("rmse", "mean", "p95", "max")
REFS = ("prev", "base")
DOSES = ("keep", "kl", "fixed")
CONDITIONS = ("other_violate", "self_violate", "both")
PROTOCOLS = ("kshot", "zero-shot")


@dataclass(frozen=True)
class Arm:
    """Where an arm's training rows and target come from: what it samples with, whether it fits the
    prompted model's distribution instead of the sampled tokens, and whether the KL barrier holds."""

    samples_with: str  # vector: the persona vector; random: a norm-matched random direction; prompt: the persona prompt
    fits_prompted: bool = False  # Prompt Baking: KL(prompted ‖ student) instead of the sampled tokens' NLL
    barrier: bool = True  # KL to the previous model; the nll arm drops it (what the barrier adds)


ARM_TABLE = {
    "steer": Arm("vector"),
    "prompt": Arm("prompt"),  # context distillation: sampled under the prompt, trained without it
    "prompt-kl": Arm("prompt", fits_prompted=True),
    "random": Arm("random"),
    "nll": Arm("vector", barrier=False),
}
ARMS = tuple(ARM_TABLE)
STEERED_MEASURES = ("all", "first")
SCHEDULES = ("constant", "linear", "exp")
GATE_MODES = ("hard", "soft")
BACKENDS = ("hf", "vllm")

# Every random stream of a round comes from the run's seed, never from the arm: two arms with one seed
# draw the same samples, LoRA initialisation and data order wherever the arm does not change them by
# design (common random numbers), so their difference pairs over seeds. The offsets keep seed 0's streams
# as they were before this table existed.
SEED_STREAMS = {"generate": 0, "random": 7, "dose": 500}
SEED_STRIDE = 1000  # between rounds (and between seeds, for the heal's own seed)


def round_seed(seed: int, r: int, stream: str) -> int:
    """The seed of one stream in round r of a run with this seed."""
    return seed + SEED_STRIDE * r + SEED_STREAMS[stream]


def heal_seed(base: int, seed: int, r: int) -> int:
    """The heal's seed (LoRA initialisation, split, data order) in round r: it varies with the run's seed,
    so seeds are independent draws, and not with the arm, so arms with one seed share it."""
    return base + SEED_STRIDE * seed + r


def opt(default: Any, help: str) -> Any:
    """A field with the help line of its command-line option (cli._opt reads it): one place for both."""
    return field(default=default, metadata={"help": help})


def help_of(section: type, name: str) -> str:
    """The help line of a field made with opt."""
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["help"]


@dataclass
class VectorConfig:
    """Contrastive extraction: a narrow middle band (a wide one collapsed the prototype's model)."""

    layers: str = opt("0.45:0.55", "Layer band as depth fractions (0.45:0.55) or indices (12,13).")
    max_prompts: int | None = opt(None, "Use only the first N user prompts (quicker).")
    normalize: bool = opt(False, "Unit-normalise each layer's direction.")
    batch_size: int = opt(16, "Prompts per forward pass.")


@dataclass
class SteerConfig:
    """How C·v is added along a completion while sampling. Only sampling follows it (the loop's
    completions, keep-rate dose probes); the iso-KL probes, raw-steered eval and measures steer at C."""

    method: str = opt("constant", "C along the completion: constant, linear (to the floor) or exp (halving).")
    tokens: int = opt(32, "linear: the token where C reaches the floor; exp: the half-life in tokens.")
    floor: float = opt(0.0, "The smallest share of C a decay goes down to.")
    gate: float | None = opt(None, "Cosine gate: add C·v only where cos(h, v) is below this.")
    gate_mode: str = opt("hard", "hard (all or nothing) or soft (scale by gate − cos, clipped at 0).")
    # Backtrack-and-replay (backtrack.py): watch the unsteered model's NLL of the sampled tokens over a
    # window; when its mean crosses backtrack_nll, rewind backtrack_tokens and resample them at a lower C.
    backtrack: int = opt(0, "Backtrack-and-replay: the window (tokens) of unsteered NLL to watch; 0 = off.")
    backtrack_nll: float = opt(
        4.0, "Rewind when the window's mean NLL under the unsteered model exceeds this."
    )  # nats per token: about the filter's max_ppl 50 (ln 50 = 3.9)
    backtrack_tokens: int = opt(8, "Tokens rewound and replayed.")
    backtrack_scale: float = opt(0.5, "C's share while replaying.")
    backtrack_max: int = opt(4, "Rewinds per completion at most.")

    def check(self) -> None:
        _choice("generate.steer.method", self.method, SCHEDULES)
        _choice("generate.steer.gate_mode", self.gate_mode, GATE_MODES)
        if self.tokens < 1 or not 0 <= self.floor <= 1:
            raise SteerhealError(
                f"generate.steer: tokens {self.tokens} must be at least 1 and floor {self.floor} within [0, 1]"
            )
        if self.backtrack < 0 or self.backtrack_tokens < 1 or self.backtrack_max < 0:
            raise SteerhealError("generate.steer: backtrack must be >= 0, backtrack_tokens >= 1, backtrack_max >= 0")
        if not 0 <= self.backtrack_scale <= 1:
            raise SteerhealError(f"generate.steer.backtrack_scale {self.backtrack_scale}: must be within [0, 1]")

    def factor(self, t: int) -> float:
        """C's share for completion token t (0 = the first): 1 at t = 0, never below the floor."""
        if self.method == "linear":
            return 1.0 - (1.0 - self.floor) * min(t / self.tokens, 1.0)
        if self.method == "exp":
            return max(self.floor, 0.5 ** (t / self.tokens))
        return 1.0

    def floor_at(self) -> int | None:
        """The first token at the floor (None: constant, or an exp decay to 0 never gets there)."""
        if self.method == "linear":
            return self.tokens
        if self.method == "exp" and self.floor > 0:
            return math.ceil(self.tokens * math.log2(1 / self.floor))
        return None


@dataclass
class GenerateConfig:
    n: int = opt(32, "Number of completions (cycles over the prompts).")
    max_new_tokens: int = opt(64, "Tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature; 0 = greedy.")
    top_p: float = opt(0.95, "Nucleus sampling mass.")
    batch_size: int = opt(32, "Completions per batch.")
    steer: SteerConfig = field(default_factory=SteerConfig)
    # vllm: a vLLM engine through a steerable checkpoint (vllm_backend.py), from the venv scripts/setup_vllm.sh
    # makes. Every sampling step uses it (completions, prompt arms, dose probes, coherence, demos); scoring stays on hf.
    backend: str = opt("hf", "Where completions are sampled: hf (transformers) or vllm (needs scripts/setup_vllm.sh).")

    def check(self) -> None:
        self.steer.check()
        _choice("generate.backend", self.backend, BACKENDS)
        s = self.steer
        if self.backend == "vllm" and (s.method != "constant" or s.gate is not None or s.backtrack > 0):
            raise SteerhealError(
                "generate.backend vllm steers at a constant C only (a bias in the checkpoint); the decay schedules, "
                "the cosine gate and backtracking need per-token state: use --backend hf"
            )


@dataclass
class DoseConfig:
    """How the loop picks the steering coefficient each round."""

    # kl: iso-KL (see dose.py); keep: filter survival; fixed: use coeff. On round 0 of the demo iso-KL chose
    # C 2.59 (p95 KL 1.01) where keep-rate bisection chose 4.36: a raw shift no different within the CIs at
    # pmass ratio 0.59 against 0.21, 96% of completions kept, and faster (benchmarks/bench_dose.py).
    method: str = "kl"
    coeff: float | None = None  # with method fixed
    target_keep: float = 0.75  # keep: the share of probes that should pass the filter
    kl_target: float = 1.0  # kl: p95 per-token KL(steered ‖ unsteered) in nats (steering-lite's anchor)
    kl_tokens: int = 20  # kl: greedy steered tokens per probe prompt
    lo: float = 0.5
    hi: float = 16.0
    steps: int = 3  # probes (forwards) per search
    probe_n: int = 16  # probe prompts


@dataclass
class FilterConfig:
    max_ppl: float = opt(50.0, "Drop if perplexity under the reference model >= this.")
    max_repetition: float = opt(0.3, "Drop if the top n-gram share >= this (loops).")
    min_words: int = opt(4, "Drop completions shorter than this many words.")
    ppl_tail: bool = opt(
        True, "Perplexity over the last quarter, or all, of the completion."
    )  # perplexity over the last quarter of the completion, where steering drift shows
    max_len: int = opt(512, "Truncate prompt + completion to this many tokens.")
    batch_size: int = opt(16, "Records per forward pass.")


@dataclass
class HealConfig:
    """What to train; defaults follow the prototype (LoRA r32/a64 on the middle 60%, tau 0.5, lam 0.3)."""

    reg: str = opt("kl_rev", "Barrier divergence: kl_rev = KL(student‖ref), kl_fwd, or nll (no barrier).")
    agg: str = opt("rmse", "Per-sequence aggregation of per-position KL: rmse, mean, p95, max.")
    tau: float = opt(0.5, "Barrier threshold: D below tau costs nothing.")
    lam: float = opt(0.3, "Barrier weight: loss = NLL + lam·relu(D − tau).")
    ref: str = opt("prev", "Reference: prev (with the --adapter history) or base (without).")
    rank: int = opt(32, "LoRA rank.")
    alpha: int = opt(64, "LoRA alpha.")
    layers: str = opt("0.2:0.8", "LoRA layer band as depth fractions (0.2:0.8) or indices.")
    lr: float = opt(1e-4, "AdamW learning rate (cosine schedule with warm-up).")
    epochs: int = opt(2, "Passes over the training rows.")
    batch_size: int = opt(4, "Rows per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    max_len: int = opt(256, "Truncate prompt + completion to this many tokens.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    val_frac: float = opt(0.125, "Fraction of rows held out for validation NLL and D.")
    seed: int = opt(0, "Random seed (LoRA init, split, shuffling).")
    min_rows: int = opt(8, "Refuse to heal on fewer rows than this.")
    warmup: float = opt(
        0.1, "Warm-up as a fraction of the steps."
    )  # a fraction of the steps, at least one step when > 0
    max_grad_norm: float = opt(1.0, "Clip the gradient norm at this; 0 = no clipping.")
    # Gradient checkpointing: each block's activations are recomputed in backward instead of kept
    # (less memory for more time; measured in the README's Performance section).
    checkpoint: bool = opt(False, "Gradient checkpointing: recompute activations in backward (less memory, more time).")
    ref_cache_gb: float = opt(
        2.0, "Cache the reference log-probs once if they fit in this many GB; else recompute per step."
    )
    # The cached reference keeps each position's top k log-probs (0 = the whole vocabulary): memory
    # independent of V. k = 1024 moves the demo's barrier D by 1.2% on average (bench_refcache.py).
    ref_top_k: int = opt(
        1024, "Keep each position's top k reference log-probs in the cache (0 = the whole vocabulary)."
    )
    processes: int = opt(1, "Processes the heal runs on (DDP, launched through accelerate); 1 = this process.")
    # FSDP2 (torch's fully_shard): each process holds 1/N of every weight while it trains (it loads them all first).
    shard: bool = opt(
        False, "Shard the model's weights (base and LoRA) over the processes (FSDP2); needs processes > 1."
    )

    def check(self) -> None:
        _choice("heal.reg", self.reg, REGS)
        _choice("heal.agg", self.agg, AGGS)
        _choice("heal.ref", self.ref, REFS)
        for name in ("rank", "alpha", "epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise SteerhealError(f"heal.{name} (--{name.replace('_', '-')}) must be at least 1")
        if not 0 <= self.val_frac < 1:
            raise SteerhealError("heal.val_frac (--val-frac) must lie in [0, 1)")
        if not 0 <= self.warmup < 1:
            raise SteerhealError("heal.warmup (--warmup) must lie in [0, 1): a fraction of the steps")
        if self.processes < 1:
            raise SteerhealError("heal.processes (--processes) must be at least 1")


@dataclass
class OnlineConfig:
    """`loop --online`: each step samples a small steered batch from the current model, filters it and takes
    one heal step; a segment of `steps` steps is one round (vector, dose and evals as in the iterative loop)."""

    enabled: bool = False
    steps: int = 8  # heal steps per segment
    batch: int = 8  # completions sampled per step (prompts cycle on from step to step)
    # The barrier's reference is the student as it was at the last multiple of ref_every steps (it trails
    # by 0 to ref_every - 1 steps); 0 = the segment's start model throughout, as in the iterative heal.
    ref_every: int = 4

    def check(self) -> None:
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise SteerhealError(f"online.{name} must be at least 1")
        if self.ref_every < 0:
            raise SteerhealError("online.ref_every must be 0 (the segment's start model) or more")

    def ref_step(self, step: int) -> int:
        """The step whose start weights the reference holds during `step`."""
        return 0 if self.ref_every == 0 else step - step % self.ref_every


@dataclass
class EvalConfig:
    vignettes: str | None = opt(
        None, "A tinymfv-schema JSONL path, tinymfv:classic|scifi|ai-actor (downloaded), or omit for the demo set."
    )
    condition: str = opt("other_violate", "other_violate, self_violate or both (tinymfv sources only).")
    limit: int | None = opt(None, "A balanced sample of N vignettes (round-robin over foundations).")
    think_tokens: int = opt(0, "Let the model write K tokens before it must answer; 0 = answer at once.")
    batch_size: int = opt(16, "Vignettes per forward pass.")
    protocol: str = opt("kshot", "kshot (seven worked examples of our own first) or zero-shot (tinymfv's protocol).")
    # Protocols each model is also scored under (<eval>.<protocol>.json beside each eval): one set of trained
    # models read both ways, at the cost of an eval each, and compare gives each verdict under each.
    also: list[str] = field(default_factory=list)

    def check(self) -> None:
        _choice("eval.condition", self.condition, CONDITIONS)
        _choice("eval.protocol", self.protocol, PROTOCOLS)
        for p in self.also:
            _choice("eval.also", p, PROTOCOLS)
        if self.protocol in self.also or len(set(self.also)) != len(self.also):
            raise SteerhealError(f"eval.also {self.also}: each protocol once, and not the run's own ({self.protocol})")
        if self.think_tokens < 0:
            raise SteerhealError(f"eval.think_tokens (--think-tokens) {self.think_tokens}: must be 0 or more")
        if self.batch_size < 1:
            raise SteerhealError(f"eval.batch_size (--batch-size) {self.batch_size}: must be at least 1")


@dataclass
class DecideConfig:
    """How compare turns intervals into decisions: better, worse, equivalent within ±delta, or undecided
    (with the seeds the plan expects to decide it). Reporting only: a run never depends on it."""

    # Equivalence margins. 0.1 nats of selectivity (or of target shift) is about a 10% change in the odds
    # of the target foundation, and about the half-width of one model's interval over the 132 classic
    # vignettes: a smaller difference is below what one eval of this benchmark resolves.
    delta: float = 0.1
    delta_shift: float = 0.1
    delta_pmass_ratio: float = 0.05  # 5% of base coherence
    power: float = 0.8  # the plan's power, to detect ±delta or to show equivalence within it
    sd_confidence: float = 0.8  # the plan reads the SD of a difference at this one-sided upper confidence bound

    def check(self) -> None:
        if min(self.delta, self.delta_shift, self.delta_pmass_ratio) <= 0:
            raise SteerhealError("decide.delta, delta_shift and delta_pmass_ratio must be above 0")
        if not (0.5 <= self.power < 1 and 0.5 <= self.sd_confidence < 1):
            raise SteerhealError("decide.power and decide.sd_confidence must lie in [0.5, 1)")

    def margin(self, measure: str) -> float:
        return {"selectivity": self.delta, "target_shift": self.delta_shift, "pmass_ratio": self.delta_pmass_ratio}[
            measure
        ]


EXECUTORS = ("local", "submitit")
CLUSTERS = ("local", "slurm")


@dataclass
class ExecutorConfig:
    """Where compare runs its (arm, seed) units and sweep its points: one after another in this process
    (local), or each as a job through submitit (cluster local: a process per job on this machine; slurm:
    an array job). Only where runs happen: it never changes a result, so a run may resume under another
    executor."""

    kind: str = opt(
        "local", "local (one after another, here) or submitit (a job per compare arm and seed, per sweep point)."
    )
    cluster: str = opt("slurm", "submitit's cluster: slurm, or local (processes on this machine).")
    partition: str | None = opt(None, "Slurm partition.")
    gpus_per_job: int = opt(0, "GPUs per job.")
    cpus_per_job: int | None = opt(None, "CPUs per job (Slurm); None: the cluster's default.")
    threads: int | None = opt(None, "torch threads in each job; None: torch's default.")
    timeout_min: int = opt(240, "A job's time limit in minutes.")
    array_parallelism: int = opt(64, "Jobs running at once (Slurm's array limit; local processes go in waves).")
    wait: bool = opt(True, "Wait for the jobs, then write the report; else submit and return.")

    def check(self) -> None:
        _choice("executor.kind", self.kind, EXECUTORS)
        _choice("executor.cluster", self.cluster, CLUSTERS)
        if self.array_parallelism < 1 or self.timeout_min < 1 or self.gpus_per_job < 0:
            raise SteerhealError(
                "executor: array_parallelism and timeout_min must be at least 1, gpus_per_job 0 or more"
            )
        if self.kind == "submitit" and self.cluster == "local" and not self.wait:
            raise SteerhealError("executor.wait false needs Slurm (its dependencies order the jobs); on local, wait")


@dataclass
class RunConfig:
    """A whole `loop` run. Sections are the steps' own configs."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    arm: str = "steer"
    rounds: int = 2
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # several independent runs (seed_S/ each), pooled in one report
    coherence_prompts: int = 24  # neutral prompts for generation coherence (greedy + sampled each); 0 = skip
    pmass_floor: float = 0.9  # stop when healed coherence < pmass_floor x base coherence
    demo_max_new_tokens: int = 40
    # Raw-steered eval, demo and generation coherence in every round (all), or in round 0 only (first:
    # compare places round 0's raw shift in the random null; later raw evals only cost time).
    steered_measures: str = "all"
    vector: VectorConfig = field(default_factory=VectorConfig)
    dose: DoseConfig = field(default_factory=DoseConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decide: DecideConfig = field(default_factory=DecideConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def check(self) -> None:
        if self.rounds < 1:
            raise SteerhealError("rounds must be at least 1")
        if len(set(self.seeds)) != len(self.seeds):
            raise SteerhealError(f"seeds {self.seeds}: each seed once")
        _choice("arm", self.arm, ARMS)
        _choice("steered_measures", self.steered_measures, STEERED_MEASURES)
        _choice("dose.method", self.dose.method, DOSES)
        if self.dose.method == "fixed" and self.dose.coeff is None:
            raise SteerhealError("dose.method fixed needs dose.coeff (--coeff C)")
        self.generate.check()
        self.heal.check()
        self.online.check()
        if self.heal.processes > 1 and (
            ARM_TABLE[self.arm].fits_prompted or self.heal.ref == "base" or self.online.enabled
        ):
            raise SteerhealError(
                f"heal.processes {self.heal.processes}: the launched heal trains on the sampled rows against the "
                "current model; arm prompt-kl (a teacher), heal.ref base and online mode need heal.processes 1"
            )
        if self.heal.shard and self.heal.processes == 1:
            raise SteerhealError("heal.shard shards the model over processes: it needs heal.processes 2 or more")
        if self.online.enabled and self.generate.backend != "hf":
            raise SteerhealError("online mode samples from the model while it trains: use --backend hf")
        if self.online.enabled and self.heal.ref == "base":
            raise SteerhealError(
                "online mode's reference is the trailing student (online.ref_every): drop heal.ref base"
            )
        self.eval.check()
        self.decide.check()
        self.executor.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SteerhealError(f"{key} {value!r}: use one of {', '.join(allowed)}")


# ---------------------------------------------------------------- building configs from YAML and --set


def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {near[0]}?" if near else f"; valid keys: {', '.join(valid)}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A YAML value cast to the field's type: YAML reads 1e9 as a string and 3 as an int."""
    if typing.get_origin(hint) is list:  # list[int]: a YAML list, or "0,1,2" from --set/--seeds
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SteerhealError(f"config key {key}: {value!r} is not a list (write 0,1,2 or [0, 1, 2])")
        return [_coerce(key, v.strip() if isinstance(v, str) else v, typing.get_args(hint)[0]) for v in items]
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise SteerhealError(f"config key {key}: {value!r} is not a {name}") from None
    raise AssertionError(f"unsupported config type {hint} for {key}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types get one clear error."""
    if not isinstance(data, dict):
        raise SteerhealError(f"config key {where.rstrip('.') or '(top)'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise SteerhealError(f"unknown config key {where}{key}{_nearest(str(key), names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}{key}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(f"{where}{key}", value, hint)
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, str) and isinstance(out.get(k), dict) and "method" in out[k]:
            v = {"method": v}  # a section's name alone sets its method: --set dose=kl means dose.method=kl
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(name: str) -> dict:
    """A preset's overrides (demo, full, compare) as a dict."""
    try:
        text = resources.files("steerheal").joinpath(f"presets/{name}.yaml").read_text()
    except FileNotFoundError:
        names = sorted(p.name.removesuffix(".yaml") for p in resources.files("steerheal").joinpath("presets").iterdir())
        raise SteerhealError(f"--config {name}: no such preset or file; presets are {', '.join(names)}") from None
    return yaml.safe_load(text) or {}


def parse_set(items: list[str]) -> dict:
    """--set heal.lam=0.5 --set rounds=3 → nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SteerhealError(f"--set {item}: use KEY=VALUE, e.g. --set heal.lam=0.5")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p, {}), dict):  # --set dose=kl, then --set dose.steps=4
                node[p] = {"method": node[p]}
            node = node.setdefault(p, {})
        value = yaml.safe_load(val)
        if isinstance(node.get(leaf), dict) and isinstance(value, str):
            node[leaf]["method"] = value  # --set dose.steps=4, then --set dose=kl
        else:
            node[leaf] = value
    return out


def with_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """cfg with nested overrides applied (as --set gives them), validated."""
    new: RunConfig = from_dict(RunConfig, deep_merge(cfg.to_dict(), overrides))
    new.check()
    return new


# What a run had for a key added after it: a run directory's config.yaml written before the key existed
# ran with this value. Listed sections (generate.steer, online, ...) map every key in them to its dataclass
# default, which is what the code did before they existed; the values given here are the ones whose default
# changed since. A key missing from a run's config.yaml and not covered here is refused, never guessed.
BEFORE_THE_KEY: dict[str, Any] = {
    "heal.ref_top_k": 0,  # the reference was the whole vocabulary before the top-k cache
    "heal.processes": 1,  # one process before DDP
    "generate.backend": "hf",  # every run sampled on transformers before the vLLM backend
}
DEFAULT_WAS_THE_BEHAVIOUR = (
    "steered_measures",
    "generate.steer",
    "heal.checkpoint",
    "heal.shard",
    "online",
    "eval.also",
    "decide",
    "executor",
)


def _leaves(d: dict, prefix: str = "") -> list[str]:
    return [
        k for key, v in d.items() for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
    ]


def _leaf(d: dict, key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _set_leaf(d: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def as_ran(config: dict) -> dict:
    """A run's recorded config with the keys added since filled in as that run ran them: BEFORE_THE_KEY's
    values, and today's default where the default was the behaviour (DEFAULT_WAS_THE_BEHAVIOUR). Any other
    missing key stays missing (unknown, so a resume refuses it and a reproduction asks for it)."""
    out = copy.deepcopy(config)
    defaults = RunConfig().to_dict()
    have = set(_leaves(out))
    for key in _leaves(defaults):
        parts = key.split(".")
        if key in have or any(".".join(parts[:i]) in have for i in range(1, len(parts))):
            continue  # recorded, or under what was a single value then (left as it was: it differs)
        if key in BEFORE_THE_KEY:
            _set_leaf(out, key, BEFORE_THE_KEY[key])
        elif any(key == k or key.startswith(k + ".") for k in DEFAULT_WAS_THE_BEHAVIOUR):
            _set_leaf(out, key, _leaf(defaults, key))
    return out


def run_settings(conf: dict, where: str, overrides: dict) -> dict:
    """A run directory's config.yaml settings, complete: keys added since the run map to what it had
    (as_ran); any other missing key is refused with its name, unless --set gives it."""
    user = as_ran(conf["config"])
    given = set(_leaves(deep_merge(user, overrides)))
    version = (conf.get("versions") or {}).get("git_commit") or (conf.get("versions") or {}).get("steerheal", "?")
    missing = [key for key in _leaves(RunConfig().to_dict()) if key not in given]
    if missing:
        raise SteerhealError(
            f"{where}: the run (steerheal {version}) has no {missing[0]}, and what it ran with is not known; "
            f"give it with --set {missing[0]}=VALUE"
        )
    return user


def resolve_config(config: str | None, overrides: dict) -> RunConfig:
    """The dataclass defaults, then one delta: the demo preset when no config is named (the loop's and every
    step command's defaults), else the named preset or YAML file (never stacked on another preset); then the
    overrides; validated. A run directory's config.yaml stands alone: that run's exact settings."""
    # The defaults as a dict first, so that a section named alone (--set dose=keep) finds its method.
    data = deep_merge(RunConfig().to_dict(), preset("demo") if config is None else {})
    if config:
        p = Path(config)
        if p.is_file():
            try:
                user = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise SteerhealError(f"{config}: malformed YAML ({getattr(e, 'problem', e)})") from None
            if not isinstance(user, dict):
                raise SteerhealError(f"{config}: a run config must be a YAML mapping")
            if isinstance(user.get("config"), dict) and "versions" in user:
                data, user = run_settings(user, config, overrides), {}
        else:
            user = preset(config)
        data = deep_merge(data, user)
    cfg: RunConfig = from_dict(RunConfig, deep_merge(data, overrides))
    cfg.check()
    return cfg
