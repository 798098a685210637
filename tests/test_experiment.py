"""Experiment files in both layouts, config values of the wrong type, and Tune-style stop criteria."""

import pytest
import yaml

from gigpo_rllib.experiment import (DEFAULT_STOP_ITERS, ExperimentError, build_config, build_stop,
                                    read_experiment_file)
from gigpo_rllib.stopping import StopCriteria, StopKeyError, close_matches, result_keys, result_value

SMALL = {"env_config": {"max_steps": 3}, "rollout_batch_size": 4,
         "train_env_manager": {"num_env_groups": 2, "group_size": 2, "tags": ["FrozenLake"],
                               "num_groups_partition": [2], "max_env_num_per_worker": 4}}
RESULT = {"training_iteration": 3, "env_runners": {"episode_return_mean": 0.4, "success_rate": 0.5},
          "learners": {"default_policy": {"policy_loss": -0.1}}, "timers": {"synch_weights": 0.01}}


def write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------- layouts


def test_tuned_example_layout(tmp_path):
    path = write(tmp_path, {"frozenlake-grpo": {
        "run": "GRPO", "env": "TextFrozenLake-v0", "stop": {"training_iteration": 5, "env_runners/success_rate": 0.9},
        "config": {**SMALL, "lr": 0.001}, "checkpoint_freq": 2, "checkpoint_at_end": False, "storage_path": "/x"}})
    experiment = read_experiment_file(path)
    assert (experiment.name, experiment.algo, experiment.checkpoint_freq, experiment.checkpoint_at_end,
            experiment.storage_path) == ("frozenlake-grpo", "GRPO", 2, False, "/x")
    assert experiment.stop == {"training_iteration": 5, "env_runners/success_rate": 0.9}
    config = build_config(experiment.settings, algo=experiment.algo, source=experiment.source)
    assert (config.env, config.lr, config.adv_estimator) == ("TextFrozenLake-v0", 0.001, "grpo")


def test_flat_layout_is_read_as_before(tmp_path):
    experiment = read_experiment_file(write(tmp_path, {**SMALL, "stop": {"training_iteration": 2}}, "flat.yaml"))
    assert (experiment.name, experiment.algo, experiment.stop) == ("flat", "GiGPO", {"training_iteration": 2})
    assert experiment.settings["train_env_manager"]["group_size"] == 2
    # A single nested config key is not mistaken for an RLlib experiment block.
    single = read_experiment_file(write(tmp_path, {"train_env_manager": {"group_size": 2}}, "single.yaml"))
    assert single.settings == {"train_env_manager": {"group_size": 2}}


@pytest.mark.parametrize("data, message", [
    ({"a": {"run": "GiGPO"}, "b": {"run": "GiGPO"}}, r"exactly one experiment"),
    ({"x": {"run": "PPO", "config": {}}}, r"unknown algorithm 'PPO'; this rllib command trains GiGPO or GRPO"),
    ({"x": {"run": "GiGPO", "stopp": {}}}, r"unknown experiment key\(s\) \['stopp'\]"),
    ({"x": {"run": "GiGPO", "config": [1]}}, r"`config` must be a mapping"),
    ({"x": {"run": "GiGPO", "env": "A", "config": {"env": "B"}}}, r"env is given twice"),
    ({"x": {"run": "GiGPO", "checkpoint_freq": -1}}, r"checkpoint_freq must be an integer >= 0"),
    ({"x": {"run": "GiGPO", "stop": {"training_iteration": "ten"}}}, r"stop.training_iteration must be a number"),
])
def test_bad_tuned_examples_are_named(tmp_path, data, message):
    with pytest.raises(ExperimentError, match=message):
        read_experiment_file(write(tmp_path, data))


def test_grpo_conflicting_with_the_config_is_an_error():
    with pytest.raises(ExperimentError, match=r"GRPO means adv_estimator: grpo, but the config sets"):
        build_config({**SMALL, "adv_estimator": "gigpo"}, algo="GRPO")
    assert build_config(SMALL, algo="gigpo").adv_estimator == "gigpo"  # names are case-insensitive


