"""Steering vectors: contrastive extraction at the assistant tag, safetensors I/O, and the hook.

The vector for layer L is mean_over(prompts × pairs)[h_L(pos system) − h_L(neg system)],
h_L being the residual stream at the output of decoder block L, read at the last prompt
token (the assistant tag). Steering adds coeff · v_L to that same output at every position,
so extraction and application touch exactly the same tensor.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import SteerhealError
from .chat import messages_for, render_prompt, supports_system
from .config import SteerConfig
from .logprobs import left_padded
from .models import LoadedModel, decoder_layers
from .persona import Persona
from .progress import progress
from .records import atomic_path


@dataclass
class SteeringVector:
    """One direction per layer, plus where it came from."""

    directions: dict[int, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # the file it was loaded from, for the eval's settings

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def check_compatible(self, lm: LoadedModel) -> None:
        """Refuse a vector made on another model (different depth or width)."""
        n_layers, hidden = lm.n_layers, lm.hidden_size
        made_on = self.meta.get("model", "another model")
        if self.meta.get("n_layers") and int(self.meta["n_layers"]) != n_layers:
            raise SteerhealError(
                f"vector was made on {made_on} with {self.meta['n_layers']} layers; this model has {n_layers}. "
                "Re-extract it with `steerheal vector` on this model"
            )
        for i, v in self.directions.items():
            if v.shape[-1] != hidden or i >= n_layers:
                raise SteerhealError(
                    f"vector was made on {made_on} (hidden size {v.shape[-1]}, layer {i}); this model has hidden "
                    f"size {hidden} and {n_layers} layers. Re-extract it with `steerheal vector` on this model"
                )

    def save(self, path: str | Path) -> None:
        tensors = {f"layer.{i}": v.detach().float().cpu().contiguous() for i, v in self.directions.items()}
        meta = {k: str(v) for k, v in self.meta.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        p = Path(path)
        if not p.is_file():
            raise SteerhealError(f"{path}: no such vector file; make one with `steerheal vector`")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                dirs = {int(k.split(".", 1)[1]): f.get_tensor(k) for k in f.keys() if k.startswith("layer.")}
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise SteerhealError(f"{path}: not a readable safetensors vector ({e})") from None
        if not dirs:
            raise SteerhealError(f"{path}: holds no 'layer.N' tensors; make one with `steerheal vector`")
        return cls(dirs, meta, str(p))

    def norm(self) -> float:
        """The norm of all layers' directions together."""
        return float(sum(float(v.float().norm()) ** 2 for v in self.directions.values()) ** 0.5)

    def random_like(self, seed: int) -> SteeringVector:
        """A random direction per layer with this vector's per-layer norms: the control for a generic
        perturbation of the same size (same layers, same dose rule)."""
        g = torch.Generator().manual_seed(seed)
        dirs = {}
        for i, v in self.directions.items():
            r = torch.randn(v.shape, generator=g, dtype=torch.float32)
            dirs[i] = r * (v.float().norm() / r.norm())
        meta = {
            **self.meta,
            "method": f"random (norm-matched to {self.meta.get('method', 'the persona vector')})",
            "random_seed": str(seed),
        }
        return SteeringVector(dirs, meta)

    def cosine(self, other: SteeringVector) -> float:
        """Cosine of the concatenated directions over the layers both share."""
        common = [i for i in self.layers if i in other.directions]
        if not common:
            return float("nan")
        a = torch.cat([self.directions[i].flatten().float() for i in common])
        b = torch.cat([other.directions[i].flatten().float() for i in common])
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    @contextlib.contextmanager
    def apply(self, model: nn.Module, coeff: float, steer: SteerConfig | None = None) -> Iterator[SteerState]:
        """Add coeff · v_L to the output of each layer L, at every position; hooks always removed.

        With `steer`, C follows its schedule over the completion's tokens and its cosine gate (see
        SteerState); the state it yields holds each row's gate statistics."""
        blocks = decoder_layers(model)
        state = SteerState(steer or SteerConfig())
        handles = []
        try:
            if coeff != 0:
                first = min(self.directions)
                for i, v in self.directions.items():
                    handles.append(blocks[i].register_forward_hook(_add_hook(coeff, v, state, i == first)))
            yield state
        finally:
            for h in handles:
                h.remove()


