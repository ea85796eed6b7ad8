#!/usr/bin/env bash
# Offline smoke run: synthetic data in the real layouts and the tiny random model (smoke figures only).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pearl.data.synthetic --root data/synthetic --images 4
python run.py -m method=pearl,naclip tlp=true,false dataset=voc21,ade20k data_root=data/synthetic model=tiny \
  results_dir=results/smoke "$@"
python -m pearl.tables --results results/smoke