# -------------------------------------------------------------------------------------------- value types


@pytest.mark.parametrize("settings, message", [
    ({"step_reward_gamma": "0.9"}, r"step_reward_gamma must be a number in \[0, 1\], got '0.9' \(str\)"),
    ({"env_config": [1, 2]}, r"env_config must be a mapping of env arguments, got \[1, 2\] \(list\)"),
    ({"ppo_epochs": 1.5}, r"ppo_epochs must be an integer >= 1, got 1.5"),
    ({"whiten_advantages": "yes"}, r"whiten_advantages must be true, false or one of 'scale', 'standardize'"),
    ({"num_env_runners": "two"}, r"num_env_runners must be an integer, got 'two'"),
    ({"reward_normalization": "mean"}, r"reward_normalization must be a mapping"),
    ({"max_new_tokens": None}, r"max_new_tokens must be an integer >= 1, got None"),
    ({"stop": {"training_iteration": 2}}, r"'stop' is not a config key"),
])
def test_wrong_types_are_errors_that_name_the_key(settings, message):
    with pytest.raises(ExperimentError, match=message):
        build_config({**SMALL, **settings}, source="--config")


def test_values_of_the_right_kind_pass():
    config = build_config({**SMALL, "step_reward_gamma": 1, "lr": [[0, 1e-3], [100, 1e-4]], "seed": None,
                           "advantage_clip": None})
    assert config.step_reward_gamma == 1 and config.advantage_clip is None


# ------------------------------------------------------------------------------------------- stop criteria


def test_stop_defaults_and_validation():
    assert build_stop({}, source="x").thresholds == {"training_iteration": DEFAULT_STOP_ITERS}
    with pytest.raises(ExperimentError, match=r"--stop: stop.env_runners/success_rate must be a number"):
        build_stop({"env_runners/success_rate": True}, source="--stop")
    with pytest.raises(ExperimentError, match=r"'stop' must be a mapping"):
        build_stop([1], source="x")


def test_any_reached_criterion_stops():
    criteria = StopCriteria({"training_iteration": 10, "env_runners/success_rate": 0.5})
    criteria.check_keys(RESULT)
    assert criteria.reached(RESULT) == ["env_runners/success_rate=0.5 >= 0.5"]
    assert StopCriteria({"training_iteration": 4}).reached(RESULT) == []
    assert StopCriteria({"learners/default_policy/policy_loss": -0.2}).reached(RESULT)  # >= with negatives


def test_a_misspelt_stop_key_names_close_matches():
    with pytest.raises(StopKeyError, match=r"'env_runners/sucess_rate' is not in the training results; did you "
                                           r"mean 'env_runners/success_rate'"):
        StopCriteria({"env_runners/sucess_rate": 0.9}).check_keys(RESULT)
    # The old API stack's top-level name points at its new place.
    with pytest.raises(StopKeyError, match=r"did you mean 'env_runners/episode_return_mean'"):
        StopCriteria({"episode_return_mean": 0.9}).check_keys(RESULT)


def test_validation_keys_are_checked_when_validation_results_appear():
    criteria = StopCriteria({"validation/success_rate": 0.9})
    criteria.check_keys(RESULT)  # no validation in this iteration yet: not due
    with pytest.raises(StopKeyError, match="validation/success_rate"):
        criteria.check_keys({**RESULT, "validation": {"episode_return_mean": 0.1}})
    criteria.check_keys({**RESULT, "validation": {"success_rate": 0.2}})


def test_result_paths():
    assert result_value(RESULT, "env_runners/success_rate") == 0.5
    assert result_value({"a/b": 1}, "a/b") == 1  # a flattened key works too
    with pytest.raises(KeyError):
        result_value(RESULT, "env_runners/nothing")
    assert "learners/default_policy/policy_loss" in result_keys(RESULT)
    assert close_matches("timers/synch_weight", result_keys(RESULT)) == ["timers/synch_weights"]
