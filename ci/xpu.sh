#!/usr/bin/env bash
# What an Intel GPU CI machine runs (PyTorch with torch.xpu): versions and configs, parity check, suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m g4route info
python3 -m g4route check
python3 -m nox -s test-xpu -- "$@"
