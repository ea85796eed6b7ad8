#!/usr/bin/env bash
# Table 4: TLP after each method (post-fusion, each method's own protocol). PEARL does not say
# which protocol produced its starred rows: rerun with profile=pearl for the other reading.
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py -m method="glob(*,exclude=pearl)" tlp=false,true dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
python -m pearl.tables "$@"
