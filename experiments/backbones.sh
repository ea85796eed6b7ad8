#!/usr/bin/env bash
# The method × backbone table (Table 6 is its PEARL row on OpenAI ViT-B/32, B/16, L/14): every method of
# METHODS (comma-separated, default pearl) on every model of MODELS (NAME:TAG, space-separated; default the
# paper's three OpenAI models; load_clip takes the tag's QuickGELU and mean/std from open_clip's config).
# Each model's runs fill its own tables (results/<model>/), a row per method and model of
# results/backbones.csv, and a column group per model of results/backbones_by_model.csv.
# e.g. METHODS=pearl,naclip,sclip MODELS="ViT-B-16:openai ViT-L-14:openai ViT-B-16:laion2b_s34b_b88k" experiments/backbones.sh
# Any supported tower (docs/architecture.md §2.1): MODELS="EVA02-B-16:merged2b_s8b_b131k PE-Core-B-16:meta
# ViT-B-16-SigLIP2:webli" (SigLIP: pip install -e '.[siglip]'; scclip and sfp need a CLS token).
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-pearl}
MODELS=${MODELS:-"ViT-B-32:openai ViT-B-16:openai ViT-L-14:openai"}
tables=()
for spec in $MODELS; do
  python run.py -m method="$METHODS" model=custom model.name="${spec%%:*}" model.pretrained="${spec#*:}" \
    dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
  tables+=(--model "$spec")
done
python -m pearl.tables "${tables[@]}" "$@"
