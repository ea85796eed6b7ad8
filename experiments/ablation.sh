#!/usr/bin/env bash
# Table 3: PEARL with PA × TLP, "TLP only" with both block architectures, and full vanilla CLIP.
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py -m method=pearl pa=true,false tlp=true,false dataset="glob(*,exclude=folder)" "$@"
python run.py -m method=pearl pa=false tlp=true arch=vanilla dataset="glob(*,exclude=folder)" "$@"
python run.py -m method=vanilla pa=false tlp=false dataset="glob(*,exclude=folder)" "$@"
python -m pearl.tables "$@"
