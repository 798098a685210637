"""The `rllib` command (gigpo_rllib.cli): experiment files, errors, and (slow) train + evaluate end to end."""

import json
import pathlib

import pytest
import yaml

from gigpo_rllib.cli import (DEFAULT_STOP_ITERS, ExperimentError, build_parser, config_from_dict, load_experiment, main,
                             progress_line)
from tests.seed_config import SEED_VALUES, has_seed_value

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TINY = {
    "env_config": {"max_steps": 3},
    "train_env_manager": {"num_env_groups": 2, "group_size": 2, "tags": ["FrozenLake"], "num_groups_partition": [2],
                          "max_env_num_per_worker": 4},
    "rollout_batch_size": 4,
    "action_constraint": True,
    "max_new_tokens": 16,
    "sequence_length": 512,
    "minibatch_size": 8,
    "lr": 1e-3,
    "num_env_runners": 0,
    "val_batch_size": 2,
    "seed": 0,
    "stop": {"training_iteration": 1},
}


def write_yaml(tmp_path, settings, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config, stop_iters = load_experiment(path)
    config.validate()
    assert stop_iters >= 1


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"example_gigpo.yaml", "frozenlake_gigpo.yaml",
                                                        "sokoban_gigpo.yaml"}


def test_example_config_has_the_seed_values():
    config, _ = load_experiment(CONFIGS / "example_gigpo.yaml")
    assert config.env_manager_cls == "roll.pipeline.agentic.env_manager.step_env_manager.StepEnvManager"
    for key in SEED_VALUES:
        assert has_seed_value(config, key), key


def test_rllib_keys_land_on_the_config(tmp_path):
    settings = {**TINY, "env": "TextFrozenLake-v0", "num_env_runners": 2, "num_learners": 0, "lr": 3e-4,
                "minibatch_size": 16, "seed": 7, "reward_normalization": {"method": "mean_std"},
                "stop": {"training_iteration": 3}}
    config, stop_iters = load_experiment(write_yaml(tmp_path, settings))
    assert (config.env, config.env_config, config.num_env_runners, config.num_learners) == (
        "TextFrozenLake-v0", {"max_steps": 3}, 2, 0)
    assert (config.lr, config.minibatch_size, config.seed, stop_iters) == (3e-4, 16, 7, 3)
    # Nested keys merge: the grouping keeps its default.
    assert config.reward_normalization == {"grouping": "traj_group_id", "method": "mean_std"}
    assert config.env_tags == ["TextFrozenLake-v0"]


def test_stop_defaults(tmp_path):
    settings = {key: value for key, value in TINY.items() if key != "stop"}
    assert load_experiment(write_yaml(tmp_path, settings))[1] == DEFAULT_STOP_ITERS


@pytest.mark.parametrize("settings, message", [
    ({"step_reward_wieght": 1.0}, r"unknown config key\(s\) \['step_reward_wieght'\]"),
    ({"train_env_manager": {"groups": 4}}, r"train_env_manager has unknown keys \['groups'\]"),
    ({"stop": {"timesteps_total": 10}}, r"unknown stop key\(s\) \['timesteps_total'\]"),
    ({"stop": {"training_iteration": 0}}, r"stop.training_iteration must be an integer >= 1"),
    ({"adv_estimator": "ppo"}, r"adv_estimator must be one of"),
])
def test_bad_keys_are_named(tmp_path, settings, message):
    path = write_yaml(tmp_path, {**TINY, **settings})
    with pytest.raises(ExperimentError, match=message) as error:
        load_experiment(path)
    assert str(path) in str(error.value)


def test_missing_and_malformed_files_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ExperimentError, match="nope.yaml"):
        load_experiment(missing)
    assert main(["train", "file", str(missing)]) == 2  # fails before ray.init
    err = capsys.readouterr().err
    assert "experiment file not found" in err and str(missing) in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\n")
    with pytest.raises(ExperimentError, match="broken.yaml: not valid YAML"):
        load_experiment(broken)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- lr\n")
    with pytest.raises(ExperimentError, match="expected a mapping"):
        load_experiment(not_a_mapping)


