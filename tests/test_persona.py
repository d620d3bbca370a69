import pytest
import yaml

from steerheal import SteerhealError
from steerheal.persona import load_persona, parse_persona


def test_shipped_persona_is_valid():
    p = load_persona("personas/anti_authority.yaml")
    assert p.target == "authority" and p.direction == -1
    assert len(p.prompts) >= 64 and len(p.pairs) >= 1
    assert len(set(p.prompts)) == len(p.prompts)
    assert p.demo and p.narration


def test_loads_fixture(persona_file):
    p = load_persona(persona_file)
    assert p.name == "tiny_persona" and len(p.pairs) == 2 and p.extraction == p.prompts
    assert len(p.sha256) == 64


def _base():
    from conftest import PERSONA_YAML

    return yaml.safe_load(PERSONA_YAML)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.pop("pairs"), "missing key 'pairs'"),
        (lambda d: d.update(pairs=[]), "'pairs' must be a non-empty list"),
        (lambda d: d.update(target="honesty"), "expected one of care"),
        (lambda d: d.update(direction=2), "'direction' must be +1 or -1"),
        (lambda d: d.update(prompts=["a", "b"]), "at least 8"),
        (lambda d: d["pairs"].append({"pos": "x"}), "pairs[2] must have exactly the keys pos and neg"),
        (lambda d: d["pairs"].append({"pos": "same", "neg": "same"}), "identical"),
        (lambda d: d.update(narration=["(unclosed"]), "narration[0] is not a valid regex"),
        (lambda d: d.update(colour="red"), "unknown key(s) colour"),
    ],
)
def test_validation_errors_name_key(mutate, needle):
    d = _base()
    mutate(d)
    with pytest.raises(SteerhealError) as e:
        parse_persona(d, "p.yaml")
    assert needle in str(e.value) and str(e.value).startswith("p.yaml")


def test_malformed_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\npairs: [\n  - pos: a\n")
    with pytest.raises(SteerhealError, match=r"bad\.yaml:\d+: malformed YAML"):
        load_persona(f)


def test_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SteerhealError, match="malformed YAML"):
        load_persona(f)
