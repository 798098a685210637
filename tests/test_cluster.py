"""The README's cluster layout, run: a learner and an env runner on different Ray nodes train together."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_learner_and_env_runner_on_two_nodes_train():
    # tests/two_node_run.py starts its own two-node cluster in a subprocess, so the test session's Ray is untouched.
    process = subprocess.run([sys.executable, "-m", "tests.two_node_run"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stderr[-3000:]
    line = next(line for line in process.stdout.splitlines() if line.startswith("RESULT "))
    run = json.loads(line[len("RESULT "):])

    nodes = run["nodes"]
    assert nodes["learner_node"] != nodes["runner_node"]
    assert run["learners_ran_on"] == [nodes["learner_node"]]  # each actor on the node holding its custom resource
    assert run["runners_ran_on"] == [nodes["runner_node"]]

    assert run["episodes"] == [4, 4]  # tiny_config: 2 groups x 2 episodes per iteration
    first, second = run["env_steps_sampled_lifetime"]
    assert 0 < first < second
    assert all(math.isfinite(loss) for loss in run["policy_loss"])
    assert run["weights_changed"]  # the remote learner updated the module ...
    assert run["runner_holds_the_learner_weights"]  # ... and its weights reached the runner on the other node
