"""evaluate.py: pure scoring on synthetic log-probs, the tiny model end to end, the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from steerheal import SteerhealError
from steerheal.config import FOUNDATIONS, EvalConfig
from steerheal.evaluate import (
    PREFILL,
    answer_token_ids,
    combine_frames,
    frame_messages,
    option_logprobs,
    score_vignettes,
    summarize,
)
from steerheal.vignettes import DEMO, load_vignettes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "tinymfv"
REAL_FILES = [SHARED / f"vignettes_classic_{c}.jsonl" for c in ("other_violate", "self_violate")]


def evaluate(lm, vigs, batch_size=16, think_tokens=0, **kw):
    return score_vignettes(lm, vigs, EvalConfig(batch_size=batch_size, think_tokens=think_tokens), **kw)


# ---------------------------------------------------------------- pure scoring


def test_option_logprobs_and_pmass_at_most_one():
    logits = torch.randn(5, 50)
    lp, pmass = option_logprobs(logits, [3, 7, 11, 2, 9, 40, 41])
    assert lp.shape == (5, 7)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(lp[:, 0], full[:, 3])
    assert torch.all(pmass <= 1 + 1e-6) and torch.all(pmass > 0)


def test_combine_frames_averages_logprobs_then_softmaxes():
    # Frame 1 favours option 0, frame 2 favours option 1 equally: averaging cancels the bias.
    a = torch.log(torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]))
    b = torch.log(torch.tensor([[0.1, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1]]))
    p, pmass = combine_frames([a, b])
    assert torch.allclose(p.sum(-1), torch.ones(1))
    assert math.isclose(float(p[0, 0]), float(p[0, 1]), rel_tol=1e-6)
    # exact: softmax of the mean log-prob vector
    expected = torch.softmax((a + b) / 2, -1)
    assert torch.allclose(p, expected)
    assert math.isclose(float(pmass[0]), 1.0, rel_tol=1e-5)


def test_combine_frames_pmass_is_mass_before_renormalising():
    half = torch.log(torch.full((3, 7), 0.5 / 7))  # the seven tokens hold half the mass
    quarter = torch.log(torch.full((3, 7), 0.25 / 7))
    p, pmass = combine_frames([half, quarter])
    assert torch.allclose(p.sum(-1), torch.ones(3))
    assert torch.allclose(pmass, torch.full((3,), 0.375))


def test_summarize_diagonal_nats_known_answer():
    # Two care rows with p[care] = 0.5 and 0.25; one authority row with p[authority] = 0.8.
    p = torch.zeros(3, 7)
    p[0] = torch.tensor([0.5] + [0.5 / 6] * 6)
    p[1] = torch.tensor([0.25] + [0.75 / 6] * 6)
    p[2] = torch.tensor([0.2 / 6] * 3 + [0.8] + [0.2 / 6] * 3)
    rep = summarize(p, torch.tensor([0.9, 0.8, 0.7]), ["care", "care", "authority"], ["care", "fairness", "authority"])
    f = rep["foundations"]
    assert math.isclose(f["care"]["nats"], (math.log(0.5) + math.log(0.25)) / 2, rel_tol=1e-5)
    assert math.isclose(f["authority"]["nats"], math.log(0.8), rel_tol=1e-5)
    assert f["loyalty"]["nats"] is None and f["loyalty"]["n"] == 0
    assert math.isclose(f["care"]["profile"], (0.5 + 0.25 + 0.2 / 6) / 3, rel_tol=1e-5)
    assert math.isclose(rep["pmass"], 0.8, rel_tol=1e-5)
    # row 1's argmax is care (0.25 > 0.125) but its modal label is fairness: 2 of 3 right
    assert math.isclose(rep["accuracy"], 2 / 3, rel_tol=1e-5)
    assert sum(x["profile"] for x in f.values()) == pytest.approx(1.0)


# ---------------------------------------------------------------- answer tokens


def test_first_token_collision_raises(tiny):
    prompt = "<|im_start|>assistant\n" + PREFILL
    # On the tiny byte-level BPE, ' fairness' and ' fair' both start with the token 'Ġf'.
    with pytest.raises(SteerhealError, match="share their first token"):
        answer_token_ids(tiny.tokenizer, prompt, ("fairness", "fair"))


def test_first_tokens_distinct_on_tiny(tiny):
    ids = answer_token_ids(tiny.tokenizer, "<|im_start|>assistant\n" + PREFILL)
    assert len(set(ids)) == 7


class _FakeTok:
    """A hand-built tokenizer that merges the answer into the prefill: must be refused."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text.replace(": care", "#")]}

    def convert_ids_to_tokens(self, i):
        return chr(i)


