"""compare: every arm a resumable loop, the random null, one report; resumes after a real SIGKILL."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_RUN, round_json, tiny_cli

from steerheal.compare import place

TINY = tiny_cli("rounds=1")


def eval_report(rng: np.random.Generator, shift: float) -> dict:
    """An eval report of 28 vignettes with random log-probs, authority's moved by `shift`."""
    from steerheal.config import FOUNDATIONS

    rows = []
    for i in range(28):
        logp = rng.normal(-2.0, 0.3, len(FOUNDATIONS))
        logp[FOUNDATIONS.index("authority")] += shift
        rows.append(
            {"id": str(i), "foundation": FOUNDATIONS[i % 7], "pmass": 0.5, "logp": dict(zip(FOUNDATIONS, logp))}
        )
    return {"rows": rows}


def test_place_in_the_null():
    null = [float(x) for x in range(100)]
    p = place(120.0, null)
    assert p["percentile"] == 100 and p["above"] and p["p_above"] == pytest.approx(1 / 101) and p["z"] > 1.5
    q = place(50.0, null)
    assert 49 <= q["percentile"] <= 51 and not q["above"] and not q["below"] and abs(q["z"]) < 0.1
    assert q["p_above"] == pytest.approx(51 / 101)  # 1 + the 50 draws at 50 or above
    low = place(-20.0, null)  # far the wrong way: not persona-specific
    assert low["below"] and not low["above"]


@pytest.mark.parametrize("k", [8, 19, 49])
def test_the_nulls_rank_p_fires_at_most_5_percent_for_a_random_direction(k):
    """Under the null (the value is one more draw from the same distribution) p <= 0.05 fires at most 5% of
    the time, for any K: exactly floor(0.05 (K + 1)) / (K + 1). The old rule, "outside the central 95%
    of the draws" by np.quantile, fired about 12% of the time at K = 8."""
    rng = np.random.default_rng(k)
    sims = 20_000
    x = rng.normal(size=(sims, k + 1))
    fired = np.mean([place(float(row[0]), row[1:].tolist())["above"] for row in x])
    want = math.floor(0.05 * (k + 1)) / (k + 1)
    assert abs(fired - want) < 4 * math.sqrt(0.05 * 0.95 / sims) + 1e-9
    old = np.mean([not (lo <= row[0] <= hi) for row in x[:4000] for lo, hi in [np.quantile(row[1:], [0.025, 0.975])]])
    assert k != 8 or old > 0.09  # what the quantile rule did


def test_compare_runs_arms_resumes_after_sigkill_and_reports(tiny_model_dir, persona_file, tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "-m",
        "steerheal.cli",
        "compare",
        str(persona_file),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--arms",
        "steer,random,prompt",
        "--null-k",
        "3",
        *TINY,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "random" / "manifest.json"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # kill once the second arm has started
        if manifest.is_file() and "baselines/base" in json.loads(manifest.read_text())["steps"]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL
    steer_steps = json.loads((out / "steer" / "manifest.json").read_text())["steps"]
    assert "round_00/done" in steer_steps and not (out / "compare.md").exists()

    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "steer" / "manifest.json").read_text())["steps"] == steer_steps  # not rerun
    assert "[round 1/1] vector" in r.stderr  # the killed arm went on
    for arm in ("random", "prompt"):  # the baselines were computed once, by the first arm
        base = json.loads((out / arm / "manifest.json").read_text())["steps"]["baselines/base"]
        assert base["shared_from"] == str(out / "steer")
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["arms"]) == {"steer", "random", "prompt"} and len(summary["null"]["draws"]) == 3
    assert "null_raw" in summary["arms"]["steer"] and "reference_minus_arm" in summary["arms"]["random"]
    assert "null_raw" not in summary["arms"]["prompt"]  # prompted, not steered at the null's C
    md = (out / "compare.md").read_text()
    assert "| random | 0 | healed |" in md and "random null" in md.lower() and (out / "compare.png").is_file()
    kept = json.loads((out / "random" / "round_00" / "round.json").read_text())["filter"]["kept_frac"]
    row = next(line for line in md.splitlines() if line.startswith("| random | 0 | healed |"))
    assert "rows kept" in md and f"| {kept:.0%} |" in row


