"""The `rllib` command (gigpo_rllib.cli): experiment files, flags in RLlib's dialect, exit codes, and (slow)
train + evaluate end to end."""

import json
import pathlib
import shutil

import pytest
import yaml

from gigpo_rllib.cli import (DEFAULT_STOP_ITERS, ExperimentError, _train_job, build_parser, config_from_dict,
                             load_experiment, main, progress_line)
from gigpo_rllib.checkpoints import MANIFEST_NAME
from gigpo_rllib.progress import read_csv, read_tensorboard_scalars
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
    ({"stop": {"env_runners/success_rate": "high"}}, r"stop.env_runners/success_rate must be a number"),
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
    assert (args.train_mode, args.path, args.stop_iters, args.checkpoint_dir, args.checkpoint_freq,
            args.num_env_runners) == ("file", "x.yaml", 3, "d", 2, 0)
    args = parser.parse_args(["train", "--stop-iters", "4", "file", "x.yaml"])  # flags before `file` survive
    assert args.stop_iters == 4
    args = parser.parse_args(["train", "--algo", "GiGPO", "--env", "FrozenLake", "--config", "{}"])
    assert args.train_mode is None and args.env == "FrozenLake"
    args = parser.parse_args(["train", "--algo", "grpo", "--env", "FrozenLake", "--stop", '{"a/b": 1}',
                              "--storage-path", "s", "--checkpoint-freq", "3", "--no-checkpoint-at-end", "--resume",
                              "--verbose"])
    assert (args.algo, args.stop, args.storage_path, args.checkpoint_freq, args.checkpoint_at_end, args.resume,
            args.verbose) == ("GRPO", '{"a/b": 1}', "s", 3, False, True, True)
    args = parser.parse_args(["train", "file", "x.yaml", "--checkpoint-at-end", "--config", "{}", "--algo", "GiGPO"])
    assert args.checkpoint_at_end is True and args.config == "{}"
    args = parser.parse_args(["evaluate", "ckpt", "--episodes", "5"])
    assert (args.checkpoint, args.episodes) == ("ckpt", 5)
    for argv in (["--help"], ["train", "--help"], ["train", "file", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--stop", "--storage-path", "--checkpoint-freq", "--checkpoint-at-end", "--resume", "--verbose",
                 "--checkpoint-dir", "--stop-iters", "--checkpoint-every"):
        assert flag in help_text, flag
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--algo", "PPO", "--env", "FrozenLake"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rllib: error: argument --algo: unknown algorithm 'PPO'") and err.count("\n") == 1


def test_evaluate_rejects_a_non_checkpoint(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "lacks class_and_ctor_args.pkl" in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ({"step_reward_gamma": "0.9"}, "--config: step_reward_gamma must be a number in [0, 1], got '0.9' (str)"),
    ({"env_config": [1, 2]}, "--config: env_config must be a mapping of env arguments, got [1, 2] (list)"),
    ({"max_new_tokens": None}, "--config: max_new_tokens must be an integer >= 1, got None"),
    ({"env_config": {"max_stepz": 3}}, "env 'FrozenLake' cannot be made with env_config {'max_stepz': 3}"),
    ({"bogus": 1}, "--config: unknown config key(s) ['bogus']"),
])
def test_bad_config_values_exit_2_with_one_line(capsys, config, message):
    assert main(["train", "--env", "FrozenLake", "--config", json.dumps(config)]) == 2  # before Ray starts
    err = capsys.readouterr().err
    assert err.startswith("rllib: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--env", "FrozenLake", "--stop", "{"], "--stop is not valid JSON"),
    (["train", "--env", "FrozenLake", "--stop", '{"training_iteration": 0}'], "stop.training_iteration must be"),
    (["train", "--env", "FrozenLake", "--config", "[1]"], "--config must be a JSON object"),
    (["train"], "needs either `file PATH.yaml` or --env ENV"),
    (["train", "--env", "FrozenLake", "--resume"], "--resume needs the run to continue"),
    (["train", "--env", "FrozenLake", "--storage-path", "a", "--checkpoint-dir", "b"], "not both"),
    (["train", "--env", "FrozenLake", "--checkpoint-freq", "-1"], "must be an integer >= 0"),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rllib: error: ") and message in err and err.count("\n") == 1


