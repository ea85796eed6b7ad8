#!/usr/bin/env bash
# Table 3: PEARL with PA × TLP, "TLP only" with both block architectures, and full vanilla CLIP.
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py -m method=pearl pa=true,false tlp=true,false dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
python run.py -m method=pearl pa=false tlp=true arch=vanilla dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
python run.py -m method=vanilla pa=false tlp=false dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
python -m pearl.tables "$@"
