"""Scorers and the keep rule: which steered completions are coherent enough to distil.

Perplexity under the reference model catches word salad, but a loop ("the the the") has LOW
perplexity, so a repetition score gates it separately. Narration ("as someone who ...") and
refusals talk about the trait instead of acting it.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from .chat import encode_completion
from .config import FilterConfig
from .logprobs import Span, score_spans
from .models import LoadedModel, pad_token_id
from .progress import progress
from .records import Record

DEFAULT_NARRATION = (
    r"\bas someone who\b",
    r"\bas a person who\b",
    r"\bi am (?:someone|a person) who\b",
    r"\bmy persona\b",
    r"\bas instructed\b",
)
REFUSAL = (
    r"\bi(?:'m| am) sorry,? but\b",
    r"\bi (?:can(?:'|no)t|cannot|am unable to|won't) (?:help|assist|provide|comply|do that)\b",
    r"\bas an ai(?: language model)?\b",
    r"\bi'm not able to (?:help|assist|provide)\b",
)


def repetition(text: str) -> float:
    """Largest share of the most common n-gram, over word and char n-grams, n = 2..4 (0 = no repeats)."""
    words = text.lower().split()
    chars = re.sub(r"\s+", " ", text.lower())
    best = 0.0
    for seq, ns in ((words, (2, 3, 4)), (chars, (2, 3, 4))):
        for n in ns:
            grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
            if len(grams) >= 8:  # too few n-grams say nothing about looping
                best = max(best, Counter(grams).most_common(1)[0][1] / len(grams))
    return best


def matches_any(text: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(re.search(p, text, flags=re.IGNORECASE) for p in patterns)


def completion_nlls(
    lm: LoadedModel, records: list[Record], max_len: int, batch_size: int, desc: str = "scoring perplexity"
) -> list[torch.Tensor]:
    """Per-token NLL of each completion given its chat, under lm as it stands."""
    tok = lm.tokenizer
    spans = [Span(*encode_completion(tok, r.messages, r.completion, max_len=max_len)) for r in records]
    pad = pad_token_id(tok)
    with progress(desc, total=len(records)) as bar:
        return score_spans(lm.model, spans, pad, batch_size, bar=bar)


def perplexity(nll: torch.Tensor, tail: bool) -> float:
    if nll.numel() == 0:
        return float("inf")
    if tail:
        nll = nll[-max(1, nll.numel() // 4) :]
    return float(math.exp(min(float(nll.mean()), 50.0)))


def score(
    lm: LoadedModel,
    records: list[Record],
    cfg: FilterConfig,
    narration: list[str] | tuple[str, ...] = (),
    nlls: list[torch.Tensor] | None = None,
) -> None:
    """Add scores and drop_reasons to each record, in place (nlls: per-token NLLs under lm, if already known)."""
    patterns = tuple(DEFAULT_NARRATION) + tuple(narration)
    if nlls is None:
        nlls = completion_nlls(lm, records, cfg.max_len, cfg.batch_size)
    for r, nll in zip(records, nlls):
        ppl = perplexity(nll, cfg.ppl_tail)
        rep = repetition(r.completion)
        r.scores = {
            "ppl": round(ppl, 3),
            "repetition": round(rep, 4),
            "narration": float(matches_any(r.completion, patterns)),
            "refusal": float(matches_any(r.completion, REFUSAL)),
            "words": float(len(r.completion.split())),
        }
        reasons = []
        if len(r.completion.split()) < cfg.min_words:
            reasons.append("too_short")
        if ppl >= cfg.max_ppl:
            reasons.append("perplexity")
        if rep >= cfg.max_repetition:
            reasons.append("repetition")
        if r.scores["narration"]:
            reasons.append("narration")
        if r.scores["refusal"]:
            reasons.append("refusal")
        r.drop_reasons = reasons


def split(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(kept, rejected) by whether a record has any drop reason."""
    return [r for r in records if not r.drop_reasons], [r for r in records if r.drop_reasons]


def filter_records(
    lm: LoadedModel,
    records: list[Record],
    cfg: FilterConfig,
    narration: list[str] | tuple[str, ...] = (),
    nlls: list[torch.Tensor] | None = None,
) -> tuple[list[Record], list[Record]]:
    """Score and split: the one function the CLI and the loop both call."""
    score(lm, records, cfg, narration, nlls)
    return split(records)


def summary(records: list[Record]) -> dict:
    """Rows in, kept, count per reason, and score medians of kept vs dropped (for Q0)."""
    kept, rej = split(records)
    reasons = Counter(x for r in rej for x in r.drop_reasons)

    def med(rows: list[Record], key: str) -> float | None:
        vals = sorted(r.scores.get(key, float("nan")) for r in rows)
        return vals[len(vals) // 2] if vals else None

    return {
        "rows": len(records),
        "kept": len(kept),
        "kept_frac": len(kept) / max(1, len(records)),
        "reasons": dict(reasons),
        "median_ppl_kept": med(kept, "ppl"),
        "median_ppl_dropped": med(rej, "ppl"),
        "median_rep_kept": med(kept, "repetition"),
        "median_rep_dropped": med(rej, "repetition"),
    }
