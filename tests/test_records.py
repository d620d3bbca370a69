import os

import pytest

from steerheal import SteerhealError
from steerheal.records import Record, atomic_path, read_records, write_records


def test_roundtrip(tmp_path):
    recs = [Record(id="a", persona="p", messages=[{"role": "user", "content": "hi"}], completion="yo", coeff=2.0)]
    f = tmp_path / "r.jsonl"
    write_records(recs, f)
    assert read_records(f) == recs


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "r.jsonl:2: not valid JSON"),
        ('{"id": "x", "messages": [{"role": "user", "content": "q"}]}', "r.jsonl:2: record lacks completion"),
        ('{"id": "x", "messages": [], "completion": "c"}', "r.jsonl:2: 'messages' must be"),
        ("[1, 2]", "r.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, needle):
    good = '{"id": "a", "messages": [{"role": "user", "content": "q"}], "completion": "c"}'
    f = tmp_path / "r.jsonl"
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(SteerhealError) as e:
        read_records(f)
    assert needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SteerhealError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_atomic_dir_replaces_old(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(os.listdir(target)) == ["new"]
