"""Peak RSS of heal and filter at a Qwen3-sized vocabulary (V = 151,936), on a tiny random Llama,
64 rows × 256 tokens: logits in chunks of positions (the default) against one chunk (a [N, V]
tensor, as before). Each phase runs in its own process, so each peak is its own. Goal ≤ 1.5 GB.

    python benchmarks/bench_vocab.py [--rows 64] [--tokens 256] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

WORDS = "the rule asks us to wait but I think we should decide for ourselves what is fair today".split()


def child(phase: str, chunked: bool, rows: int, tokens: int, vocab: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import steerheal.logprobs as L
    from steerheal.config import FilterConfig, HealConfig
    from steerheal.filter import filter_records
    from steerheal.heal import heal
    from steerheal.models import LoadedModel, bundled_path
    from steerheal.records import Record

    torch.manual_seed(0)
    if not chunked:
        L.CHUNK_ELEMS = 2**62  # one chunk: the whole [N, V] at once
    tok = AutoTokenizer.from_pretrained(str(bundled_path()))
    tok.padding_side = "left"
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    lm = LoadedModel(LlamaForCausalLM(cfg).eval(), tok, f"tiny-llama-V{vocab}")
    text = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    ids = tok(text, add_special_tokens=False)["input_ids"][: tokens - 40]
    completion = tok.decode(ids)
    recs = [
        Record(id=str(i), persona="p", messages=[{"role": "user", "content": f"Question {i}?"}], completion=completion)
        for i in range(rows)
    ]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if phase == "heal":
        with tempfile.TemporaryDirectory() as d:
            heal(lm, recs, HealConfig(max_len=tokens, epochs=1, min_rows=4), f"{d}/adapter")
    else:
        filter_records(lm, recs, FilterConfig(max_len=tokens * 2), narration=[])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{phase:6s} {'chunked' if chunked else 'one chunk':9s} peak RSS {peak:6.0f} MB "
        f"(model and data {rss0:.0f} MB)  {time.perf_counter() - t:5.1f} s",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--phase", default="")
    ap.add_argument("--one-chunk", action="store_true")
    a = ap.parse_args()
    if a.phase:
        child(a.phase, not a.one_chunk, a.rows, a.tokens, a.vocab)
        return
    print(f"tiny Llama, V = {a.vocab}, {a.rows} rows × {a.tokens} tokens")
    for phase in ("filter", "heal"):
        for extra in ([], ["--one-chunk"]):
            args = ["--phase", phase, "--rows", str(a.rows), "--tokens", str(a.tokens), "--vocab", str(a.vocab)]
            subprocess.run([sys.executable, __file__, *args, *extra], check=True)


if __name__ == "__main__":
    main()