class SteerState:
    """Where sampling is along the completion, for schedules and the gate.

    A forward over more than one position is a prefill (a new batch of prompts): its positions
    steer at C's share for token 0, since the prefill's last position predicts completion token 0.
    Each later one-position forward (the KV-cached decode) predicts the next token t = 1, 2, ...
    The first steered layer advances the count; every layer reads it.
    """

    def __init__(self, steer: SteerConfig):
        self.steer = steer
        self.step = 0
        self.open: torch.Tensor | None = None  # [B] summed gate weights over predicted tokens
        self.seen = 0
        self.row_share: torch.Tensor | None = None  # [B] C's share per row, set by a custom decode loop

    @property
    def plain(self) -> bool:
        return self.steer.method == "constant" and self.steer.gate is None and self.row_share is None

    def advance(self, positions: int) -> None:
        self.step = 0 if positions > 1 else self.step + 1

    def gate(self, hs: torch.Tensor, v: torch.Tensor, record: bool) -> torch.Tensor:
        """[B, T] weight of C·v per position: 1 below the gate (hard) or (gate − cos)⁺ (soft)."""
        s = self.steer
        cos = torch.nn.functional.cosine_similarity(hs.float(), v.float(), dim=-1)
        w = (cos < s.gate).float() if s.gate_mode == "hard" else (s.gate - cos).clamp_min(0)  # type: ignore[operator]
        if record:  # the weight at each position that predicts a completion token
            last = w[:, -1].detach().cpu()
            self.open, self.seen = (last, 1) if self.step == 0 else (self.open + last, self.seen + 1)  # type: ignore[operator]
        return w

    def gate_open(self) -> list[float] | None:
        """Per row of the last batch: the mean gate weight over its predicted tokens (1 = always steered)."""
        return None if self.open is None else (self.open / max(self.seen, 1)).tolist()


