#!/usr/bin/env bash
# Table 5: PEARL at input short sides 224, 280, 336 on every dataset (Cityscapes included).
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py -m method=pearl resize_short=224,280,336 dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
python -m pearl.tables "$@"
