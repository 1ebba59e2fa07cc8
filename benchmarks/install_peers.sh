#!/usr/bin/env bash
# Install the peer libraries compared by benchmarks/run.py into a
# separate folder, without touching the project's environment.
#
#   bash benchmarks/install_peers.sh [TARGET]      # default: benchmarks/.peers
#
# benchmarks/run.py puts TARGET on the PYTHONPATH of the tools' subprocesses
# only (option --peers-dir); CI does not run this script, so there the peers
# are reported as skipped rows.
#
# Why a separate folder and --no-deps:
# * kronfluence 1.0.1 requires torchvision, whose PyPI wheels pin a CUDA torch
#   build and fail to import beside the local torch 2.13.0+cpu wheel. kronfluence
#   never imports torchvision at run time (only its Conv2d module imports
#   `einconv`), so it is installed without dependencies, plus the ones it imports.
# * dattri 0.3.0 declares pretty_midi (used only by its MusicTransformer
#   benchmark); its attributors need numpy, scipy, pyyaml and tqdm, which the
#   project's environment already has.
# * An unpinned torch would pull a multi-GB CUDA build: nothing here may
#   install torch, hence --no-deps everywhere and the constraint below.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-benchmarks/.peers}"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$py" - >"$constraints" <<'PY'
import torch
print(f"torch=={torch.__version__.split('+')[0]}")
PY
mkdir -p "$target"
"$py" -m pip install -q --no-deps --upgrade --target "$target" -c "$constraints" \
  "dattri==0.3.0" "pretty_midi==0.2.11.post0" "mido>=1.3" \
  "kronfluence==1.0.1" "einconv==0.1.0" "einops>=0.8" "opt-einsum>=3.3"
# Check that they import beside the project's torch, without torchvision.
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" - <<'PY'
import importlib.metadata as md
import sys

import torch
from dattri.algorithm.influence_function import IFAttributorDataInf  # noqa: F401
from kronfluence.analyzer import Analyzer  # noqa: F401

assert "torchvision" not in sys.modules, "torchvision was imported"
print("peers OK with torch", torch.__version__, {
    p: md.version(p) for p in ("dattri", "kronfluence", "einops", "opt-einsum")
})
PY