def test_a_variant_is_an_arm_with_its_own_settings(tiny_model_dir, persona_file, tmp_path):
    """--variant NAME:KEY=VALUE runs the steer arm with those settings in its own directory, shares the
    baselines, and is compared against steer in the report."""
    from steerheal import SteerhealError
    from steerheal.compare import parse_variant, run_compare
    from steerheal.config import parse_set, resolve_config
    from steerheal.records import read_records

    name, over = parse_variant("decay:generate.steer=linear;generate.steer.tokens=2;generate.steer.floor=0.5")
    assert name == "decay" and over == {"generate": {"steer": {"method": "linear", "tokens": 2, "floor": 0.5}}}
    cfg = resolve_config(None, parse_set([*TINY_RUN, "rounds=1", f"model={tiny_model_dir}"]))
    out = tmp_path / "cmp"
    run_compare(persona_file, out, cfg, ["steer"], null_k=0, variants={name: over})
    recs = read_records(out / "decay" / "round_00" / "completions.jsonl")
    assert {r.steer["method"] for r in recs} == {"linear"} and recs[0].steer["floor_at"] == 2
    assert all(
        r.steer == {} or r.steer["method"] == "constant"
        for r in read_records(out / "steer" / "round_00" / "completions.jsonl")
    )
    base = json.loads((out / "decay" / "manifest.json").read_text())["steps"]["baselines/base"]
    assert base["shared_from"] == str(out / "steer")
    summary = json.loads((out / "compare.json").read_text())
    assert "reference_minus_arm" in summary["arms"]["decay"]
    assert "| decay | 0 | healed |" in (out / "compare.md").read_text()
    # --report-only runs nothing: an arm with no finished round (random) is left out, not started
    (out / "compare.json").unlink()
    run_compare(persona_file, out, cfg, ["steer", "random"], null_k=0, variants={name: over}, report_only=True)
    assert set(json.loads((out / "compare.json").read_text())["arms"]) == {"steer", "decay"}
    assert not (out / "random").exists()
    # --reference sets every arm against a variant instead of steer.
    run_compare(persona_file, out, cfg, ["steer"], null_k=0, variants={name: over}, report_only=True, reference=name)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference"] == "decay" and "reference_minus_arm" in summary["arms"]["steer"]
    assert "reference_minus_arm" not in summary["arms"]["decay"]
    assert "decay minus steer (selectivity, round 0)" in (out / "compare.md").read_text()
    # Without steer among the arms and no --reference, the arms are reported, set against nothing.
    run_compare(persona_file, out, cfg, [], null_k=0, variants={name: over}, report_only=True)
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["arms"]) == {"decay"} and "reference_minus_arm" not in summary["arms"]["decay"]
    with pytest.raises(SteerhealError, match="--reference late: not among the arms"):
        run_compare(persona_file, out, cfg, ["steer"], null_k=0, report_only=True, reference="late")
    with pytest.raises(SteerhealError, match="nothing to report"):
        run_compare(persona_file, tmp_path / "empty", cfg, ["steer"], null_k=0, report_only=True)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("decay", "use NAME:KEY=VALUE"),
        ("steer:generate.steer=exp", "other than an arm"),
        ("late:eval.limit=3", "shared baselines"),
    ],
)
def test_bad_variants_are_refused_in_one_line(spec, msg):
    from steerheal import SteerhealError
    from steerheal.compare import parse_variant

    with pytest.raises(SteerhealError, match=msg):
        parse_variant(spec)