def test_config_from_dict_json_mode():
    config, stop_iters = config_from_dict({**TINY, "env": "TextFrozenLake-v0"}, source="--config")
    assert config.env == "TextFrozenLake-v0" and stop_iters == 1
    with pytest.raises(ExperimentError, match=r"--config: unknown config key\(s\) \['bogus'\]"):
        config_from_dict({"bogus": 1}, source="--config")


def test_parser_flags_and_help(capsys):
    parser = build_parser()
    args = parser.parse_args(["train", "file", "x.yaml", "--stop-iters", "3", "--checkpoint-dir", "d",
                              "--checkpoint-every", "2", "--num-env-runners", "0"])
    assert (args.train_mode, args.path, args.stop_iters, args.checkpoint_dir, args.checkpoint_every,
            args.num_env_runners) == ("file", "x.yaml", 3, "d", 2, 0)
    args = parser.parse_args(["train", "--stop-iters", "4", "file", "x.yaml"])  # flags before `file` survive
    assert args.stop_iters == 4
    args = parser.parse_args(["train", "--algo", "GiGPO", "--env", "FrozenLake", "--config", "{}"])
    assert args.train_mode is None and args.env == "FrozenLake"
    args = parser.parse_args(["evaluate", "ckpt", "--episodes", "5"])
    assert (args.checkpoint, args.episodes) == ("ckpt", 5)
    for argv in (["--help"], ["train", "--help"], ["train", "file", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
    assert "checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--algo", "PPO", "--env", "FrozenLake"])


def test_evaluate_rejects_a_non_checkpoint(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not an algorithm checkpoint" in capsys.readouterr().err


def test_progress_line():
    result = {"training_iteration": 3, "time_this_iter_s": 1.04,
              "timers": {"env_runner_sampling_timer": 0.52, "learner_update_timer": 0.5, "synch_weights": 0.0123},
              "learners": {"advantages_time_s": 0.002},
              "env_runners": {"episode_return_mean": 0.5, "success_rate": 0.25, "invalid_action_rate": 0.0}}
    assert progress_line(result) == ("iter    3 | return +0.500 | success 0.250 | invalid 0.000 | time 1.0s "
                                     "(rollout 0.52s, advantages 2.0ms, update 0.50s, sync 12.3ms)")
    assert "return +nan" in progress_line({"training_iteration": 1})  # missing metrics do not crash


@pytest.mark.slow
def test_train_file_then_evaluate(ray_session, tmp_path, capsys):
    path = write_yaml(tmp_path, TINY)
    checkpoints = tmp_path / "ckpt"
    assert main(["train", "file", str(path), "--checkpoint-dir", str(checkpoints)]) == 0
    out = capsys.readouterr().out
    assert "iter    1 | return" in out and "done: 1 iteration(s)" in out
    checkpoint = checkpoints / "checkpoint_000001"
    assert f"checkpoint saved: {checkpoint}" in out and (checkpoint / "class_and_ctor_args.pkl").is_file()

    assert main(["evaluate", str(checkpoint), "--episodes", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_episodes"] == 3
    assert 0.0 <= metrics["success_rate"] <= 1.0 and "episode_return_mean" in metrics


@pytest.mark.slow
def test_train_from_flags(ray_session, tmp_path, capsys):
    settings = {key: value for key, value in TINY.items() if key != "train_env_manager"}
    settings["train_env_manager"] = {"num_env_groups": 2, "group_size": 2, "max_env_num_per_worker": 4}
    assert main(["train", "--algo", "GiGPO", "--env", "FrozenLake", "--config", json.dumps(settings),
                 "--checkpoint-dir", str(tmp_path), "--stop-iters", "2", "--checkpoint-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "iter    2 | return" in out
    assert (tmp_path / "checkpoint_000001").is_dir() and (tmp_path / "checkpoint_000002").is_dir()
