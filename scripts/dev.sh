#!/usr/bin/env bash
# Set up a virtual environment in .venv (once) and run a project task in it.
#   bash scripts/dev.sh demo   generate images for examples/prompts.parquet into out/demo with the embedded model
#   bash scripts/dev.sh test   run the test suite
#   bash scripts/dev.sh lint   ruff: lint rules and import order (pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
# The CPU build of PyTorch; an unpinned torch pulls a multi-GB CUDA build. GPU hosts install their own torch.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  demo)
    setup
    "$VENV/bin/karlo" generate examples/prompts.parquet out/demo "${@:2}"
    ;;
  lint)
    setup
    "$VENV/bin/ruff" check .
    ;;
  test)
    setup
    set +e
    "$VENV/bin/python" -m pytest "${@:2}"
    rc=$?
    set -e
    # pytest exits 5 when it collected no tests: that must never pass as green.
    if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test|lint [args...]" >&2
    exit 2
    ;;
esac
