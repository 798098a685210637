"""benchmarks/gpu_check.py runs where only torch and transformers are installed: here, on the CPU, with Ray,
vLLM and gymnasium made unimportable (its sharded check on two CPU processes, gloo, instead of two GPUs)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK_IMPORTS = '''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"ray", "vllm", "gymnasium"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None
sys.meta_path.insert(0, Block())
'''


@pytest.mark.slow
def test_gpu_check_runs_without_ray_vllm_or_gymnasium(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_IMPORTS)
    out = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--models", "gigpo-tiny",
               "--rows", "4", "--prompt", "48", "--response", "8", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                 "HOME": str(pathlib.Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["advantages"]["max_abs_difference"] == 0.0  # cpu vs cpu
    updates = report["update"]["gigpo-tiny"]
    assert set(updates) == {"response logits", "response logits + checkpointing", "full-vocabulary logits"}
    for label, update in updates.items():  # checkpointing recomputes every decoder layer
        recomputes = 2 if label == "response logits + checkpointing" else 1
        assert update["decoder_layer_calls"] == recomputes * update["decoder_layers"], label
    assert report["logprob_gap"]["float32"]["max_abs"] < 1e-5
    lora = report["lora"]  # only adapters train, and the samplers' merged weights compute what the adapters do
    assert 0 < lora["trainable_parameters"] < lora["parameters"]
    assert lora["merged_max_abs_difference"] < 1e-5 < lora["adapters_max_abs_change"]
    sharded = report["sharded_update"]  # two FSDP ranks update like one process, each holding half the bytes
    assert sharded["max_abs_difference"] < 1e-5 < sharded["max_abs_change"]
    assert len(sharded["ranks"]) == 2
    for rank in sharded["ranks"]:
        assert 0.45 < rank["held_gib"] / sharded["single_held_gib"] < 0.55, rank


def test_the_sharded_check_needs_two_gpus_and_says_so(monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu_check.check_sharded_update("gigpo-tiny", torch.device("cuda"), 4, 8, 4) == {
        "skipped": "needs 2 GPUs, this machine has 1"}
    with pytest.raises(ValueError, match="splits --rows over 2 ranks: got 3 rows"):
        gpu_check.check_sharded_update("gigpo-tiny", torch.device("cpu"), 3, 8, 4)