def test_arms_are_compared_at_the_last_round_both_reached(tmp_path):
    """A partial run (nll healed only rounds 0-1) is compared with steer at round 1, not at steer's last round 2."""
    from steerheal.compare import _arm_difference
    from steerheal.config import RunConfig
    from steerheal.report import verdict_lines
    from steerheal.results import ArmSummary
    from steerheal.stats import EvalRows, difference

    rng = np.random.default_rng(0)
    report = lambda shift: eval_report(rng, shift)  # noqa: E731

    base = report(0.0)
    evals = {("steer", 0): report(-0.5), ("steer", 1): report(-1.0), ("steer", 2): report(-3.0)}
    evals |= {("nll", 0): report(-0.4), ("nll", 1): report(-0.8)}
    numbers = {}
    for arm in ("steer", "nll"):
        rounds = sorted(r for a, r in evals if a == arm)
        for r in rounds:
            d = tmp_path / arm / f"round_{r:02d}"
            d.mkdir(parents=True)
            (d / "eval_healed.json").write_text(json.dumps(evals[arm, r]))
            (d / "round.json").write_text(round_json(r))
        numbers[arm] = {
            "rounds": [{"round": r, "healed": {"target_shift": 0.0}} for r in rounds],
            "base": base,
            "target": "authority",
            "direction": -1,
        }
    got = _arm_difference(tmp_path, RunConfig(), "steer", "nll", numbers)
    rows = lambda arm: [EvalRows.from_report(evals[arm, 1])]  # noqa: E731
    want = difference(EvalRows.from_report(base), rows("steer"), rows("nll"), "authority", -1, "selectivity")
    sel = got.selectivity
    assert got.round == 1 and got.seeds == [1, 1] and sel.difference == pytest.approx(want.difference)
    assert sel.difference_ci == pytest.approx(want.difference_ci)
    line = verdict_lines({"arms": {"nll": ArmSummary(2, 2, reference_minus_arm=got)}}, "authority")[0]
    assert "round 1" in line and "no seed-to-seed variance" in line
    # The Pareto axes, arm minus steer (not steer minus arm) at the same round 1.
    shift = got.arm_minus_reference["target_shift"]
    assert shift.difference == pytest.approx(
        difference(EvalRows.from_report(base), rows("nll"), rows("steer"), "authority", -1, "target_shift").difference
    )
    assert got.arm_minus_reference["pmass_ratio"].difference == pytest.approx(0)  # the same pmass everywhere
    assert f"against steer (shift, coherence): {got.front}" in line


def test_pareto_word_reads_both_axes():
    from steerheal.compare import pareto_word

    assert pareto_word("yes", "yes") == "beyond (better on both)"
    assert pareto_word("no", "no") == "behind (worse on both)"
    assert pareto_word("yes", "no") == pareto_word("no", "yes") == "trade-off"
    assert pareto_word("yes", "unclear") == "better on shift, coherence unclear"
    assert pareto_word("unclear", "no") == "worse on coherence, shift unclear"
    assert pareto_word("unclear", "unclear") == "unclear"


def test_the_header_says_which_seeds_reached_the_last_round():
    from steerheal.report import _seed_text

    def arm(n_last):
        return {"seeds": [0, 1, 2], "rounds": [{"round": 0, "n_seeds": 3}, {"round": 1, "n_seeds": n_last}]}

    assert _seed_text({"steer": arm(3), "nll": arm(3)}) == "seeds 0, 1, 2"
    text = _seed_text({"steer": arm(3), "nll": arm(2)})
    assert "nll 0, 1, 2 (round 1: 2 of them)" in text and "steer 0, 1, 2;" in text


def test_a_seed_counts_in_the_difference_only_once_its_round_is_finished(tmp_path):
    """Seed 1's round-1 eval is written but its round.json is not (the round is still running): the
    difference pools seed 0 alone, as the table does, instead of counting two seeds."""
    from steerheal.compare import _arm_difference
    from steerheal.config import FOUNDATIONS, RunConfig

    rng = np.random.default_rng(1)

    def report() -> dict:
        return {
            "rows": [
                {
                    "id": str(i),
                    "foundation": FOUNDATIONS[i % 7],
                    "pmass": 0.5,
                    "logp": dict(zip(FOUNDATIONS, rng.normal(-2, 0.3, 7))),
                }
                for i in range(14)
            ]
        }

    for arm in ("steer", "gate"):
        for seed in (0, 1):
            d = tmp_path / arm / f"seed_{seed}" / "round_00"
            d.mkdir(parents=True)
            (d / "eval_healed.json").write_text(json.dumps(report()))
            if not (arm == "gate" and seed == 1):
                (d / "round.json").write_text(round_json(0))
    numbers = {
        arm: {
            "rounds": [{"round": 0, "healed": {"target_shift": 0.0}}],
            "base": report(),
            "target": "authority",
            "direction": -1,
        }
        for arm in ("steer", "gate")
    }
    got = _arm_difference(tmp_path, RunConfig(seeds=[0, 1]), "steer", "gate", numbers)
    assert got.seeds == [2, 1] and got.selectivity.seed_ci is None


