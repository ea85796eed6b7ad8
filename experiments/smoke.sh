#!/usr/bin/env bash
# Offline smoke run: synthetic data in the real layouts and the tiny random model (smoke figures only).
# Extra arguments go to run.py and to the tables step (e.g. results_dir=/tmp/smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pearl.data.synthetic --root data/synthetic --images 4
python run.py -m method=pearl,naclip tlp=true,false dataset=voc21 data_root=data/synthetic model=tiny \
  results_dir=results/smoke "$@"
python -m pearl.tables --include-partial model=tiny results_dir=results/smoke "$@"
