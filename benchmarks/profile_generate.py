"""Where steered generation's time goes: torch's profiler over one batch of 16 rows x 40 sampled tokens
on the bundled SmolLM2 (top-p 0.95), the ops by their own CPU time.

    python benchmarks/profile_generate.py [bf16|fp32]
"""

from __future__ import annotations

import sys
import time

from torch.profiler import ProfilerActivity, profile

from steerheal.chat import messages_for
from steerheal.generate import complete
from steerheal.models import load_model, parse_layers
from steerheal.persona import load_persona
from steerheal.progress import set_quiet
from steerheal.vector import extract


def main() -> None:
    set_quiet(True)
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    lm = load_model(dtype=dtype)
    persona = load_persona("personas/anti_authority.yaml")
    vec = extract(lm, persona, parse_layers("0.45:0.55", lm.n_layers), max_prompts=4)
    chats = [messages_for(q) for q in persona.generation[:16]]
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.95, batch_size=16, vector=vec, coeff=2.5, seed=0)
    complete(lm, chats, **kw)  # warm-up
    t0 = time.perf_counter()
    complete(lm, chats, **kw)
    print(f"{dtype}: {time.perf_counter() - t0:.2f} s for 16 rows x 40 tokens")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        complete(lm, chats, **kw)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
