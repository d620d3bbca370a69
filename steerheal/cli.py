"""The steerheal command line: thin commands over the core. Parse, load, call one core function, write.

Data goes to stdout or -o; logs, tables and progress go to stderr. Bad input exits 2 with one line.

Over 400 lines only because every option is spelled out once, with its help; no logic lives here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from . import SteerhealError, __version__
from .config import (
    ARMS,
    NULL_K_COMPARE,
    NULL_K_SWEEP,
    SWEEP_BANDS,
    SWEEP_COEFFS,
    EvalConfig,
    ExecutorConfig,
    FilterConfig,
    GenerateConfig,
    HealConfig,
    SteerConfig,
    VectorConfig,
    help_of,
    resolve_config,
)

# One set of defaults: a step command run alone uses what that step runs with inside `steerheal loop` (the
# dataclasses with the demo preset, config.resolve_config); every option below reads its default from here.
_D = resolve_config(None, {})
_V, _G, _F, _H, _E, _SEED = _D.vector, _D.generate, _D.filter, _D.heal, _D.eval, _D.seed
_S = _G.steer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Steer a persona into a model, distil it into LoRA, heal it with a KL barrier, measure, repeat.",
)

# Options shared by every command that loads a model (one definition, reused).
ModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help="HF id or local dir; default: the bundled SmolLM2-135M-Instruct.")
]
AdapterOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--adapter", "-a", help="A peft adapter dir to stack (repeatable, in order: round 0 first)."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto (bf16 on CUDA and on CPUs with native bf16: AMX or AVX-512 BF16; else fp32), fp32, bf16, fp16."
    ),
]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model repo's own code to run.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]
OutOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default: stdout).")]


def _opt(section: type, name: str, *names: str, **kw: Any) -> Any:
    """The option for a config field, its help line read from the field (config.opt): stated once."""
    return typer.Option(*names, help=help_of(section, name), **kw)


T = TypeVar("T")


def _section(section: type[T], options: dict[str, Any], **renamed: str) -> T:
    """A config section from a command's options (its locals()), field by field; `renamed`: field=option
    where the option's name differs. A field with no option keeps its default."""
    names = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(section)}  # type: ignore[arg-type]
    return section(**{field: options[opt] for field, opt in names.items() if opt in options})


def command(fn: Callable) -> Callable:
    """Register a command whose bad input becomes one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .progress import set_quiet

        set_quiet(bool(kwargs.get("quiet", False)))
        try:
            return fn(*args, **kwargs)
        except SteerhealError as e:
            typer.echo(f"steerheal {fn.__name__.rstrip('_')}: error: {e}", err=True)
            raise typer.Exit(2) from None
        except _oom_errors() as e:
            typer.echo(
                f"steerheal {fn.__name__.rstrip('_')}: error: out of memory ({str(e).splitlines()[0][:120]}); "
                "lower --batch-size (or --max-len), or use a smaller model or another device",
                err=True,
            )
            raise typer.Exit(3) from None
        except MemoryError:
            typer.echo(
                f"steerheal {fn.__name__.rstrip('_')}: error: out of CPU memory; lower --batch-size "
                "(or --max-len), or use a smaller model",
                err=True,
            )
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            typer.echo("steerheal: interrupted; nothing half-written was left (rerun to resume)", err=True)
            raise typer.Exit(130) from None

    return app.command(fn.__name__.rstrip("_"))(wrapper)


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"steerheal {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """steerheal: steer, filter, heal, bake, eval, loop."""


def _load(model: str | None, adapter: list[Path] | None, device: str, dtype: str, trust: bool):
    from .models import load_model

    return load_model(model, [str(a) for a in adapter or []], device=device, dtype=dtype, trust_remote_code=trust)


@command
def vector(
    persona: Annotated[Path, typer.Argument(help="Persona YAML with contrastive pairs and prompts.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the vector (.safetensors).")],
    layers: Annotated[str, _opt(VectorConfig, "layers")] = _V.layers,
    normalize: Annotated[bool, _opt(VectorConfig, "normalize", "--normalize")] = _V.normalize,
    fmt: Annotated[
        str, typer.Option("--format", help="safetensors, or gguf to also write a llama.cpp control vector.")
    ] = "safetensors",
    batch_size: Annotated[int, _opt(VectorConfig, "batch_size")] = _V.batch_size,
    max_prompts: Annotated[Optional[int], _opt(VectorConfig, "max_prompts")] = _V.max_prompts,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a steering vector: mean hidden-state difference at the assistant tag, pos vs neg persona."""
    from .models import parse_layers
    from .persona import load_persona
    from .progress import log
    from .vector import extract, write_gguf

    if fmt not in ("safetensors", "gguf"):
        raise SteerhealError(f"--format {fmt}: use safetensors or gguf")
    p = load_persona(persona)
    lm = _load(model, adapter, device, dtype, trust_remote_code)
    vec = extract(
        lm, p, parse_layers(layers, lm.n_layers), normalize=normalize, batch_size=batch_size, max_prompts=max_prompts
    )
    vec.save(output)
    log(f"wrote {output}: layers {vec.layers}, norms {vec.meta['norms']}")
    if fmt == "gguf":
        gg = output.with_suffix(".gguf")
        write_gguf(vec, gg, getattr(lm.model.config, "model_type", "llama"))
        log(f"wrote {gg} (llama.cpp control vector)")


