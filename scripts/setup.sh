#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with fastdino (editable) and everything the
# tests and the trainer need, at the versions CI tests with (constraints.txt). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and alone: a CPU wheel where one is provided locally, PyPI's build elsewhere.
python -m pip install -q -c constraints.txt torch
python -m pip install -q -c constraints.txt -e ".[train,bench,eval,dali,dev]"
# timm for the timm-interop parity tests, without its torchvision requirement: PyPI's torchvision
# is built against CUDA torch and does not import beside the CPU wheel (tests/unit/timm_helpers.py
# stands in for the names timm imports from it). Not an extra: fastdino itself never imports timm.
python -m pip install -q -c constraints.txt --no-deps timm
python -c "import importlib.util, torch, fastdino.kernels; t = importlib.util.find_spec('triton') and __import__('triton').__version__; print(f'fastdino ready: torch {torch.__version__}, triton {t or \"not installed (PyTorch references)\"}, cuda {torch.cuda.is_available()}')"
