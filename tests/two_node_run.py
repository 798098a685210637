"""Train GiGPO for two iterations on a two-node Ray cluster started on this host, the learner pinned to one node and
the env runner to the other by custom resources, and print what the test checks as one ``RESULT {json}`` line.

    python -m tests.two_node_run

A script of its own because ``ray.cluster_utils.Cluster`` needs a Ray instance of its own: run from the test in a
subprocess, the cluster comes and goes without touching the test session's Ray.
"""

import json

import numpy as np
import ray
from ray.cluster_utils import Cluster

from tests.conftest import ROOT
from tests.test_algorithm import module_weights, runner_weights, tiny_config

LEARNER_NODE, RUNNER_NODE = "learner_node", "runner_node"  # one unit of each, held by one node each


def node_of_each_learner(algo) -> list[str]:
    return [call.get() for call in algo.learner_group.foreach_learner(
        lambda _: ray.get_runtime_context().get_node_id())]


def node_of_each_runner(algo) -> list[str]:
    return algo.env_runner_group.foreach_env_runner(lambda _: ray.get_runtime_context().get_node_id(),
                                                    local_env_runner=False)


def main() -> None:
    # One CPU a node: the learner actor takes the head's, the env runner the worker's (the driver needs none).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {LEARNER_NODE: 1}})
    runner_node = cluster.add_node(num_cpus=1, resources={RUNNER_NODE: 1})
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
        config = (tiny_config()
                  .learners(num_learners=1, custom_resources_per_learner={LEARNER_NODE: 1})
                  .env_runners(num_env_runners=1, custom_resources_per_env_runner={RUNNER_NODE: 1}))
        algo = config.build_algo()
        try:
            initial = {name: weight.copy() for name, weight in module_weights(algo).items()}
            results = [algo.train() for _ in range(2)]
            trained = module_weights(algo)
            (runner,) = runner_weights(algo)
            report = {
                "nodes": {LEARNER_NODE: cluster.head_node.node_id, RUNNER_NODE: runner_node.node_id},
                "learners_ran_on": node_of_each_learner(algo),
                "runners_ran_on": node_of_each_runner(algo),
                "episodes": [result["env_runners"]["num_episodes"] for result in results],
                "env_steps_sampled_lifetime": [result["env_runners"]["num_env_steps_sampled_lifetime"] for result in results],
                "policy_loss": [result["learners"]["default_policy"]["policy_loss"] for result in results],
                "weights_changed": any(not np.array_equal(initial[name], trained[name]) for name in initial),
                "runner_holds_the_learner_weights": runner.keys() == trained.keys() and all(
                    np.array_equal(runner[name], trained[name]) for name in trained),
            }
        finally:
            algo.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