@command
def generate(
    persona: Annotated[Path, typer.Argument(help="Persona YAML (its prompts are the user turns).")],
    vector_path: Annotated[
        Optional[Path], typer.Option("--vector", "-v", help="Steering vector (.safetensors).")
    ] = None,
    coeff: Annotated[float, typer.Option(help="Steering coefficient C: adds C·v; 0 = unsteered.")] = 0.0,
    n: Annotated[int, _opt(GenerateConfig, "n", "-n")] = _G.n,
    max_new_tokens: Annotated[int, _opt(GenerateConfig, "max_new_tokens")] = _G.max_new_tokens,
    temperature: Annotated[float, _opt(GenerateConfig, "temperature")] = _G.temperature,
    top_p: Annotated[float, _opt(GenerateConfig, "top_p")] = _G.top_p,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _SEED,
    batch_size: Annotated[int, _opt(GenerateConfig, "batch_size")] = _G.batch_size,
    system: Annotated[Optional[str], typer.Option(help="A system prompt (the prompting baseline).")] = None,
    schedule: Annotated[str, _opt(SteerConfig, "method")] = _S.method,
    decay_tokens: Annotated[int, _opt(SteerConfig, "tokens")] = _S.tokens,
    floor: Annotated[float, _opt(SteerConfig, "floor")] = _S.floor,
    gate: Annotated[Optional[float], _opt(SteerConfig, "gate")] = _S.gate,
    gate_mode: Annotated[str, _opt(SteerConfig, "gate_mode")] = _S.gate_mode,
    backtrack: Annotated[int, _opt(SteerConfig, "backtrack")] = _S.backtrack,
    backtrack_nll: Annotated[float, _opt(SteerConfig, "backtrack_nll")] = _S.backtrack_nll,
    backtrack_tokens: Annotated[int, _opt(SteerConfig, "backtrack_tokens")] = _S.backtrack_tokens,
    backtrack_scale: Annotated[float, _opt(SteerConfig, "backtrack_scale")] = _S.backtrack_scale,
    backtrack_max: Annotated[int, _opt(SteerConfig, "backtrack_max")] = _S.backtrack_max,
    backend: Annotated[str, _opt(GenerateConfig, "backend")] = _G.backend,
    output: OutOpt = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate completions with C·v added to the residual stream; JSONL records to stdout or -o."""
    from .generate import generate_records, use_backend
    from .persona import load_persona
    from .records import write_records
    from .vector import SteeringVector

    steer = _section(SteerConfig, locals(), method="schedule", tokens="decay_tokens")
    cfg = _section(GenerateConfig, locals())
    cfg.check()
    p = load_persona(persona)
    vec = SteeringVector.load(vector_path) if vector_path else None
    if vec is None and coeff != 0:
        raise SteerhealError("--coeff needs --vector (a file from `steerheal vector`)")
    lm = _load(model, adapter, device, dtype, trust_remote_code)
    if vec is not None:
        vec.check_compatible(lm)
    use_backend(lm, backend, seed)
    recs = generate_records(lm, p.name, p.generation, cfg, vector=vec, coeff=coeff, system=system, seed=seed)
    write_records(recs, output)


@command
def filter_(
    records: Annotated[str, typer.Argument(help="JSONL records from `steerheal generate`, or - for stdin.")] = "-",
    output: OutOpt = None,
    rejected: Annotated[Optional[Path], typer.Option(help="Also write the dropped records here.")] = None,
    persona: Annotated[Optional[Path], typer.Option(help="Persona YAML whose narration patterns to apply.")] = None,
    max_ppl: Annotated[float, _opt(FilterConfig, "max_ppl")] = _F.max_ppl,
    max_repetition: Annotated[float, _opt(FilterConfig, "max_repetition")] = _F.max_repetition,
    min_words: Annotated[int, _opt(FilterConfig, "min_words")] = _F.min_words,
    ppl_tail: Annotated[bool, _opt(FilterConfig, "ppl_tail", "--ppl-tail/--ppl-all")] = _F.ppl_tail,
    max_len: Annotated[int, _opt(FilterConfig, "max_len")] = _F.max_len,
    batch_size: Annotated[int, _opt(FilterConfig, "batch_size")] = _F.batch_size,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score completions (perplexity, repetition, narration, refusal); keep the coherent ones."""
    from .filter import filter_records, summary
    from .persona import load_persona
    from .records import read_records, write_records

    recs = read_records(records)
    if not recs:
        raise SteerhealError(f"{records}: no records to filter")
    narration = load_persona(persona).narration if persona else []
    lm = _load(model, adapter, device, dtype, trust_remote_code)
    cfg = _section(FilterConfig, locals())
    kept, dropped = filter_records(lm, recs, cfg, narration)
    if rejected:
        write_records(dropped, rejected)
    write_records(kept, output)
    _filter_table(summary(recs), quiet)


def _filter_table(s: dict, quiet: bool) -> None:
    from rich.table import Table

    from .progress import console

    if quiet:
        return
    t = Table(title="steerheal filter", show_header=True)
    t.add_column("")
    t.add_column("rows", justify="right")
    t.add_row("in", str(s["rows"]))
    t.add_row("kept", f"{s['kept']} ({s['kept_frac']:.0%})")
    for reason, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1]):
        t.add_row(f"dropped: {reason}", str(n))
    console.print(t)


