"""Ray Tune's logger callbacks receive GiGPO's results, as they do for RLlib's own algorithms."""

import pytest

from gigpo_rllib.cli import config_from_dict
from tests.test_cli import TINY


@pytest.mark.slow
def test_tune_logger_callbacks_see_our_results(ray_session, tmp_path):
    from ray import tune
    from ray.tune.logger import LoggerCallback

    class RecordResults(LoggerCallback):
        """A user's logger: keeps what Tune hands it (it runs in the driver)."""

        def __init__(self):
            self.results = []

        def log_trial_result(self, iteration, trial, result):
            self.results.append(result)

    small_config, _ = config_from_dict({key: value for key, value in TINY.items() if key != "stop"})
    recorder = RecordResults()
    tuner = tune.Tuner("GiGPO", param_space=small_config,
                       run_config=tune.RunConfig(stop={"training_iteration": 1}, callbacks=[recorder],
                                                 storage_path=str(tmp_path), verbose=0))
    assert not tuner.fit().errors
    (result,) = recorder.results
    assert result["training_iteration"] == 1
    assert -1.0 <= result["env_runners"]["episode_return_mean"] <= 1.0
    assert "policy_loss" in result["learners"]["default_policy"]
