import json

import pytest
import torch

from steerheal import SteerhealError
from steerheal.chat import messages_for, render_prompt
from steerheal.models import decoder_layers, load_model, parse_layers
from steerheal.persona import load_persona
from steerheal.vector import SteeringVector, extract, record_layers, write_gguf


def test_parse_layers():
    assert parse_layers("0.45:0.55", 30) == [13, 14, 15, 16]
    assert parse_layers("1,3", 4) == [1, 3]
    with pytest.raises(SteerhealError):
        parse_layers("7", 4)
    with pytest.raises(SteerhealError):
        parse_layers("0.9:0.1", 4)


def test_decoder_layers_found_generically(tiny):
    blocks = decoder_layers(tiny.model)
    assert len(blocks) == 4 and blocks is tiny.model.model.layers


def test_assistant_tag_is_last_token(tiny):
    text = render_prompt(tiny.tokenizer, messages_for("hello", "be good"))
    assert text.endswith("<|im_start|>assistant\n")
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    tag = tiny.tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[-len(tag) :] == tag


def test_extract_shape_meta_and_roundtrip(tiny, persona_file, tmp_path):
    p = load_persona(persona_file)
    vec = extract(tiny, p, [1, 2], batch_size=3)
    assert vec.layers == [1, 2]
    assert all(v.shape == (tiny.hidden_size,) for v in vec.directions.values())
    assert vec.meta["n_layers"] == "4" and vec.meta["persona"] == "tiny_persona"
    assert json.loads(vec.meta["layers"]) == [1, 2] and vec.meta["method"] == "mean_diff"
    out = tmp_path / "v.safetensors"
    vec.save(out)
    back = SteeringVector.load(out)
    assert back.meta == vec.meta
    for i in vec.layers:
        torch.testing.assert_close(back.directions[i], vec.directions[i])
    assert back.cosine(vec) == pytest.approx(1.0, abs=1e-5)


def test_extract_is_mean_difference_at_the_tag(tiny, persona_file):
    """Parity with a direct computation: one prompt at a time, no batching, no padding."""
    p = load_persona(persona_file)
    vec = extract(tiny, p, [2], batch_size=5)
    tok = tiny.tokenizer
    diffs = []
    for pair in p.pairs:
        for u in p.prompts:
            hs = []
            for sys_text in (pair.pos, pair.neg):
                ids = tok(render_prompt(tok, messages_for(u, sys_text)), return_tensors="pt", add_special_tokens=False)
                with torch.no_grad():
                    out = tiny.model(**ids, output_hidden_states=True)
                hs.append(out.hidden_states[3][0, -1])  # hidden_states[i + 1] is block i's output
            diffs.append(hs[0] - hs[1])
    torch.testing.assert_close(vec.directions[2], torch.stack(diffs).mean(0), atol=1e-4, rtol=1e-4)


def test_normalize(tiny, persona_file):
    vec = extract(tiny, load_persona(persona_file), [1], normalize=True)
    assert float(vec.directions[1].norm()) == pytest.approx(1.0, abs=1e-5)


def test_hook_adds_exactly_c_v_and_is_removed(tiny):
    v = torch.randn(tiny.hidden_size)
    vec = SteeringVector({1: v})
    ids = torch.tensor([[1, 5, 6, 7]])
    before = dict(decoder_layers(tiny.model)[1]._forward_hooks)  # transformers keeps hooks of its own
    with record_layers(tiny.model, [1]) as plain:
        tiny.model(ids)
    with vec.apply(tiny.model, 2.5), record_layers(tiny.model, [1]) as steered:
        tiny.model(ids)
    # the steering hook was registered first, so the recorder sees its output
    torch.testing.assert_close(steered[1] - plain[1], (2.5 * v).expand_as(plain[1]), atol=1e-5, rtol=0)
    assert dict(decoder_layers(tiny.model)[1]._forward_hooks) == before


