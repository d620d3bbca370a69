"""logprobs.py and every batched forward: a batch gives the numbers each row gets alone, on a RoPE
model (tiny Llama) and on an absolute-position model (tiny GPT-2), where left padding without
position_ids would shift every position."""

from __future__ import annotations

import pytest
import torch

from steerheal.config import EvalConfig, GenerateConfig
from steerheal.filter import completion_nlls
from steerheal.generate import generate_records
from steerheal.logprobs import Span, position_ids, score_spans
from steerheal.models import load_model
from steerheal.records import Record
from steerheal.vector import last_token_states

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["My boss wants me to stay late.", "Write a polite note.", "Hi.", "The weather is nice today, isn't it?"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tiny_model_dir, tiny_gpt2_dir):
    return load_model(str(tiny_model_dir if request.param == "llama" else tiny_gpt2_dir))


def test_position_ids_count_real_tokens_from_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids(mask, start=7).tolist() == [[7, 7, 7, 8, 9], [7, 8, 9, 10, 11]]


def test_extraction_batched_equals_one_by_one(lm):
    from steerheal.chat import messages_for, render_prompt

    texts = [render_prompt(lm.tokenizer, messages_for(p)) for p in PROMPTS]
    many = last_token_states(lm, texts, [0, 1], batch_size=4)
    one = last_token_states(lm, texts, [0, 1], batch_size=1)
    for i in (0, 1):
        assert torch.allclose(many[i], one[i], atol=1e-4), (many[i] - one[i]).abs().max()


def test_completion_nll_batched_equals_one_by_one(lm):
    recs = [
        Record(id=str(i), persona="", messages=[{"role": "user", "content": p}], completion="A fine answer " * (i + 1))
        for i, p in enumerate(PROMPTS)
    ]
    many = completion_nlls(lm, recs, 256, 4)
    one = completion_nlls(lm, recs, 256, 1)
    for a, b in zip(many, one):
        assert torch.allclose(a, b, atol=1e-4)


def test_full_span_logprobs_batched_equal_one_by_one(lm):
    tok = lm.tokenizer
    spans = [Span(tok(p, add_special_tokens=False)["input_ids"], 2) for p in PROMPTS]
    many = score_spans(lm.model, spans, tok.pad_token_id, 4, full=True)
    one = score_spans(lm.model, spans, tok.pad_token_id, 1, full=True)
    for a, b in zip(many, one):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)


def test_eval_batched_equals_one_by_one(lm):
    from steerheal.evaluate import score_vignettes
    from steerheal.vignettes import load_vignettes

    vigs = load_vignettes(None, limit=5)
    a = score_vignettes(lm, vigs, EvalConfig(batch_size=5, protocol="zero-shot"), prefix_cache=False)
    b = score_vignettes(lm, vigs, EvalConfig(batch_size=1, protocol="zero-shot"), prefix_cache=False)
    c = score_vignettes(lm, vigs, EvalConfig(batch_size=5, protocol="zero-shot"), prefix_cache=True)
    for ra, rb, rc in zip(a["rows"], b["rows"], c["rows"]):
        assert ra["pmass"] == pytest.approx(rb["pmass"], abs=1e-4) == rc["pmass"]


def test_generation_batched_greedy_equals_one_by_one(lm):
    g = dict(n=4, max_new_tokens=6, temperature=0.0, top_p=1.0)
    one = generate_records(lm, "p", PROMPTS, GenerateConfig(**g, batch_size=1))
    many = generate_records(lm, "p", PROMPTS, GenerateConfig(**g, batch_size=4))
    assert [r.completion for r in one] == [r.completion for r in many]


def test_topk_kl_is_exact_at_k_equal_v_and_a_lower_bound_below():
    from steerheal.heal import kl_per_position, topk_kl
    from steerheal.logprobs import TopK

    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(6, 80) * 3, -1)
    student = torch.log_softmax(ref + torch.randn(6, 80) * 0.5, -1)
    for direction in ("kl_rev", "kl_fwd"):
        full = kl_per_position(student, ref, direction)
        assert torch.allclose(topk_kl(student, TopK.of(ref, 80), direction), full, atol=1e-5)
        for k in (4, 16):
            part = topk_kl(student, TopK.of(ref, k), direction)
            assert (part >= -1e-6).all() and (part <= full + 1e-5).all()  # coarser buckets: never more
        assert (
            topk_kl(student, TopK.of(ref, 16), direction) >= topk_kl(student, TopK.of(ref, 4), direction) - 1e-5
        ).all()
    t = TopK.of(ref, 8)
    assert t.nbytes() == 6 * 8 * 12 and torch.equal(t.values, ref.topk(8, -1).values)


