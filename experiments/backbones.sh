#!/usr/bin/env bash
# Table 6: PEARL with OpenAI ViT-B/32, ViT-B/16 and ViT-L/14 (load_clip builds OpenAI weights with QuickGELU).
# Each model's runs fill its own tables (results/<model>/) and one row of results/backbones.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in ViT-B-32 ViT-B-16 ViT-L-14; do
  python run.py -m method=pearl model=custom model.name=$name model.pretrained=openai dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
done
python -m pearl.tables --model ViT-B-32:openai --model ViT-B-16:openai --model ViT-L-14:openai "$@"
