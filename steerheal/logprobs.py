"""One batched log-prob helper: sort by length, chunk, pad (with position_ids), forward, gather,
restore order. Filter, heal and eval all read log-probs through it.

Two paddings, one rule: position_ids always count the real tokens from 0, so a padded row sees
exactly the positions it would see alone (absolute-position models such as GPT-2 need this).
- right padding scores a span of tokens inside each row (completion NLL, KL to a reference);
- left padding reads the last position of each row (the eval's answer slot, the assistant tag).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

T = TypeVar("T")


@dataclass
class Span:
    """Token ids and the index of the first token to score (e.g. the first completion token)."""

    ids: list[int]
    start: int

    @property
    def n_scored(self) -> int:
        return max(0, len(self.ids) - self.start)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: int  # logits kept: the last `keep` positions (right padding); 1 for left padding
    mask: torch.Tensor  # [B, keep] bool: kept positions that predict a scored token
    labels: torch.Tensor  # [B, keep] the token each kept position predicts (0 where masked)
    rows: list[int]  # indices of these rows in the caller's list


def position_ids(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Positions that count only real tokens, from `start` (what a single-row forward sees)."""
    return (start + mask.long().cumsum(-1) - 1).clamp_min(start)


def by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in chunks of similar length (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def right_padded(spans: Sequence[Span], idx: Sequence[int], pad_id: int, device: torch.device) -> Batch:
    """A right-padded batch whose kept tail starts at the first position that predicts a scored token."""
    sel = [spans[i] for i in idx]
    width = max(len(s.ids) for s in sel)
    first = max(min(min(s.start for s in sel) - 1, width - 1), 0)
    keep = width - first
    ids = torch.full((len(sel), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(sel), width), dtype=torch.long)
    mask = torch.zeros((len(sel), keep), dtype=torch.bool)
    labels = torch.zeros((len(sel), keep), dtype=torch.long)
    for b, s in enumerate(sel):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids)
        att[b, :n] = 1
        lo, hi = s.start - 1 - first, n - 1 - first  # kept positions lo..hi-1 predict ids[start..n-1]
        mask[b, lo:hi] = True
        labels[b, lo:hi] = torch.tensor(s.ids[s.start :])
    return Batch(
        ids.to(device),
        att.to(device),
        position_ids(att).to(device),
        keep,
        mask.to(device),
        labels.to(device),
        list(idx),
    )


def left_padded(rows: Sequence[Sequence[int]], idx: Sequence[int], pad_id: int, device: torch.device) -> Batch:
    """A left-padded batch: the last position of every row is real."""
    sel = [list(rows[i]) for i in idx]
    width = max(len(r) for r in sel)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in sel], dtype=torch.long)
    att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in sel], dtype=torch.long)
    empty = torch.zeros((len(sel), 1), dtype=torch.bool)
    return Batch(
        ids.to(device),
        att.to(device),
        position_ids(att).to(device),
        1,
        empty.to(device),
        empty.long().to(device),
        list(idx),
    )


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters  # type: ignore[attr-defined]


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"  # type: ignore[attr-defined]


def cache_kwarg(model: nn.Module) -> str:
    """The forward's name for a KV cache: newer transformers renamed past_key_values to cache."""
    return _cache_kwarg(_base_class(model))


def _base_class(model: nn.Module) -> type:
    return type(unwrap(model))


def unwrap(model: nn.Module) -> Any:
    """The transformers model inside any peft wrappers."""
    base: Any = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    return base


def tail_logits(model: nn.Module, batch: Batch, **kw: object) -> torch.Tensor:
    """Logits [B, keep, V] of the last `keep` positions; only those go through the LM head."""
    if _takes_logits_to_keep(_base_class(model)):
        kw["logits_to_keep"] = batch.keep
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **kw,
    )
    return out.logits[:, -batch.keep :]


def span_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probs [N, V] (fp32) at the positions that predict scored tokens, rows in batch order."""
    return F.log_softmax(tail_logits(model, batch)[batch.mask].float(), dim=-1)


# ---------------------------------------------------------------- memory that does not grow with V
# A [positions, V] fp32 tensor is 0.6 GB for 1,000 positions at Qwen3's V = 151,936, and a heal step
# holds several (logits, log-softmax, their gradients). So the LM head runs on chunks of positions
# of at most CHUNK_ELEMS entries each, checkpointed under autograd (recomputed in backward).
CHUNK_ELEMS = 2**24  # 64 MiB of fp32 per [positions, V] piece
# Models that post-process head(h) (Gemma 2's soft-capping, Cohere's and Granite's scaling) keep the plain path.
_LOGIT_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_head(model: nn.Module) -> nn.Linear | None:
    """The output layer when the logits are exactly head(last hidden state), else None."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    if cfg is None or any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESS):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


def span_hidden(model: nn.Module, batch: Batch, head: nn.Module) -> torch.Tensor:
    """The head's input [N, H] at the positions that predict scored tokens. A pre-hook takes it and hands
    the head an empty slice, so the forward builds no logits at all."""
    got: dict[str, torch.Tensor] = {}

    def take(_mod: nn.Module, args: tuple) -> tuple:
        got["h"] = args[0]
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        tail_logits(model, batch)
    finally:
        handle.remove()
    return got["h"][:, -batch.keep :][batch.mask]


