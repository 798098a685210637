"""RLlib's own conventions: results that RLlib's checker accepts, and evaluation through RLlib's entry points."""

import pytest
from ray.rllib.utils.test_utils import check_train_results_new_api_stack

from gigpo_rllib import GiGPOConfig

pytestmark = pytest.mark.slow


def small_config(**training):
    settings = dict(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4, minibatch_size=8,
                    max_new_tokens=12, action_constraint=True, history_length=0, lr=1e-3, val_batch_size=3)
    return (GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3, "instructions_style": "compact"})
            .training(**{**settings, **training}))


@pytest.mark.parametrize("estimator", ["gigpo", "grpo"])
def test_results_pass_rllibs_checker_and_evaluation_reports_under_evaluation(ray_session, estimator):
    config = small_config(adv_estimator=estimator).evaluation(evaluation_interval=1, evaluation_duration=4)
    algo = config.build()
    try:
        result = algo.train()
        check_train_results_new_api_stack(result)
        evaluation = result["evaluation"]["env_runners"]
        assert evaluation["num_episodes"] == 4 and 0.0 <= evaluation["success_rate"] <= 1.0
        direct = algo.evaluate()  # RLlib's entry point, called by hand
        assert direct["env_runners"]["num_episodes"] == 4 and "success_rate" in direct["env_runners"]
    finally:
        algo.stop()


def test_a_separate_evaluation_runner_group_is_refused():
    with pytest.raises(ValueError, match="evaluation_num_env_runners must be 0"):
        small_config().evaluation(evaluation_num_env_runners=1).validate()