@command
def heal(
    records: Annotated[str, typer.Argument(help="Kept JSONL records (from `steerheal filter`), or - for stdin.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Adapter directory to write (peft + train_log.jsonl + heal.json).")
    ],
    reg: Annotated[str, _opt(HealConfig, "reg")] = _H.reg,
    agg: Annotated[str, _opt(HealConfig, "agg")] = _H.agg,
    tau: Annotated[float, _opt(HealConfig, "tau")] = _H.tau,
    lam: Annotated[float, _opt(HealConfig, "lam")] = _H.lam,
    ref: Annotated[str, _opt(HealConfig, "ref")] = _H.ref,
    rank: Annotated[int, _opt(HealConfig, "rank")] = _H.rank,
    alpha: Annotated[int, _opt(HealConfig, "alpha")] = _H.alpha,
    layers: Annotated[str, _opt(HealConfig, "layers")] = _H.layers,
    lr: Annotated[float, _opt(HealConfig, "lr")] = _H.lr,
    epochs: Annotated[int, _opt(HealConfig, "epochs")] = _H.epochs,
    batch_size: Annotated[int, _opt(HealConfig, "batch_size")] = _H.batch_size,
    grad_accum: Annotated[int, _opt(HealConfig, "grad_accum")] = _H.grad_accum,
    max_len: Annotated[int, _opt(HealConfig, "max_len")] = _H.max_len,
    weight_decay: Annotated[float, _opt(HealConfig, "weight_decay")] = _H.weight_decay,
    val_frac: Annotated[float, _opt(HealConfig, "val_frac")] = _H.val_frac,
    warmup: Annotated[float, _opt(HealConfig, "warmup")] = _H.warmup,
    max_grad_norm: Annotated[float, _opt(HealConfig, "max_grad_norm")] = _H.max_grad_norm,
    min_rows: Annotated[int, _opt(HealConfig, "min_rows")] = _H.min_rows,
    checkpoint: Annotated[bool, _opt(HealConfig, "checkpoint")] = _H.checkpoint,
    ref_cache_gb: Annotated[
        float,
        _opt(HealConfig, "ref_cache_gb"),
    ] = _H.ref_cache_gb,
    ref_top_k: Annotated[
        int,
        _opt(HealConfig, "ref_top_k"),
    ] = _H.ref_top_k,
    processes: Annotated[int, _opt(HealConfig, "processes")] = _H.processes,
    shard: Annotated[bool, _opt(HealConfig, "shard")] = _H.shard,
    seed: Annotated[int, _opt(HealConfig, "seed")] = _H.seed,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Distil kept completions into a fresh LoRA: completion NLL + lam·relu(D − tau), D = KL to the reference."""
    from .heal import check_processes, launch
    from .heal import heal as heal_core
    from .heal import processes as join_the_processes
    from .records import read_records

    cfg = _section(HealConfig, locals())
    cfg.check()
    check_processes(cfg)
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:  # relaunch this command on N processes
        if records == "-":
            raise SteerhealError("--processes needs the records in a file, not on stdin")
        launch(Path(records), output, cfg, model, [str(a) for a in adapter or []], dtype, device, trust_remote_code)
        return
    join_the_processes()  # under accelerate launch: join the group (and take this process's GPU) before loading
    recs = read_records(records)
    history = [str(a) for a in adapter or []]
    # ref base: load without the history so the base reference is taken before heal merges it (one copy).
    base_ref = ref == "base" and reg != "nll"
    lm = _load(model, None if base_ref else adapter, device, dtype, trust_remote_code)
    heal_core(lm, recs, cfg, output, history=history if base_ref else ())


@command
def bake(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged HF checkpoint.")],
    adapter: AdapterOpt = None,
    steer: Annotated[
        Optional[Path],
        typer.Option(
            help="A vector (safetensors) to bake into the MLP biases at --coeff: a steerable checkpoint that vLLM "
            "and transformers serve (Llama-family MLPs)."
        ),
    ] = None,
    coeff: Annotated[float, typer.Option(help="The steering coefficient C for --steer.")] = 0.0,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge adapters, in order, into the base weights (and a vector into the MLP biases with --steer); save a
    plain checkpoint AutoModelForCausalLM opens."""
    from .bake import bake as bake_core
    from .progress import log

    if steer is not None and coeff == 0:
        raise SteerhealError("--steer needs a nonzero --coeff (the C to bake in)")
    m = bake_core(
        model,
        [str(a) for a in adapter or []],
        output,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        steer=steer,
        coeff=coeff,
    )
    steered = f", vector at C = {coeff:g} in the MLP biases" if steer is not None else ""
    log(f"wrote {output}: {len(m['adapters'])} adapter(s) merged into {m['base_model']}{steered} ({m['time_s']:.1f} s)")


# Options shared by `loop` and `compare` (one definition each).
ConfigOpt = Annotated[
    Optional[str],
    typer.Option(help="Run YAML, or a preset: demo (default, CPU), compare (the CPU arms comparison) or full (GPU)."),
]
RoundsOpt = Annotated[Optional[int], typer.Option(help="Number of rounds.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
SeedsOpt = Annotated[
    Optional[str], typer.Option(help="Several independent seeds, e.g. 0,1,2: runs in -o/seed_S, one pooled report.")
]
CoeffOpt = Annotated[
    Optional[float],
    typer.Option(help="A fixed steering coefficient (sets dose.method=fixed; default: bisect the dose)."),
]
VignettesOpt = Annotated[Optional[str], typer.Option(help="Eval vignettes: a tinymfv JSONL path or tinymfv:classic.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Any config key, e.g. --set heal.lam=0.5 --set generate.n=96.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Resume even if the config changed.")]
ExecutorOpt = Annotated[
    Optional[str],
    typer.Option(
        help=help_of(ExecutorConfig, "kind") + " Cluster options: --set executor.cluster=slurm, "
        "executor.partition=..., executor.gpus_per_job=1, ..."
    ),
]


def _run_config(config: str | None, set_: list[str] | None, **flags: Any) -> Any:
    """The RunConfig from a preset or YAML, the flags that were given, and --set (last wins)."""
    from .config import deep_merge, parse_set

    coeff, vignettes = flags.pop("coeff", None), flags.pop("vignettes", None)
    online, backend, executor = flags.pop("online", False), flags.pop("backend", None), flags.pop("executor", None)
    over: dict = {k: v for k, v in flags.items() if v is not None and v != "auto" and v is not False}
    if online:
        over["online"] = {"enabled": True}
    if coeff is not None:
        over["dose"] = {"method": "fixed", "coeff": coeff}
    if vignettes is not None:
        over["eval"] = {"vignettes": vignettes}
    if backend is not None:
        over["generate"] = {"backend": backend}
    if executor is not None:
        over["executor"] = {"kind": executor}
    return resolve_config(config, deep_merge(over, parse_set(set_ or [])))


@command
def sweep(
    persona: Annotated[Path, typer.Argument(help="Persona YAML.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Sweep directory.")],
    bands: Annotated[str, typer.Option(help="Layer bands (fractions of depth), comma-separated.")] = (SWEEP_BANDS),
    coeffs: Annotated[str, typer.Option(help="Steering coefficients, comma-separated.")] = SWEEP_COEFFS,
    null_k: Annotated[
        int, typer.Option(help="Random directions per point, norm-matched to the real vector.")
    ] = NULL_K_SWEEP,
    report_only: Annotated[
        bool, typer.Option(help="Run nothing: write the report from the finished steps (jobs may be running).")
    ] = False,
    executor: ExecutorOpt = None,
    config: ConfigOpt = None,
    vignettes: VignettesOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Raw steering over layer bands × coefficients against a random null, and the prompt by strength (Pareto curves)."""
    from .sweep import run_sweep

    cfg = _run_config(
        config,
        set_,
        executor=executor,
        model=model,
        vignettes=vignettes,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    try:
        cs = [float(c) for c in coeffs.split(",") if c.strip()]
    except ValueError:
        raise SteerhealError(f"--coeffs {coeffs}: give numbers, e.g. 2,4,8") from None
    run_sweep(persona, output, cfg, [b.strip() for b in bands.split(",") if b.strip()], cs, null_k, report_only, force)


@command
def loop(
    persona: Annotated[Path, typer.Argument(help="Persona YAML.")],
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Run directory (default runs/<persona name>).")
    ] = None,
    arm: Annotated[
        Optional[str], typer.Option(help="steer (default), prompt, prompt-kl, random or nll: see the README's Arms.")
    ] = None,
    online: Annotated[
        bool,
        typer.Option(
            help="Online mode: each round is a segment of steps that sample, filter and take one heal step each "
            "(online.steps, online.batch, online.ref_every via --set)."
        ),
    ] = False,
    backend: Annotated[
        Optional[str], typer.Option(help=help_of(GenerateConfig, "backend") + " Default: generate.backend.")
    ] = None,
    config: ConfigOpt = None,
    rounds: RoundsOpt = None,
    seed: SeedOpt = None,
    seeds: SeedsOpt = None,
    coeff: CoeffOpt = None,
    vignettes: VignettesOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run rounds of vector → dose → generate → filter → heal → eval, resumable, with baselines, report and plot."""
    from .loop import run_seeds
    from .persona import load_persona

    cfg = _run_config(
        config,
        set_,
        arm=arm,
        online=online,
        backend=backend,
        rounds=rounds,
        seed=seed,
        seeds=seeds,
        model=model,
        coeff=coeff,
        vignettes=vignettes,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    out = output or Path("runs") / load_persona(persona).name
    run_seeds(persona, out, cfg, force=force)


@command
def compare(
    persona: Annotated[Path, typer.Argument(help="Persona YAML.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Comparison directory (one sub-directory per arm).")],
    arms: Annotated[str, typer.Option(help="Comma-separated arms to run and compare.")] = ",".join(ARMS),
    null_k: Annotated[
        int, typer.Option(help="Random directions in the raw-steering null (0 = none).")
    ] = NULL_K_COMPARE,
    variant: Annotated[
        Optional[list[str]],
        typer.Option(
            help="An extra arm: NAME:KEY=VALUE[;KEY=VALUE], the steer arm with those settings "
            "(e.g. decay:generate.steer=exp;generate.steer.tokens=16). Repeatable."
        ),
    ] = None,
    report_only: Annotated[
        bool, typer.Option(help="Run nothing: report what the arms have so far (others may still be running).")
    ] = False,
    plan: Annotated[
        bool,
        typer.Option(
            help="Run nothing: from the seeds so far, the seeds per arm each decision needs and the hours they "
            "take (plan.md)."
        ),
    ] = False,
    reference: Annotated[
        Optional[str],
        typer.Option(help="The arm every other one is set against (an arm or a --variant; default steer)."),
    ] = None,
    executor: ExecutorOpt = None,
    config: ConfigOpt = None,
    rounds: RoundsOpt = None,
    seeds: SeedsOpt = None,
    vignettes: VignettesOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run several arms (each a full, resumable loop) and write one report: compare.md, compare.png, compare.json."""
    from .compare import parse_variant, run_compare, write_plan

    variants = dict(parse_variant(v) for v in variant or [])
    cfg = _run_config(
        config,
        set_,
        executor=executor,
        rounds=rounds,
        seeds=seeds,
        model=model,
        vignettes=vignettes,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    if plan:
        write_plan(output, cfg, arm_list, variants, reference)
        return
    run_compare(persona, output, cfg, arm_list, null_k, force, variants, report_only, reference)


@command
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from `steerheal loop`.")], quiet: QuietOpt = False
) -> None:
    """Redraw a run's trajectory.png (authority vs care nats per round, and coherence)."""
    from .plot import plot_run
    from .progress import log
    from .rundir import BASELINES

    if not (run_dir / BASELINES / "base.json").is_file():
        raise SteerhealError(f"{run_dir}: not a run directory with finished baselines")
    log(f"wrote {plot_run(run_dir)}")


@command
def eval_(
    vector_path: Annotated[
        Optional[Path],
        typer.Option("--vector", "-v", help="Steering vector (.safetensors) to evaluate the raw steered model."),
    ] = None,
    coeff: Annotated[float, typer.Option(help="Steering coefficient C: adds C·v; 0 = unsteered.")] = 0.0,
    system: Annotated[Optional[str], typer.Option(help="A system prompt (the prompting baseline).")] = None,
    vignettes: Annotated[
        Optional[str],
        _opt(EvalConfig, "vignettes", "--vignettes"),
    ] = _E.vignettes,
    condition: Annotated[str, _opt(EvalConfig, "condition")] = _E.condition,
    think_tokens: Annotated[int, _opt(EvalConfig, "think_tokens")] = _E.think_tokens,
    protocol: Annotated[str, _opt(EvalConfig, "protocol")] = _E.protocol,
    limit: Annotated[Optional[int], _opt(EvalConfig, "limit")] = _E.limit,
    seed: Annotated[int, typer.Option(help="Seed for the balanced --limit sample.")] = _SEED,
    batch_size: Annotated[int, _opt(EvalConfig, "batch_size")] = _E.batch_size,
    output: OutOpt = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Forced-choice moral-foundations eval (tinymfv): per-foundation nats, pmass (coherence), accuracy; JSON out."""
    import json

    from .evaluate import print_table, score_vignettes
    from .records import write_json
    from .vector import SteeringVector
    from .vignettes import load_vignettes

    cfg = _section(EvalConfig, locals())
    cfg.check()
    vigs = load_vignettes(vignettes, condition, limit, seed)
    vec = SteeringVector.load(vector_path) if vector_path else None
    if vec is None and coeff != 0:
        raise SteerhealError("--coeff needs --vector (a file from `steerheal vector`)")
    lm = _load(model, adapter, device, dtype, trust_remote_code)
    rep = score_vignettes(lm, vigs, cfg, vector=vec, coeff=coeff, system=system)
    print_table(rep)
    if output is None or str(output) == "-":
        sys.stdout.write(json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        write_json(output, rep)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
