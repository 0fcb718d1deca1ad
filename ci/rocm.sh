#!/usr/bin/env bash
# What an AMD CI machine runs (ROCm build of PyTorch): versions and configs, parity check, device suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m g4route info
python3 -m g4route check
python3 -m nox -s test-rocm -- "$@"
