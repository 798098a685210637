"""One bad env, one hang or one NaN never costs a run (docs/design.md "Lost trajectories"), end to end through Ray."""

import math
import time

import pytest

from gigpo_rllib import GiGPOConfig

pytestmark = pytest.mark.slow
ENVS = "tests.learning_env:"


def corridor_config(tags, runners, **training):
    settings = dict(train_env_manager={"num_env_groups": 8, "group_size": 4, "tags": tags,
                                       "num_groups_partition": [8 // len(tags)] * len(tags),
                                       "max_env_num_per_worker": 32},
                    rollout_batch_size=32, minibatch_size=64, max_new_tokens=12, action_constraint=True,
                    history_length=0, lr=1e-3, env_step_timeout_s=1.0)
    return (GiGPOConfig().training(**{**settings, **training}).env_runners(num_env_runners=runners)
            .debugging(seed=0))


@pytest.mark.parametrize("runners", [0, 2])
def test_a_raising_env_and_a_hanging_env_cost_only_their_trajectories(ray_session, runners):
    algo = corridor_config([ENVS + "FlakyCorridor-v0", ENVS + "HangingCorridor-v0"], runners).build()
    try:
        results = [algo.train() for _ in range(3)]
    finally:
        algo.stop()
    lost = {cause: sum(r["env_runners"]["trajectories_lost_by_cause"][cause] for r in results)
            for cause in results[0]["env_runners"]["trajectories_lost_by_cause"]}
    assert lost["env_error"] > 0
    assert lost["step_timeout"] == max(runners, 1)  # each process hangs once, then gets a fresh env
    assert lost["runner_failed"] == lost["runner_timeout"] == 0
    for result in results:
        assert result["env_runners"]["num_env_steps"] > 0
        assert math.isfinite(result["learners"]["default_policy"]["policy_loss"])


def test_env_error_penalty_keeps_and_counts_the_trajectories_a_raising_env_ends(ray_session):
    algo = corridor_config([ENVS + "FlakyCorridor-v0"], 0, env_error_penalty=-0.5).build()
    try:
        result = algo.train()
    finally:
        algo.stop()
    runners = result["env_runners"]
    assert runners["trajectories_ended_by_env_error"] > 0 and runners["trajectories_lost_by_cause"]["env_error"] == 0
    assert runners["num_episodes"] == 32 and math.isfinite(result["learners"]["default_policy"]["policy_loss"])


def test_a_runner_that_stops_answering_is_restarted_and_its_share_counted(ray_session):
    # The env of group seed 0 hangs with no step timeout: the runner holding it never answers.
    config = corridor_config([ENVS + "HangingCorridor-v0"], 2, env_step_timeout_s=None, sample_timeout_s=5.0)
    config.environment(env_config={"hang_seed": 0})
    algo = config.build()
    try:
        first = algo.train()
        runners = algo.env_runner_group
        deadline = time.monotonic() + 120
        while runners.num_healthy_remote_workers() < 2 and time.monotonic() < deadline:
            algo.restore_env_runners(runners)  # what each iteration starts with
            time.sleep(1.0)
        assert runners.num_healthy_remote_workers() == 2, "the killed runner did not come back"
        # It came back with the learner's current weights, not the ones it was built with.
        held = runners.foreach_env_runner(lambda runner: runner.weights_seq_no, local_env_runner=False)
        assert held == [algo._current_weights_seq_no()] * 2 and held[0] > 0
        second = algo.train()
    finally:
        algo.stop()
    assert first["env_runners"]["trajectories_lost_by_cause"]["runner_timeout"] == 16  # half the batch
    # Back, it takes its share again.
    assert second["env_runners"]["trajectories_lost_by_cause"] == {cause: 0 for cause in
                                                                   second["env_runners"]["trajectories_lost_by_cause"]}
    assert second["env_runners"]["num_episodes"] == 32


def test_everything_lost_stops_the_run_with_the_first_fault(ray_session):
    config = corridor_config([ENVS + "FaultyCorridor-v0"], 0)
    config.environment(env_config={"raise_rate": 1.0})
    algo = config.build()
    try:
        with pytest.raises(RuntimeError, match="(?s)32 of 32 trajectories were lost.*deliberate step failure"):
            algo.train()
    finally:
        algo.stop()


def test_train_after_stop_says_so(ray_session):
    algo = corridor_config([ENVS + "FaultyCorridor-v0"], 1).build()
    algo.stop()
    with pytest.raises(RuntimeError, match="was stopped"):
        algo.train()
