"""Heal: distil kept completions into a fresh LoRA, with a KL barrier to a frozen reference.

Loss per batch = mean completion-token NLL + lam · mean_b relu(D_b − tau), where D_b is the
per-position KL between student and reference over sequence b's completion positions,
aggregated by rmse (default), mean, p95 or max. The reference is the same weights with the
LoRA off (never a second copy); since it never changes during a heal, its log-probs over
completion positions are computed once and reused when they fit heal.ref_cache_gb.

Three steps, one function each: the reference (prepare_reference, choose_reference), train, and the
summary heal.json.

Over 400 lines: the loss pieces, the reference, training and the summary are one idea; each function fits a screen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import SteerhealError
from .chat import encode_completion
from .config import HealConfig
from .logprobs import (
    Batch,
    Span,
    TopK,
    cat_logprobs,
    per_position,
    right_padded,
    score_spans,
    span_logprobs,
    vocab_size,
)
from .models import LoadedModel, TokenMeter, add_adapters, decoder_layers, pad_token_id, parse_layers
from .progress import log, progress
from .records import Record, atomic_path

# ---------------------------------------------------------------- pure loss pieces


def kl_per_position(student_logp: torch.Tensor, ref_logp: torch.Tensor, direction: str = "kl_rev") -> torch.Tensor:
    """KL per row of [N, V] log-probs: reverse = KL(student‖ref), forward = KL(ref‖student)."""
    if direction == "kl_rev":
        return (student_logp.exp() * (student_logp - ref_logp)).sum(-1)
    if direction == "kl_fwd":
        return (ref_logp.exp() * (ref_logp - student_logp)).sum(-1)
    raise ValueError(f"unknown KL direction {direction}")


def topk_kl(student_logp: torch.Tensor, ref: TopK, direction: str = "kl_rev") -> torch.Tensor:
    """Per-position KL over the reference's top k tokens plus one bucket for all the others: a lower
    bound of the full-vocabulary KL. On a demo heal, k = 1024 gives D within 1.2% of it (mean over
    sequences; bench_refcache.py), where spreading the rest evenly over the tail was off by 74% at 256."""
    s = student_logp.gather(-1, ref.indices)
    s_rest = (1 - s.exp().sum(-1)).clamp_min(1e-12).log()
    r, r_rest = ref.values, ref.rest()
    if direction == "kl_fwd":  # KL(ref ‖ student)
        return (r.exp() * (r - s)).sum(-1) + r_rest.exp() * (r_rest - s_rest)
    return (s.exp() * (s - r)).sum(-1) + s_rest.exp() * (s_rest - r_rest)


def position_kl(student_logp: torch.Tensor, ref: torch.Tensor | TopK, direction: str) -> torch.Tensor:
    """KL per scored position against a full-vocabulary reference or a top-k one."""
    if isinstance(ref, TopK):
        return topk_kl(student_logp, ref, direction)
    return kl_per_position(student_logp, ref, direction)


def aggregate(kl: torch.Tensor, mask: torch.Tensor, agg: str = "rmse") -> torch.Tensor:
    """Per-sequence D from [B, T] per-position KL over the positions where mask is true → [B].

    rmse = sqrt(mean KL²) weights spikes (a short loop) far more than the mean does.
    """
    m = mask.to(kl.dtype)
    n = m.sum(-1).clamp_min(1)
    if agg == "mean":
        return (kl * m).sum(-1) / n
    if agg == "rmse":
        # the small epsilon keeps sqrt's gradient finite when a sequence's KL is exactly 0
        return ((kl.pow(2) * m).sum(-1) / n + 1e-12).sqrt()
    if agg == "max":
        return kl.masked_fill(~mask, float("-inf")).amax(-1).clamp_min(0)
    if agg == "p95":
        return torch.stack(
            [torch.quantile(kl[b][mask[b]], 0.95) if mask[b].any() else kl.new_zeros(()) for b in range(kl.shape[0])]
        )
    raise ValueError(f"unknown aggregation {agg}")


def barrier(d: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """lam · mean_b relu(D_b − tau): zero, with zero gradient, while every D stays under tau."""
    return lam * F.relu(d - tau).mean()


# ---------------------------------------------------------------- data


def encode_rows(tok: Any, records: Sequence[Record], max_len: int) -> list[Span]:
    """Tokenise each chat + completion with the exact boundary; refuse rows with nothing to learn."""
    empty = [r.id for r in records if not r.completion.strip()]
    if empty:
        raise SteerhealError(
            f"{len(empty)} record(s) have an empty completion (first: {empty[0]}); "
            "filter them out (`steerheal filter`) before healing"
        )
    rows = []
    for r in records:
        ids, start = encode_completion(tok, r.messages, r.completion, max_len)
        if len(ids) <= start:
            raise SteerhealError(f"record {r.id}: its prompt fills --max-len {max_len}; raise --max-len")
        rows.append(Span(ids, start))
    return rows


def batch_terms(
    model: nn.Module,
    batch: Batch,
    ref_logp: torch.Tensor | TopK | None,
    cfg: HealConfig,
    teacher_logp: torch.Tensor | TopK | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, fit, D[B]) for one batch; ref_logp is the reference's [N, V] (or top k), None for reg nll.

    fit is the completion-token NLL, or, given the teacher's log-probs [N, V] at the same
    positions, KL(teacher ‖ student): distillation towards a whole distribution (Prompt Baking).
    """
    labels = batch.labels[batch.mask]
    ref = None if cfg.reg == "nll" else ref_logp

    def terms(logp: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if teacher_logp is not None:
            fit = position_kl(logp, teacher_logp[sl], "kl_fwd")
        else:
            fit = -logp.gather(-1, labels[sl, None]).squeeze(-1)
        return fit, position_kl(logp, ref[sl], cfg.reg) if ref is not None else torch.zeros_like(fit)

    fit_pos, kl_pos = per_position(model, batch, terms)  # chunks of positions: no [N, V] tensor kept
    fit = fit_pos.mean()
    if ref is None:
        return fit, fit, torch.zeros(batch.input_ids.shape[0], device=fit.device)
    d = aggregate(_per_position(kl_pos, batch.mask), batch.mask, cfg.agg)
    return fit + barrier(d, cfg.tau, cfg.lam), fit, d


def _per_position(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values at the masked positions [N] back into [B, keep] (zeros elsewhere)."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


# ---------------------------------------------------------------- LoRA


def lora_targets(model: nn.Module, layer_idx: Sequence[int]) -> list[str]:
    """Full names of every Linear inside the chosen decoder blocks (attention and MLP projections),
    found generically rather than by Llama's q_proj/... names."""
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    out = []
    for i in layer_idx:
        for n, m in blocks[i].named_modules():
            if isinstance(m, nn.Linear):
                out.append(f"{prefix}.{i}.{n}")
    if not out:
        raise SteerhealError("no Linear projections found in the chosen layers; this architecture is not supported")
    return out


def attach_lora(model: nn.Module, cfg: HealConfig) -> tuple[Any, list[int]]:
    """A fresh LoRA (B = 0, so step 0 is exactly the current model) on the layer band."""
    from peft import LoraConfig, get_peft_model

    layers = parse_layers(cfg.layers, len(decoder_layers(model)))
    targets = lora_targets(model, layers)
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none", target_modules=targets, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: noise on stderr
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lcfg), layers


# ---------------------------------------------------------------- reference


def ref_cache_bytes(rows: Sequence[Span], vocab: int, top_k: int = 0) -> int:
    per_token = top_k * 12 if 0 < top_k < vocab else vocab * 4  # TopK: fp32 value + int64 id per entry
    return sum(r.n_scored for r in rows) * per_token


class Reference:
    """The frozen reference's log-probs at a batch's completion positions ([N, V] or their top k). Three
    kinds, one constructor each: CachedReference (computed once, before anything changes), ModelReference
    (a separate frozen model, read per batch) and AdapterOffReference (the student with its LoRA off)."""

    cache_gb = 0.0  # what caching every row's reference log-probs takes (heal.json reports it)

    def logprobs(self, b: Batch) -> torch.Tensor | TopK:
        raise NotImplementedError


class CachedReference(Reference):
    def __init__(self, cache: list[torch.Tensor] | list[TopK], cache_gb: float):
        self.cache, self.cache_gb = cache, cache_gb

    def logprobs(self, b: Batch) -> torch.Tensor | TopK:
        return cat_logprobs([self.cache[i] for i in b.rows], b.input_ids.device)


class ModelReference(Reference):
    def __init__(self, model: nn.Module, cache_gb: float = 0.0):
        self.model, self.cache_gb = model, cache_gb

    @torch.no_grad()
    def logprobs(self, b: Batch) -> torch.Tensor:
        return span_logprobs(self.model, b)


class AdapterOffReference(Reference):
    """No second copy of the weights: the student's own model with its adapter disabled, in eval mode."""

    def __init__(self, peft_model: Any, cache_gb: float = 0.0):
        self.peft_model, self.cache_gb = peft_model, cache_gb

    def logprobs(self, b: Batch) -> torch.Tensor:
        model, was_training = self.peft_model, self.peft_model.training
        model.eval()  # the frozen reference never sees dropout
        try:
            with torch.no_grad(), model.disable_adapter():
                return span_logprobs(model, b)
        finally:
            model.train(was_training)


def prepare_reference(
    lm: LoadedModel,
    rows: Sequence[Span],
    cfg: HealConfig,
    history: Sequence[str],
    reference_model: nn.Module | None = None,
) -> CachedReference | None:
    """Take the reference before anything changes: cache its log-probs if they fit (else None: it is read
    per batch once the LoRA is attached, see choose_reference), then merge `history`.

    With --ref base, either `history` holds the adapters not yet merged (the cached reference is
    then the base model's and the student trains on top of the merged history: one copy of the
    weights), or `reference_model` is the base model itself (the loop, which keeps one anyway).
    """
    cache_gb = ref_cache_bytes(rows, vocab_size(lm.model), cfg.ref_top_k) / 2**30
    ref = None
    if cfg.reg != "nll" and cache_gb <= cfg.ref_cache_gb:
        pad = pad_token_id(lm.tokenizer)
        ref = CachedReference(reference_logprobs(reference_model or lm.model, rows, pad, cfg.ref_top_k), cache_gb)
    elif cfg.reg != "nll" and cfg.ref == "base" and history and reference_model is None:
        raise SteerhealError(
            f"--ref base with a history needs the base log-probs cached: {cache_gb:.2f} GB "
            f"> --ref-cache-gb {cfg.ref_cache_gb}; raise --ref-cache-gb or lower --max-len/rows"
        )
    add_adapters(lm, history)
    return ref


def choose_reference(
    cached: CachedReference | None, reference_model: nn.Module | None, peft_model: Any, cfg: HealConfig, cache_gb: float
) -> Reference | None:
    """The barrier's reference once the LoRA is attached: the cache, else the separate model, else the student
    with its adapter off; None for reg nll (no barrier)."""
    if cfg.reg == "nll":
        return None
    if cached is not None:
        return cached
    return (
        ModelReference(reference_model, cache_gb)
        if reference_model is not None
        else AdapterOffReference(peft_model, cache_gb)
    )


def reference_logprobs(
    model: nn.Module, rows: Sequence[Span], pad_id: int, top_k: int, desc: str = "reference log-probs"
) -> list[torch.Tensor] | list[TopK]:
    """Each row's reference log-probs, 8 rows at a time, kept as their top k (compressed chunk by
    chunk of positions, so no [n, V] tensor is ever built) or, for a vocabulary of k or fewer, whole."""
    with progress(desc, total=len(rows)) as bar:
        return score_spans(model, rows, pad_id, 8, full=True, top_k=top_k, bar=bar)


@torch.no_grad()
def teacher_logprobs(
    lm: LoadedModel, rows: Sequence[Span], teacher_records: Sequence[Record], cfg: HealConfig
) -> list[torch.Tensor] | list[TopK]:
    """The current model's log-probs over each completion, read in the teacher's context: [n, V] rows,
    or their top heal.ref_top_k (Prompt Baking keeps the teacher's top logits the same way)."""
    if len(teacher_records) != len(rows):
        raise SteerhealError(f"{len(teacher_records)} teacher records for {len(rows)} rows; give one per row")
    t_rows = encode_rows(lm.tokenizer, teacher_records, cfg.max_len)
    for r, t, rec in zip(rows, t_rows, teacher_records):
        if r.n_scored != t.n_scored:
            raise SteerhealError(
                f"record {rec.id}: its completion is cut by --max-len {cfg.max_len} in the "
                "teacher's longer context; raise --max-len"
            )
    return reference_logprobs(lm.model, t_rows, pad_token_id(lm.tokenizer), cfg.ref_top_k, desc="teacher log-probs")


def _activation_checkpointing(model: Any, on: bool) -> None:
    """Switch gradient checkpointing on or off (transformers 5 renamed it activation checkpointing)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kw
        ) if on else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=kw
        ) if on else model.gradient_checkpointing_disable()


# ---------------------------------------------------------------- training


def warmup_steps(total: int, frac: float) -> int:
    """Warm-up length: a fraction of the steps, but at least one when asked (int() made short heals skip it)."""
    return min(total - 1, max(1, math.ceil(frac * total))) if frac > 0 and total > 1 else 0


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:  # linear from 1/(warmup+1): the first step never takes the full rate
            return (step + 1) / (warmup + 1)
        prog = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def records_sha256(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update((r.to_json() + "\n").encode())
    return h.hexdigest()


def _uniform(seed: int, salt: str, row_id: str) -> float:
    """A number in [0, 1) drawn from (seed, salt, id) alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{salt}/{row_id}".encode()).digest()[:8], "big") / 2**64


def order_by_id(ids: Sequence[str], seed: int, salt: str) -> list[int]:
    """Positions of `ids` in an order drawn from (seed, salt, id) alone: rows that two runs share (the same
    slot of the same round: arms with one seed) keep their order relative to each other, whatever else
    each run kept (common random numbers). Ties (a repeated id) keep their input order."""
    return sorted(range(len(ids)), key=lambda i: _uniform(seed, salt, ids[i]))


def split(ids: Sequence[str], val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) positions. A row is held out when its own draw falls below val_frac, so a row two arms
    share lands on the same side in both (about val_frac of the rows; with val_frac > 0 at least one row
    is held out and at least one trains)."""
    u = [_uniform(seed, "val", x) for x in ids]
    val = [i for i in range(len(ids)) if u[i] < val_frac]
    if not val and val_frac > 0 and len(ids) > 1:
        val = [min(range(len(ids)), key=lambda i: u[i])]
    if len(val) == len(ids):
        val.remove(max(val, key=lambda i: u[i]))
    held = set(val)
    return [i for i in range(len(ids)) if i not in held], val


@torch.no_grad()
def measure(
    peft_model: Any, rows: Sequence[Span], idx: list[int], ref: Reference | None, cfg: HealConfig, pad_id: int
) -> dict[str, float]:
    """Token-mean NLL and the sequence-mean of D under both aggregations, over rows idx.

    D here is always measured (reverse KL unless --reg kl_fwd), also for --reg nll, so runs
    with different regs and aggs compare on the same scale.
    """
    if not idx:
        return {"nll": float("nan"), "D_mean": float("nan"), "D_rmse": float("nan")}
    direction = "kl_fwd" if cfg.reg == "kl_fwd" else "kl_rev"
    ref = ref or AdapterOffReference(peft_model)
    tot_nll, tot_tok, dm, dr = 0.0, 0, [], []
    peft_model.eval()
    dev = next(peft_model.parameters()).device
    for s in range(0, len(idx), 8):
        b = right_padded(rows, idx[s : s + 8], pad_id, dev)
        nll_pos, kl_pos = _nll_and_kl(peft_model, b, ref.logprobs(b), direction)
        tot_nll += float(nll_pos.sum())
        tot_tok += int(b.mask.sum())
        kl = _per_position(kl_pos, b.mask)
        dm += aggregate(kl, b.mask, "mean").tolist()
        dr += aggregate(kl, b.mask, "rmse").tolist()
    peft_model.train()
    return {"nll": tot_nll / tot_tok, "D_mean": sum(dm) / len(dm), "D_rmse": sum(dr) / len(dr)}


def _nll_and_kl(model: nn.Module, b: Batch, ref: torch.Tensor | TopK, direction: str) -> tuple[torch.Tensor, ...]:
    """Per scored position: the token's NLL and the KL to the reference, in chunks of positions."""
    labels = b.labels[b.mask]
    return per_position(
        model, b, lambda lp, sl: (-lp.gather(-1, labels[sl, None]).squeeze(-1), position_kl(lp, ref[sl], direction))
    )


def train(
    peft_model: Any,
    rows: Sequence[Span],
    ids: Sequence[str],
    train_idx: list[int],
    ref: Reference | None,
    cfg: HealConfig,
    pad_id: int,
    teacher: list[torch.Tensor] | list[TopK] | None = None,
    sharded: bool = False,
) -> list[dict]:
    """AdamW with a cosine schedule and warm-up over the training rows (each epoch in the seed's order by
    row id, `ids`); one log row per optimizer step. Under `accelerate launch` (DDP) each process takes its
    share of each step's micro-batches and the gradients are summed over processes: the step one process
    takes with the same global batch. `sharded` (FSDP2, see shard_model): FSDP sums the gradients itself."""
    dev = next(peft_model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    world, rank = processes()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = math.ceil(micro_per_epoch / cfg.grad_accum) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup_steps(total, cfg.warmup)))
    log_rows: list[dict] = []
    step = 0
    with progress("healing", total=total) as bar:
        for epoch in range(cfg.epochs):
            perm = [train_idx[i] for i in order_by_id([ids[j] for j in train_idx], cfg.seed, f"epoch {epoch}")]
            micro = [perm[s : s + cfg.batch_size] for s in range(0, len(perm), cfg.batch_size)]
            for g in range(0, len(micro), cfg.grad_accum):
                group = micro[g : g + cfg.grad_accum]
                share = _share(group, world, rank, sharded)
                acc = _backward_share(peft_model, rows, share, len(group), ref, cfg, pad_id, teacher, sharded)
                if world > 1:  # sharded, FSDP has summed the gradients already: only the log numbers
                    acc = _sum_over_processes([] if sharded else params, acc, dev)
                if acc["bad"] != 0:
                    raise SteerhealError(
                        f"step {step} (epoch {epoch}): loss is {acc['bad']}; nothing written; lower --lr or check the data"
                    )
                active = acc.pop("active") > 0
                acc.pop("bad")
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                log_rows.append({"step": step, "epoch": epoch, **acc, "barrier_active": active, "lr": lr})
                step += 1
                bar(1, loss=acc["loss"], D=acc["D"])
    return log_rows


