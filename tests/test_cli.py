"""The command line end to end on the tiny model: piping, exit codes, one-line errors."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from steerheal.cli import app

runner = CliRunner()


def test_help_lists_commands_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("vector", "generate", "filter"):
        assert cmd in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("steerheal ")


def test_vector_generate_filter_pipeline(tiny_model_dir, persona_file, tmp_path):
    vec = tmp_path / "v.safetensors"
    m = ["--model", str(tiny_model_dir)]
    r = runner.invoke(app, ["vector", str(persona_file), "-o", str(vec), "--layers", "1,2", *m])
    assert r.exit_code == 0, r.output
    # real processes and a real pipe: data on stdout, logs on stderr
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerheal.cli",
            "generate",
            str(persona_file),
            "--vector",
            str(vec),
            "--coeff",
            "2",
            "-n",
            "4",
            "--max-new-tokens",
            "8",
            *m,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = gen.stdout.splitlines()
    assert len(lines) == 4 and all(json.loads(x)["coeff"] == 2.0 for x in lines)
    filt = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerheal.cli",
            "filter",
            "-",
            "--max-ppl",
            "1e9",
            "--min-words",
            "0",
            "--rejected",
            str(tmp_path / "rej.jsonl"),
            *m,
        ],
        input=gen.stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    kept = [json.loads(x) for x in filt.stdout.splitlines()]
    rej = (tmp_path / "rej.jsonl").read_text().splitlines()
    assert len(kept) + len(rej) == 4
    assert all("scores" in k and k["drop_reasons"] == [] for k in kept)
    assert "kept" in filt.stderr


def _one_line_error(r, needle):
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_errors_are_one_line_exit_2(tiny_model_dir, tiny_model_dir_wide, persona_file, tmp_path):
    m = ["--model", str(tiny_model_dir)]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    _one_line_error(runner.invoke(app, ["vector", str(bad_yaml), "-o", str(tmp_path / "v.st"), *m]), "malformed YAML")
    assert not (tmp_path / "v.st").exists()
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text("{oops\n")
    _one_line_error(runner.invoke(app, ["filter", str(bad_jsonl), *m]), "bad.jsonl:1")
    _one_line_error(
        runner.invoke(app, ["generate", str(persona_file), "--model", str(tmp_path / "no-such-model")]),
        "no such directory",
    )
    # a vector from another model
    vec = tmp_path / "wide.safetensors"
    assert (
        runner.invoke(
            app, ["vector", str(persona_file), "-o", str(vec), "--layers", "1", "--model", str(tiny_model_dir_wide)]
        ).exit_code
        == 0
    )
    out = tmp_path / "out.jsonl"
    _one_line_error(
        runner.invoke(app, ["generate", str(persona_file), "--vector", str(vec), "--coeff", "1", "-o", str(out), *m]),
        "Re-extract",
    )
    assert not out.exists()


def test_generate_schedule_gate_and_backtrack_flags(tiny_model_dir, persona_file, tmp_path):
    vec = tmp_path / "v.safetensors"
    m = ["--model", str(tiny_model_dir)]
    assert runner.invoke(app, ["vector", str(persona_file), "-o", str(vec), "--layers", "1", *m]).exit_code == 0
    out = tmp_path / "c.jsonl"
    args = ["generate", str(persona_file), "--vector", str(vec), "--coeff", "2", "-n", "2", "--max-new-tokens", "6"]
    flags = ["--schedule", "exp", "--decay-tokens", "2", "--floor", "0.5", "--gate", "0.1", "--backtrack", "2"]
    r = runner.invoke(app, [*args, *flags, "-o", str(out), *m])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text().splitlines()[0])["steer"]
    assert rec["method"] == "exp" and rec["floor_at"] == 2 and rec["gate"] == 0.1 and rec["backtrack"] == 2
    assert "backtracks" in rec and 0 <= rec["gate_open"] <= 1
    bad = runner.invoke(app, [*args, "--schedule", "cosine", *m])
    assert bad.exit_code != 0 and "generate.steer.method 'cosine'" in bad.output and "Traceback" not in bad.output
