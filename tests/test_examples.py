"""The README's Python examples run as written, and every script in examples/ runs in a smoke mode."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
README_SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def run(command, timeout=600, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def test_the_readme_has_python_examples():
    assert len(README_SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", README_SNIPPETS, ids=lambda snippet: snippet.strip().splitlines()[0][:40])
def test_readme_snippet_runs_as_written(snippet):
    run([sys.executable, "-c", snippet])


@pytest.mark.parametrize("script, arguments, expected", [
    ("train_frozenlake.py", ["--iterations", "1", "--checkpoint-dir", "{tmp}/run"], "iter    1 |"),
    ("compare_gigpo_grpo.py", ["--iters", "1", "--plot", "{tmp}/compare.png"], "gigpo success"),
    ("wrap_your_own_env.py", ["--train", "--iters", "1"], "iter"),
    ("evaluate.py", ["--episodes", "2"], "success by seed"),  # printed after the pool's success_rate
    ("tune_sweep.py", ["--smoke", "--storage", "{tmp}/sweep"], "final success rate"),
])
def test_example_script_runs_in_smoke_mode(tmp_path, script, arguments, expected):
    out = run([sys.executable, str(ROOT / "examples" / script), *(a.format(tmp=tmp_path) for a in arguments)])
    assert expected in out
