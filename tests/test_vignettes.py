"""vignettes.py: the sources (demo set, JSONL files, tinymfv download) and the balanced sample."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from steerheal import SteerhealError
from steerheal.config import FOUNDATIONS
from steerheal.vignettes import load_vignettes, parse_vignettes

REAL = Path(__file__).resolve().parents[2] / "shared" / "tinymfv" / "vignettes_classic_other_violate.jsonl"


# ---------------------------------------------------------------- vignette sources


def test_demo_set_balanced():
    vigs = load_vignettes(None)
    assert len(vigs) == 42
    assert Counter(v.foundation for v in vigs) == {f: 6 for f in FOUNDATIONS}
    assert all(not v.human for v in vigs) and all(v.modal == v.foundation for v in vigs)


def test_limit_is_balanced_not_prefix():
    vigs = load_vignettes(None, limit=14)
    assert Counter(v.foundation for v in vigs) == {f: 2 for f in FOUNDATIONS}
    again = load_vignettes(None, limit=14)
    assert [v.id for v in again] == [v.id for v in vigs]  # deterministic
    other = load_vignettes(None, limit=14, seed=1)
    assert [v.id for v in other] != [v.id for v in vigs]
    nine = load_vignettes(None, limit=9)
    assert max(Counter(v.foundation for v in nine).values()) == 2


def _row(**kw):
    base = {"id": "a", "foundation_coarse": "Care", "text": "You see a man kicking a dog."}
    base.update(kw)
    return json.dumps(base)


def test_schema_errors_name_file_and_line(tmp_path):
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"id": "x", "text": "t"}), "lacks foundation_coarse"),
        (_row(foundation_coarse="Honesty"), "foundation_coarse 'Honesty'"),
        (_row(human_Care="lots"), "human_Care"),
        (_row(human_Kindness=3), "unknown column"),
        (_row(text=""), "'text' must be"),
    ]
    for bad, msg in cases:
        f = tmp_path / "v.jsonl"
        f.write_text(_row(id="ok") + "\n\n" + bad + "\n")
        with pytest.raises(SteerhealError) as e:
            load_vignettes(str(f))
        assert f"{f}:3:" in str(e.value) and msg in str(e.value)


def test_human_modal_and_social_norms_alias():
    line = _row(foundation_coarse="Social Norms", human_Care=10.0, human_SocialNorms=70.0, human_Authority=20.0)
    (v,) = parse_vignettes([line], "x.jsonl")
    assert v.foundation == "social" and v.modal == "social" and v.human["authority"] == 20.0


def test_unknown_tinymfv_set_and_offline(monkeypatch, tmp_path):
    with pytest.raises(SteerhealError, match="unknown set"):
        load_vignettes("tinymfv:nope")
    import urllib.request

    def boom(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path))
    with pytest.raises(SteerhealError, match="could not download .*pass a local path with --vignettes"):
        load_vignettes("tinymfv:classic")


def test_tinymfv_download_verified_and_cached(monkeypatch, tmp_path):
    import io
    import urllib.request

    import steerheal.vignettes as ev

    data = (_row(id="a") + "\n" + _row(id="b", foundation_coarse="Liberty") + "\n").encode()
    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path))
    monkeypatch.setitem(ev.TINYMFV_SHA256, "vignettes_classic_other_violate.jsonl", ev._sha256(data))
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=0: calls.append(url) or io.BytesIO(data))
    assert len(load_vignettes("tinymfv:classic")) == 2
    assert len(load_vignettes("tinymfv:classic")) == 2 and len(calls) == 1  # second time from the cache
    assert ev.TINYMFV_COMMIT in calls[0]
    monkeypatch.setitem(ev.TINYMFV_SHA256, "vignettes_classic_self_violate.jsonl", "0" * 64)
    with pytest.raises(SteerhealError, match="does not match"):
        load_vignettes("tinymfv:classic", condition="self_violate")


@pytest.mark.skipif(not REAL.is_file(), reason="shared/tinymfv not beside the checkout")
def test_real_classic_file():
    vigs = load_vignettes(str(REAL))
    assert len(vigs) == 132 and sum(bool(v.human) for v in vigs) == 132
    lim = load_vignettes(str(REAL), limit=28)
    assert Counter(v.foundation for v in lim) == {f: 4 for f in FOUNDATIONS}