def exit_status(argv):
    """main's return value, or the status of the SystemExit argparse raises for a malformed flag."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_storage_path_and_flags_settle_the_run(tmp_path):
    experiment = write_yaml(tmp_path, {"my-run": {"run": "GRPO", "env": "FrozenLake", "checkpoint_freq": 4,
                                                  "stop": {"training_iteration": 7},
                                                  "config": {key: value for key, value in TINY.items()
                                                             if key != "stop"}}})
    args = build_parser().parse_args(["train", "file", str(experiment), "--storage-path", str(tmp_path / "runs"),
                                      "--config", '{"train_env_manager": {"max_env_num_per_worker": 2}}'])
    job = _train_job(args)
    assert job.run_dir == tmp_path / "runs" / "my-run"
    assert (job.config.adv_estimator, job.checkpoint_freq, job.checkpoint_at_end) == ("grpo", 4, True)
    assert job.stop.thresholds == {"training_iteration": 7}
    # --config merges into the file's nested dicts; --stop replaces the file's criteria; flags beat the file.
    assert job.config.train_env_manager["max_env_num_per_worker"] == 2
    assert job.config.train_env_manager["group_size"] == 2
    args = build_parser().parse_args(["train", "file", str(experiment), "--stop", '{"env_runners/success_rate": 1}',
                                      "--checkpoint-freq", "1", "--no-checkpoint-at-end", "--checkpoint-dir", "x"])
    job = _train_job(args)
    assert job.stop.thresholds == {"env_runners/success_rate": 1}
    assert (job.checkpoint_freq, job.checkpoint_at_end, str(job.run_dir)) == (1, False, "x")


def test_progress_line():
    result = {"training_iteration": 3, "time_this_iter_s": 1.04,
              "timers": {"env_runner_sampling_timer": 0.52, "learner_update_timer": 0.5, "synch_weights": 0.0123},
              "learners": {"__all_modules__": {"advantages_time_s": 0.002}},
              "env_runners": {"episode_return_mean": 0.5, "success_rate": 0.25, "invalid_action_rate": 0.0}}
    assert progress_line(result) == ("iter    3 | return +0.500 | success 0.250 | invalid 0.000 | time 1.0s "
                                     "(rollout 0.52s, advantages 2.0ms, update 0.50s, sync 12.3ms)")
    # Learner-side old log-probs, truncated prompts and skipped updates show when there are any.
    result["learners"]["__all_modules__"].update(old_logprobs_time_s=0.1, skipped_updates=2.0)
    result["env_runners"]["prompt_truncations"] = 4.0
    assert progress_line(result).endswith("(rollout 0.52s, advantages 2.0ms, old log-probs 0.10s, update 0.40s, "
                                          "sync 12.3ms) | truncated prompts 4 | skipped updates 2")
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
    # TensorBoard event files beside progress.csv hold the same return.
    (row,) = read_csv(checkpoints / "progress.csv")
    returns = read_tensorboard_scalars(checkpoints)["env_runners/episode_return_mean"]
    assert returns == [(1, pytest.approx(row["episode_return_mean"]))]

    assert main(["evaluate", str(checkpoint), "--episodes", "3", "--show", "2"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):])
    assert metrics["num_episodes"] == 3
    assert 0.0 <= metrics["success_rate"] <= 1.0 and "episode_return_mean" in metrics
    # Two transcripts: what the policy saw (the map), its reply, the parsed action and the reward of every turn.
    assert "--- episode 1 (" in out and "--- episode 2 (" in out and "--- episode 3" not in out
    assert "turn 1:" in out and "reply: '<answer>" in out and "action: " in out and " | reward " in out

    # A copy cut short where no manifest can tell (as algo.save_to_path alone writes it): still no traceback.
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / MANIFEST_NAME).unlink()
    (module_state,) = damaged.glob("learner_group/learner/rl_module/*/module_state.pkl")
    module_state.write_bytes(module_state.read_bytes()[:1000])
    assert main(["evaluate", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rllib: error: cannot load checkpoint '{damaged}'") and "Traceback" not in err


@pytest.mark.slow
def test_train_from_flags_in_rllib_dialect(ray_session, tmp_path, capsys):
    settings = {key: value for key, value in TINY.items() if key not in ("train_env_manager", "stop")}
    settings["train_env_manager"] = {"num_env_groups": 2, "group_size": 2, "max_env_num_per_worker": 4}
    flags = ["train", "--algo", "GRPO", "--env", "FrozenLake", "--config", json.dumps(settings),
             "--storage-path", str(tmp_path), "--checkpoint-freq", "1"]
    # A misspelt stop key stops after the first result, names the close match and leaves no run behind.
    assert main([*flags, "--stop", '{"training_iteration": 2, "env_runners/sucess_rate": 0.99}']) == 2
    err = capsys.readouterr().err
    assert ("rllib: error: stop key 'env_runners/sucess_rate' is not in the training results; did you mean "
            "'env_runners/success_rate'") in err
    run_dir = tmp_path / "GRPO_FrozenLake"
    assert not run_dir.exists()

    assert main([*flags, "--stop", '{"training_iteration": 2, "env_runners/success_rate": 1.01}']) == 0
    out = capsys.readouterr().out
    assert "iter    2 | return" in out and "stopping: training_iteration=2 >= 2" in out
    assert (run_dir / "checkpoint_000001").is_dir() and (run_dir / "checkpoint_000002").is_dir()
    # The same command again refuses to overwrite the run; --resume continues it.
    assert main([*flags, "--stop-iters", "3"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*flags, "--stop-iters", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [row["iteration"] for row in read_csv(run_dir / "progress.csv")] == [1.0, 2.0, 3.0]
