"""Generation coherence on neutral prompts: what a forced-choice pmass cannot see.

A model that answers every question with the same template, or drifts into word salad late in
a completion, can keep its pmass. So each model also writes a greedy and a sampled completion
for each of a fixed set of neutral, non-moral prompts (data/neutral_prompts.txt, written for
this project), and we measure, always against the base model as the judge:
- ppl: perplexity under the base model (exp of the mean token NLL over all completions);
- pass_rate: the share the filter keeps (the same filter, the base model as reference);
- distinct2: distinct word bigrams over all bigrams (a template repeated everywhere scores low);
- kl_to_base: the mean per-token KL(model ‖ base) over the completions' tokens.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from .chat import encode_completion, messages_for
from .config import FilterConfig
from .filter import filter_records
from .generate import complete
from .logprobs import Span, score_spans
from .models import LoadedModel
from .progress import progress
from .records import Record
from .vector import SteeringVector

NEUTRAL = Path(__file__).parent / "data" / "neutral_prompts.txt"
CHUNK = 8  # rows whose full-vocabulary log-probs are held at once


def neutral_prompts(n: int | None = None) -> list[str]:
    prompts = [x.strip() for x in NEUTRAL.read_text(encoding="utf-8").splitlines() if x.strip()]
    return prompts[:n] if n else prompts


def distinct2(texts: list[str]) -> float:
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.lower().split()] for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def judge_completions(
    lm: LoadedModel,
    base: LoadedModel,
    model_chats: list[list[dict[str, str]]],
    base_chats: list[list[dict[str, str]]],
    completions: list[str],
    steer: Any,
    max_len: int,
) -> tuple[list[torch.Tensor], float]:
    """One base forward per chunk gives both the per-token NLL of each completion under base and the
    mean per-token KL(model ‖ base) over the completion tokens; each model sees its own chat."""
    pad = lm.tokenizer.pad_token_id
    nlls: list[torch.Tensor] = []
    tot, n = 0.0, 0
    with progress("judging completions", total=len(completions)) as bar:
        for s in range(0, len(completions), CHUNK):
            idx = range(s, min(s + CHUNK, len(completions)))
            a = [Span(*encode_completion(lm.tokenizer, model_chats[i], completions[i], max_len)) for i in idx]
            b = [Span(*encode_completion(base.tokenizer, base_chats[i], completions[i], max_len)) for i in idx]
            with steer():
                la = score_spans(lm.model, a, pad, CHUNK, full=True)
            lb = score_spans(base.model, b, pad, CHUNK, full=True)
            for x, y, span in zip(la, lb, b):
                nlls.append(-y.gather(-1, torch.tensor(span.ids[span.start :])[:, None]).squeeze(-1))
                k = min(len(x), len(y))  # equal unless max_len truncated one of the two
                tot += float((x[:k].exp() * (x[:k] - y[:k])).sum())
                n += k
            bar(len(idx))
    return nlls, tot / max(1, n)


def generation_coherence(
    lm: LoadedModel,
    base: LoadedModel,
    prompts: list[str],
    *,
    vector: SteeringVector | None = None,
    coeff: float = 0.0,
    system: str | None = None,
    max_new_tokens: int = 40,
    seed: int = 0,
    filter_cfg: FilterConfig | None = None,
) -> dict[str, Any]:
    """The four measures above for `lm` (optionally steered, or prompted with `system`), judged by `base`."""
    model_chats = [messages_for(p, system) for p in prompts]
    base_chats = [messages_for(p) for p in prompts]  # the judge reads the completion without the persona prompt
    kw = dict(vector=vector, coeff=coeff, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    greedy = complete(lm, model_chats, temperature=0.0, top_p=1.0, **kw)  # type: ignore[arg-type]
    sampled = complete(lm, model_chats, temperature=1.0, top_p=0.95, seed=seed, **kw)  # type: ignore[arg-type]
    texts = greedy + sampled
    chats_m, chats_b = model_chats * 2, base_chats * 2
    recs = [Record(id=f"coh-{i}", persona="", messages=chats_b[i], completion=t) for i, t in enumerate(texts)]
    fcfg = filter_cfg or FilterConfig()

    def steer() -> Any:
        return vector.apply(lm.model, coeff) if vector is not None else contextlib.nullcontext()

    nlls, kl = judge_completions(lm, base, chats_m, chats_b, texts, steer, fcfg.max_len)
    tokens = sum(len(x) for x in nlls)
    ppl = math.exp(min(50.0, sum(float(x.sum()) for x in nlls) / max(1, tokens)))
    kept, _ = filter_records(base, recs, fcfg, nlls=nlls)
    return {
        "ppl": round(ppl, 3),
        "pass_rate": round(len(kept) / len(recs), 4),
        "distinct2": round(distinct2(texts), 4),
        "kl_to_base": round(kl, 5),
        "n": len(texts),
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "examples": greedy[:3],
    }
