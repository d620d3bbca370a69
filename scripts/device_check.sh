#!/usr/bin/env bash
# On a CUDA machine: the dtype-sensitive tests on the GPU, then one bf16 round of the loop on a tiny
# model built here (no weights travel), checking that the model the loop measured, the same adapters
# reloaded (`generate -a`) and the baked checkpoint are one function. Prints PASS/FAIL per check and
# exits non-zero on any FAIL. When to run it: see the README ("GPU check").
#   bash scripts/device_check.sh            # DEVICE=cpu bash scripts/device_check.sh exercises it on a CPU
set -u
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
DEVICE=${DEVICE:-cuda}
LOGS=$(mktemp -d)
fail=0
check() {
  local name=$1
  shift
  if "$@" >"$LOGS/$name.log" 2>&1; then echo "PASS $name: $(tail -n 1 "$LOGS/$name.log")"; else
    echo "FAIL $name"
    tail -n 25 "$LOGS/$name.log"
    fail=1
  fi
}

check device "$PY" -c "import torch; d='$DEVICE'; assert d == 'cpu' or torch.cuda.is_available(), 'no CUDA'; print(d, torch.__version__)"
[ "$DEVICE" = cuda ] && check bf16_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_lowprec.py
check bf16_round env DEVICE="$DEVICE" "$PY" - <<'PY'
import os, sys, tempfile
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from conftest import PERSONA_YAML, TINY_RUN, build_tiny_model  # the suite's own tiny model and settings

from steerheal.bake import bake
from steerheal.config import parse_set, resolve_config
from steerheal.loop import run_loop
from steerheal.models import load_model

dev = os.environ["DEVICE"]
tmp = Path(tempfile.mkdtemp())
model_dir = build_tiny_model(tmp / "model")
(tmp / "persona.yaml").write_text(PERSONA_YAML)
cfg = resolve_config(None, parse_set([*TINY_RUN, "rounds=1", f"model={model_dir}", f"device={dev}", "dtype=bf16"]))
res = run_loop(tmp / "persona.yaml", tmp / "run", cfg)
adapter = str(res.root / "round_00" / "adapter")
bake(str(model_dir), [adapter], tmp / "baked", device=dev)
ids = torch.tensor([[1, 5, 9, 20, 30, 7, 11, 3]], device=dev)


def logp(name, adapters=(), dtype="bf16"):
    m = load_model(name, list(adapters), device=dev, dtype=dtype).model
    with torch.no_grad():
        return torch.log_softmax(m(ids).logits.float(), -1)


def max_kl(a, b):
    return float((a.exp() * (a - b)).sum(-1).max())


loop = logp(str(model_dir), [adapter])  # the loop's model: bf16 weights plus fp32 low-rank residuals
baked = logp(str(tmp / "baked"), dtype="fp32")
floor = max_kl(logp(str(model_dir)), logp(str(model_dir), dtype="fp32"))  # bf16 vs fp32, no adapter at all
kl = max_kl(loop, baked)
print(f"max per-token KL(loop bf16 ‖ baked fp32) = {kl:.2e}; bf16-vs-fp32 floor without adapters {floor:.2e}")
assert kl <= 1.5 * floor + 1e-4, "the loop's bf16 model and the baked checkpoint differ beyond bf16 rounding"
PY
echo "logs: $LOGS"
exit $fail
