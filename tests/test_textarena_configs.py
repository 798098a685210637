"""The two CPU-sized TextArena experiment files: they load, validate, build their envs, and (slow) train one
iteration each, scaled down through the CLI's own --config overrides."""

import json
import pathlib

import pytest

from gigpo_rllib.cli import load_experiment, main
from gigpo_rllib.experiment import check_envs, read_experiment_file
from gigpo_rllib.progress import read_csv

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TEXTARENA_CONFIGS = {
    "textarena_towerofhanoi_gigpo.yaml": ("TowerOfHanoi-v0", 1),
    "textarena_tictactoe_gigpo.yaml": ("TicTacToe-v0", 2),
}
# Two groups of two short games, sampled in the driver: one iteration in seconds.
SMALL = {"train_env_manager": {"num_env_groups": 2, "group_size": 2, "max_env_num_per_worker": 4},
         "rollout_batch_size": 4, "num_env_runners": 0, "minibatch_size": 8, "env_config": {"max_steps": 2}}


@pytest.mark.parametrize("name", sorted(TEXTARENA_CONFIGS))
def test_textarena_config_loads_and_builds_its_game(name):
    game, players = TEXTARENA_CONFIGS[name]
    config, stop_iters = load_experiment(CONFIGS / name)
    config.validate()
    assert stop_iters >= 1 and not config.action_constraint  # free-text moves
    check_envs(config, source=name)
    from gigpo_rllib.env_runner import make_env_factory

    env = make_env_factory(config)(config.env_tags[0])
    assert env.unwrapped.game_id == game and env.unwrapped.num_players == players
    env.close()


def test_tictactoe_uses_rllib_layout():
    experiment = read_experiment_file(CONFIGS / "textarena_tictactoe_gigpo.yaml")
    assert (experiment.name, experiment.algo, experiment.checkpoint_freq) == ("textarena-tictactoe-gigpo", "GiGPO", 5)
    assert experiment.settings["env_config"]["opponent"] == "random"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEXTARENA_CONFIGS))
def test_textarena_config_trains_one_iteration(ray_session, tmp_path, capsys, name):
    settings = dict(SMALL)
    if name == "textarena_towerofhanoi_gigpo.yaml":
        settings["train_env_manager"] = {**SMALL["train_env_manager"], "num_groups_partition": [2]}
    assert main(["train", "file", str(CONFIGS / name), "--config", json.dumps(settings), "--stop-iters", "1",
                 "--checkpoint-dir", str(tmp_path), "--no-checkpoint-at-end"]) == 0
    assert "iter    1 | return" in capsys.readouterr().out
    (row,) = read_csv(tmp_path / "progress.csv")
    assert row["episode_len_mean"] <= 2 and row["invalid_action_rate"] >= 0.0