def test_the_per_seed_table_keeps_each_seed_on_its_own_row(tmp_path):
    """Seed 1 stopped unhealed in round 1: seeds 0 and 2 carry round 1, and seed 2's own values
    (and its kept fraction) land in seed 2's row, not in seed 1's."""
    import yaml

    from steerheal.report import per_seed_lines
    from steerheal.results import collect

    rng = np.random.default_rng(2)
    report = lambda shift: eval_report(rng, shift) | {"n": 28, "settings": {"source": "v.jsonl"}}  # noqa: E731

    base, kept = report(0.0), {0: 0.9, 1: 0.5, 2: 0.7}
    dirs = []
    for seed in (0, 1, 2):
        d = tmp_path / f"seed_{seed}"
        (d / "baselines").mkdir(parents=True)
        conf = {"persona": "p.yaml", "config": {"seed": seed}, "target": "authority", "direction": -1}
        (d / "config.yaml").write_text(yaml.safe_dump(conf))
        (d / "baselines" / "base.json").write_text(json.dumps(base))
        (d / "baselines" / "prompt.json").write_text(json.dumps(report(-0.2)))
        for r in (0, 1):
            healed = not (seed == 1 and r == 1)
            rd = d / f"round_{r:02d}"
            rd.mkdir()
            if healed:
                (rd / "eval_healed.json").write_text(json.dumps(report(-0.5 * (seed + 1))))
            (rd / "round.json").write_text(round_json(r, healed, filter={"kept_frac": kept[seed]}))
        dirs.append(d)
    numbers = {"steer": collect(dirs)}
    lines = [x for x in per_seed_lines(numbers) if x.startswith("| steer |")]
    assert [x.split(" | ")[2] for x in lines] == ["0", "2"]
    healed = numbers["steer"]["rounds"][1]["healed"]
    assert f"| {healed['target_shift_per_seed'][1]:+.2f} |" in lines[1] and lines[1].endswith("| 70% |")
    assert healed["target_shift_per_seed"][1] > healed["target_shift_per_seed"][0]  # seed 2 was shifted further
    assert per_seed_lines(numbers)[-1] == "- steer seed 1: healed up to round 0 (stopped, or still running)"


def test_holm_over_the_arms_set_against_the_reference():
    """Each arm's verdict stands alone; Holm reads them as one family. Three arms each 'better' at
    p 0.02 alone: adjusted, the smallest needs p < 0.05 / 3, so none is called."""
    from steerheal.compare import holm_family
    from steerheal.report import verdict_lines
    from steerheal.results import ArmDifference, ArmSummary
    from steerheal.stats import Difference

    def arm(p: float | None, verdict: str) -> ArmSummary:
        d = Difference("selectivity", 0.3, [0.1, 0.5], verdict=verdict)
        if p is not None:
            d.seed_p, d.seed_ci, d.seed_test, d.per_seed = p, [0.05, 0.6], "Welch t", [[0.3] * 3, [0.0] * 3]
        axes = {m: Difference(m, 0.0, [-0.1, 0.1], verdict="unclear") for m in ("target_shift", "pmass_ratio")}
        return ArmSummary(3, 3, reference_minus_arm=ArmDifference(2, [3, 3], [], d, axes, "unclear"))

    # An arm with one seed has no seed test: it counts in the family with p = 1 and is never called.
    arms = {"a": arm(0.01, "yes"), "b": arm(0.30, "unclear"), "one": arm(None, "yes")}
    holm_family(arms)
    got = {k: e.reference_minus_arm.selectivity for k, e in arms.items()}
    assert [got[k].seed_p_holm for k in ("a", "b", "one")] == pytest.approx([0.03, 0.60, 1.0])
    assert [got[k].verdict_holm for k in ("a", "b", "one")] == ["yes", "unclear", "unclear"]
    arms = {"a": arm(0.02, "yes"), "b": arm(0.02, "yes"), "c": arm(0.02, "yes")}
    holm_family(arms)
    assert {e.reference_minus_arm.selectivity.verdict_holm for e in arms.values()} == {"unclear"}
    line = verdict_lines({"arms": arms, "reference": "const"}, "authority")[0]
    assert "const better: yes (Holm over the 3 arms set against const: p 0.060, unclear)" in line


