import pytest
import torch

from steerheal.config import GenerateConfig
from steerheal.generate import generate_records
from steerheal.vector import SteeringVector


def G(n, **kw):
    return GenerateConfig(**{"n": n, "top_p": 1.0, "batch_size": 16, **kw})


PROMPTS = ["My boss wants me to stay late.", "Write a polite note.", "The weather is nice today."]


def test_coeff_zero_equals_plain_generation(tiny):
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 10})
    plain = generate_records(tiny, "p", PROMPTS, G(5, max_new_tokens=8, batch_size=2), seed=3)
    zero = generate_records(tiny, "p", PROMPTS, G(5, max_new_tokens=8, batch_size=2), vector=vec, coeff=0.0, seed=3)
    assert [r.completion for r in plain] == [r.completion for r in zero]


def test_steering_changes_output_and_records(tiny):
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 50})
    plain = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=8, temperature=0))
    steered = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=8, temperature=0), vector=vec, coeff=4.0)
    assert [r.completion for r in plain] != [r.completion for r in steered]
    r = steered[0]
    assert r.coeff == 4.0 and r.layers == [1] and r.messages == [{"role": "user", "content": PROMPTS[0]}]
    assert len({x.id for x in steered}) == 3


def test_batched_greedy_matches_one_at_a_time(tiny):
    """Left padding must not change what a prompt generates."""
    one = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=6, temperature=0, batch_size=1))
    many = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=6, temperature=0, batch_size=3))
    assert [r.completion for r in one] == [r.completion for r in many]


def test_system_prompt_is_recorded(tiny):
    recs = generate_records(tiny, "p", PROMPTS, G(2, max_new_tokens=4), system="Be principled.")
    assert recs[0].messages[0] == {"role": "system", "content": "Be principled."}


# ---------------------------------------------------------------- C along the completion: schedules and the gate


def _spy(tiny, vec, layer, coeff, steer, **gen):
    """Run generation with spies before and after the steering hook on `layer`: what it added, per forward."""
    from steerheal.generate import complete
    from steerheal.models import decoder_layers

    block, pre, post = decoder_layers(tiny.model)[layer], [], []

    def out_of(o):
        return (o[0] if isinstance(o, tuple) else o).detach().clone()

    h1 = block.register_forward_hook(lambda m, i, o: pre.append(out_of(o)))  # runs before steering's hook
    try:
        orig = vec.apply

        def apply_then_spy(model, c, s=None):  # steering's hook, then a spy hook after it
            import contextlib

            @contextlib.contextmanager
            def ctx():
                with orig(model, c, s) as state:
                    h2 = block.register_forward_hook(lambda m, i, o: post.append(out_of(o)))
                    try:
                        yield state
                    finally:
                        h2.remove()

            return ctx()

        vec.apply = apply_then_spy
        complete(tiny, [[{"role": "user", "content": p}] for p in PROMPTS], vector=vec, coeff=coeff, steer=steer, **gen)
    finally:
        h1.remove()
        del vec.apply
    return pre, post


def test_decay_reaches_the_floor_at_the_stated_token():
    from steerheal.config import SteerConfig

    lin = SteerConfig(method="linear", tokens=8, floor=0.25)
    assert lin.factor(0) == 1.0 and lin.factor(4) == 0.625 and lin.floor_at() == 8
    assert lin.factor(7) > 0.25 and lin.factor(8) == lin.factor(50) == 0.25
    exp = SteerConfig(method="exp", tokens=4, floor=0.25)  # halves every 4 tokens: at 0.25 from token 8
    assert exp.factor(4) == 0.5 and exp.floor_at() == 8 and exp.factor(7) > 0.25 and exp.factor(8) == 0.25
    assert SteerConfig(method="exp", tokens=4).floor_at() is None and SteerConfig().factor(99) == 1.0


def test_generation_applies_the_schedule_token_by_token(tiny):
    """What the hook adds at each forward, read back through spies around it: C at the prefill (it
    predicts token 0), then C · factor(t) for the forward that predicts token t."""
    from steerheal.config import SteerConfig

    torch.manual_seed(0)
    v = torch.randn(tiny.hidden_size)
    vec = SteeringVector({1: v})
    steer = SteerConfig(method="linear", tokens=4, floor=0.25)
    pre, post = _spy(
        tiny, vec, 1, 2.0, steer, max_new_tokens=7, min_new_tokens=7, temperature=0.0, top_p=1.0, batch_size=3
    )
    applied = [float(((b - a) @ v / (v @ v)).mean()) for a, b in zip(pre, post)]
    want = [2.0 * steer.factor(t) for t in range(7)]
    assert applied == pytest.approx(want, abs=1e-4)
    assert applied.index(min(applied)) == steer.floor_at()


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_the_gate_adds_nothing_where_the_state_already_points_along_v(tiny, mode):
    from steerheal.config import SteerConfig

    torch.manual_seed(1)
    v = torch.randn(tiny.hidden_size)
    vec = SteeringVector({1: v})
    steer = SteerConfig(gate=0.0, gate_mode=mode)  # about half the positions have cos(h, v) >= 0
    pre, post = _spy(tiny, vec, 1, 3.0, steer, max_new_tokens=4, temperature=0.0, top_p=1.0, batch_size=3)
    h, d = torch.cat([x.flatten(0, 1) for x in pre]), torch.cat([(b - a).flatten(0, 1) for a, b in zip(pre, post)])
    cos = torch.nn.functional.cosine_similarity(h, v[None], dim=-1)
    shut = cos >= 0.0
    assert 0 < int(shut.sum()) < len(cos)  # both cases occur
    assert d[shut].abs().max() == 0  # nothing added where the state already points along v
    w = torch.ones_like(cos) if mode == "hard" else (0.0 - cos).clamp_min(0)
    assert torch.allclose(d[~shut], 3.0 * w[~shut, None] * v, atol=1e-4)