def test_unstable_prefill_boundary_raises():
    with pytest.raises(SteerhealError, match="merges with the prefill"):
        answer_token_ids(_FakeTok(), "Answer:", ("care", "fairness"))


# ---------------------------------------------------------------- on the tiny model


def test_evaluate_tiny_rows_sum_to_one(tiny):
    vigs = load_vignettes(None, limit=7)
    rep = evaluate(tiny, vigs, batch_size=3)
    assert rep["n"] == 7 and len(rep["rows"]) == 7
    for r in rep["rows"]:
        assert sum(r["p"].values()) == pytest.approx(1.0, abs=1e-4)
        assert 0 < r["pmass"] <= 1
    assert set(rep["foundations"]) == set(FOUNDATIONS)
    assert rep["settings"]["vignettes_sha256"] and rep["settings"]["label"] == "foundation_coarse"
    json.dumps(rep)


def test_prefix_cache_matches_plain_forward(tiny):
    vigs = load_vignettes(None, limit=7)
    a = evaluate(tiny, vigs, batch_size=4, prefix_cache=True)
    b = evaluate(tiny, vigs, batch_size=4, prefix_cache=False)
    assert a["settings"]["protocol"]["prefix_cache"] is True
    for ra, rb in zip(a["rows"], b["rows"]):
        for f in FOUNDATIONS:
            assert ra["p"][f] == pytest.approx(rb["p"][f], abs=1e-4)
        assert ra["pmass"] == pytest.approx(rb["pmass"], abs=1e-4)


def test_prefix_cache_matches_plain_forward_through_a_peft_adapter(tiny):
    """The eval's cached prefix also holds with an unmerged LoRA in the forward (a healed model before merging)."""
    import dataclasses

    from steerheal.config import HealConfig
    from steerheal.heal import attach_lora

    pm, _ = attach_lora(copy.deepcopy(tiny.model), HealConfig(rank=4, alpha=8, layers="0:1"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    lm = dataclasses.replace(tiny, model=pm.eval())
    vigs = load_vignettes(None, limit=5)
    a = evaluate(lm, vigs, batch_size=3, prefix_cache=True)
    b = evaluate(lm, vigs, batch_size=3, prefix_cache=False)
    plain = evaluate(tiny, vigs, batch_size=3, prefix_cache=True)
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["pmass"] == pytest.approx(rb["pmass"], abs=1e-4)
        for f in FOUNDATIONS:
            assert ra["p"][f] == pytest.approx(rb["p"][f], abs=1e-4)
    assert max(abs(ra["pmass"] - rp["pmass"]) for ra, rp in zip(a["rows"], plain["rows"])) > 1e-4


def test_cpu_grouped_attention_gives_the_same_scores(tiny, monkeypatch):
    """The tiny model has 4 query heads over 2 K/V heads: SDPA's own GQA equals transformers' repeat_kv."""
    import os

    assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == "1"  # set by load_model on CPU
    vigs = load_vignettes(None, limit=6)
    a = evaluate(tiny, vigs, batch_size=3, prefix_cache=True)
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    b = evaluate(tiny, vigs, batch_size=3, prefix_cache=True)
    for ra, rb in zip(a["rows"], b["rows"]):
        for f in FOUNDATIONS:
            assert ra["logp"][f] == pytest.approx(rb["logp"][f], abs=1e-5)


def test_batched_matches_one_at_a_time(tiny):
    vigs = load_vignettes(None, limit=5)
    a = evaluate(tiny, vigs, batch_size=5, prefix_cache=False)
    b = evaluate(tiny, vigs, batch_size=1, prefix_cache=False)
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["pmass"] == pytest.approx(rb["pmass"], abs=1e-4)


def test_think_tokens_path_runs(tiny):
    vigs = load_vignettes(None, limit=3)
    rep = evaluate(tiny, vigs, think_tokens=4, system="Be brief.")
    assert rep["settings"]["think_tokens"] == 4
    assert len(rep["rows"][0]["thought"]) == 2  # one per frame
    assert all(sum(r["p"].values()) == pytest.approx(1.0, abs=1e-4) for r in rep["rows"])


def test_think_messages_shape():
    msgs = frame_messages("A scene.", FOUNDATIONS, "sys", thought="Hmm")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "Just answer."


def test_steering_changes_scores(tiny):
    from steerheal.vector import SteeringVector

    torch.manual_seed(0)
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 5}, {"n_layers": str(tiny.n_layers)})
    vigs = load_vignettes(None, limit=3)
    a = evaluate(tiny, vigs)
    vec.path = "v.safetensors"
    b = evaluate(tiny, vigs, vector=vec, coeff=2.0)
    assert a["rows"][0]["pmass"] != pytest.approx(b["rows"][0]["pmass"], abs=1e-6)
    assert b["settings"]["coeff"] == 2.0 and b["settings"]["vector"]["path"] == "v.safetensors"


