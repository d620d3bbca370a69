"""Batched steered sampling: prompts in, JSONL records out."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch

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
    gate_open: list[float | None] | None = None,
) -> list[str]:
    """Complete each chat (left padding, KV cache), optionally with coeff · v added; texts in input order.

    temperature 0 means greedy. Prompts are batched in order of length to waste little on padding.
    `steer`: C's schedule along the completion and its cosine gate; with a gate, `gate_open` (one
    slot per chat) receives each row's mean gate weight over its tokens.
    """
    tok = lm.tokenizer
    texts = [render_prompt(tok, m) for m in chats]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    kwargs: dict = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=sample, pad_token_id=tok.pad_token_id
    )
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    steering = vector.apply(lm.model, coeff, steer) if vector is not None else contextlib.nullcontext()
    with steering as state, progress(desc, total=len(texts)) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(
                lm.device
            )
            gen = lm.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                out[i] = tok.decode(row, skip_special_tokens=True).strip()
            if gate_open is not None and state is not None and (rows := state.gate_open()) is not None:
                for i, g in zip(idx, rows):
                    gate_open[i] = round(g, 4)
            bar(len(idx))
    return out


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
    gate_open: list[float | None] = [None] * cfg.n
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
        gate_open=gate_open,
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
            steer={**how, "gate_open": gate_open[i]} if how and cfg.steer.gate is not None else how,
        )
        for i in range(cfg.n)
    ]