def test_scheduled_and_gated_generation_batched_equals_one_by_one_and_is_recorded(tiny):
    from steerheal.config import SteerConfig

    torch.manual_seed(2)
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 20})
    steer = SteerConfig(method="exp", tokens=2, floor=0.1, gate=0.2)
    kw = dict(max_new_tokens=6, temperature=0, steer=steer)
    one = generate_records(tiny, "p", PROMPTS, G(3, batch_size=1, **kw), vector=vec, coeff=4.0)
    many = generate_records(tiny, "p", PROMPTS, G(3, batch_size=3, **kw), vector=vec, coeff=4.0)
    assert [r.completion for r in one] == [r.completion for r in many]
    assert [r.steer["gate_open"] for r in one] == pytest.approx([r.steer["gate_open"] for r in many], abs=1e-4)
    r = many[0]
    assert r.steer["method"] == "exp" and r.steer["floor_at"] == steer.floor_at() == 7 and r.steer["gate"] == 0.2
    assert all(0.0 <= x.steer["gate_open"] <= 1.0 for x in many)
    plain = generate_records(tiny, "p", PROMPTS, G(3, max_new_tokens=6, temperature=0))
    assert all(x.steer == {} for x in plain)


# ---------------------------------------------------------------- backtrack-and-replay


def _bt(**kw):
    from steerheal.config import SteerConfig

    return SteerConfig(**{"backtrack": 2, "backtrack_nll": -1.0, "backtrack_tokens": 3, "backtrack_max": 1, **kw})


def test_without_a_trigger_backtracking_decodes_like_generate(tiny):
    """Our decode loop, never rewinding, samples what transformers' generate samples (greedy)."""
    torch.manual_seed(3)
    vec = SteeringVector({1: torch.randn(tiny.hidden_size) * 10})
    kw = dict(max_new_tokens=8, temperature=0)
    plain = generate_records(tiny, "p", PROMPTS, G(3, **kw), vector=vec, coeff=3.0)
    never = generate_records(tiny, "p", PROMPTS, G(3, steer=_bt(backtrack_nll=1e9), **kw), vector=vec, coeff=3.0)
    assert [r.completion for r in never] == [r.completion for r in plain]
    assert all(r.steer["backtracks"] == [] for r in never)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_a_forced_backtrack_replays_k_tokens_at_the_reduced_coefficient(tiny, tiny_gpt2_dir, model):
    """backtrack_nll -1 rewinds as soon as the window is full and k + 1 tokens exist: exactly k tokens
    are dropped and resampled at backtrack_scale · C, and the batch gives what each row gives alone."""
    from steerheal.generate import complete
    from steerheal.models import load_model
    from steerheal.vector import SteerState

    lm = tiny if model == "llama" else load_model(str(tiny_gpt2_dir))
    torch.manual_seed(4)
    vec = SteeringVector({1: torch.randn(lm.hidden_size) * 10})
    steer = _bt(backtrack_scale=0.25)
    shares: list[list[float]] = []
    orig = SteerState.__setattr__

    def spy(self, name, value):  # every per-row share the decode loop hands the hooks
        if name == "row_share" and value is not None:
            shares.append(value.tolist())
        orig(self, name, value)

    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    SteerState.__setattr__ = spy  # type: ignore[method-assign]
    try:
        info: list = [{} for _ in chats]
        many = complete(
            lm,
            chats,
            max_new_tokens=8,
            temperature=0,
            top_p=1.0,
            batch_size=3,
            vector=vec,
            coeff=2.0,
            steer=steer,
            row_info=info,
        )
    finally:
        SteerState.__setattr__ = orig  # type: ignore[method-assign]
    one = [
        complete(lm, [c], max_new_tokens=8, temperature=0, top_p=1.0, batch_size=1, vector=vec, coeff=2.0, steer=steer)[
            0
        ]
        for c in chats
    ]
    assert many == one
    n = len(chats)
    for b, x in enumerate(info):
        assert x["backtracks"] == [{"at": 4, "k": 3}]  # window 2 full and 4 > k tokens: rewind at token 4
        row = [s[b] for s in shares]
        assert row.count(0.25) == 3 and set(row) == {1.0, 0.25}  # k tokens replayed at 0.25 · C
        assert all(s[n + b] == 0.0 for s in shares)  # the unsteered mirror never steers


@pytest.mark.parametrize(
    "sets, says",
    [
        (["generate.steer.method=linear"], "constant C only"),
        (["generate.steer.gate=0.2"], "constant C only"),
        (["generate.steer.backtrack=4"], "constant C only"),
        (["online.enabled=true"], "online mode samples"),
    ],
)
def test_the_vllm_backend_refuses_what_needs_per_token_state(sets, says):
    from steerheal import SteerhealError
    from steerheal.config import parse_set, resolve_config

    with pytest.raises(SteerhealError, match=says):
        resolve_config(None, parse_set(["generate.backend=vllm", *sets]))
    resolve_config(None, parse_set(sets))  # the same settings on hf are fine
    with pytest.raises(SteerhealError, match="use one of hf, vllm"):
        resolve_config(None, parse_set(["generate.backend=sglang"]))


def test_vllm_missing_is_one_line_that_names_the_setup(tiny_model_dir, persona_file):
    """Where vLLM is not installed (the main venv), --backend vllm says how to get it, without a traceback."""
    pytest.importorskip("typer")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from typer.testing import CliRunner

    from steerheal.cli import app

    args = ["generate", str(persona_file), "--model", str(tiny_model_dir), "-n", "1", "--backend", "vllm"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "scripts/setup_vllm.sh" in r.output and "Traceback" not in r.output
