"""Batched steered sampling: prompts in, JSONL records out."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from . import backtrack
from .chat import messages_for, render_prompt
from .config import GenerateConfig, SteerConfig
from .models import LoadedModel
from .progress import progress
from .records import Record
from .vector import SteeringVector


@torch.no_grad()
def complete(
    lm: LoadedModel,
    chats: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    vector: SteeringVector | None = None,
    coeff: float = 0.0,
    seed: int | None = 0,
    desc: str = "generating",
    min_new_tokens: int = 0,
    steer: SteerConfig | None = None,
    row_info: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Complete each chat (left padding, KV cache), optionally with coeff · v added; texts in input order.

    temperature 0 means greedy. Prompts are batched in order of length to waste little on padding.
    With an engine on lm (generate.backend vllm), it samples instead, at a constant C.
    `steer`: C's schedule along the completion, its cosine gate and backtracking (backtrack.py);
    `row_info` (one dict per chat) receives each row's gate-open share and rewinds.
    """
    tok = lm.tokenizer
    texts = [render_prompt(tok, m) for m in chats]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    if lm.engine is not None:  # generate.backend vllm: the same token ids in, token ids out
        sampling = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature)
        return _on_engine(lm, texts, vector, coeff, desc, top_p=top_p, seed=seed, **sampling)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = _hf_kwargs(tok.pad_token_id, max_new_tokens, min_new_tokens, temperature, top_p)
    steering = vector.apply(lm.model, coeff, steer) if vector is not None else contextlib.nullcontext()
    backtracking = steer is not None and steer.backtrack > 0 and vector is not None and coeff != 0
    with steering as state, progress(desc, total=len(texts)) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            if backtracking:  # our own decode loop: rows rewind on their own
                assert state is not None and steer is not None
                prompts = [tok(texts[i], add_special_tokens=False)["input_ids"] for i in idx]
                rows = backtrack.decode(
                    lm, prompts, state, steer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
                )
                new: Any = [r.tokens for r in rows]
                infos: list[dict[str, Any]] = [{"backtracks": r.backtracks} for r in rows]
            else:
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                gen = lm.model.generate(**enc.to(lm.device), **kwargs)
                new, infos = gen[:, enc["input_ids"].shape[1] :], [{} for _ in idx]
            for i, row in zip(idx, new):
                out[i] = tok.decode(row, skip_special_tokens=True).strip()
            if state is not None and (opened := state.gate_open()) is not None:
                for info, g in zip(infos, opened):
                    info["gate_open"] = round(g, 4)
            if row_info is not None:
                for i, info in zip(idx, infos):
                    row_info[i] = info
            bar(len(idx))
    return out


def _on_engine(
    lm: LoadedModel, texts: list[str], vector: SteeringVector | None, coeff: float, desc: str, **sampling: Any
) -> list[str]:
    """complete() on lm's vLLM engine: prompts as our token ids, completions decoded by our tokenizer."""
    tok = lm.tokenizer
    with progress(desc, total=len(texts)) as bar:
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows = lm.engine.complete(lm, ids, vector=vector, coeff=coeff, **sampling)
        bar(len(texts))
    return [tok.decode(r, skip_special_tokens=True).strip() for r in rows]


def use_backend(lm: LoadedModel, backend: str, seed: int = 0) -> None:
    """Sample lm's completions on `backend` (GenerateConfig.backend) from now on: vllm attaches the process's
    engine for lm's model, which follows lm's adapters and C·v by itself."""
    if backend == "vllm":
        from .vllm_backend import engine_for

        lm.engine = engine_for(lm, seed)
    else:
        lm.engine = None


def _hf_kwargs(pad: int, max_new_tokens: int, min_new_tokens: int, temperature: float, top_p: float) -> dict:
    """transformers' generate() arguments: sampling at temperature and top_p (no top-k), or greedy at 0."""
    kw: dict = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, pad_token_id=pad)
    if temperature > 0:
        return kw | dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    return kw | dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def generate_records(
    lm: LoadedModel,
    persona_name: str,
    prompts: Iterable[str],
    cfg: GenerateConfig,
    *,
    vector: SteeringVector | None = None,
    coeff: float = 0.0,
    system: str | None = None,
    seed: int = 0,
    id_prefix: str = "",
) -> list[Record]:
    """cfg.n completions cycling over the user prompts, each a Record ready for JSONL."""
    prompts = list(prompts)
    chats = [messages_for(prompts[i % len(prompts)], system) for i in range(cfg.n)]
    steered = vector is not None and coeff != 0
    info: list[dict[str, Any]] = [{} for _ in range(cfg.n)]
    texts = complete(
        lm,
        chats,
        vector=vector,
        coeff=coeff,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
        batch_size=cfg.batch_size,
        steer=cfg.steer,
        row_info=info,
    )
    layers = vector.layers if vector is not None and coeff != 0 else []
    # How the row was made, for filter, heal and the report: the schedule, where it reached its floor, the gate
    how = {**dataclasses.asdict(cfg.steer), "floor_at": cfg.steer.floor_at()} if steered else {}
    prefix = id_prefix or f"{persona_name}-s{seed}"
    return [
        Record(
            id=f"{prefix}-{i:05d}",
            persona=persona_name,
            messages=chats[i],
            completion=texts[i],
            coeff=float(coeff),
            layers=layers,
            seed=seed,
            model=lm.name,
            steer={**how, **info[i]} if how else {},
        )
        for i in range(cfg.n)
    ]
