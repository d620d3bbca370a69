"""The steerheal command line: thin commands over the core. Parse, load, call one core function, write.

Data goes to stdout or -o; logs, tables and progress go to stderr. Bad input exits 2 with one line.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from . import SteerhealError, __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Steer a persona into a model, distil it into LoRA, heal it with a KL barrier, measure, repeat.")

# Options shared by every command that loads a model (one definition, reused).
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="HF id or local dir; default: the bundled SmolLM2-135M-Instruct.")]
AdapterOpt = Annotated[Optional[list[Path]], typer.Option("--adapter", "-a", help="A peft adapter dir to stack (repeatable, in order: round 0 first).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model repo's own code to run.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]
OutOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default: stdout).")]


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
        except KeyboardInterrupt:
            typer.echo("steerheal: interrupted; nothing half-written was left (rerun to resume)", err=True)
            raise typer.Exit(130) from None

    return app.command(fn.__name__.rstrip("_"))(wrapper)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"steerheal {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False) -> None:
    """steerheal: steer, filter, heal, bake, eval, loop."""


def _load(model: str | None, adapter: list[Path] | None, device: str, dtype: str, trust: bool):
    from .models import load_model

    return load_model(model, [str(a) for a in adapter or []], device=device, dtype=dtype, trust_remote_code=trust)


@command
def vector(
    persona: Annotated[Path, typer.Argument(help="Persona YAML with contrastive pairs and prompts.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the vector (.safetensors).")],
    layers: Annotated[str, typer.Option(help="Layer band as depth fractions (0.45:0.55) or indices (12,13).")] = "0.45:0.55",
    normalize: Annotated[bool, typer.Option("--normalize", help="Unit-normalise each layer's direction.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="safetensors, or gguf to also write a llama.cpp control vector.")] = "safetensors",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 16,
    model: ModelOpt = None, adapter: AdapterOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False, quiet: QuietOpt = False,
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
    vec = extract(lm, p, parse_layers(layers, lm.n_layers), normalize=normalize, batch_size=batch_size)
    vec.save(output)
    log(f"wrote {output}: layers {vec.layers}, norms {vec.meta['norms']}")
    if fmt == "gguf":
        gg = output.with_suffix(".gguf")
        write_gguf(vec, gg, getattr(lm.model.config, "model_type", "llama"))
        log(f"wrote {gg} (llama.cpp control vector)")


@command
def generate(
    persona: Annotated[Path, typer.Argument(help="Persona YAML (its prompts are the user turns).")],
    vector_path: Annotated[Optional[Path], typer.Option("--vector", "-v", help="Steering vector (.safetensors).")] = None,
    coeff: Annotated[float, typer.Option(help="Steering coefficient C: adds C·v; 0 = unsteered.")] = 0.0,
    n: Annotated[int, typer.Option("-n", help="Number of completions (cycles over the prompts).")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Completions per batch.")] = 32,
    system: Annotated[Optional[str], typer.Option(help="A system prompt (the prompting baseline).")] = None,
    output: OutOpt = None,
    model: ModelOpt = None, adapter: AdapterOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False, quiet: QuietOpt = False,
) -> None:
    """Generate completions with C·v added to the residual stream; JSONL records to stdout or -o."""
    from .generate import generate_records
    from .persona import load_persona
    from .records import write_records
    from .vector import SteeringVector

    p = load_persona(persona)
    vec = SteeringVector.load(vector_path) if vector_path else None
    if vec is None and coeff != 0:
        raise SteerhealError("--coeff needs --vector (a file from `steerheal vector`)")
    lm = _load(model, adapter, device, dtype, trust_remote_code)
    if vec is not None:
        vec.check_compatible(lm)
    recs = generate_records(lm, p.name, p.generation, n, vector=vec, coeff=coeff, system=system,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, batch_size=batch_size)
    write_records(recs, output)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
