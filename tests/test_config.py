"""config.py: the dataclasses are the one source of defaults; YAML and --set are checked against them."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from steerheal import SteerhealError, cli
from steerheal.config import (
    HealConfig,
    RunConfig,
    SteerConfig,
    parse_set,
    resolve_config,
)

# CLI command -> the loop's config section its options mirror, and option names that differ from the field's
MIRRORS = {
    "vector": ("vector", {}),
    "generate": ("generate", {}),
    "filter_": ("filter", {}),
    "heal": ("heal", {}),
    "eval_": ("eval", {}),
}
STEER_OPTIONS = {"schedule": "method", "decay_tokens": "tokens"}  # generate's options for generate.steer


@pytest.mark.parametrize("command,section", [(c, s) for c, (s, _) in MIRRORS.items()])
def test_every_step_option_defaults_to_what_the_loop_runs(command, section):
    """One set of defaults: each step command's option defaults are that step's settings inside `steerheal loop`
    with no --config (the dataclasses with the demo preset), nested ones (generate.steer) included."""
    loop = resolve_config(None, {})
    params = inspect.signature(getattr(cli, command)).parameters
    want = dataclasses.asdict(getattr(loop, section))
    if command == "generate":
        steer = want.pop("steer")
        want |= {opt: steer[field] for opt, field in STEER_OPTIONS.items()}
        want |= {k: v for k, v in steer.items() if k not in STEER_OPTIONS.values()}
    shared = [n for n in params if n in want]
    assert len(shared) >= 4, shared  # the mirror is real, not an empty intersection
    for name in shared:
        assert params[name].default == want[name], f"{command} --{name}"
    if command in ("generate", "heal"):  # every key of these sections has an option (eval.also: --set only)
        assert not set(want) - set(params), set(want) - set(params)
    assert params.get("seed") is None or params["seed"].default == loop.seed or command == "heal"


@pytest.mark.parametrize("command,section", [(c, s) for c, (s, _) in MIRRORS.items()])
def test_every_step_option_reads_its_help_from_the_config_field(command, section):
    """One place per help line: an option that mirrors a config field says what the field's metadata says,
    and every field of generate and heal (each has an option) carries a help line."""
    hints = typing.get_type_hints(getattr(cli, command), include_extras=True)
    cls = type(getattr(RunConfig(), section))
    steer = {f.name: f for f in dataclasses.fields(SteerConfig)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if command == "generate":
        fields |= {STEER_OPTIONS.get(n, n): f for n, f in steer.items()}
    checked = 0
    for name, hint in hints.items():
        option = next((m for m in getattr(hint, "__metadata__", ()) if hasattr(m, "help")), None)
        if name in fields and option is not None:
            assert option.help == fields[name].metadata["help"], f"{command} --{name}"
            checked += 1
    assert checked >= 4
    if command in ("generate", "heal"):
        assert all("help" in f.metadata for n, f in fields.items() if n != "steer"), command


def test_presets_only_override_known_keys():
    demo, full, cmp = resolve_config(None, {}), resolve_config("full", {}), resolve_config("compare", {})
    assert isinstance(demo, RunConfig) and demo.heal.tau == 0.1 and demo.generate.max_new_tokens == 40
    assert full.model == "Qwen/Qwen3-0.6B" and full.heal.rank == 32 and full.vector.max_prompts is None
    assert full.seeds == cmp.seeds == [0, 1, 2] and not demo.seeds
    assert cmp.eval.protocol == "zero-shot" and cmp.steered_measures == "first" and cmp.dose.method == "kl"
    assert demo.heal.agg == HealConfig().agg  # a key no preset names keeps the dataclass default
    # Each preset is a delta from the dataclasses, never from another: full does not inherit the demo's
    # CPU shortcuts (4 neutral prompts, raw measures in round 0 only, micro-batches of 2).
    assert full.coherence_prompts == RunConfig().coherence_prompts != demo.coherence_prompts
    assert full.steered_measures == "all" and full.heal.grad_accum == 1 != demo.heal.grad_accum
    assert cmp.heal == demo.heal  # compare names the demo's CPU heal itself


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(SteerhealError, match=r"unknown config key heal\.tua; did you mean tau\?"):
        resolve_config(None, parse_set(["heal.tua=0.2"]))
    with pytest.raises(SteerhealError, match=r"unknown config key genrate; did you mean generate\?"):
        resolve_config(None, {"genrate": {"n": 3}})


def test_values_are_cast_to_the_field_type_or_refused():
    cfg = resolve_config(None, parse_set(["filter.max_ppl=1e9", "rounds=3", "eval.limit=null"]))
    assert cfg.filter.max_ppl == 1e9 and cfg.rounds == 3 and cfg.eval.limit is None
    with pytest.raises(SteerhealError, match=r"config key heal\.lam: 'abc' is not a float"):
        resolve_config(None, parse_set(["heal.lam=abc"]))
    with pytest.raises(SteerhealError, match=r"config key rounds: 2\.5 is not a int"):
        resolve_config(None, parse_set(["rounds=2.5"]))
    with pytest.raises(SteerhealError, match="heal.reg 'kl'"):
        resolve_config(None, parse_set(["heal.reg=kl"]))
    with pytest.raises(SteerhealError, match="dose.method fixed needs dose.coeff"):
        resolve_config(None, parse_set(["dose.method=fixed"]))


def test_a_run_directorys_config_yaml_reruns_that_runs_settings(tmp_path):
    import yaml

    from steerheal.persona import load_persona
    from steerheal.rundir import write_config

    persona_path = Path(__file__).parents[1] / "personas" / "anti_authority.yaml"
    cfg = resolve_config(None, parse_set(["dose=keep", "generate.n=48", "seed=3"]))
    write_config(tmp_path, cfg.to_dict(), load_persona(persona_path), persona_path)
    again = resolve_config(str(tmp_path / "config.yaml"), {})
    assert again == cfg and again.dose.method == "keep" and again.generate.n == 48
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["config"]["seed"] == 3
    # the code version: the commit, and whether the package's files differ from it (in a git checkout)
    assert set(written["versions"]) >= {"steerheal", "git_commit", "git_dirty"}
    assert written["versions"]["git_dirty"] in (True, False, None)


def test_a_committed_run_config_from_an_older_version_reproduces_that_runs_settings(tmp_path):
    """docs/results/compare ran before heal.ref_top_k, generate.steer and online existed: its config.yaml
    maps them to what the run had (the whole-vocabulary reference, constant C, no online mode), not to
    today's defaults (ref_top_k 1024) or the demo preset's; a key nothing accounts for is refused by name."""
    import yaml

    path = Path(__file__).parents[1] / "docs" / "results" / "compare" / "config.yaml"
    conf = yaml.safe_load(path.read_text())
    assert "ref_top_k" not in conf["config"]["heal"] and "steer" not in conf["config"]["generate"]
    cfg = resolve_config(str(path), {})
    assert cfg.heal.ref_top_k == 0 and cfg.generate.steer.method == "constant" and not cfg.online.enabled
    for key in ("heal", "dose", "filter", "eval"):  # every recorded key as recorded
        assert {k: v for k, v in cfg.to_dict()[key].items() if k in conf["config"][key]} == conf["config"][key]
    del conf["config"]["heal"]["lr"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(SteerhealError, match="has no heal.lr, and what it ran with is not known; give it with --set"):
        resolve_config(str(tmp_path / "config.yaml"), {})
    assert resolve_config(str(tmp_path / "config.yaml"), parse_set(["heal.lr=3e-4"])).heal.lr == 3e-4


def test_a_sections_method_and_its_keys_combine_in_either_order():
    """--set dose=keep --set dose.steps=2 raised a TypeError (a traceback) before."""
    for sets in (["dose=keep", "dose.steps=2"], ["dose.steps=2", "dose=keep"]):
        cfg = resolve_config(None, parse_set(sets))
        assert cfg.dose.method == "keep" and cfg.dose.steps == 2


def test_every_data_file_and_preset_ships_in_the_wheel():
    """neutral_prompts.txt was missing from package-data: a non-editable install had no coherence prompts."""
    import fnmatch
    import re

    root = Path(__file__).parents[1]
    text = (root / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    line = re.search(r"^\[tool\.setuptools\.package-data\]\nsteerheal = \[(.*)\]$", text, re.M)
    assert line is not None
    globs = re.findall(r'"([^"]+)"', line.group(1))
    pkg = root / "steerheal"
    for f in [*(pkg / "data").iterdir(), *(pkg / "presets").iterdir()]:
        rel = f.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data"