# ---------------------------------------------------------------- CLI


def test_cli_eval_writes_json(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from steerheal.cli import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--limit", "7", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["n"] == 7 and "authority" in rep["foundations"] and len(rep["rows"]) == 7


def test_cli_eval_bad_vignettes_exits_2(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from steerheal.cli import app

    res = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_model_dir), "--vignettes", str(tmp_path / "missing.jsonl")]
    )
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "no such vignette file" in lines[0]
    assert "Traceback" not in res.output


# ---------------------------------------------------------------- the bundled model


@pytest.mark.smoke
def test_smoke_bundled_demo():
    from steerheal.models import load_model

    lm = load_model()
    rep = evaluate(lm, load_vignettes(None, limit=14))
    assert all(sum(r["p"].values()) == pytest.approx(1.0, abs=1e-4) for r in rep["rows"])
    # SmolLM2-135M puts only ~0.1-0.15 of its mass on the seven words (measured), far above the
    # ~7/49152 of a format-blind model; a broken prompt or token choice would fall below 0.05.
    assert 0.05 < rep["pmass"] <= 1
    assert DEMO.is_file()


# ---------------------------------------------------------------- the k-shot protocol


def test_kshot_examples_are_our_own_and_follow_the_frame_order():
    from steerheal.evaluate import load_shots

    shots = load_shots("kshot")
    assert sorted(f for _, f in shots) == sorted(FOUNDATIONS) and load_shots("zero-shot") == ()
    for order in (FOUNDATIONS, tuple(reversed(FOUNDATIONS))):
        msgs = frame_messages("A scene.", order, None, shots=shots)
        answers = [m["content"].split()[-1] for m in msgs if m["role"] == "assistant"]
        assert answers == list(order)  # examples shown in the frame's own option order
        assert msgs[-1]["role"] == "user" and "A scene." in msgs[-1]["content"]
    # no eval vignette text inside the examples: not the demo set, not tinymfv's classic files
    from steerheal.vignettes import load_vignettes as lv

    sets = [lv(None)] + [lv(str(p)) for p in REAL_FILES if p.is_file()]
    # any run of 7 words shared with a vignette would mean copying ("you see a woman eating" is not)
    words = lambda t: {" ".join(t.lower().split()[i : i + 7]) for i in range(len(t.split()) - 6)}  # noqa: E731
    for text, _ in shots:
        for vigs in sets:
            for v in vigs:
                assert not (words(text) & words(v.text)), (text, v.id)


def test_kshot_scores_differ_from_zero_shot_and_prefix_cache_still_holds(tiny):
    vigs = load_vignettes(None, limit=7)
    cfg = EvalConfig(batch_size=4)
    a = score_vignettes(tiny, vigs, cfg, prefix_cache=True)
    b = score_vignettes(tiny, vigs, cfg, prefix_cache=False)
    z = score_vignettes(tiny, vigs, EvalConfig(batch_size=4, protocol="zero-shot"))
    assert a["settings"]["protocol"]["name"] == "kshot" and len(a["settings"]["protocol"]["shots"]) == 7
    assert a["settings"]["protocol"]["prefix_cache"] is True
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["pmass"] == pytest.approx(rb["pmass"], abs=1e-4)
    assert a["pmass"] != pytest.approx(z["pmass"], abs=1e-6)


def test_the_prefix_cache_is_shared_not_copied_per_row(tiny, monkeypatch):
    """Every batch reads one stored prefix (broadcast), and scoring stores nothing in it: its length stays
    the prefix's, and scores equal the plain forward's."""
    import steerheal.evaluate as E

    caches = []
    real = E.share_prefix

    def spy(cache):
        caches.append(cache)
        return real(cache)

    monkeypatch.setattr(E, "share_prefix", spy)
    vigs = load_vignettes(None, limit=7)
    a = evaluate(tiny, vigs, batch_size=3, prefix_cache=True)
    b = evaluate(tiny, vigs, batch_size=3, prefix_cache=False)
    assert len(caches) == 2  # one per frame
    for c in caches:
        assert all(type(layer).__name__ == "SharedPrefixLayer" and layer.keys.shape[0] == 1 for layer in c.layers)
        assert len({layer.get_seq_length() for layer in c.layers}) == 1
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["pmass"] == pytest.approx(rb["pmass"], abs=1e-4)
