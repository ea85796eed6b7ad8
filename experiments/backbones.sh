#!/usr/bin/env bash
# Table 6: PEARL with OpenAI ViT-B/32, ViT-B/16 and ViT-L/14 (QuickGELU builds of the OpenAI weights).
set -euo pipefail
cd "$(dirname "$0")/.."
for name in ViT-B-32-quickgelu ViT-B-16-quickgelu ViT-L-14-quickgelu; do
  python run.py -m method=pearl model=custom model.name=$name model.pretrained=openai dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
done
