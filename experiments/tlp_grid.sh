#!/usr/bin/env bash
# Fig. 4: PEARL's mIoU against the TLP grid size, then the figure.
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py -m method=pearl tlp_grid=40,60,80,112,160,224 dataset=voc21,context59,cityscapes,ade20k "$@"
python -m pearl.tables --pivot tlp_grid "$@"   # also draws figures/fig4_tlp_grid.png
