"""Dynamic sampling: episode groups without return spread are left out of the batch and more groups are sampled
until the batch holds the configured number with signal (or the extra rounds run out)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigpo_rllib.advantages import compute_gigpo_advantages, groups_without_spread
from gigpo_rllib.algorithm import split_by_tag
from gigpo_rllib.batch import groups_with_signal, take_groups


def rollout_of(trajectories: list[tuple[int, list[float]]]) -> dict:
    """A rollout with one row per turn of each ``(group id, [rewards per turn])`` trajectory."""
    columns = {name: [] for name in ("rewards", "traj_ids", "step_ids", "group_ids", "tag_ids", "anchor_ids",
                                     "action_is_valid", "prompt_truncated", "episode_ends", "episode_success")}
    for traj_id, (group_id, rewards) in enumerate(trajectories):
        for step, reward in enumerate(rewards):
            for name, value in (("rewards", reward), ("traj_ids", traj_id), ("step_ids", step),
                                ("group_ids", group_id), ("tag_ids", 0), ("anchor_ids", step),
                                ("action_is_valid", True), ("prompt_truncated", False),
                                ("episode_ends", step == len(rewards) - 1), ("episode_success", sum(rewards) > 0)):
                columns[name].append(value)
    rollout = {name: np.asarray(values) for name, values in columns.items()}
    rows = len(rollout["rewards"])
    rollout["prompt_ids"] = [[row] for row in range(rows)]
    rollout["response_ids"] = [[row, row] for row in range(rows)]
    rollout["response_logprobs"] = [[0.0, 0.0]] * rows
    return rollout


TRAJECTORIES = [(0, [0.0, 0.0]), (0, [0.0, 0.0, 0.0]),  # all lost: no spread
                (1, [0.0, 1.0]), (1, [1.0]),           # all won with return 1 (one took longer): no spread
                (2, [0.0, 1.0]), (2, [0.0, 0.0]),      # one won: spread
                (5, [0.5]), (5, [0.25])]               # different partial returns: spread


def test_groups_with_signal_are_those_whose_episode_returns_differ():
    assert groups_with_signal(rollout_of(TRAJECTORIES)).tolist() == [2, 5]


def test_groups_without_spread_get_zero_episode_advantage():
    rollout = rollout_of(TRAJECTORIES)
    columns = {name: torch.as_tensor(rollout[name]) for name in ("traj_ids", "step_ids", "group_ids", "anchor_ids")}
    out = compute_gigpo_advantages(torch.as_tensor(rollout["rewards"], dtype=torch.float32), columns["traj_ids"],
                                   columns["step_ids"], columns["group_ids"], columns["anchor_ids"], gamma=0.95,
                                   episode_weight=1.0, step_weight=0.0, method="mean", grouping="traj_group_id")
    flat = groups_without_spread(out.episode_returns, columns["group_ids"])  # groups 0, 1, 2, 5 in order
    assert flat.tolist() == [True, True, False, False]
    zero = out.episode_advantages.abs() < 1e-12
    for group, is_flat in zip((0, 1, 2, 5), flat.tolist()):
        rows = columns["group_ids"] == group
        assert bool(zero[rows].all()) == is_flat


def test_take_groups_keeps_whole_rows_of_the_chosen_groups():
    rollout = rollout_of(TRAJECTORIES)
    taken = take_groups(rollout, np.array([2, 5]))
    rows = np.flatnonzero(np.isin(rollout["group_ids"], [2, 5]))
    assert set(taken["group_ids"].tolist()) == {2, 5}
    for name in ("rewards", "traj_ids", "step_ids", "episode_ends"):
        np.testing.assert_array_equal(taken[name], rollout[name][rows])
    assert taken["response_ids"] == [rollout["response_ids"][row] for row in rows]
    assert len(taken["prompt_ids"]) == len(taken["rewards"])


def test_split_by_tag_keeps_the_proportions():
    assert split_by_tag([4, 4], 4) == [2, 2]
    assert split_by_tag([6, 2], 3) == [3, 0]  # rounded down, the remainder to the first tag
    assert sum(split_by_tag([3, 2, 1], 5)) == 5


def half_flat_config(**training):
    from gigpo_rllib import GiGPOConfig

    settings = dict(train_env_manager={"num_env_groups": 4, "group_size": 4}, rollout_batch_size=16,
                    minibatch_size=16, max_new_tokens=8, action_constraint=True, lr=1e-3, history_length=0)
    return (GiGPOConfig().environment("tests.learning_env:HalfFlat-v0")
            .training(**{**settings, **training}).debugging(seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_trains_only_on_groups_with_signal(ray_session, dynamic):
    """Env seeds 0, 1, 2, ... alternate between groups that cannot differ and groups that can: dynamic sampling
    leaves out the even-seed groups and samples a second round to fill the batch with odd-seed ones."""
    algo = half_flat_config(dynamic_sampling=dynamic, dynamic_sampling_max_rounds=3).build()
    trained = []
    update = algo._update
    algo._update = lambda batch: trained.append(batch) or update(batch)
    try:
        result = algo.train()
    finally:
        algo.stop()
    runners = result["env_runners"]
    (batch,) = trained
    groups = np.unique(batch["group_ids"])
    signal = groups_with_signal({name: batch[name] for name in ("rewards", "traj_ids", "group_ids", "episode_ends")})
    if dynamic:
        assert len(groups) == 4 and signal.tolist() == groups.tolist()  # four groups, all with signal
        assert runners["dynamic_sampling_rounds"] >= 1
        sampled_groups = 4 + 4 * runners["dynamic_sampling_rounds"]  # each extra round: 2 missing at rate 1/2
        assert runners["num_env_steps"] == 4 * sampled_groups  # every sampled episode is counted
        # Only odd seeds (half of those sampled) can have signal, and the batch's four do.
        assert 4 / sampled_groups <= runners["groups_with_signal_fraction"] <= 0.5
    else:
        assert len(groups) == 4 and runners["dynamic_sampling_rounds"] == 0
        assert runners["groups_with_signal_fraction"] == len(signal) / 4 <= 0.5
        assert runners["num_env_steps"] == 16
