#!/usr/bin/env bash
# What an NVIDIA CI machine runs: versions and the chosen configs, the parity check, the device suite.
# Uses the machine's own PyTorch; needs nox (pip install nox) and pytest, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m g4route info
python3 -m g4route check
python3 -m nox -s test-cuda -- "$@"
