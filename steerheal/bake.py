"""Bake: merge adapters, in order, into the base weights and save an ordinary HF checkpoint; optionally
with a steering vector baked into the MLP biases (a steerable checkpoint any engine serves).

The merge runs in fp32 (load_model merges adapters into fp32 weights as it loads), so a baked
model is the same function as base + stacked adapters everywhere `--adapter` is accepted, also
when the loop ran in bf16 (there each adapter is an fp32 low-rank residual, see models.add_low_rank).

Steering baked into a bias: a Llama-family config with `mlp_bias: true`, zero gate/up biases and
down_proj.bias = C·v_L in each steered block L adds exactly C·v_L to that block's output at every
position, which is what the hook does at a constant C (`SteeringVector.apply`). vLLM's Llama reads
`mlp_bias`, so the checkpoint serves steered generation without a fork.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import SteerhealError, __version__
from .models import BUNDLED, LoadedModel, decoder_layers, load_model, pick_dtype
from .progress import log
from .records import atomic_path, file_sha256
from .vector import SteeringVector


def bake(
    base_name: str | None,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    device: str | None = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    steer: str | Path | None = None,
    coeff: float = 0.0,
) -> dict:
    """Merge `adapters` (round 0 first) into `base_name`, with the vector file `steer` at `coeff` in the MLP
    biases if given, and save to out_dir atomically; return the manifest."""
    if not adapters and steer is None:
        raise SteerhealError(
            "bake needs at least one --adapter (a directory from `steerheal heal`) or a --steer vector"
        )
    t0 = time.perf_counter()
    paths = [str(a) for a in adapters]
    # Always merged in fp32: merged into bf16 weights, a small heal is mostly rounded away.
    lm = load_model(base_name, paths, device=device, dtype="fp32", trust_remote_code=trust_remote_code)
    steering = None
    if steer is not None:
        vec = SteeringVector.load(steer)
        lm.model = steered_by_bias(lm, vec, coeff)
        steering = {
            "vector": str(Path(steer).resolve()),
            "sha256": file_sha256(steer),
            "coeff": coeff,
            "layers": vec.layers,
        }
    if dtype not in (None, "auto", "fp32", "float32"):
        log(
            f"bake: --dtype {dtype} casts the merged weights after merging, which rounds away much of each "
            "adapter's ΔW (most of a small heal); the loop's model keeps it in fp32. Omit --dtype to ship that model."
        )
        lm.model.to(pick_dtype(lm.device, dtype))
    manifest: dict = {
        "base_model": base_name or BUNDLED,
        "adapters": [
            {"order": i, "path": str(Path(a).resolve()), "sha256": file_sha256(a)} for i, a in enumerate(paths)
        ],
        "steer": steering,
        "steerheal_version": __version__,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }
    with atomic_path(out_dir) as tmp:
        lm.model.save_pretrained(tmp)
        tok = lm.tokenizer
        tok.padding_side = "left"
        tok.save_pretrained(tmp)
        manifest["time_s"] = round(time.perf_counter() - t0, 2)
        (tmp / "steerheal_bake.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def steered_by_bias(lm: LoadedModel, vec: SteeringVector, coeff: float) -> nn.Module:
    """lm.model rebuilt with MLP biases on (mlp_biases): the same function as the hook at a constant coeff."""
    vec.check_compatible(lm)
    model: Any = lm.model
    biases = mlp_biases(model, vec, coeff)
    new_cfg = copy.deepcopy(model.config)
    new_cfg.mlp_bias = True
    dtype = next(model.parameters()).dtype
    steered = type(model)(new_cfg).to(dtype=dtype, device=next(model.parameters()).device)
    missing, unexpected = steered.load_state_dict(model.state_dict() | biases, strict=False)
    if unexpected or missing:
        raise SteerhealError(
            f"{new_cfg.model_type}: switching mlp_bias on changed more than the MLP biases; use the hook"
        )
    steered.tie_weights()
    return steered.eval()


def mlp_biases(model: nn.Module, vec: SteeringVector | None, coeff: float) -> dict[str, torch.Tensor]:
    """The MLP biases of a steerable checkpoint, by parameter name: zero everywhere but down_proj.bias =
    coeff · v_L in each steered block L. Refused for an MLP without a bias switch (config.mlp_bias)."""
    cfg: Any = model.config
    names = {id(m): n for n, m in model.named_modules()}
    blocks = decoder_layers(model)
    if not hasattr(cfg, "mlp_bias") or not all(hasattr(getattr(b, "mlp", None), "down_proj") for b in blocks):
        raise SteerhealError(
            f"{cfg.model_type}: its MLP has no bias switch (config.mlp_bias), so steering cannot be baked into the "
            "checkpoint; steer with the hook instead (steerheal generate --vector V --coeff C, or the loop with "
            "--backend hf)"
        )
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        mlp: Any = block.get_submodule("mlp")
        for proj in mlp.modules():
            if isinstance(proj, nn.Linear):
                out[f"{names[id(proj)]}.bias"] = torch.zeros(proj.out_features)
        if vec is not None and i in vec.directions:
            out[f"{names[id(mlp.down_proj)]}.bias"] = coeff * vec.directions[i].float().cpu()
    return out
