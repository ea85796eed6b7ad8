#!/usr/bin/env bash
# Table 1: every registered method at its released defaults on the eight benchmarks (8 jobs per method),
# then ResCLIP on its three hosts (+experiment=resclip: 24 jobs) and ProxyCLIP with DINOv2 B/14 with registers
# as PEARL's Table 1 ran it (+experiment=proxyclip: 8 jobs; the main sweep runs its code's default, DINO B/8),
# LPOSS / LPOSS+ on the CLIP their code runs, OpenCLIP's LAION-2B ViT-B/16 in fp32 (+experiment=lposs: 16 jobs),
# and CASS with DINOv2 B/14 with registers and DINOv3 B/16 as PEARL's Table 1 ran it (+experiment=cass: 16 jobs;
# the main sweep runs its code's default, DINO B/8).
# Extra arguments are passed to run.py (e.g. data_root=/data model.pretrained=/ckpt/ViT-B-16.pt).
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py -m method="glob(*)" dataset=voc21,context60,coco_object,voc20,context59,coco_stuff,cityscapes,ade20k "$@"
python run.py -m +experiment=resclip "$@"
python run.py -m +experiment=proxyclip "$@"
python run.py -m +experiment=lposs "$@"
python run.py -m +experiment=cass "$@"
python -m pearl.tables "$@"
