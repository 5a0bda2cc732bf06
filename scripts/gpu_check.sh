#!/usr/bin/env bash
# The torch backend on an NVIDIA GPU, in one report (under 5 minutes): bash scripts/gpu_check.sh [--device cuda:1]
#
# Runs from the repository root without installing moesim (PYTHONPATH). Where hydra-core / omegaconf are
# missing and a .whl/ folder of wheels was carried along, they are installed into /tmp/moesim-site first
# (only the config tests need them; the checks themselves do not). Writes docs/gpu/<date>-<gpu>.md, and a
# copy into $OUT when that is set. See scripts/gpu_check.py for what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moesim-site .whl/*.whl
  export PYTHONPATH="/tmp/moesim-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout 290 "$PY" scripts/gpu_check.py "$@"
