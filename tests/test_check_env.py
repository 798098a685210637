"""`rllib check-env` (gigpo_rllib.check_env): the report on the bundled envs, a plain env, a turn-counter env, and
one-line refusals of envs that cannot train. Few episodes each: the point is the figures, not the statistics."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from gigpo_rllib.check_env import (ANSWER_FORMATS, DEFAULT_GROUP_SIZE, DEFAULT_HISTORY_LENGTH,
                                   DEFAULT_INVALID_ACTION_PENALTY, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEQUENCE_LENGTH,
                                   EnvCheckError, check_env)
from gigpo_rllib.cli import main
from gigpo_rllib.models import TINY_MODEL_NAME

RING = "tests.turn_counter_env:RingJump-v0"
LINE_WALK = "examples.wrap_your_own_env:LineWalk-v0"


def direct_anchor_count(report):
    """The anchor figures counted straight from the episodes' transcripts: steps that acted on the same observation
    text in the same episode group share an anchor."""
    episodes = report.rollout["episodes"]
    members = Counter()
    steps = []  # (turn, key) of every step
    for group, transcript in zip(episodes["group_id"], episodes["transcript"]):
        for turn, step in enumerate(transcript):
            key = (int(group), step["observation"])
            members[key] += 1
            steps.append((turn, key))
    sizes = np.array(list(members.values()))
    shared = np.array([members[key] > 1 for _, key in steps])
    later = np.array([turn > 0 for turn, _ in steps])
    by_turn = defaultdict(list)
    for (turn, key), is_shared in zip(steps, shared):
        by_turn[turn].append(is_shared)
    return {"num_groups": len(sizes), "mean_group_size": sizes.mean(), "singleton_fraction": np.mean(sizes == 1),
            "shared": shared.mean(), "shared_later": shared[later].mean(),
            "by_turn": {turn: np.mean(values) for turn, values in by_turn.items()}}


@pytest.mark.parametrize("env, env_config", [("FrozenLake", {}), (RING, {})])
def test_anchor_figures_match_a_direct_count(env, env_config):
    report = check_env(env, env_config, episodes=12, group_size=4)
    counted = direct_anchor_count(report)
    assert report.anchor_num_groups == counted["num_groups"]
    assert report.anchor_mean_group_size == pytest.approx(counted["mean_group_size"])
    assert report.anchor_singleton_fraction == pytest.approx(counted["singleton_fraction"])
    assert report.shared_step_fraction == pytest.approx(counted["shared"])
    assert report.shared_step_fraction_after_first_turn == pytest.approx(counted["shared_later"])
    assert len(report.by_turn) == len(counted["by_turn"])  # short episodes: one row per turn
    for row in report.by_turn:
        assert row.first_turn == row.last_turn
        assert row.shared_fraction == pytest.approx(counted["by_turn"][row.first_turn])
    assert report.by_turn[0].shared_fraction == 1.0  # a group's episodes all start from its one reset state
    assert report.shared_after_first_turn_without_numbers >= report.shared_step_fraction_after_first_turn
    assert len(report.episode_lengths) == 12 and report.episode_lengths.sum() == len(report.rollout["rewards"])


def test_a_turn_counter_makes_states_rarely_recur_and_the_report_names_the_fix():
    report = check_env(RING, episodes=16, group_size=4)
    assert not report.states_recur
    assert report.verdict.startswith("states rarely recur")
    assert "`anchor_canonicalizer`" in report.verdict and "`anchor_similarity_threshold`" in report.verdict
    assert "GiGPO reduces to GRPO here" in str(report)
    assert "numbers in the observations split anchors (with every number ignored, 100% of later steps" in \
        report.verdict  # the cell number is ignored too: the hint is an upper bound
    fixed = check_env(RING, episodes=16, group_size=4, anchor_canonicalizer="tests.turn_counter_env:strip_turn")
    assert fixed.states_recur and fixed.verdict.startswith("states recur: GiGPO's step baseline applies to")
    without_counter = check_env(RING, {"show_turn": False}, episodes=16, group_size=4)
    assert without_counter.shared_step_fraction == fixed.shared_step_fraction  # the same episodes, anchored alike


def test_similarity_threshold_merges_states_that_differ_in_the_counter_only():
    exact = check_env(RING, episodes=8, group_size=4)
    similar = check_env(RING, episodes=8, group_size=4, anchor_similarity_threshold=0.8)
    assert similar.anchor_num_groups < exact.anchor_num_groups
    assert "anchor_similarity_threshold=0.8" in str(similar)


@pytest.mark.parametrize("env, env_config, actions, action_line", [
    ("FrozenLake", {}, None, "action words Left, Down, Right, Up"),
    ("Sokoban", {}, None, "action words Up, Down, Left, Right"),
    ("TicTacToe", {}, [f"[{cell}]" for cell in range(9)], "free text"),
    (LINE_WALK, {"length": 5}, None, "action words Left, Right"),
])
def test_the_report_on_bundled_and_plain_envs(env, env_config, actions, action_line):
    report = check_env(env, env_config, episodes=4, group_size=2, actions=actions)
    text = str(report)
    for section in ("spaces", "episodes", "prompt tokens (gigpo-tiny's tokenizer", "anchors", "verdict: states"):
        assert section in text
    assert action_line in text and "can train    yes" in text
    assert report.invalid_turn_fraction == 0.0  # the policy only picks allowed actions
    assert 0.0 <= report.success_rate <= 1.0 and report.max_prompt_tokens >= report.first_prompt_tokens.max() > 0


def test_random_words_in_a_free_text_env_come_with_a_warning():
    report = check_env("TicTacToe", episodes=4, group_size=2)
    assert report.policy_actions is None
    assert "pass `actions` for figures that mean something" in str(report)


def test_the_first_policy_in_a_deterministic_env_shares_every_anchor():
    report = check_env("FrozenLake", episodes=4, group_size=2, policy="first")
    assert report.shared_step_fraction == 1.0 and report.anchor_singleton_fraction == 0.0


def test_one_turn_episodes_say_gigpo_is_grpo():
    report = check_env("tests.learning_env:PreferredAction-v0", episodes=4, group_size=2)
    assert report.shared_step_fraction_after_first_turn is None and not report.states_recur
    assert report.verdict.startswith("episodes last one turn")


def test_lost_trajectories_are_reported_in_one_line(caplog):
    report = check_env("tests.learning_env:OddSeedFailing-v0", episodes=4, group_size=2)  # seed 1 fails in reset
    assert not caplog.records  # no traceback logged per lost trajectory
    assert report.trajectories_lost == 2 and report.episodes == 2
    assert "RuntimeError: deliberate failure for seed 1" in report.first_fault
    assert f"lost         {report.trajectories_lost} trajectories" in str(report)


@pytest.mark.parametrize("argv, message", [
    (["NoSuchEnv-v9"], "env 'NoSuchEnv-v9' cannot be made: ValueError: unknown env tag or id"),
    (["tests.learning_env:BoxObservation-v0"], "needs a text observation"),
    (["tests.learning_env:FaultyCorridor-v0", "--env-config", '{"reset_raise_rate": 1.0}'],
     "reset(seed=0) raised RuntimeError: deliberate reset failure"),
    (["tests.learning_env:FaultyCorridor-v0", "--env-config", '{"raise_rate": 1.0}'],
     "every trajectory was lost; first fault: env 'tests.learning_env:FaultyCorridor-v0' (seed 0, turn 0): step raised"),
    (["tests.learning_env:PlainTextNoLimit-v0"], "has no turn limit"),
    (["FrozenLake", "--episodes", "6", "--group-size", "4"], "episodes must be a positive multiple of group_size=4"),
    (["FrozenLake", "--actions", '["Jump"]'], "`actions` is only for free-text envs"),
    (["TicTacToe", "--policy", "first"], "the `first` policy needs `actions`"),
    (["FrozenLake", "--config", '{"lr": 0.1}'], "--config: check-env takes the keys"),
    (["FrozenLake", "--config", '{"anchor_canonicalizer": "nowhere:strip"}'], "cannot import 'nowhere:strip'"),
])
def test_bad_envs_and_arguments_exit_2_with_one_line(capsys, argv, message):
    small = [] if "--group-size" in argv else ["--episodes", "4", "--group-size", "2"]
    assert main(["check-env", *argv, *small]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("rllib: error: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_command_prints_the_report(capsys):
    assert main(["check-env", LINE_WALK, "--env-config", '{"show_turn": true}', "--episodes", "4", "--group-size",
                 "2", "--config", '{"anchor_canonicalizer": "examples.wrap_your_own_env:strip_turn_counter"}']) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"check-env {LINE_WALK}") and "anchor_canonicalizer=examples." in out
    assert "\nverdict: states " in out


def test_the_defaults_are_the_configs():
    from gigpo_rllib.config import GIGPO_KEYS

    defaults = {key.name: key for key in GIGPO_KEYS}
    assert defaults["history_length"].default == DEFAULT_HISTORY_LENGTH
    assert defaults["train_env_manager"].default["group_size"] == DEFAULT_GROUP_SIZE
    assert defaults["invalid_action_penalty"].default == DEFAULT_INVALID_ACTION_PENALTY
    assert defaults["model_name_or_path"].default == TINY_MODEL_NAME
    assert tuple(defaults["answer_format"].choices) == ANSWER_FORMATS
    assert defaults["sequence_length"].default == DEFAULT_SEQUENCE_LENGTH
    assert defaults["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS


def test_default_episodes_are_eight_groups():
    assert check_env("FrozenLake", group_size=3).episodes == 24


def test_bad_arguments_raise_env_check_errors():
    with pytest.raises(EnvCheckError, match="policy must be one of"):
        check_env("FrozenLake", policy="smart")
    with pytest.raises(EnvCheckError, match="group_size must be an integer >= 2"):
        check_env("FrozenLake", episodes=4, group_size=1)
    with pytest.raises(EnvCheckError, match=r"anchor_similarity_threshold must be in \(0, 1\]"):
        check_env("FrozenLake", anchor_similarity_threshold=1.5)
