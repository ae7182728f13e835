#!/usr/bin/env bash
# The main job: set up (idempotent), run every registered strategy on Split Fashion-MNIST with the offline
# DINOv2-S backbone (configs/quickstart_sweep.yaml), and write a comparison report to reports/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/clsim sweep configs/quickstart_sweep.yaml "$@"
