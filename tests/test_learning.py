"""The whole loop learns: sampling, advantages, PPO update and weight sync must all work for this to pass."""

import pytest

from gigpo_rllib import GiGPOConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("estimator", ["gigpo", "grpo"])
def test_policy_learns_the_paying_action(ray_session, estimator):
    config = (GiGPOConfig().environment("tests.learning_env:PreferredAction-v0")
              .training(train_env_manager={"num_env_groups": 4, "group_size": 8}, rollout_batch_size=32,
                        minibatch_size=32, lr=1e-3, max_new_tokens=8, action_constraint=True, history_length=0,
                        adv_estimator=estimator))
    algo = config.build()
    try:
        success = [algo.train()["env_runners"]["success_rate"] for _ in range(12)]
    finally:
        algo.stop()
    # Chance is 0.25; the last iterations must be far above it.
    assert sum(success[-4:]) / 4 >= 0.6, success
