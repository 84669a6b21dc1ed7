#!/usr/bin/env bash
# The second test environment: a virtual environment with torchvision, timm and transformers beside
# the torch they were built for, and darkknowledge (editable) with its test extras. The tests marked
# `models` (tests/test_external_models.py) run there:
#
#   bash scripts/setup_models.sh && DK_REQUIRE_MODELS=1 .venv-models/bin/python -m pytest -m models
#
# The main environment keeps its CPU torch, which has no matching torchvision; PyPI's torch 2.14.1
# with torchvision 0.29.1 (a CUDA build, about 6 GB with its libraries) runs on a CPU as well. Pretrained
# weights are never downloaded: the tests build every model with random weights.
#
# A venv that already holds everything (right versions, darkknowledge from this checkout) is kept as
# it is, so a second run takes seconds.
#
# Environment: DK_MODELS_VENV (default .venv-models in the repository root), PYTHON (the interpreter
# that creates the venv), DK_MODELS_TORCH / DK_MODELS_TORCHVISION (the versions, default 2.14.1 / 0.29.1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${DK_MODELS_VENV:-$ROOT/.venv-models}"
TORCH="${DK_MODELS_TORCH:-2.14.1}"
VISION="${DK_MODELS_TORCHVISION:-0.29.1}"
PIP=(-m pip install --quiet --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_models: creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# prints what is missing: `libraries` (torch and torchvision at the pinned versions, timm,
# transformers) and/or `package` (darkknowledge from this checkout with its test tools)
missing() {
  "$PY" - "$TORCH" "$VISION" "$ROOT" <<'EOF'
import pathlib
import sys

want_torch, want_vision, root = sys.argv[1:4]
try:
    import timm, torch, torchvision, transformers
    ok = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]) == (want_torch, want_vision)
    if ok:
        print(f"setup_models: torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"timm {timm.__version__}, transformers {transformers.__version__}", file=sys.stderr)
except Exception:  # noqa: BLE001 - any import failure means: install
    ok = False
if not ok:
    print("libraries")
try:
    import darkknowledge, hypothesis, pytest, pytest_timeout  # noqa: F401
    ok = pathlib.Path(darkknowledge.__file__).resolve().is_relative_to(pathlib.Path(root).resolve())
except Exception:  # noqa: BLE001
    ok = False
if not ok:
    print("package")
EOF
}

todo="$(missing)"
if [[ "$todo" == *libraries* ]]; then
  echo "setup_models: installing torch==$TORCH torchvision==$VISION timm transformers into $VENV (a few minutes)" >&2
  "$PY" "${PIP[@]}" "torch==$TORCH" "torchvision==$VISION" "timm>=1.0" "transformers>=4.46"
fi
if [[ "$todo" == *package* ]]; then
  echo "setup_models: installing darkknowledge[test] (editable) from $ROOT into $VENV" >&2
  "$PY" "${PIP[@]}" -e ".[test]"
fi
if [ -n "$todo" ]; then
  todo="$(missing)"
  if [ -n "$todo" ]; then
    echo "setup_models: still missing after the install: $todo" >&2
    exit 1
  fi
fi
echo "setup_models: ready: $PY -m pytest -m models" >&2
