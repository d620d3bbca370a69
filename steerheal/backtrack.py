"""Backtrack-and-replay: steered sampling that rewinds a row when it drifts into text the unsteered
model finds unlikely, and resamples that stretch at a lower coefficient.

Every sampled token is scored by the unsteered model as it is sampled: the batch runs twice in one
forward, rows 0..B-1 steered and rows B..2B-1 their unsteered mirrors (C's share 0), fed the same
tokens. When the mean NLL of a row's last `backtrack` tokens under the mirror exceeds
`backtrack_nll`, that row drops its last k tokens and replays them at `backtrack_scale` · C.

Rows rewind on their own without stalling the batch. The KV cache keeps one column per decode
step for every row. A rewind masks the row's rewound columns out of its attention mask and feeds
the last kept token again at its old position (position_ids count each row's real tokens). The
row then continues exactly as if the rewound tokens had never been sampled; their K/V stay in
the cache, unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import SteerConfig
from .logprobs import cache_kwarg
from .models import LoadedModel
from .vector import SteerState


@dataclass
class Row:
    """One completion's state: its tokens, their NLL under the unsteered model, where it rewound."""

    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)  # the cache column of each token once it is fed
    replay_left: int = 0
    backtracks: list[dict[str, int]] = field(default_factory=list)
    done: bool = False


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B] next tokens: greedy at temperature 0, else nucleus sampling (the global torch RNG)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def decode(
    lm: LoadedModel,
    prompts: list[list[int]],
    state: SteerState,
    steer: SteerConfig,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[Row]:
    """Sample a completion for each prompt (token ids) with backtracking; the vector's hooks are on
    (vector.apply) and read each row's share of C from state.row_share."""
    dev, pad = lm.device, lm.tokenizer.pad_token_id
    eos = lm.tokenizer.eos_token_id
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts] * 2, device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts] * 2, device=dev)
    rows = [Row(len(p)) for p in prompts]
    k = steer.backtrack_tokens
    state.row_share = share(rows, steer)
    out = lm.model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
        use_cache=True,
    )
    cache, logits = out.past_key_values, out.logits[:, -1]
    column = width
    for _ in range(max_new_tokens + steer.backtrack_max * (k + 1) + 1):
        nxt = sample_next(logits[:n], temperature, top_p)
        ref_nll = -F.log_softmax(logits[n:].float(), dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
        feed, pos, seen = [pad] * n, [0] * n, [0] * n
        for b, r in enumerate(rows):
            if r.done:
                continue
            for c in _take(r, int(nxt[b]), float(ref_nll[b]), steer, eos, max_new_tokens):
                mask[b, c] = mask[b + n, c] = 0  # a rewind: the dropped tokens' columns are unseen
            if r.done:
                continue
            feed[b], pos[b], seen[b] = r.tokens[-1], r.prompt_len + len(r.tokens) - 1, 1
            r.columns.append(column)
        if all(r.done for r in rows):
            break
        mask = torch.cat([mask, torch.tensor(seen * 2, device=dev)[:, None]], dim=1)
        state.row_share = share(rows, steer)
        out = lm.model(
            input_ids=torch.tensor(feed * 2, device=dev)[:, None],
            attention_mask=mask,
            position_ids=torch.tensor(pos * 2, device=dev)[:, None],
            use_cache=True,
            **{cache_kwarg(lm.model): cache},
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
        column += 1
    state.row_share = None
    return rows


def _take(r: Row, token: int, nll: float, steer: SteerConfig, eos: int | None, max_new_tokens: int) -> list[int]:
    """Append the sampled token to row r (done at eos or the length limit); when the unsteered NLL over the
    window calls for it, rewind and return the cache columns to unsee."""
    k, window = steer.backtrack_tokens, steer.backtrack
    r.tokens.append(token)
    r.nll.append(nll)
    r.replay_left = max(0, r.replay_left - 1)
    if token == eos or len(r.tokens) >= max_new_tokens:
        r.done = True
        return []
    recent = r.nll[-window:] if window else []
    if not (
        window
        and len(recent) == window
        and sum(recent) / window > steer.backtrack_nll
        and len(r.backtracks) < steer.backtrack_max
        and len(r.tokens) > k
        and r.replay_left == 0
    ):
        return []
    # Rewind: drop the last k tokens (the newest is not in the cache yet), unsee the columns of the k
    # before it (the kept last token among them), and feed that token again.
    r.backtracks.append({"at": len(r.tokens), "k": k})
    del r.tokens[-k:], r.nll[-k:]
    unseen = r.columns[-k:]
    del r.columns[-k:]
    r.replay_left = k
    return unseen


def share(rows: list[Row], steer: SteerConfig) -> torch.Tensor:
    """[2B] C's share for the token each row predicts next: the schedule at that token, times
    backtrack_scale while replaying; 0 for the unsteered mirrors."""
    own = [steer.factor(len(r.tokens)) * (steer.backtrack_scale if r.replay_left else 1.0) for r in rows]
    return torch.tensor(own + [0.0] * len(rows))
