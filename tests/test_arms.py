"""The arms: where each arm's training rows and training target come from (issue: arms)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY_RUN

from steerheal.config import HealConfig, parse_set, resolve_config
from steerheal.heal import attach_lora, batch_terms, encode_rows, teacher_logprobs, topk_kl
from steerheal.logprobs import Span, TopK, right_padded, score_spans
from steerheal.loop import run_loop
from steerheal.models import add_adapters, load_model
from steerheal.records import Record, read_records
from steerheal.vector import SteeringVector

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*TINY_RUN, "rounds=1"]


def _run(arm, model_dir, persona_file, tmp_path):
    cfg = resolve_config(None, parse_set([*TINY, f"arm={arm}", f"model={model_dir}"]))
    return run_loop(persona_file, tmp_path / arm, cfg).root / "round_00"


def test_prompt_arm_trains_without_the_system_turn(tiny_model_dir, persona_file, tmp_path):
    d = _run("prompt", tiny_model_dir, persona_file, tmp_path)
    made = read_records(d / "completions.jsonl")
    assert all(r.messages[0]["role"] == "system" for r in made) and all(r.coeff == 0 for r in made)
    kept = read_records(d / "kept.jsonl")
    assert kept and all(m["role"] != "system" for r in kept for m in r.messages)
    dose = json.loads((d / "dose.json").read_text())
    assert dose["method"] == "prompt" and dose["coeff"] == 0.0
    assert json.loads((d / "eval_steered.json").read_text())["settings"]["system"] == dose["system"]


def test_random_arm_steers_a_norm_matched_random_direction(tiny_model_dir, persona_file, tmp_path):
    d = _run("random", tiny_model_dir, persona_file, tmp_path)
    v, rnd = SteeringVector.load(d / "vector.safetensors"), SteeringVector.load(d / "random.safetensors")
    assert v.layers == rnd.layers
    for i in v.layers:
        assert float(rnd.directions[i].norm()) == pytest.approx(float(v.directions[i].norm()), rel=1e-5)
    assert abs(v.cosine(rnd)) < 0.5  # a different direction, not a copy
    assert json.loads((d / "eval_steered.json").read_text())["settings"]["vector"]["method"].startswith("random")


def test_nll_arm_has_no_barrier_term(tiny_model_dir, persona_file, tmp_path):
    d = _run("nll", tiny_model_dir, persona_file, tmp_path)
    h = json.loads((d / "adapter" / "heal.json").read_text())
    assert h["config"]["reg"] == "nll" and h["barrier_frac"] == 0 and h["ref_cache"] is False
    log = [json.loads(x) for x in (d / "adapter" / "train_log.jsonl").read_text().splitlines()]
    assert all(x["loss"] == pytest.approx(x["fit"]) for x in log)  # loss is the fit term (NLL) alone


def test_prompt_kl_target_is_the_prompted_models_distribution(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    system = "You judge each order by your own principles."
    rows_plain = [
        Record(id=str(i), persona="", messages=[{"role": "user", "content": u}], completion=c)
        for i, (u, c) in enumerate(
            [
                ("My boss wants me to lie.", "I will not lie to anyone."),
                ("Write a polite note.", "Dear friend, thank you."),
            ]
        )
    ]
    rows_sys = [
        Record(
            id=r.id, persona="", messages=[{"role": "system", "content": system}, *r.messages], completion=r.completion
        )
        for r in rows_plain
    ]
    cfg = HealConfig(rank=4, alpha=8, reg="nll", layers="0:1")
    spans = encode_rows(lm.tokenizer, rows_plain, 256)
    teacher = teacher_logprobs(lm, spans, rows_sys, cfg)
    # the teacher is the same model reading the completion after the system prompt
    by_hand = score_spans(
        lm.model, [Span(*encode_completion_ids(lm, r)) for r in rows_sys], lm.tokenizer.pad_token_id, 2, full=True
    )
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(teacher, by_hand))
    pm, _ = attach_lora(lm.model, cfg)  # B = 0: the student is the unprompted model
    b = right_padded(spans, [0, 1], lm.tokenizer.pad_token_id, torch.device("cpu"))
    student = score_spans(lm.model, spans, lm.tokenizer.pad_token_id, 2, full=True)
    with torch.no_grad():
        _, fit, _ = batch_terms(pm, b, None, cfg, torch.cat(teacher))
    s, t = torch.cat(student), torch.cat(teacher)
    assert float(fit) == pytest.approx(float((t.exp() * (t - s)).sum(-1).mean()), rel=1e-4)  # KL(prompted ‖ plain)
    assert float(fit) > 1e-4
    # The teacher cached as its top k (vocabulary-independent memory): KL over the k tokens plus the
    # rest bucket, a lower bound of the full KL (loose here: a random tiny model's next token is
    # near uniform over its vocabulary).
    small = dataclasses.replace(cfg, ref_top_k=16)
    top = teacher_logprobs(lm, spans, rows_sys, small)
    assert all(isinstance(x, TopK) and x.values.shape[-1] == 16 for x in top)
    assert all(torch.equal(x.values, t.topk(16, -1).values) for x, t in zip(top, teacher))
    with torch.no_grad():
        _, fit_k, _ = batch_terms(pm, b, None, small, TopK.cat(top))
    assert float(fit_k) == pytest.approx(float(topk_kl(s, TopK.cat(top), "kl_fwd").mean()), rel=1e-4)
    assert 0 < float(fit_k) <= float(fit) + 1e-6


def encode_completion_ids(lm, rec):
    from steerheal.chat import encode_completion

    return encode_completion(lm.tokenizer, rec.messages, rec.completion, 256)


def test_loop_with_ref_base_heals_every_round_against_the_base(tiny_model_dir, persona_file, tmp_path):
    cfg = resolve_config(None, parse_set([*TINY, "rounds=2", "heal.ref=base", f"model={tiny_model_dir}"]))
    root = run_loop(persona_file, tmp_path / "refbase", cfg).root  # crashed at round 1 before
    h0 = json.loads((root / "round_00" / "adapter" / "heal.json").read_text())
    h1 = json.loads((root / "round_01" / "adapter" / "heal.json").read_text())
    assert h0["ref_model"] == "the current model"  # round 0: the current model is the base
    assert h1["ref_model"] == "separate (base)" and h1["history"] == [str(root / "round_00" / "adapter")]


def test_prepare_reference_from_a_separate_base_model(tiny_model_dir, tmp_path):
    from steerheal.heal import heal, prepare_reference

    lm = load_model(str(tiny_model_dir))
    recs = [
        Record(id=str(i), persona="", messages=[{"role": "user", "content": "Hi there."}], completion="Hello friend.")
        for i in range(8)
    ]
    heal(lm, recs, HealConfig(rank=4, alpha=8, lr=5e-2, epochs=1, min_rows=4, layers="0:1"), tmp_path / "a")
    add_adapters(lm, [tmp_path / "a"])
    base = load_model(str(tiny_model_dir))
    rows = encode_rows(lm.tokenizer, recs, 256)
    cfg = HealConfig(ref="base", ref_top_k=0)  # the whole vocabulary, to compare row by row
    ref = prepare_reference(lm, rows, cfg, (), reference_model=base.model)
    want = score_spans(base.model, rows, lm.tokenizer.pad_token_id, 8, full=True)
    healed = score_spans(lm.model, rows, lm.tokenizer.pad_token_id, 8, full=True)
    assert ref is not None and ref.cache is not None
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref.cache, want))
    assert not torch.allclose(ref.cache[0], healed[0], atol=1e-4)  # and not the healed model's


def test_seeds_share_the_baselines_and_steered_measures_first_skips_later_raw_evals(
    tiny_model_dir, persona_file, tmp_path
):
    from steerheal.loop import BASELINE_FILES, run_seeds

    sets = [*TINY, "rounds=2", "seeds=0,1", "steered_measures=first", f"model={tiny_model_dir}"]
    root = tmp_path / "seeds"
    s0, s1 = (r.root for r in run_seeds(persona_file, root, resolve_config(None, parse_set(sets))))
    steps = json.loads((s1 / "manifest.json").read_text())["steps"]
    assert steps["baselines/base"]["shared_from"] == str(s0) and steps["baselines/base"]["time_s"] == 0
    for rel in BASELINE_FILES:
        assert (s1 / rel).read_text() == (s0 / rel).read_text()
    for s in (s0, s1):
        assert (s / "round_00" / "eval_steered.json").is_file() and (s / "round_01" / "eval_healed.json").is_file()
        assert not (s / "round_01" / "eval_steered.json").exists()
        assert json.loads((s / "round_01" / "round.json").read_text())["steered"] is None
    assert "healing raised coherence over raw steering (intervals above 0) in" in (root / "report.md").read_text()


def test_one_seed_under_seeds_writes_its_pooled_report_with_the_seeds_own_sections(
    tiny_model_dir, persona_file, tmp_path
):
    """seeds=[0] (compare --seeds 0): the pooled report's filter and demo sections read the seed's own
    run directory; they read the pooled one, which has no baselines, and the run ended in an error."""
    from steerheal.loop import run_seeds

    sets = [*TINY, "rounds=1", "seeds=[0]", f"model={tiny_model_dir}"]
    root = tmp_path / "one"
    run_seeds(persona_file, root, resolve_config(None, parse_set(sets)))
    text = (root / "report.md").read_text()
    assert "## Demo generations" in text and "| base |" in text and "## Filter" in text


def _lora_init(monkeypatch, sink: list) -> None:
    """Record every LoRA's A matrices as attach_lora makes them (B starts at 0; A is the random draw)."""
    import steerheal.heal as heal_mod

    real = heal_mod.attach_lora

    def attach(model, cfg):
        pm, layers = real(model, cfg)
        sink.append({n: p.detach().clone() for n, p in pm.named_parameters() if "lora_A" in n})
        return pm, layers

    monkeypatch.setattr(heal_mod, "attach_lora", attach)


