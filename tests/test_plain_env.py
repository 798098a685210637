"""Any Gymnasium text env trains as it is: no instructions, no action words, no max_steps attribute."""

import math

import pytest

from gigpo_rllib import GiGPOConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("constrained", [False, True])
def test_an_env_with_none_of_the_projects_attributes_trains(ray_session, constrained):
    # action_constraint is unavailable for free-form envs: reported, not an error.
    config = (GiGPOConfig().environment("tests.learning_env:PlainText-v0")
              .training(train_env_manager={"num_env_groups": 2, "group_size": 4}, rollout_batch_size=8,
                        minibatch_size=16, max_new_tokens=12, history_length=1, lr=1e-3,
                        action_constraint=constrained))
    algo = config.build()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    for result in results:
        assert result["env_runners"]["num_episodes"] == 8
        assert math.isfinite(result["learners"]["default_policy"]["policy_loss"])
