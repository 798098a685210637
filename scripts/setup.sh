#!/usr/bin/env bash
# Install gigpo-rllib into the current Python environment.
#
#   bash scripts/setup.sh          # the library and its runtime dependencies
#   bash scripts/setup.sh test     # ... plus pytest and hypothesis
#
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first (torch==2.13.0), so that
# the unpinned `torch` requirement does not pull a multi-GB CUDA build. A GPU machine keeps, or gets,
# its normal CUDA torch. Override the choice with GIGPO_TORCH_SPEC (e.g. GIGPO_TORCH_SPEC="torch==2.13.0")
# and point pip at a CPU wheel index with GIGPO_TORCH_INDEX_URL if your PyPI mirror serves CUDA builds.
# GIGPO_SETUP_DRY_RUN=1 prints the pip commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
PIP="${PYTHON:-python3} -m pip"

run() {
  if [ -n "${GIGPO_SETUP_DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi
}

if [ -n "${GIGPO_TORCH_SPEC:-}" ]; then
  torch_spec="$GIGPO_TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1; then
  torch_spec=""        # GPU machine: let the project's torch range resolve to the normal (CUDA) build
else
  torch_spec="torch==2.13.0"
fi

if [ -n "$torch_spec" ] && ! ${PYTHON:-python3} -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $torch_spec first (no GPU found, or GIGPO_TORCH_SPEC set)"
  if [ -n "${GIGPO_TORCH_INDEX_URL:-}" ]; then
    run $PIP install -q "$torch_spec" --index-url "$GIGPO_TORCH_INDEX_URL"
  else
    run $PIP install -q "$torch_spec"
  fi
fi

echo "[setup] installing gigpo-rllib$extra"
run $PIP install -q -e ".$extra"
