"""Envs are checked when the algorithm is built (gigpo_rllib.env_runner.probe_envs): an unusable env is refused
with one message naming it, never deep inside a rollout."""

import pytest

from gigpo_rllib import GiGPOConfig
from gigpo_rllib.env_runner import probe_envs

ENVS = "tests.learning_env:"


def config_for(env, **training):
    settings = dict(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                    max_new_tokens=12, history_length=0)
    return GiGPOConfig().environment(env).training(**{**settings, **training})


def test_a_plain_gymnasium_text_env_passes():
    config = config_for(ENVS + "PlainText-v0")
    config.validate()
    probe_envs(config)


@pytest.mark.parametrize("env, message", [
    (ENVS + "BoxObservation-v0", r"env 'tests.learning_env:BoxObservation-v0' cannot be made .*needs a text "
                                 r"observation"),
    (ENVS + "PlainTextNoLimit-v0", r"env 'tests.learning_env:PlainTextNoLimit-v0' has no turn limit"),
])
def test_unusable_envs_are_refused_naming_the_env(env, message):
    with pytest.raises(ValueError, match=message):
        probe_envs(config_for(env))


def test_a_budget_without_room_for_the_instructions_is_refused():
    config = config_for("TextFrozenLake-v0", sequence_length=120, max_new_tokens=16)
    with pytest.raises(ValueError, match=r"sequence_length=120 leaves 104 prompt tokens .* raise sequence_length to "
                                         r"at least \d+"):
        probe_envs(config)
    config.environment(env_config={"instructions_style": "compact"})
    probe_envs(config)  # the compact instructions fit


def test_the_constraint_is_reported_unavailable_for_free_form_envs(caplog):
    probe_envs(config_for(ENVS + "PlainText-v0", action_constraint=True))
    assert "action_constraint is unavailable for env 'tests.learning_env:PlainText-v0'" in caplog.text


def test_constrained_replies_must_fit_max_new_tokens():
    with pytest.raises(ValueError, match=r"max_new_tokens \(4\) is shorter than the longest allowed reply of env "
                                         r"'TextFrozenLake-v0'"):
        probe_envs(config_for("TextFrozenLake-v0", action_constraint=True, max_new_tokens=4))