def _share(group: list[list[int]], world: int, rank: int, sharded: bool) -> list[tuple[list[int], bool]]:
    """This process's micro-batches of a step, each with whether it counts. Sharded, each forward and backward
    is a chain of collectives, so every process runs as many as the others: a short share (the epoch's last
    step) repeats a micro-batch whose loss counts zero."""
    own = [(idx, True) for idx in group[rank::world]]
    if sharded:
        own += [(group[0], False)] * (-(-len(group) // world) - len(own))
    return own


def _backward_share(
    peft_model: Any,
    rows: Sequence[Span],
    share: list[tuple[list[int], bool]],
    n_group: int,
    ref: Reference | None,
    cfg: HealConfig,
    pad_id: int,
    teacher: list[torch.Tensor] | list[TopK] | None,
    sharded: bool,
) -> dict[str, float]:
    """Backward through this process's share of a step (gradients accumulate); the step's log numbers."""
    dev = next(peft_model.parameters()).device
    acc = {"loss": 0.0, "fit": 0.0, "D": 0.0, "active": 0.0, "bad": 0.0}
    for idx, counts in share:
        b = right_padded(rows, idx, pad_id, dev)
        t_logp = cat_logprobs([teacher[i] for i in idx], dev) if teacher is not None else None
        with TokenMeter.paused(not counts):  # a repeat is no training: heal.json's tokens leave it out
            loss, fit, d = batch_terms(peft_model, b, ref.logprobs(b) if ref else None, cfg, t_logp)
        if not counts:
            (loss * 0).backward()  # the same collectives as the others' backward; no gradient added
            continue
        if not torch.isfinite(loss):
            acc["bad"] = float(loss.detach())  # raised by the caller, by every process at once
            if not sharded:  # sharded, the others wait on this process's collectives: finish the share
                break
        (loss / n_group).backward()
        acc["loss"] += float(loss.detach()) / n_group
        acc["fit"] += float(fit.detach()) / n_group
        acc["D"] += float(d.detach().mean()) / n_group
        acc["active"] += float(bool((d > cfg.tau).any()) and ref is not None)
    return acc


def processes() -> tuple[int, int]:
    """(how many processes share the heal, this one's rank): (1, 0) alone; under `accelerate launch` (or
    torchrun) accelerate's state, which joins the process group (gloo on CPUs, nccl on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # accelerate joins CPUs only when told to
    return state.num_processes, state.process_index


def check_processes(cfg: HealConfig) -> None:
    """Each process takes grad_accum / N of a step's micro-batches: a multiple, or some would idle. A sharded
    heal on one process is refused rather than run unsharded: the user asked for the memory it saves."""
    world = processes()[0] if cfg.processes == 1 else cfg.processes
    if cfg.shard and world == 1:
        raise SteerhealError(
            "heal.shard (--shard) shards the model over processes: give --processes 2 or more (or accelerate launch)"
        )
    if cfg.shard and not _fsdp_sums():
        raise SteerhealError(
            f"heal.shard needs torch 2.8 or newer (FSDP2 summing gradients over gloo); this is torch {torch.__version__}: "
            "upgrade torch, or heal on processes without --shard"
        )
    if cfg.grad_accum % world:
        raise SteerhealError(
            f"heal on {world} processes: heal.grad_accum (--grad-accum) {cfg.grad_accum} must be a multiple of "
            f"{world}, so that each process takes its share of every step's micro-batches"
        )


def _fsdp_sums() -> bool:
    """Whether this torch's FSDP2 can be told to sum gradients with SUM alone (what shard_model needs)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return hasattr(FSDPModule, "set_force_sum_reduction_for_comms")


def _sum_over_processes(params: list[torch.Tensor], acc: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Sum each parameter's gradient and the step's log numbers over the processes (every process then
    takes the same optimizer step). A process whose share was empty adds zeros."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    keys = list(acc)
    t = torch.tensor([acc[k] for k in keys], dtype=torch.float64, device=device)  # nccl reduces on the GPU
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def shard_model(model: nn.Module, world: int) -> dict[str, Any]:
    """FSDP2 (torch's fully_shard) over the `world` processes, LoRA attached: each decoder block is a unit
    (all-gathered for its forward and backward, freed after), then the root (embeddings, final norm, head).
    Every weight, frozen base and LoRA alike, then lives as a 1/world shard on each process. Returns
    heal.json's record of it: the parameter counts, whole and per process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dev = next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (world,))
    for unit in [*decoder_layers(model), model]:
        fsdp = fully_shard(unit, mesh=mesh)
        # Each process's loss is already scaled for a sum over processes (train): FSDP must sum, not
        # average, and with SUM alone (gloo has no PREMUL_SUM or AVG).
        fsdp.set_gradient_divide_factor(1.0)
        fsdp.set_force_sum_reduction_for_comms(True)
    params = list(model.parameters())  # tied weights once
    if not all(isinstance(p, DTensor) for p in params):
        raise SteerhealError("heal.shard: some weights were left unsharded by fully_shard; this model is not supported")
    local = {"all": sum(p.to_local().numel() for p in params)}  # type: ignore[attr-defined]
    local["lora"] = sum(p.to_local().numel() for p in params if p.requires_grad)  # type: ignore[attr-defined]
    rank = processes()[1]
    counts = {f"{k} {r}": float(v if r == rank else 0) for k, v in local.items() for r in range(world)}
    counts = _sum_over_processes([], counts, dev)  # each process's counts, gathered by a sum
    return {
        "params": sum(p.numel() for p in params),
        "params_per_process": [int(counts[f"all {r}"]) for r in range(world)],
        "lora_params": sum(p.numel() for p in params if p.requires_grad),
        "lora_per_process": [int(counts[f"lora {r}"]) for r in range(world)],
    }


def full_adapter(peft_model: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights whole, on the CPU, from their shards: each process joins every all-gather, in the
    same order (named_parameters'). Only the adapter is gathered, never the base weights."""
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }


def accelerate_launch(processes: int) -> list[str]:
    """`accelerate launch` for `processes` processes on this machine (--multi_gpu: accelerate's torchrun
    launcher, CPUs included), on a free port, so that two launches at once do not collide."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}"),
        *("--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"),
        f"--num_cpu_threads_per_process={max(1, (os.cpu_count() or 1) // processes)}",  # the cores, shared out
    ]


def launch(
    records: Path,
    out_dir: Path,
    cfg: HealConfig,
    model: str | None,
    adapters: Sequence[str],
    dtype: str,
    device: str,
    trust_remote_code: bool = False,
) -> None:
    """`steerheal heal` on cfg.processes processes under `accelerate launch` (DDP), as a child process: the
    records file, the model with its adapter history, and every heal setting passed on. The launch's output
    goes to OUT.launch.log (kept if it fails); its error becomes one line here: what the processes said."""
    import subprocess

    opts = [
        f"--{k.replace('_', '-')}={v}" for k, v in asdict(cfg).items() if k not in ("processes", "checkpoint", "shard")
    ]
    opts += ["--checkpoint" if cfg.checkpoint else "--no-checkpoint", "--shard" if cfg.shard else "--no-shard"]
    opts += [f"--model={model}"] if model else []
    opts += [f"--adapter={a}" for a in adapters] + [f"--dtype={dtype}", f"--device={device}"]
    opts += ["--trust-remote-code"] if trust_remote_code else []
    launcher = [*accelerate_launch(cfg.processes), "-m", "steerheal.cli"]
    log(f"heal on {cfg.processes} processes: accelerate launch ... steerheal heal {records}")
    launch_log = Path(out_dir).with_name(Path(out_dir).name + ".launch.log")
    launch_log.parent.mkdir(parents=True, exist_ok=True)
    with open(launch_log, "w") as fh:  # the launcher reports a failed process with a traceback of its own
        cmd = [*launcher, "heal", str(records), "-o", str(out_dir), *opts, "--quiet"]
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        mark = "steerheal heal: error: "
        said = dict.fromkeys(ln.split(mark, 1)[1] for ln in launch_log.read_text().splitlines() if mark in ln)
        raise SteerhealError(
            f"the heal on {cfg.processes} processes failed: {'; '.join(said) or f'exit {done.returncode}'} "
            f"(the launch's log: {launch_log})"
        )
    launch_log.unlink()


def summarize(log_rows: list[dict], ref: Reference | None, before: dict, after: dict) -> dict[str, Any]:
    """heal.json's numbers: NLL and D (to the reference) before and after training, and the barrier's use."""
    n = max(1, len(log_rows))
    return {
        "steps": len(log_rows),
        "ref_cache": isinstance(ref, CachedReference),
        "ref_cache_gb": round(ref.cache_gb, 4) if ref else 0.0,
        "train_nll_start": before["train"]["nll"],
        "train_nll": after["train"]["nll"],
        "val_nll_start": before["val"]["nll"],
        "val_nll": after["val"]["nll"],
        # D after training vs the reference, sequence means of the mean and rmse aggregations
        "val_D_mean": after["val"]["D_mean"],
        "val_D_rmse": after["val"]["D_rmse"],
        "train_D_mean": after["train"]["D_mean"],
        "train_D_rmse": after["train"]["D_rmse"],
        "mean_D_steps": sum(r["D"] for r in log_rows) / n,
        "barrier_frac": sum(r["barrier_active"] for r in log_rows) / n,
    }


# ---------------------------------------------------------------- the heal


def _check_inputs(lm: LoadedModel, records: list[Record], cfg: HealConfig, reference_model: nn.Module | None) -> None:
    if len(records) < cfg.min_rows:
        raise SteerhealError(
            f"{len(records)} rows to heal on, fewer than --min-rows {cfg.min_rows}; "
            "generate more completions or lower --min-rows"
        )
    if cfg.ref == "base" and lm.adapters and cfg.reg != "nll" and reference_model is None:
        raise SteerhealError(
            "--ref base needs the model loaded without its adapters: pass them as history "
            "(the CLI does this) so the base reference is taken before they are merged"
        )


@contextlib.contextmanager
def _checkpointing(model: Any, on: bool) -> Iterator[None]:
    """Gradient checkpointing for the duration, when asked."""
    if on:
        _activation_checkpointing(model, True)
    try:
        yield
    finally:
        if on:
            _activation_checkpointing(model, False)


def _save(
    peft_model: Any,
    out_dir: str | Path,
    log_rows: list[dict],
    summary: dict,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The adapter, its train log and heal.json, written atomically as one directory. `state`: the adapter's
    weights when the model's own are shards (full_adapter); peft keeps its keys and format."""
    peft_model.eval()
    with atomic_path(Path(out_dir)) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state)  # None: peft reads the model's own
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
        (tmp / "heal.json").write_text(json.dumps(summary, indent=2) + "\n")


def _write_out(
    peft_model: Any,
    out_dir: str | Path,
    log_rows: list[dict],
    summary: dict,
    meter: TokenMeter | None,
    sharding: dict[str, Any] | None,
    device: torch.device,
) -> None:
    """heal.json's numbers from every process (the tokens each passed, the shards each held), then the
    adapter, written by one process (under DDP every process holds the same one)."""
    if meter is not None:
        counts = _sum_over_processes([], meter.totals(), device)
        summary["tokens"] = {k: int(v) for k, v in counts.items()}
        meter.close()
    if sharding is not None:
        summary["shard"] = sharding
    state = full_adapter(peft_model) if sharding is not None else None  # every process joins the gathers
    if processes()[1] == 0:
        _save(peft_model, out_dir, log_rows, summary, state)


def heal(
    lm: LoadedModel,
    records: Sequence[Record],
    cfg: HealConfig,
    out_dir: str | Path,
    history: Sequence[str] = (),
    teacher_records: Sequence[Record] | None = None,
    reference_model: nn.Module | None = None,
) -> dict:
    """Train a LoRA on `records` over lm.model, write it to out_dir, return heal.json's summary; lm.model is
    left as it was (`models.add_adapters` applies the adapter). `history`: adapters merged after the reference
    is taken (--ref base with one copy of the weights). `teacher_records`: the rows in the teacher's context,
    whose distribution the student fits instead of the sampled tokens. `reference_model`: a separate one."""
    cfg.check()
    check_processes(cfg)
    t0 = time.perf_counter()
    records = list(records)
    _check_inputs(lm, records, cfg, reference_model)
    rows, pad_id = encode_rows(lm.tokenizer, records, cfg.max_len), pad_token_id(lm.tokenizer)
    ids = [r.id for r in records]
    train_idx, val_idx = split(ids, cfg.val_frac, cfg.seed)
    torch.manual_seed(cfg.seed)
    cached = prepare_reference(lm, rows, cfg, history, reference_model)
    teacher = teacher_logprobs(lm, rows, teacher_records, cfg) if teacher_records is not None else None

    # Under DDP the parent's meter sees none of it: count here, summed over the processes into heal.json.
    meter = TokenMeter(lm.model) if processes()[0] > 1 else None
    lm.model.train()  # no dropout in these models' configs; train() for correctness of any that have it
    peft_model, layer_idx = attach_lora(lm.model, cfg)
    sharding = shard_model(lm.model, processes()[0]) if cfg.shard and processes()[0] > 1 else None  # 1: refused
    cache_gb = ref_cache_bytes(rows, vocab_size(lm.model), cfg.ref_top_k) / 2**30
    ref = choose_reference(cached, reference_model, peft_model, cfg, cache_gb)
    both = {"val": val_idx, "train": train_idx}
    try:
        before = {k: measure(peft_model, rows, idx, ref, cfg, pad_id) for k, idx in both.items()}
        with _checkpointing(lm.model, cfg.checkpoint):
            log_rows = train(peft_model, rows, ids, train_idx, ref, cfg, pad_id, teacher, sharding is not None)
        after = {k: measure(peft_model, rows, idx, ref, cfg, pad_id) for k, idx in both.items()}
        summary = {
            "config": asdict(cfg),
            "model": lm.name,
            "history": list(lm.adapters),
            "data_sha256": records_sha256(records),
            "rows": {"train": len(train_idx), "val": len(val_idx)},
            "layers": layer_idx,
            "ref_model": "separate (base)" if reference_model is not None else "the current model",
            **summarize(log_rows, ref, before, after),
            "time_s": round(time.perf_counter() - t0, 2),
        }
        _write_out(peft_model, out_dir, log_rows, summary, meter, sharding, lm.device)
    finally:
        lm.model = peft_model.unload().eval()  # a plain model again, trained or not
        for p in lm.model.parameters():
            p.requires_grad_(False)
    log(
        f"healed: val NLL {summary['val_nll_start']:.3f} → {summary['val_nll']:.3f}, val D mean "
        f"{summary['val_D_mean']:.3f} rmse {summary['val_D_rmse']:.3f}, barrier active "
        f"{summary['barrier_frac']:.0%} of {summary['steps']} steps, {summary['time_s']:.0f} s"
    )
    return summary