def test_reference_cache_size_does_not_grow_with_the_vocabulary():
    from steerheal.heal import ref_cache_bytes
    from steerheal.logprobs import Span

    rows = [Span(list(range(30)), 10)] * 4
    assert ref_cache_bytes(rows, 151_936, 256) == ref_cache_bytes(rows, 49_152, 256) == 80 * 256 * 12
    assert ref_cache_bytes(rows, 151_936, 0) == 80 * 151_936 * 4  # full vocabulary: 4 bytes per entry


# ---------------------------------------------------------------- chunks of positions (memory not growing with V)


def _spans(lm):
    tok = lm.tokenizer
    return [Span(tok(p + " and then some more words", add_special_tokens=False)["input_ids"], 2) for p in PROMPTS]


def test_chunked_positions_equal_one_head_pass_and_build_no_logits(lm, monkeypatch):
    """Chunks of 3 positions give the same log-probs, NLLs and top-k as one pass over all of them,
    and the model's own forward never builds a logits tensor."""
    import steerheal.logprobs as L
    from steerheal.logprobs import output_head, right_padded, span_logprobs, span_token_nll

    spans, pad = _spans(lm), lm.tokenizer.pad_token_id
    b = right_padded(spans, range(len(spans)), pad, torch.device("cpu"))
    head = output_head(lm.model)
    assert head is not None
    want = span_logprobs(lm.model, b)  # the plain path: logits for every kept position
    vocab = want.shape[-1]
    monkeypatch.setattr(L, "CHUNK_ELEMS", 3 * vocab)
    shapes = []
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        got = L.per_position(lm.model, b, lambda lp, sl: (lp,))[0]
        nll = span_token_nll(lm.model, b)
    finally:
        handle.remove()
    assert torch.allclose(got, want, atol=1e-5)
    labels = b.labels[b.mask]
    assert torch.allclose(nll, -want.gather(-1, labels[:, None]).squeeze(-1), atol=1e-5)
    forward_calls = [s for s in shapes if len(s) == 3]  # [B, T, V] from the model's own forward
    chunk_calls = [s for s in shapes if len(s) == 2]  # [positions, V] from per_position
    assert len(forward_calls) == 2 and all(s[1] == 0 for s in forward_calls)  # handed an empty slice
    assert max(s[0] for s in chunk_calls) == 3 and sum(s[0] for s in chunk_calls) == 2 * want.shape[0]
    top = score_spans(lm.model, spans, pad, 4, full=True, top_k=5)
    full = score_spans(lm.model, spans, pad, 4, full=True)
    for t, f in zip(top, full):
        assert torch.allclose(t.values, f.topk(5, -1).values, atol=1e-5)


def test_checkpointed_chunks_give_the_same_heal_gradients(tiny, monkeypatch):
    """Under autograd the chunks are checkpointed (recomputed in backward): the loss and the LoRA
    gradients equal those of one unchunked pass."""
    import copy

    import steerheal.logprobs as L
    from steerheal.config import HealConfig
    from steerheal.heal import attach_lora, batch_terms
    from steerheal.logprobs import right_padded

    spans = _spans(tiny)
    pm, _ = attach_lora(copy.deepcopy(tiny.model), HealConfig(rank=4, alpha=8, layers="0:1"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    b = right_padded(spans, range(len(spans)), tiny.tokenizer.pad_token_id, torch.device("cpu"))
    ref = score_spans(tiny.model, spans, tiny.tokenizer.pad_token_id, 4, full=True)
    ref_b = torch.cat(ref)
    cfg = HealConfig(reg="kl_rev", agg="rmse", tau=0.0, lam=0.5)

    def grads():
        pm.zero_grad()
        loss, _, d = batch_terms(pm, b, ref_b, cfg)
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    loss1, g1 = grads()
    monkeypatch.setattr(L, "CHUNK_ELEMS", 4 * ref_b.shape[-1])
    loss2, g2 = grads()
    assert loss2 == pytest.approx(loss1, rel=1e-5) and loss1 > 0
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n


def test_models_that_post_process_logits_keep_the_plain_path(tiny):
    import copy

    from steerheal.logprobs import output_head

    m = copy.deepcopy(tiny.model)
    m.config.final_logit_softcapping = 30.0  # Gemma 2: logits = 30 · tanh(head(h) / 30)
    assert output_head(tiny.model) is not None and output_head(m) is None
