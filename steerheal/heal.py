"""Heal: distil kept completions into a fresh LoRA, with a KL barrier to a frozen reference.

Loss per batch = mean completion-token NLL + lam · mean_b relu(D_b − tau), where D_b is the
per-position KL between student and reference over sequence b's completion positions,
aggregated by rmse (default), mean, p95 or max. The reference is the same weights with the
LoRA off (never a second copy); since it never changes during a heal, its log-probs over
completion positions are computed once and reused when they fit --ref-cache-gb.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import SteerhealError
from .chat import encode_completion
from .models import LoadedModel, decoder_layers, merge_adapters, parse_layers
from .progress import log, progress
from .records import Record, atomic_path

REGS = ("kl_rev", "kl_fwd", "nll")
AGGS = ("rmse", "mean", "p95", "max")
REFS = ("prev", "base")


@dataclass
class HealConfig:
    """What to train; defaults follow the prototype (LoRA r32/a64 on the middle 60%, tau 0.5, lam 0.3)."""

    reg: str = "kl_rev"
    agg: str = "rmse"
    tau: float = 0.5
    lam: float = 0.3
    ref: str = "prev"
    rank: int = 32
    alpha: int = 64
    layers: str = "0.2:0.8"
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 256
    weight_decay: float = 0.0
    val_frac: float = 0.125
    seed: int = 0
    min_rows: int = 8
    warmup: float = 0.1
    ref_cache_gb: float = 2.0

    def check(self) -> None:
        if self.reg not in REGS:
            raise SteerhealError(f"--reg {self.reg}: use one of {', '.join(REGS)}")
        if self.agg not in AGGS:
            raise SteerhealError(f"--agg {self.agg}: use one of {', '.join(AGGS)}")
        if self.ref not in REFS:
            raise SteerhealError(f"--ref {self.ref}: use prev or base")
        for name in ("rank", "alpha", "epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise SteerhealError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.val_frac < 1:
            raise SteerhealError("--val-frac must lie in [0, 1)")
        if not 0 <= self.warmup < 1:
            raise SteerhealError("--warmup must lie in [0, 1): a fraction of the steps")


# ---------------------------------------------------------------- pure loss pieces


def kl_per_position(student_logp: torch.Tensor, ref_logp: torch.Tensor, direction: str = "kl_rev") -> torch.Tensor:
    """KL per row of [N, V] log-probs: reverse = KL(student‖ref), forward = KL(ref‖student)."""
    if direction == "kl_rev":
        return (student_logp.exp() * (student_logp - ref_logp)).sum(-1)
    if direction == "kl_fwd":
        return (ref_logp.exp() * (ref_logp - student_logp)).sum(-1)
    raise ValueError(f"unknown KL direction {direction}")


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
        return torch.stack([torch.quantile(kl[b][mask[b]], 0.95) if mask[b].any() else kl.new_zeros(())
                            for b in range(kl.shape[0])])
    raise ValueError(f"unknown aggregation {agg}")


def barrier(d: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """lam · mean_b relu(D_b − tau): zero, with zero gradient, while every D stays under tau."""
    return lam * F.relu(d - tau).mean()


# ---------------------------------------------------------------- data


@dataclass
class Row:
    ids: list[int]
    start: int  # index of the first completion token
    id: str = ""

    @property
    def n_comp(self) -> int:
        return len(self.ids) - self.start


def encode_rows(tok, records: Sequence[Record], max_len: int) -> list[Row]:
    """Tokenise each chat + completion with the exact boundary; refuse rows with nothing to learn."""
    empty = [r.id for r in records if not r.completion.strip()]
    if empty:
        raise SteerhealError(f"{len(empty)} record(s) have an empty completion (first: {empty[0]}); "
                             "filter them out (`steerheal filter`) before healing")
    rows = []
    for r in records:
        ids, start = encode_completion(tok, r.messages, r.completion, max_len)
        if len(ids) <= start:
            raise SteerhealError(f"record {r.id}: its prompt fills --max-len {max_len}; raise --max-len")
        rows.append(Row(ids, start, r.id))
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor
    keep: int  # logits kept: the last `keep` positions
    mask: torch.Tensor  # [B, keep] bool: positions that predict a completion token
    labels: torch.Tensor  # [B, keep] the token each kept position predicts (0 where masked)
    rows: list[int] = field(default_factory=list)


def make_batch(rows: Sequence[Row], idx: Sequence[int], pad_id: int, device: torch.device) -> Batch:
    """Right padding (built by hand: the tokenizer pads left for generation)."""
    sel = [rows[i] for i in idx]
    T = max(len(r.ids) for r in sel)
    first = min(r.start for r in sel) - 1  # the position that predicts the first completion token
    first = max(first, 0)
    keep = T - first
    ids = torch.full((len(sel), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(sel), T), dtype=torch.long)
    mask = torch.zeros((len(sel), keep), dtype=torch.bool)
    labels = torch.zeros((len(sel), keep), dtype=torch.long)
    for b, r in enumerate(sel):
        L = len(r.ids)
        ids[b, :L] = torch.tensor(r.ids)
        att[b, :L] = 1
        lo, hi = r.start - 1 - first, L - 1 - first  # kept positions lo..hi-1 predict ids[start..L-1]
        mask[b, lo:hi] = True
        labels[b, lo:hi] = torch.tensor(r.ids[r.start:])
    return Batch(ids.to(device), att.to(device), keep, mask.to(device), labels.to(device), list(idx))


def _supports_keep(model: nn.Module) -> bool:
    base = model
    while hasattr(base, "get_base_model") and base is not getattr(base, "get_base_model")():
        base = base.get_base_model()
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def completion_logp(model: nn.Module, batch: Batch, use_keep: bool = True) -> torch.Tensor:
    """Log-probs [N, V] at the completion-predicting positions, rows in batch order.

    Only the kept tail goes through the LM head and the softmax: prompts cost no vocab work.
    """
    kw = {"logits_to_keep": batch.keep} if use_keep else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kw).logits
    logits = logits[:, -batch.keep:]
    return F.log_softmax(logits[batch.mask].float(), dim=-1)


def batch_terms(model: nn.Module, batch: Batch, ref_logp: torch.Tensor | Callable[[], torch.Tensor] | None,
                cfg: HealConfig, use_keep: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, D[B]) for one batch; ref_logp is [N, V], a thunk giving it, or None for reg nll."""
    logp = completion_logp(model, batch, use_keep)
    labels = batch.labels[batch.mask]
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1).mean()
    if cfg.reg == "nll" or ref_logp is None:
        d = torch.zeros(batch.input_ids.shape[0], device=logp.device)
        return nll, nll, d
    ref = ref_logp() if callable(ref_logp) else ref_logp
    kl_flat = kl_per_position(logp, ref, cfg.reg)
    kl = torch.zeros(batch.mask.shape, dtype=kl_flat.dtype, device=kl_flat.device)
    kl = kl.masked_scatter(batch.mask, kl_flat)
    d = aggregate(kl, batch.mask, cfg.agg)
    return nll + barrier(d, cfg.tau, cfg.lam), nll, d


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


