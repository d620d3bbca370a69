"""Chat templating shared by every step: render a prompt, and tokenise prompt + completion
with the exact boundary between them (the completion mask for NLL and KL)."""

from __future__ import annotations

from typing import Any

from . import SteerhealError

_SYSTEM_ROLE: dict[str, bool] = {}  # chat template text -> renders a system turn


def supports_system(tok: Any) -> bool:
    """Whether the chat template renders a system turn (some, like Gemma 2's, raise)."""
    template = str(getattr(tok, "chat_template", None))
    if template not in _SYSTEM_ROLE:
        try:
            out = tok.apply_chat_template(
                [{"role": "system", "content": "SYSMARK"}, {"role": "user", "content": "hi"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            _SYSTEM_ROLE[template] = "SYSMARK" in out
        except Exception:  # templates signal "no system role" by raising their own error types
            _SYSTEM_ROLE[template] = False
    return _SYSTEM_ROLE[template]


def fold_system(tok: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Fold a system turn into the first user turn when the template has no system role."""
    if not messages or messages[0]["role"] != "system" or supports_system(tok):
        return messages
    sys_text, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{sys_text}\n\n{rest[0]['content']}"
    return rest


def messages_for(user: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def render_prompt(tok: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text up to and including the assistant tag (add_generation_prompt=True)."""
    if getattr(tok, "chat_template", None) is None:
        raise SteerhealError("this tokenizer has no chat template; steerheal needs an instruct/chat model")
    return tok.apply_chat_template(fold_system(tok, messages), tokenize=False, add_generation_prompt=True)


def encode_completion(
    tok: Any, messages: list[dict[str, str]], completion: str, max_len: int | None = None, eos: bool = False
) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ eos) and the index where the completion starts.

    The prompt and completion are tokenised separately and concatenated, so the boundary is
    exact; we then check that this matches tokenising the joined text, since a BPE merge
    across the boundary would mean we train on a sequence the model never sees.
    """
    prompt = render_prompt(tok, messages)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    joined = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    if joined[: len(p_ids)] != p_ids:
        raise SteerhealError(
            "prompt/completion token boundary is not stable under this tokenizer (a BPE merge crosses it); "
            "the chat template must end the prompt on a special token or newline"
        )
    ids = p_ids + c_ids + ([tok.eos_token_id] if eos and tok.eos_token_id is not None else [])
    if max_len is not None and len(ids) > max_len:
        ids = ids[:max_len]
    return ids, len(p_ids)
