#!/usr/bin/env bash
# Wheels of the packages the GPU machine's image lacks (docs/speed.md §7), into .whl/ (git-ignored),
# for Python 3.12 on x86-64. Run here, where pip reaches the registry; the GPU machine reaches nothing.
# Versions: the ones this repository is tested with. antlr4-python3-runtime 4.9.3 (hydra-core's pin)
# is published as a source archive only, so its pure-Python wheel is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    open_clip_torch==3.3.0 hydra-core==1.3.8 omegaconf==2.3.1 ftfy==6.3.1 wcwidth==0.9.4
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