def test_paired_seeds_and_both_protocols_from_one_set_of_models(tiny_model_dir, persona_file, tmp_path):
    """Three seeds of two arms, run seed by seed: the difference is a paired t over the shared seeds with
    its within-seed correlation, and every eval is scored under the second protocol too (eval.also), so
    compare gives each verdict under each protocol from the same trained models."""
    from steerheal.compare import run_compare
    from steerheal.config import parse_set, resolve_config
    from steerheal.results import collect

    sets = [*TINY_RUN, "rounds=1", "seeds=0,1,2", "eval.also=zero-shot", "coherence_prompts=0"]
    cfg = resolve_config(None, parse_set([*sets, f"model={tiny_model_dir}"]))
    out = tmp_path / "cmp"
    run_compare(persona_file, out, cfg, ["steer", "prompt"], null_k=0)
    # seed by seed: seed 0 of both arms finished before seed 1 of either began
    done = {
        (arm, s): json.loads((out / arm / f"seed_{s}" / "manifest.json").read_text())["steps"]["round_00/done"]["at"]
        for arm in ("steer", "prompt")
        for s in (0, 1)
    }
    assert max(done["steer", 0], done["prompt", 0]) <= min(done["steer", 1], done["prompt", 1])
    for rel in (
        "baselines/base.zero-shot.json",
        "round_00/eval_healed.zero-shot.json",
        "round_00/eval_steered.zero-shot.json",
    ):
        assert (out / "prompt" / "seed_2" / rel).is_file()
    kshot = json.loads((out / "steer" / "seed_0" / "round_00" / "eval_healed.json").read_text())
    zero = json.loads((out / "steer" / "seed_0" / "round_00" / "eval_healed.zero-shot.json").read_text())
    assert kshot["settings"]["protocol"]["name"] == "kshot" and zero["settings"]["protocol"]["name"] == "zero-shot"
    assert kshot["rows"][0]["logp"] != zero["rows"][0]["logp"]
    dirs = [out / "steer" / f"seed_{s}" for s in (0, 1, 2)]
    assert collect(dirs, "zero-shot")["rounds"][0]["healed"] != collect(dirs)["rounds"][0]["healed"]
    summary = json.loads((out / "compare.json").read_text())
    d = summary["arms"]["prompt"]["reference_minus_arm"]
    assert d["seed_test"] == "paired t" and d["paired_seeds"] == [0, 1, 2] and -1 <= d["seed_corr"] <= 1
    other = summary["protocols"]["zero-shot"]["arms"]["prompt"]["reference_minus_arm"]
    assert other["seed_test"] == "paired t" and other["difference"] != d["difference"]
    md = (out / "compare.md").read_text()
    assert "## Verdict under the zero-shot protocol" in md and "3 paired seeds, within-seed r" in md
    assert d["decision_holm"] in ("better", "worse", "equivalent", "undecided") and "decision: " in md
    # a comparison not scored under a protocol of eval.also (an older run) is read under its own alone
    from steerheal.compare import gather

    (out / "steer" / "seed_0" / "baselines" / "base.zero-shot.json").unlink()
    assert gather(out, cfg, ["steer", "prompt"], "steer")[0]["protocols"] == {}
    # --report-only also pools each arm's finished seeds into its own report (a run stopped early has none)
    (out / "prompt" / "report.md").unlink()
    run_compare(persona_file, out, cfg, ["steer", "prompt"], null_k=0, report_only=True)
    assert "seed 2: 1 rounds done" in (out / "prompt" / "report.md").read_text()
    # compare --plan: from these three paired seeds, runs nothing
    from steerheal.compare import plan_entry, write_plan
    from steerheal.stats import Difference, sd_upper, seeds_needed

    steps = {a: json.loads((out / a / "seed_0" / "manifest.json").read_text())["steps"] for a in ("steer", "prompt")}
    write_plan(out, cfg, ["steer", "prompt"], {}, None)
    assert {a: json.loads((out / a / "seed_0" / "manifest.json").read_text())["steps"] for a in steps} == steps
    plan = json.loads((out / "plan.json").read_text())
    row = next(r for r in plan["rows"] if r["measure"] == "selectivity" and r["protocol"] == "kshot")
    diffs = [x - y for x, y in zip(*d["per_seed"])]
    sd = float(np.std(diffs, ddof=1))
    assert row["paired"] and row["seeds"] == 3 and row["sd"] == pytest.approx(sd)
    assert row["sd_upper"] == pytest.approx(sd_upper(sd, 3, 0.8))
    assert row["seeds_to_detect"] == seeds_needed(row["sd_upper"], 0.1, 0.05, 0.8, 1, False, True)
    assert row == {**row, **plan_entry(Difference.from_dict(d), cfg.decide, 1)}
    assert plan["seed_cost_s"]["steer"] > 0 and "| kshot | prompt | selectivity |" in (out / "plan.md").read_text()
