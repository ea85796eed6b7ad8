#!/usr/bin/env bash
# Paper vs released code: PEARL with each variant the paper describes (pearl/params.py `paper`,
# docs/pearl.md §6) alone, then all together, on the eight benchmarks; the first sweep, the released
# code, is Table 1's PEARL. Then results/code_vs_paper.csv: each cell beside the paper's number and
# its difference to the released code. Extra arguments go to run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t runs < <(python -W ignore::RuntimeWarning -m pearl.params --code-vs-paper)
for overrides in "${runs[@]}"; do
  # shellcheck disable=SC2086  # one run's overrides, split into arguments
  python run.py -m method=pearl dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k $overrides "$@"
done
python -m pearl.tables "$@"
