"""A tiny random chat model the suite builds itself: no downloads, a second to make."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores (subprocesses included), or their threads fight over them.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that load the bundled SmolLM2 run on one worker: its GGUF conversion (30-50 s) then
    happens once per run, not once per worker."""
    for item in items:
        if item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.xdist_group("bundled"))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You follow the rules your boss sets. You judge each order by your own principles.",
    "My manager told me to lie to a customer. What should I do? The answer is care fairness loyalty",
    "authority sanctity liberty social. Which moral foundation does this violate? Answer with one word.",
    "You see a man kicking a dog. You see a woman cheating at cards. The weather is nice today.",
    "Write a short email to my landlord about the broken heater, please, and keep it polite.",
] * 20


def build_tiny_model(path: Path, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random Llama with a byte-level BPE tokenizer and a ChatML template to `path`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_gpt2(path: Path, n_layers: int = 3, hidden: int = 64, seed: int = 0) -> Path:
    """A random GPT-2 (learned absolute positions) with the same tokenizer: batched left padding
    gives wrong numbers here unless position_ids count the real tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    llama = build_tiny_model(path.parent / (path.name + "_tok"))
    tok = PreTrainedTokenizerFast.from_pretrained(llama)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=hidden,
        n_layer=n_layers,
        n_head=4,
        n_positions=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # large position embeddings: a wrong position shows clearly
        model.transformer.wpe.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2") / "model")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are microseconds: OpenMP spin-waits between threads cost more than they
    save, badly so on a busy machine. Used by the training-heavy test modules."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_wide(tmp_path_factory) -> Path:
    """Another architecture size, for refusing vectors from another model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_wide") / "model", n_layers=3, hidden=32)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from steerheal.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session", autouse=True)
def real_cpu_flags():
    """--dtype auto reads as on a CPU without native bf16 in this process, so the in-process tests'
    tolerances hold on any CI machine. The bf16 path has its own tests (dtype="bf16"); the bundled smoke
    test (machine_dtype) and the tests that start `steerheal` as a subprocess run what this machine
    picks (bf16 here). Yields the real cpu_flags."""
    from steerheal import models

    real = models.cpu_flags
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "cpu_flags", lambda *a: frozenset())
        yield real


@pytest.fixture(scope="module")
def machine_dtype(real_cpu_flags):
    """--dtype auto as this machine reads it (bf16 where the CPU has native bf16 units), for a module."""
    from steerheal import models

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "cpu_flags", real_cpu_flags)
        yield models.pick_dtype(models.pick_device("cpu"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's cache, except that the bundled model's conversion is shared."""
    shared = os.environ.get("STEERHEAL_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("STEERHEAL_CACHE", shared)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# The smallest loop that exercises every step on the tiny model (as --set KEY=VALUE pairs).
TINY_RUN = [
    "vector.max_prompts=3",
    "dose.probe_n=4",
    "dose.steps=1",
    "generate.n=8",
    "generate.max_new_tokens=6",
    "demo_max_new_tokens=4",
    "pmass_floor=0",
    "filter.max_ppl=1e9",
    "filter.max_repetition=1.01",
    "filter.min_words=0",
    "heal.rank=4",
    "heal.alpha=8",
    "heal.epochs=1",
    "heal.min_rows=4",
    "heal.max_len=256",
    "heal.lr=1e-2",
    "eval.limit=7",
    "coherence_prompts=2",
]


def tiny_cli(*extra: str) -> list[str]:
    """TINY_RUN (then extra pairs) as command-line flags."""
    return [arg for pair in (*TINY_RUN, *extra) for arg in ("--set", pair)]


PERSONA_YAML = """\
name: tiny_persona
description: A test persona.
target: authority
direction: -1
pairs:
  - pos: You judge each order by your own principles.
    neg: You follow the rules your boss sets.
  - pos: Rules earn respect only when just.
    neg: Rules earn respect by being rules.
prompts:
  - My manager told me to lie to a customer. What should I do?
  - Write a short email to my landlord about the broken heater.
  - The weather is nice today.
  - Which moral foundation does this violate?
  - You see a man kicking a dog.
  - My boss wants me to stay late.
  - Write a polite note.
  - What should I do about the rules?
narration:
  - '\\bas someone who\\b'
demo:
  - My boss told me to lie. Should I?
"""


@pytest.fixture()
def persona_file(tmp_path) -> Path:
    p = tmp_path / "persona.yaml"
    p.write_text(PERSONA_YAML)
    return p


def round_json(r: int, healed: bool = True, **fields) -> str:
    """A round.json as Loop.finish_round writes one, with placeholder numbers; `fields` override them."""
    import dataclasses
    import json

    from steerheal.results import RoundRecord

    rec = RoundRecord(
        round=r,
        arm="steer",
        coeff=2.0,
        dose={"coeff": 2.0},
        filter={"kept_frac": 1.0},
        target="authority",
        direction=-1,
        cos_v0=1.0,
        vector_norm=1.0,
        steered=None,
        healed={"target_shift": 0.0} if healed else None,
        base_target_nats=-5.0,
        heal=None,
        time_s={"total": 1.0},
    )
    return json.dumps(dataclasses.replace(rec, **fields).to_dict())