def per_position(
    model: nn.Module, batch: Batch, fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """fn(log-probs [n, V] fp32, the slice of positions they are) over chunks of the N scored positions;
    its outputs (each [n, ...]) are concatenated. Peak memory is one chunk's, not [N, V]."""
    head = output_head(model)
    if head is None:
        logp = span_logprobs(model, batch)
        return fn(logp, slice(0, logp.shape[0]))
    h = span_hidden(model, batch, head)
    n, step = h.shape[0], max(1, CHUNK_ELEMS // int(head.weight.shape[0]))
    grad = torch.is_grad_enabled() and h.requires_grad and n > step
    outs = []
    for s in range(0, max(n, 1), step):
        sl = slice(s, min(n, s + step))

        def piece(hc: torch.Tensor, sl: slice = sl) -> tuple[torch.Tensor, ...]:
            return fn(F.log_softmax(head(hc).float(), dim=-1), sl)

        outs.append(checkpoint(piece, h[sl], use_reentrant=False) if grad else piece(h[sl]))
    return tuple(torch.cat(x) for x in zip(*outs))


def span_token_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """NLL [N] of each scored token, in chunks of positions (never a [B, T, V] tensor)."""
    target = batch.labels[batch.mask]
    return per_position(model, batch, lambda lp, sl: (-lp.gather(-1, target[sl, None]).squeeze(-1),))[0]


def map_batches(
    items: Sequence[T],
    lengths: Sequence[int],
    batch_size: int,
    fn: Callable[[list[int]], list[Any]],
    bar: Callable[..., None] | None = None,
) -> list[Any]:
    """Run fn over length-sorted chunks of row indices; its per-row outputs come back in input order."""
    out: list[Any] = [torch.empty(0)] * len(items)
    for idx in by_length(lengths, batch_size):
        for i, x in zip(idx, fn(idx)):
            out[i] = x
        if bar is not None:
            bar(len(idx))
    return out


@torch.no_grad()
def score_spans(
    model: nn.Module,
    spans: Sequence[Span],
    pad_id: int,
    batch_size: int,
    *,
    full: bool = False,
    top_k: int = 0,
    bar: Callable[..., None] | None = None,
) -> list[Any]:
    """Per span: the NLL of each scored token [n_scored]; with full=True the log-probs [n_scored, V],
    or with 0 < top_k < V their top k as a TopK (compressed chunk by chunk: no [N, V] tensor)."""
    dev = next(model.parameters()).device

    def run(idx: list[int]) -> list[Any]:
        b = right_padded(spans, idx, pad_id, dev)
        sizes = [spans[i].n_scored for i in idx]
        if not full:
            return [v.cpu() for v in span_token_nll(model, b).split(sizes)]
        vocab = vocab_size(model)
        if 0 < top_k < vocab:
            vals, ids = per_position(model, b, lambda lp, sl: tuple(lp.topk(top_k, dim=-1)))
            return [TopK(v.cpu(), i.cpu()) for v, i in zip(vals.split(sizes), ids.split(sizes))]
        return [v.cpu() for v in per_position(model, b, lambda lp, sl: (lp,))[0].split(sizes)]

    return map_batches(spans, [len(s.ids) for s in spans], batch_size, run, bar)


def vocab_size(model: nn.Module) -> int:
    """Rows of the output layer (can exceed the tokenizer's vocabulary: padded embeddings)."""
    return int(unwrap(model).get_output_embeddings().weight.shape[0])


@torch.no_grad()
def last_logits(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    bar: Callable[..., None] | None = None,
) -> list[torch.Tensor]:
    """Logits [V] (fp32, CPU) at the last token of each row of ids."""
    dev = next(model.parameters()).device

    def run(idx: list[int]) -> list[torch.Tensor]:
        b = left_padded(rows, idx, pad_id, dev)
        return list(tail_logits(model, b)[:, -1].float().cpu())

    return map_batches(rows, [len(r) for r in rows], batch_size, run, bar)


@dataclass
class TopK:
    """Log-probs [n, V] kept as the top k per position (the rest of the mass is 1 − their sum):
    memory that does not grow with the vocabulary (12 bytes per kept entry)."""

    values: torch.Tensor  # [n, k] fp32 log-probs
    indices: torch.Tensor  # [n, k] int64 token ids

    @classmethod
    def of(cls, logp: torch.Tensor, k: int) -> TopK:
        v, i = logp.float().topk(min(k, logp.shape[-1]), dim=-1)
        return cls(v, i)

    @classmethod
    def cat(cls, parts: Sequence[TopK]) -> TopK:
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]))

    def to(self, device: torch.device) -> TopK:
        return TopK(self.values.to(device), self.indices.to(device))

    def __getitem__(self, rows: slice) -> TopK:
        return TopK(self.values[rows], self.indices[rows])

    def rest(self) -> torch.Tensor:
        """[n] log of the mass outside the top k."""
        return (1 - self.values.exp().sum(-1)).clamp_min(1e-12).log()

    def nbytes(self) -> int:
        return self.values.numel() * 4 + self.indices.numel() * 8


def cat_logprobs(parts: Sequence[torch.Tensor | TopK], device: torch.device) -> torch.Tensor | TopK:
    """Concatenate cached per-row log-probs (whole rows or top-k) and move them to `device`."""
    tops = [p for p in parts if isinstance(p, TopK)]
    if tops:
        return TopK.cat(tops).to(device)
    return torch.cat([p for p in parts if isinstance(p, torch.Tensor)]).to(device)