def attach_lora(model: nn.Module, cfg: HealConfig):
    """A fresh LoRA (B = 0, so step 0 is exactly the current model) on the layer band."""
    from peft import LoraConfig, get_peft_model

    layers = parse_layers(cfg.layers, len(decoder_layers(model)))
    targets = lora_targets(model, layers)
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: noise on stderr
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lcfg), layers


# ---------------------------------------------------------------- reference


def ref_cache_bytes(rows: Sequence[Row], vocab: int) -> int:
    return sum(r.n_comp for r in rows) * vocab * 4


@torch.no_grad()
def reference_logps(model: nn.Module, rows: Sequence[Row], pad_id: int, batch_size: int = 8,
                    use_keep: bool = True) -> list[torch.Tensor]:
    """Per-row [n_comp, V] log-probs of the reference (whatever `model` is now)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    dev = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))  # little padding
    with progress("reference log-probs", total=len(rows)) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = make_batch(rows, idx, pad_id, dev)
            lp = completion_logp(model, b, use_keep)
            for i, chunk in zip(idx, lp.split([rows[i].n_comp for i in idx])):
                out[i] = chunk.clone()
            bar(len(idx))
    return out


# ---------------------------------------------------------------- training


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return f


def records_sha256(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update((r.to_json() + "\n").encode())
    return h.hexdigest()


def split(n: int, val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_frac)) if val_frac > 0 else 0
    n_val = min(n_val, n - 1)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def heal(lm: LoadedModel, records: Sequence[Record], cfg: HealConfig, out_dir: str | Path,
         history: Sequence[str] = (), merge: bool = False) -> dict:
    """Train a LoRA on `records` over lm.model, write it to out_dir, return the heal.json summary.

    `history`: adapters not yet merged into lm.model; they are merged after the reference is
    taken, which is how --ref base works with a history (one copy of the weights). With
    merge=True the new adapter ends merged into lm.model (the loop continues from it); else
    lm.model is left as it was (plus history).
    """
    cfg.check()
    t0 = time.perf_counter()
    records = list(records)
    if len(records) < cfg.min_rows:
        raise SteerhealError(f"{len(records)} rows to heal on, fewer than --min-rows {cfg.min_rows}; "
                             "generate more completions or lower --min-rows")
    if cfg.ref == "base" and lm.adapters and cfg.reg != "nll":
        raise SteerhealError("--ref base needs the model loaded without its adapters: pass them as history "
                             "(the CLI does this) so the base reference is taken before they are merged")
    tok, model = lm.tokenizer, lm.model
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = encode_rows(tok, records, cfg.max_len)
    train_idx, val_idx = split(len(rows), cfg.val_frac, cfg.seed)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    use_keep = _supports_keep(model)
    dev = lm.device
    torch.manual_seed(cfg.seed)

    # The reference: cache it once if it fits, else recompute it per batch with the LoRA off.
    need_ref = cfg.reg != "nll"
    cache_gb = ref_cache_bytes(rows, vocab) / 2**30
    cache: list[torch.Tensor] | None = None
    if need_ref and cache_gb <= cfg.ref_cache_gb:
        cache = reference_logps(model, rows, pad_id, use_keep=use_keep)
    elif need_ref and cfg.ref == "base" and history:
        raise SteerhealError(f"--ref base with a history needs the base log-probs cached: {cache_gb:.2f} GB "
                             f"> --ref-cache-gb {cfg.ref_cache_gb}; raise --ref-cache-gb or lower --max-len/rows")
    if history:
        model = merge_adapters(model, list(history))
        lm.model, lm.adapters = model, lm.adapters + [str(a) for a in history]

    model.train()  # no dropout in these models' configs; train() for correctness of any that have it
    peft_model, layer_idx = attach_lora(model, cfg)
    ok = False
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        micro_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup * total)))

        def ref_for(b: Batch, force: bool = False):
            if not need_ref and not force:
                return None
            if cache is not None:
                return torch.cat([cache[i] for i in b.rows]).to(dev)

            def on_the_fly() -> torch.Tensor:
                with torch.no_grad(), peft_model.disable_adapter():
                    return completion_logp(peft_model, b, use_keep)
            return on_the_fly

        def evaluate(idx: list[int]) -> dict:
            """Token-mean NLL and the sequence-mean of D under both aggregations, over rows idx.

            D here is always measured (reverse KL unless --reg kl_fwd), also for --reg nll, so
            runs with different regs and aggs compare on the same scale.
            """
            if not idx:
                return {"nll": float("nan"), "D_mean": float("nan"), "D_rmse": float("nan")}
            direction = "kl_fwd" if cfg.reg == "kl_fwd" else "kl_rev"
            tot_nll, tot_tok, dm, dr = 0.0, 0, [], []
            peft_model.eval()
            with torch.no_grad():
                for s in range(0, len(idx), 8):
                    b = make_batch(rows, idx[s:s + 8], pad_id, dev)
                    logp = completion_logp(peft_model, b, use_keep)
                    ref = ref_for(b, force=True)
                    ref = ref() if callable(ref) else ref
                    n = int(b.mask.sum())
                    tot_nll += float(-logp.gather(-1, b.labels[b.mask][:, None]).sum())
                    tot_tok += n
                    kl = torch.zeros(b.mask.shape, dtype=logp.dtype, device=dev).masked_scatter(
                        b.mask, kl_per_position(logp, ref, direction))
                    dm += aggregate(kl, b.mask, "mean").tolist()
                    dr += aggregate(kl, b.mask, "rmse").tolist()
            peft_model.train()
            return {"nll": tot_nll / tot_tok, "D_mean": sum(dm) / len(dm), "D_rmse": sum(dr) / len(dr)}

        val0, train0 = evaluate(val_idx), evaluate(train_idx)
        gen = torch.Generator().manual_seed(cfg.seed)
        log_rows: list[dict] = []
        step = 0
        with progress("healing", total=total) as bar:
            for epoch in range(cfg.epochs):
                perm = [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen).tolist()]
                micro = [perm[s:s + cfg.batch_size] for s in range(0, len(perm), cfg.batch_size)]
                for g in range(0, len(micro), cfg.grad_accum):
                    group = micro[g:g + cfg.grad_accum]
                    acc = {"loss": 0.0, "nll": 0.0, "D": 0.0}
                    active = False
                    for idx in group:
                        b = make_batch(rows, idx, pad_id, dev)
                        loss, nll, d = batch_terms(peft_model, b, ref_for(b), cfg, use_keep)
                        if not torch.isfinite(loss):
                            raise SteerhealError(f"step {step} (epoch {epoch}): loss is {float(loss)}; "
                                                 "nothing written; lower --lr or check the data")
                        (loss / len(group)).backward()
                        acc["loss"] += float(loss.detach()) / len(group)
                        acc["nll"] += float(nll.detach()) / len(group)
                        acc["D"] += float(d.detach().mean()) / len(group)
                        active |= bool((d > cfg.tau).any()) and need_ref
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    lr = sched.get_last_lr()[0]
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    log_rows.append({"step": step, "epoch": epoch, **acc, "barrier_active": active, "lr": lr})
                    step += 1
                    bar(1, loss=acc["loss"], D=acc["D"])

        val1, train1 = evaluate(val_idx), evaluate(train_idx)
        summary = {
            "config": asdict(cfg),
            "model": lm.name,
            "history": list(lm.adapters),
            "data_sha256": records_sha256(records),
            "rows": {"train": len(train_idx), "val": len(val_idx)},
            "layers": layer_idx,
            "steps": step,
            "ref_cache": cache is not None,
            "ref_cache_gb": round(cache_gb, 4),
            "train_nll_start": train0["nll"], "train_nll": train1["nll"],
            "val_nll_start": val0["nll"], "val_nll": val1["nll"],
            # D after training vs the reference, sequence means of the mean and rmse aggregations
            "val_D_mean": val1["D_mean"], "val_D_rmse": val1["D_rmse"],
            "train_D_mean": train1["D_mean"], "train_D_rmse": train1["D_rmse"],
            "mean_D_steps": sum(r["D"] for r in log_rows) / max(1, len(log_rows)),
            "barrier_frac": sum(r["barrier_active"] for r in log_rows) / max(1, len(log_rows)),
            "time_s": round(time.perf_counter() - t0, 2),
        }
        peft_model.eval()
        out_dir = Path(out_dir)
        with atomic_path(out_dir) as tmp:
            peft_model.save_pretrained(tmp)
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
            (tmp / "heal.json").write_text(json.dumps(summary, indent=2) + "\n")
        ok = True
    finally:
        # Leave lm.model a plain model: merged with the new adapter on success if asked, else as before.
        if ok and merge:
            lm.model = peft_model.merge_and_unload().eval()
            lm.adapters = lm.adapters + [str(out_dir)]
        else:
            lm.model = peft_model.unload().eval()
        for p in lm.model.parameters():
            p.requires_grad_(False)
    log(f"healed: val NLL {val0['nll']:.3f} → {val1['nll']:.3f}, val D mean {val1['D_mean']:.3f} "
        f"rmse {val1['D_rmse']:.3f}, barrier active "
        f"{summary['barrier_frac']:.0%} of {step} steps, {summary['time_s']:.0f} s")
    return summary