def _add_hook(coeff: float, v: torch.Tensor, state: SteerState, first: bool):
    cache: dict[tuple, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        hs = out[0] if isinstance(out, tuple) else out
        key = (hs.device, hs.dtype)
        if key not in cache:
            cache[key] = v.to(device=hs.device, dtype=hs.dtype)
        if state.plain:  # today's constant C: one cached add
            if (key, "delta") not in cache:
                cache[(key, "delta")] = coeff * cache[key]
            hs = hs + cache[(key, "delta")]
        else:
            if first:
                state.advance(hs.shape[1])
            if state.row_share is not None:  # per row (backtracking decodes rows at different tokens)
                delta = coeff * state.row_share.to(hs)[:, None, None] * cache[key]
            else:
                delta = (coeff * state.steer.factor(state.step)) * cache[key]
            if state.steer.gate is not None:
                w = state.gate(hs, cache[key], record=first)
                hs = hs + w.unsqueeze(-1).to(hs.dtype) * delta
            else:
                hs = hs + delta
        return (hs, *out[1:]) if isinstance(out, tuple) else hs

    return hook


class _StopForward(Exception):
    """Raised after the last recorded layer: the rest of the model is not needed."""


@contextlib.contextmanager
def record_layers(model: nn.Module, layers: list[int], stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the output of the given decoder blocks on the next forward.

    With stop=True the forward is cut short after the deepest recorded block (the caller
    wraps the forward in `run_until_recorded`): a middle band needs only half the model.
    """
    blocks = decoder_layers(model)
    got: dict[int, torch.Tensor] = {}
    handles = []
    last = max(layers)

    def make(i: int):
        def hook(_mod, _inp, out):
            got[i] = (out[0] if isinstance(out, tuple) else out).detach()
            if stop and i == last:
                raise _StopForward

        return hook

    try:
        for i in layers:
            handles.append(blocks[i].register_forward_hook(make(i)))
        yield got
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def last_token_states(
    lm: LoadedModel, prompts: list[str], layers: list[int], batch_size: int = 16, desc: str = "reading activations"
) -> dict[int, torch.Tensor]:
    """Hidden state at the last token of each rendered prompt, per layer: {layer: [n, hidden]} (fp32, CPU)."""
    tok = lm.tokenizer
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with progress(desc, total=len(prompts)) as bar:
        for s in range(0, len(rows), batch_size):
            b = left_padded(rows, range(s, min(s + batch_size, len(rows))), tok.pad_token_id, lm.device)
            with record_layers(lm.model, layers, stop=True) as got:
                try:  # position_ids count the real tokens: absolute-position models need them
                    lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
                except _StopForward:
                    pass
            for i in layers:
                out[i].append(got[i][:, -1, :].float().cpu())  # left padding: the tag is last
            bar(len(b.rows))
    return {i: torch.cat(v) for i, v in out.items()}


def extract(
    lm: LoadedModel,
    persona: Persona,
    layers: list[int],
    normalize: bool = False,
    batch_size: int = 16,
    max_prompts: int | None = None,
) -> SteeringVector:
    """Raw mean difference (pos − neg system prompt) at the assistant tag, per layer.

    max_prompts caps the user turns (the first N), for a quick demo on a CPU.
    """
    tok = lm.tokenizer
    users = persona.extraction[:max_prompts] if max_prompts else persona.extraction
    pos = [render_prompt(tok, messages_for(u, p.pos)) for p in persona.pairs for u in users]
    neg = [render_prompt(tok, messages_for(u, p.neg)) for p in persona.pairs for u in users]
    h = last_token_states(lm, pos + neg, layers, batch_size)
    n = len(pos)
    dirs = {}
    for i in layers:
        d = (h[i][:n] - h[i][n:]).mean(0)
        dirs[i] = d / d.norm() if normalize else d
    meta = {
        "model": lm.name,
        "adapters": json.dumps(lm.adapters),
        "n_layers": str(lm.n_layers),
        "hidden_size": str(lm.hidden_size),
        "layers": json.dumps(layers),
        "persona": persona.name,
        "persona_sha256": persona.sha256,
        "method": "mean_diff_normalized" if normalize else "mean_diff",
        "n_prompts": str(len(users)),
        "n_pairs": str(len(persona.pairs)),
        "system_role": "native" if supports_system(tok) else "folded into user turn",
        "norms": json.dumps({i: round(float(dirs[i].norm()), 4) for i in layers}),
    }
    return SteeringVector(dirs, meta)


def write_gguf(vec: SteeringVector, path: str | Path, arch_hint: str = "llama") -> None:
    """Write a llama.cpp control vector (arch 'controlvector'); block i's vector is tensor 'direction.<i>'.

    llama.cpp adds direction.k after decoder block k (0-based), the same tensor `apply` steers, so the
    name is the block index itself; direction.0 is rejected by its loader, so block 0 is refused here.
    Ref: llama.cpp common/common.cpp common_control_vector_load_one + src/llama-adapter.cpp
    llama_adapter_cvec::apply/tensor_for (applied per layer by build_cvec(cur, il) in src/models/*.cpp).
    """
    import gguf

    if 0 in vec.directions:
        raise SteerhealError(
            "cannot export a direction for decoder block 0 to llama.cpp: its control-vector loader rejects "
            "'direction.0' (it never steers the output of block 0), so the file would be skipped. "
            "Choose layers >= 1 (e.g. `--layers 1,2`) or drop layer 0 before exporting"
        )
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", arch_hint)
        w.add_uint32("controlvector.layer_count", len(vec.directions))
        for i in vec.layers:
            w.add_tensor(f"direction.{i}", vec.directions[i].float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
