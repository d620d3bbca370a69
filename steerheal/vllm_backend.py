"""generate.backend vllm: the loop's sampling on vLLM, through a steerable checkpoint.

vLLM runs the model in processes of its own, where no hook of ours reaches. So the engine serves a
checkpoint with MLP biases switched on (bake.mlp_biases): C·v at a constant C is a bias, and a healed
round is a set of weights. Both reach the running engine the same way, as a safetensors file that a
worker extension loads (no restart, no pickling); the engine follows `lm` lazily, before each call.

Prompts go in as our own token ids and come back as token ids decoded by our tokenizer, so the
records, the filter, the heal and every report are the hf backend's. Greedy fp32 completions match
the hf backend's token for token (tests/test_vllm.py); sampled ones follow vLLM's random streams.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import SteerhealError
from .bake import mlp_biases
from .models import LoadedModel, low_precision, merged_state_dict
from .progress import log
from .records import atomic_path
from .vector import SteeringVector

# vLLM on a GPU shares it with the loop's own model (heal, eval): half of its memory, not vLLM's 90%.
GPU_SHARE = 0.5
# Unless the user's environment says otherwise: vLLM's CPU build binds one core and takes 4 GiB of KV cache
# (here: every core, 2 GiB), and it logs at INFO (here: warnings only, beside the loop's own log).
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


class Worker:
    """vLLM worker extension: load tensors by their HF names from a safetensors file (weights or biases)."""

    model_runner: Any  # set by vLLM's worker, which this class extends

    def steerheal_load(self, path: str) -> int:
        from safetensors.torch import load_file

        return len(self.model_runner.model.load_weights(load_file(path).items()))


@dataclass
class VllmEngine:
    """One vLLM engine per model name and dtype, kept for the process (`engine_for`)."""

    llm: Any
    root: Path  # the steerable checkpoint it serves, and the files it loads from
    model: Any  # the model whose shapes and names the biases follow
    eos: list[int]
    adapters: tuple[str, ...] = ()  # the healed rounds it serves now
    vector: SteeringVector | None = None  # the steering it serves now: C·v, or nothing
    coeff: float = 0.0
    pushes: int = 0
    meter: Any = None  # the loop's TokenMeter: each call adds its prompt and generated tokens (no padding)

    @classmethod
    def start(cls, lm: LoadedModel, seed: int = 0) -> VllmEngine:
        for k, v in VLLM_ENV.items():  # before the import: vLLM reads its logging level then
            os.environ.setdefault(k, v)
        try:
            from vllm import LLM
        except ImportError:
            raise SteerhealError(
                "generate.backend vllm: vLLM is not installed here; run scripts/setup_vllm.sh and use "
                ".venv-vllm/bin/steerheal (or --backend hf)"
            ) from None
        root = Path(tempfile.mkdtemp(prefix="steerheal-vllm-"))
        atexit.register(shutil.rmtree, root, True)
        save_checkpoint(lm.model, root, None, 0.0)
        lm.tokenizer.save_pretrained(root)
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        cuda = lm.device.type == "cuda"
        llm = LLM(
            model=str(root),
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=False,  # a cached prefix would outlive a change of C or of the weights
            generation_config="vllm",  # our sampling settings, not the checkpoint's defaults
            worker_extension_cls=f"{__name__}.Worker",
            **({"gpu_memory_utilization": GPU_SHARE} if cuda else {}),
        )
        gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
        eos = {lm.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
        return cls(llm, root, lm.model, sorted(eos), tuple(lm.adapters))

    def follow(self, lm: LoadedModel, vector: SteeringVector | None, coeff: float) -> None:
        """Bring the engine to lm's weights (its adapters) and to C·v, sending only what changed."""
        if vector is None or coeff == 0:
            vector, coeff = None, 0.0
        if vector is not None:
            vector.check_compatible(lm)
        if tuple(lm.adapters) != self.adapters:
            if lm.adapters and low_precision(lm.model):
                log(
                    "vllm: the healed rounds are merged into the engine's low-precision weights, which rounds most "
                    "of a small heal away; --dtype fp32 serves exactly the model the loop measures"
                )
            # A whole checkpoint, reloaded the way vLLM loads one: its CPU kernels repack the weights they read.
            self.model = lm.model
            save_checkpoint(lm.model, self.root, vector, coeff)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.root)})
            self.adapters, self.vector, self.coeff = tuple(lm.adapters), vector, coeff
            self.pushes += 1
        elif vector is not self.vector or coeff != self.coeff:
            # Biases only: vLLM keeps them as they load, so they can be written in place.
            path = self.root / "biases" / "biases.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_tensors(mlp_biases(self.model, vector, coeff), self.model, path)
            self.llm.collective_rpc("steerheal_load", args=(str(path),))
            self.vector, self.coeff = vector, coeff
            self.pushes += 1

    def complete(
        self,
        lm: LoadedModel,
        prompts: list[list[int]],
        *,
        vector: SteeringVector | None,
        coeff: float,
        max_new_tokens: int,
        min_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[list[int]]:
        """The completion token ids of each prompt (token ids), in order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.follow(lm, vector, coeff)
        common = dict(max_tokens=max_new_tokens, min_tokens=min_new_tokens, stop_token_ids=self.eos, detokenize=False)
        if temperature > 0:
            # One stream per row, from (seed, row): a row's completion does not depend on its batch.
            seeds = [int(np.random.SeedSequence([seed or 0, i]).generate_state(1)[0]) for i in range(len(prompts))]
            params = [SamplingParams(temperature=temperature, top_p=top_p, seed=s, **common) for s in seeds]
        else:
            params = [SamplingParams(temperature=0.0, **common)] * len(prompts)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outs]
        if self.meter is not None:
            self.meter.forward += sum(len(p) + len(r) for p, r in zip(prompts, rows))
        return rows


def save_checkpoint(model: Any, root: Path, vector: SteeringVector | None, coeff: float) -> None:
    """model's weights (residual adapters folded in) with C·v in the MLP biases, and its config with mlp_bias on,
    as an HF checkpoint in root (the tokenizer is saved once, by the engine's start)."""
    cfg = copy.deepcopy(model.config)
    cfg.mlp_bias = True
    cfg.save_pretrained(root)
    save_tensors(merged_state_dict(model) | mlp_biases(model, vector, coeff), model, root / "model.safetensors")


def save_tensors(tensors: dict[str, torch.Tensor], model: Any, path: Path) -> None:
    """Tensors as safetensors stores them, in the model's dtype, written atomically; a tied head is the
    embedding, stored once."""
    from safetensors.torch import save_file

    dtype = next(model.parameters()).dtype
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {
        k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items() if not (tied and k == "lm_head.weight")
    }
    with atomic_path(path) as tmp:
        save_file(out, tmp)


_ENGINES: dict[tuple[str, str], VllmEngine] = {}


def shutdown() -> None:
    """Stop every engine of this process (else vLLM stops them at exit, logging into closed streams)."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.llm.llm_engine.engine_core.shutdown()


atexit.register(shutdown)


def engine_for(lm: LoadedModel, seed: int = 0) -> VllmEngine:
    """The process's engine for lm's model and dtype, started on first use (a minute or two: vLLM compiles)."""
    key = (lm.name, str(next(lm.model.parameters()).dtype))
    if key not in _ENGINES:
        log(f"vllm: starting an engine for {lm.name} ({key[1]})")
        _ENGINES[key] = VllmEngine.start(lm, seed)
    return _ENGINES[key]