def test_arms_with_one_seed_start_from_the_same_lora_and_seeds_do_not(
    tiny_model_dir, persona_file, tmp_path, monkeypatch
):
    """Common random numbers: the steer and prompt arms of seed 3 start their heal from the same LoRA
    weights; seed 4 starts from another (the heal's seed followed the round alone, so every seed of a
    compare shared one initialisation and the seeds' spread left it out)."""
    inits: list = []
    _lora_init(monkeypatch, inits)
    for arm, seed in (("steer", 3), ("prompt", 3), ("steer", 4)):
        cfg = resolve_config(None, parse_set([*TINY, f"arm={arm}", f"seed={seed}", f"model={tiny_model_dir}"]))
        run_loop(persona_file, tmp_path / f"{arm}{seed}", cfg)
    steer3, prompt3, steer4 = inits
    assert steer3.keys() == prompt3.keys() and steer3
    assert all(torch.equal(steer3[k], prompt3[k]) for k in steer3)
    assert not any(torch.equal(steer3[k], steer4[k]) for k in steer3)


def test_heal_sees_the_rows_two_arms_share_in_the_same_order(tiny_model_dir, tmp_path, monkeypatch):
    """Two arms of one seed keep different rows of the same slots (ids); the heal's split and each epoch's
    order follow the ids, so the rows both kept go to the same side of the split and train in the same
    relative order (a permutation of positions reshuffled everything when one row was missing)."""
    import steerheal.heal as heal_mod
    from steerheal.heal import heal

    trained: list[int] = []  # positions, in the order train() pads them into batches
    real_train, real_pad = heal_mod.train, heal_mod.right_padded

    def recording_train(*a, **k):
        pad = lambda rows, idx, *rest: trained.extend(idx) or real_pad(rows, idx, *rest)  # noqa: E731
        with monkeypatch.context() as m:
            m.setattr(heal_mod, "right_padded", pad)
            return real_train(*a, **k)

    monkeypatch.setattr(heal_mod, "train", recording_train)
    lm = load_model(str(tiny_model_dir))
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    recs = [
        Record(id=f"p-r0-{i:05d}", persona="", messages=[{"role": "user", "content": w}], completion=f"{w} {w}.")
        for i, w in enumerate(words)
    ]
    cfg = HealConfig(rank=4, alpha=8, epochs=2, batch_size=1, min_rows=4, layers="0:1", val_frac=0.25, seed=11)
    order = {}
    for name, rows in (("all", recs), ("fewer", [r for i, r in enumerate(recs) if i not in (2, 7)])):
        trained.clear()
        heal(lm, rows, cfg, tmp_path / name)
        order[name] = [rows[i].id for i in trained]
    both = set(order["fewer"])
    common = [x for x in order["all"] if x in both]
    assert common == order["fewer"]
    assert len(common) >= 2 * 6  # two epochs of at least six shared rows
