"""rundir.py and the loop's small contracts: warm-up, resume fingerprints, --force, stale temps, the stop
rules and the bake suggestion."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_RUN

from steerheal import SteerhealError
from steerheal.config import parse_set, resolve_config
from steerheal.heal import _lr_lambda, warmup_steps
from steerheal.loop import run_loop

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*TINY_RUN, "rounds=1", "coherence_prompts=0"]


def test_warmup_is_not_a_no_op_for_short_heals():
    assert warmup_steps(8, 0.1) == 1 and warmup_steps(40, 0.1) == 4 and warmup_steps(8, 0.0) == 0
    f = _lr_lambda(8, warmup_steps(8, 0.1))
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)  # step 0 used to take the full rate


def _cfg(model_dir, *extra):
    return resolve_config(None, parse_set([*TINY, f"model={model_dir}", *extra]))


def test_resume_refuses_changed_vignettes_and_changed_weights(
    tiny_model_dir, tiny_model_dir_wide, persona_file, tmp_path
):
    import shutil

    from steerheal.vignettes import DEMO

    model, vig = tmp_path / "model", tmp_path / "vignettes.jsonl"
    shutil.copytree(tiny_model_dir, model)
    vig.write_text(DEMO.read_text())
    cfg = _cfg(model, f"eval.vignettes={vig}")
    out = tmp_path / "run"
    run_loop(persona_file, out, cfg)
    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["vignettes_sha256"] and conf["model_fingerprint"]
    vig.write_text(DEMO.read_text().replace('"text": "', '"text": "Edited. '))  # same path, other scenes
    with pytest.raises(SteerhealError, match="vignettes sha256 changed"):
        run_loop(persona_file, out, cfg)
    vig.write_text(DEMO.read_text())
    for f in tiny_model_dir_wide.glob("*.safetensors"):  # other weights under the same path
        shutil.copy(f, model / f.name)
    with pytest.raises(SteerhealError, match="model fingerprint changed"):
        run_loop(persona_file, out, cfg)
    assert not list(out.glob("config.replaced-*.yaml"))  # refused: nothing moved


def test_force_continues_and_keeps_the_replaced_config(tiny_model_dir, persona_file, tmp_path):
    out = tmp_path / "run"
    run_loop(persona_file, out, _cfg(tiny_model_dir))
    (out / ".killed.xyz.tmp").mkdir()  # what a SIGKILL mid-write leaves
    run_loop(persona_file, out, _cfg(tiny_model_dir, "rounds=2", "heal.lam=0.5"), force=True)
    kept = list(out.glob("config.replaced-*.yaml"))
    assert len(kept) == 1 and yaml.safe_load(kept[0].read_text())["config"]["heal"]["lam"] == 0.3
    assert not list(out.rglob(".*.tmp"))
    assert (out / "round_01" / "round.json").is_file()


def test_stop_rules_and_the_bake_suggestion(tiny_model_dir, persona_file, tmp_path, capsys):
    from steerheal.progress import set_quiet

    set_quiet(False)
    res = run_loop(persona_file, tmp_path / "floor", _cfg(tiny_model_dir, "rounds=3", "pmass_floor=1.5"))
    assert res.rounds_done == 1 and "fell below the floor" in res.stop_reason
    info = json.loads((res.root / "round_00" / "round.json").read_text())
    assert info["below_floor"] is True
    assert "standalone model" not in capsys.readouterr().err  # never suggest baking the broken round
    res = run_loop(persona_file, tmp_path / "rows", _cfg(tiny_model_dir, "rounds=3", "filter.max_ppl=1.0"))
    assert res.rounds_done == 1 and "fewer than heal.min_rows" in res.stop_reason
    assert not (res.root / "round_00" / "adapter").exists()


def test_a_rounds_steps_are_read_from_the_manifest_in_the_order_they_ran(tmp_path):
    """round.json's step times come from what the round ran (alt-protocol evals too), not from a hand-kept list."""
    from steerheal.rundir import Run

    run = Run(tmp_path)
    for step in ("round_00/vector", "round_01/vector", "round_00/eval_healed", "round_00/eval_healed.kshot"):
        run.mark(step, 1.0)
    assert run.steps_under("round_00") == ["vector", "eval_healed", "eval_healed.kshot"]
    assert Run(tmp_path).steps_under("round_01") == ["vector"]  # read back from manifest.json


def test_a_round_json_missing_a_key_is_one_line_naming_the_file_and_the_keys(tmp_path):
    from steerheal.results import RoundRecord

    (tmp_path / "round.json").write_text('{"round": 0, "healed": null}')
    with pytest.raises(SteerhealError, match=r"round.json: no arm, coeff, .*rerun the round"):
        RoundRecord.read(tmp_path / "round.json")


def _mark_many(root: str, who: int) -> None:
    from pathlib import Path

    from steerheal.rundir import Run

    run = Run(Path(root))  # read once, as a job does; the others write meanwhile
    for i in range(25):
        run.mark(f"w{who}/s{i}", 0.0)


def test_jobs_marking_one_manifest_at_once_lose_no_step(tmp_path):
    """The sweep's point jobs (and compare's null job) mark steps in one manifest from several processes: each
    mark merges into what is on disk, under a lock, so no writer drops another's steps."""
    import multiprocessing as mp

    from steerheal.rundir import Run

    Run(tmp_path).mark("first", 0.0)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_mark_many, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    steps = Run(tmp_path).manifest["steps"]
    assert set(steps) == {"first"} | {f"w{w}/s{i}" for w in range(4) for i in range(25)}


def test_a_filesystem_without_locks_is_one_line(tmp_path, monkeypatch):
    """Lustre mounted without -o flock refuses flock (ENOSYS): a SteerhealError naming the directory."""
    import errno
    import fcntl

    from steerheal.rundir import Run

    def refuse(fh, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(SteerhealError, match=f"{tmp_path}: this filesystem refuses file locks"):
        Run(tmp_path).mark("base", 0.0)


def test_a_run_from_before_new_keys_resumes_and_a_changed_behaviour_is_refused(tiny_model_dir, persona_file, tmp_path):
    """A run made before keys were added (its config.yaml lacks them) resumes when those keys keep the
    behaviour it ran with (the default that was the behaviour, or BEFORE_THE_KEY's value), and only then:
    a key whose value before it existed differs from today's default is a change."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir)
    run_loop(persona_file, out, cfg)
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    conf = yaml.safe_load((out / "config.yaml").read_text())
    old = conf["config"]
    for section, key in (("generate", "backend"), ("heal", "processes"), ("heal", "shard"), ("heal", "checkpoint")):
        del old[section][key]
    for section in ("online", "executor", "decide"):
        del old[section]
    (out / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    run_loop(persona_file, out, cfg)  # the same behaviour: a resume, nothing redone
    assert json.loads((out / "manifest.json").read_text())["steps"] == steps
    conf = yaml.safe_load((out / "config.yaml").read_text())
    del conf["config"]["heal"]["ref_top_k"]  # before the top-k cache the reference was the whole vocabulary
    (out / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    with pytest.raises(SteerhealError, match=r"config changed \(heal\)"):
        run_loop(persona_file, out, cfg)
    run_loop(persona_file, out, _cfg(tiny_model_dir, "heal.ref_top_k=0"))  # as it ran: a resume