def test_hook_removed_on_error(tiny):
    vec = SteeringVector({0: torch.ones(tiny.hidden_size)})
    before = dict(decoder_layers(tiny.model)[0]._forward_hooks)
    with pytest.raises(RuntimeError):
        with vec.apply(tiny.model, 1.0):
            raise RuntimeError("boom")
    assert dict(decoder_layers(tiny.model)[0]._forward_hooks) == before


def test_vector_from_another_model_is_refused(tiny, tiny_model_dir_wide, persona_file):
    other = load_model(str(tiny_model_dir_wide))
    vec = extract(other, load_persona(persona_file), [1])
    with pytest.raises(SteerhealError, match="Re-extract"):
        vec.check_compatible(tiny)


def test_load_rejects_non_vector(tmp_path):
    bad = tmp_path / "v.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SteerhealError, match="not a readable safetensors"):
        SteeringVector.load(bad)


def _llama_cpp_cvec(path, n_layer: int) -> dict[int, torch.Tensor]:
    """What llama.cpp steers with a control-vector GGUF: {block il (0-based): vector added after it}.

    Mimics common/common.cpp common_control_vector_load_one (name 'direction.k', k <= 0 rejects the
    file, data for k stored at (k - 1) * n_embd) and src/llama-adapter.cpp llama_adapter_cvec::apply /
    tensor_for (tensors[il] filled from offset (il - 1) * n_embd for il in 1..n_layer-1, added by
    build_cvec(cur, il) to the output of block il; default layer range 1..n_layer).
    """
    import gguf

    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "controlvector"
    data: list[float] = []
    n_embd = None
    for t in r.tensors:
        prefix, _, idx = t.name.partition(".")
        assert prefix == "direction" and idx.isdigit(), f"llama.cpp: unparsable layer index in {t.name}"
        k = int(idx)
        assert k > 0, "llama.cpp: invalid (zero) direction tensor layer index"
        v = torch.from_numpy(t.data.copy()).float().flatten()
        n_embd = n_embd or v.numel()
        data += [0.0] * max(0, n_embd * k - len(data))
        for j in range(n_embd):
            data[n_embd * (k - 1) + j] += float(v[j])
    out = {}
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= len(data):
            out[il] = torch.tensor(data[off : off + n_embd])
    return out


def test_gguf_steers_the_same_blocks_as_the_hook(tiny, tmp_path):
    """The rule, not a string: applying the exported file as llama.cpp does == steerheal's own hook."""
    torch.manual_seed(0)
    n = len(decoder_layers(tiny.model))
    vec = SteeringVector({1: torch.randn(tiny.hidden_size), n - 1: torch.randn(tiny.hidden_size)})
    out = tmp_path / "v.gguf"
    write_gguf(vec, out)
    cvec = _llama_cpp_cvec(out, n)
    coeff, ids = 3.0, torch.tensor([[1, 5, 6, 7, 8]])

    blocks = decoder_layers(tiny.model)

    def add(delta):
        def hook(_m, _i, o):
            return (o[0] + delta, *o[1:]) if isinstance(o, tuple) else o + delta

        return hook

    handles = [blocks[il].register_forward_hook(add(coeff * v)) for il, v in cvec.items() if v.any()]
    try:
        with torch.no_grad():
            theirs = tiny.model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), vec.apply(tiny.model, coeff):
        ours = tiny.model(ids, output_hidden_states=True)
    with torch.no_grad():
        plain = tiny.model(ids).logits
    assert not torch.allclose(ours.logits, plain, atol=1e-3)  # the steering does something
    for a, b in zip(theirs.hidden_states, ours.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-5, rtol=1e-5)


def test_gguf_refuses_block_0(tmp_path):
    """llama.cpp cannot steer block 0's output (direction.0 is rejected): refuse, do not shift."""
    out = tmp_path / "v.gguf"
    with pytest.raises(SteerhealError, match=r"block 0.*layers >= 1"):
        write_gguf(SteeringVector({0: torch.ones(8), 2: torch.ones(8)}), out)
    assert not out.exists()
