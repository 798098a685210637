import pathlib

import pytest

from gigpo_rllib.config import GIGPO_KEYS, GiGPOConfig, markdown_reference
from tests.seed_config import SEED_VALUES, SEED_VALUES_NOT_DEFAULT, has_seed_value

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def valid_config(**training):
    base = dict(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4)
    return GiGPOConfig().environment("TextFrozenLake-v0").training(**{**base, **training})


def test_defaults_are_the_seed_values():
    config = GiGPOConfig()
    for key in SEED_VALUES:
        assert has_seed_value(config, key), key
    config.validate()
    valid_config(**SEED_VALUES_NOT_DEFAULT).validate()  # still accepted


@pytest.mark.parametrize("value, scaling", [(True, "scale"), (False, "none"), ("scale", "scale"),
                                            ("standardize", "standardize")])
def test_whiten_advantages_true_means_scale_without_recentring(value, scaling):
    config = valid_config(whiten_advantages=value)
    config.validate()
    assert config.advantage_scaling == scaling


def test_nested_keys_merge_partial_dicts():
    config = GiGPOConfig().training(reward_normalization={"method": "mean_std"})
    assert config.reward_normalization == {"grouping": "traj_group_id", "method": "mean_std"}
    config.update_from_dict({"train_env_manager": {"group_size": 4}})
    assert config.train_env_manager["group_size"] == 4 and config.train_env_manager["num_env_groups"] == 128


def test_defaults_are_not_shared_between_instances():
    first = GiGPOConfig()
    first.train_env_manager["tags"].append("Sokoban")
    assert GiGPOConfig().train_env_manager["tags"] == ["FrozenLake"]


def test_rllib_keys_still_go_through():
    config = valid_config(lr=3e-4, minibatch_size=8)
    assert config.lr == 3e-4 and config.minibatch_size == 8
    config.validate()


@pytest.mark.parametrize("training, message", [
    (dict(adv_estimator="ppo"), r"adv_estimator must be one of \['gigpo', 'grpo'\], got 'ppo'"),
    (dict(episode_advantage_stats="samples"), r"episode_advantage_stats must be one of \['trajectory', 'step'\]"),
    (dict(batch_adjust_mode="pad"), r"batch_adjust_mode must be one of \['copy', 'delete', 'auto'\]"),
    (dict(reward_normalization={"method": "zscore"}), r"reward_normalization.method must be one of"),
    (dict(reward_normalization={"grouping": "env"}), r"reward_normalization.grouping must be one of"),
    (dict(step_reward_gamma=1.5), r"step_reward_gamma must be a number in \[0, 1\], got 1.5"),
    (dict(rollout_batch_size=5), r"rollout_batch_size \(5\) must equal train_env_manager.num_env_groups × group_size"),
    (dict(env_manager_cls="roll.pipeline.agentic.env_manager.traj_env_manager.TrajEnvManager"),
     r"env_manager_cls must be the per-step collector"),
    (dict(action_constraint=True, answer_format="think_answer"), r"action_constraint needs answer_format='answer'"),
    (dict(max_new_tokens=2000), r"max_new_tokens must be fewer than sequence_length \(1024\) tokens"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(sampler_backend="tgi"), r"sampler_backend must be one of \['hf', 'vllm', 'auto'\]"),
    (dict(minibatch_size=0), r"minibatch_size must be an integer >= 1"),
    (dict(anchor_similarity_threshold=1.5), r"anchor_similarity_threshold must be null or a number in \(0, 1\]"),
    (dict(train_env_manager={"group_size": 2, "max_env_num_per_worker": 1}),
     r"group_size \(2\) must not exceed max_env_num_per_worker \(1\)"),
])
def test_validation_names_the_key_and_the_allowed_values(training, message):
    with pytest.raises(ValueError, match=message):
        valid_config(**training).validate()


def test_partition_must_match_tags():
    config = GiGPOConfig().training(train_env_manager={"num_env_groups": 4, "group_size": 2, "tags": ["FrozenLake", "Sokoban"],
                                                       "num_groups_partition": [4]}, rollout_batch_size=8)
    with pytest.raises(ValueError, match=r"num_groups_partition must be a list of one positive group count per tag "
                                         r"\(2 tags\)"):
        config.validate()
    config.training(train_env_manager={"num_groups_partition": [1, 1]})
    with pytest.raises(ValueError, match=r"counts summing to num_env_groups \(4\)"):
        config.validate()
    # A negative count cannot make up for an extra group elsewhere (it trained 12 episodes for a batch of 8).
    config.training(train_env_manager={"num_groups_partition": [5, -1]})
    with pytest.raises(ValueError, match="positive group count"):
        config.validate()


@pytest.mark.parametrize("settings, message", [
    ({"whiten_advantages": "false"}, "whiten_advantages must be true, false or one of 'scale', 'standardize', got 'false'"),
    ({"ppo_epochs": 1.5}, "ppo_epochs must be an integer >= 1, got 1.5"),
    ({"max_new_tokens": 16.5}, "max_new_tokens must be an integer >= 1, got 16.5"),
    ({"lr": -1.0}, "lr must be a number >= 0"),
    ({"lr": [[0, 1e-3], [10, -1]]}, "lr must be a number >= 0 or a schedule"),
    ({"entropy_loss_coef": [[5, 0.05], [10, 0.0]]}, r"entropy_loss_coef must be .* schedule \[\[0, value\]"),
    ({"entropy_loss_coef": [[0, 0.05], [100, -0.01]]}, "entropy_loss_coef must be a number >= 0 or a schedule"),
    ({"seed": "abc"}, "seed must be null or an integer >= 0, got 'abc'"),
    ({"step_reward_gamma": "0.9"}, r"step_reward_gamma must be a number in \[0, 1\], got '0.9'"),
    ({"val_batch_size": "32"}, "val_batch_size must be an integer >= 1, got '32'"),
    ({"temperature": None}, "temperature must be a number > 0, got None"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"env_config": [1, 2]}, "env_config must be a dict"),
    ({"train_env_manager": {"num_env_groups": 2, "group_size": 2, "tags": ["FrozenLak"], "num_groups_partition": [2]}},
     "unknown env tag 'FrozenLak' \\(did you mean 'FrozenLake'\\?\\)"),
])
def test_every_key_is_checked_for_type_and_range(settings, message):
    config = GiGPOConfig().training(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4)
    for key, value in settings.items():
        if key == "env_config":
            config.env_config = value
        elif key in ("seed",):
            config.seed = value
        else:
            config.training(**{key: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


@pytest.mark.parametrize("env_config", [[1, 2], None, "max_steps=3"])
def test_environment_rejects_an_env_config_that_is_not_a_dict(env_config):
    with pytest.raises(ValueError, match="env_config must be a dict of keyword arguments for every env"):
        GiGPOConfig().environment("TextFrozenLake-v0", env_config=env_config)


def test_environment_still_merges_a_dict_env_config():
    config = GiGPOConfig().environment("TextFrozenLake-v0", env_config={"max_steps": 3})
    config.environment(env_config={"size": 8})
    assert config.env == "TextFrozenLake-v0" and config.env_config == {"max_steps": 3, "size": 8}


def test_update_from_dict_names_the_closest_key():
    with pytest.raises(ValueError, match="unknown config key 'step_reward_wieght'; did you mean 'step_reward_weight'"):
        GiGPOConfig().update_from_dict({"step_reward_wieght": 0.5})
    assert GiGPOConfig().update_from_dict(GiGPOConfig().to_dict()).step_reward_weight == 1.0  # Tune's round trip


def test_unknown_nested_key_is_an_error():
    with pytest.raises(ValueError, match=r"train_env_manager has unknown keys \['groupsize'\]"):
        GiGPOConfig().training(train_env_manager={"groupsize": 4})


def test_batch_grouping_needs_one_learner():
    config = valid_config(reward_normalization={"grouping": "batch"}).learners(num_learners=2)
    with pytest.raises(ValueError, match="grouping='batch' normalises over the whole batch, which needs one learner"):
        config.validate()


@pytest.mark.parametrize("settings, message", [
    ({"learner_sharding": "zero3"}, r"learner_sharding must be one of \['ddp', 'fsdp'\], got 'zero3'"),
    ({"learner_sharding": "fsdp", "init_kl_coef": 0.1}, "does not shard the frozen reference model"),
    ({"fsdp_cpu_offload": True}, "fsdp_cpu_offload offloads the shards of learner_sharding='fsdp'"),
    ({"learner_sharding": "fsdp", "fsdp_cpu_offload": "yes"}, "fsdp_cpu_offload must be"),
])
def test_bad_learner_sharding_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        valid_config(**settings).learners(num_learners=2).validate()


def test_group_size_one_warns():
    config = GiGPOConfig().environment("TextFrozenLake-v0").training(
        train_env_manager={"num_env_groups": 4, "group_size": 1}, rollout_batch_size=4)
    with pytest.warns(UserWarning, match="group_size is 1"):
        config.validate()


def test_grpo_turns_the_step_level_off():
    assert valid_config(adv_estimator="grpo", step_reward_weight=0.7).effective_step_reward_weight == 0.0
    assert valid_config(step_reward_weight=0.7).effective_step_reward_weight == 0.7


def test_environment_overrides_tags():
    config = valid_config()
    assert config.env_tags == ["TextFrozenLake-v0"] and config.groups_per_tag == [2]
    plain = GiGPOConfig()
    assert plain.env_tags == ["FrozenLake"] and plain.groups_per_tag == [128]


def test_build_builds_without_the_deprecation_message(monkeypatch, caplog):
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    import logging

    from ray.util.debug import reset_log_once

    # RLlib logs the deprecation once per process, on a logger that does not propagate to the root.
    deprecation_logger = logging.getLogger("ray._common.deprecation")
    monkeypatch.setattr(deprecation_logger, "handlers", [caplog.handler])
    reset_log_once()
    built = object()
    monkeypatch.setattr(GiGPOConfig, "build_algo", lambda self, *args, **kwargs: built)
    config = valid_config()
    with caplog.at_level("WARNING"):
        assert AlgorithmConfig.build(config) is built  # RLlib's own build() reports the deprecation ...
    assert "deprecated" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert config.build() is built  # ... ours builds the same algorithm silently
    assert "deprecated" not in caplog.text


def test_every_key_is_documented():
    for key in GIGPO_KEYS:
        assert len(key.help) > 20, key.name


def test_readme_reference_matches_the_code():
    text = README.read_text()
    assert markdown_reference() in text, ("README's configuration reference is stale: run "
                                          "python3 scripts/config_reference.py --update-readme")


def constant_state(text: str) -> str:
    return "every observation is the same state"


def test_anchor_canonicalizer_reaches_the_envs():
    from gigpo_rllib.env_runner import load_function, make_env_factory

    plain = make_env_factory(valid_config())("FrozenLake")
    merged = make_env_factory(valid_config(anchor_canonicalizer="tests.test_config:constant_state"))("FrozenLake")
    plain_ids = {plain.reset(seed=s)[1]["anchor_id"] for s in range(3)}
    merged_ids = {merged.reset(seed=s)[1]["anchor_id"] for s in range(3)}
    assert len(plain_ids) == 3 and len(merged_ids) == 1
    with pytest.raises(ValueError, match="cannot import 'tests.test_config:missing'"):
        load_function("tests.test_config:missing")
    with pytest.raises(ValueError, match='anchor_canonicalizer must be null or "module:function"'):
        valid_config(anchor_canonicalizer="no_colon").validate()


def test_similarity_threshold_makes_the_envs_report_canonical_text():
    from gigpo_rllib.env_runner import make_env_factory

    exact = make_env_factory(valid_config())("FrozenLake").reset(seed=0)[1]
    similar = make_env_factory(valid_config(anchor_similarity_threshold=0.9))("FrozenLake").reset(seed=0)[1]
    assert "canonical_observation" not in exact and similar["canonical_observation"]


def test_seed_pool_draws_every_seed_equally_often_without_repeats_in_a_pass():
    from gigpo_rllib.algorithm import episode_group_seeds

    assert episode_group_seeds(5, 3, base=10, pool=None) == [15, 16, 17]
    pool = [3, 7, 11, 13]
    seeds = episode_group_seeds(0, 12, base=10, pool=pool)
    for start in range(0, 12, 4):  # each pass is a permutation of the pool
        assert sorted(seeds[start:start + 4]) == pool
    assert seeds[:4] != seeds[4:8] or seeds[4:8] != seeds[8:12]  # passes are shuffled anew
    # Drawing in pieces (iteration by iteration, or after a resume) gives the same sequence.
    assert episode_group_seeds(0, 5, 10, pool) + episode_group_seeds(5, 7, 10, pool) == seeds
    # The training seed shuffles the order, never the pool.
    assert sorted(episode_group_seeds(0, 4, base=99, pool=pool)) == pool
    for bad in (0, [1, 1], [-1], [1 << 40]):
        with pytest.raises(ValueError, match="seed_pool"):
            GiGPOConfig().training(train_env_manager={"num_env_groups": 2, "group_size": 2, "seed_pool": bad},
                                   rollout_batch_size=4).validate()
    config = GiGPOConfig().training(train_env_manager={"seed_pool": 3})
    assert config.pool_seeds == [0, 1, 2]


def test_success_by_seed_averages_each_seeds_episodes_across_its_groups():
    import numpy as np

    from gigpo_rllib.algorithm import success_by_seed
    from gigpo_rllib.rollout import GroupSpec

    groups = [GroupSpec(group_id=0, tag="Lake", tag_id=0, seed=5), GroupSpec(group_id=1, tag="Lake", tag_id=0, seed=7),
              GroupSpec(group_id=2, tag="Lake", tag_id=0, seed=5), GroupSpec(group_id=3, tag="Lake", tag_id=0, seed=9)]
    # Rows are steps; an episode counts once, at its last step. Seed 5: groups 0 and 2 win 1 + 2 of 4 episodes; seed 7
    # wins 0 of 2 (its first step rows say success=1 but are not episode ends); seed 9's episodes were all lost.
    group_ids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    episode_ends = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    success = np.array([0, 1, 0, 1, 0, 0, 1, 1, 1], dtype=bool)
    rollout = {"group_ids": group_ids, "episode_ends": episode_ends, "episode_success": success}
    assert success_by_seed(rollout, groups) == {"5": 0.75, "7": 0.0}
    # With several env tags a seed names a different map in each, so the key says which.
    groups[1] = GroupSpec(group_id=1, tag="Boxes", tag_id=1, seed=5)
    assert success_by_seed(rollout, groups) == {"Lake/5": 0.75, "Boxes/5": 0.0}


def test_float16_training_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="model_dtype='bfloat16'.*sampler_dtype='float16'"):
        valid_config(model_dtype="float16").validate()
    valid_config(model_dtype="bfloat16", sampler_dtype="float16").validate()


def test_the_policy_settings_have_one_source():
    config = valid_config(temperature=0.7, model_dtype="bfloat16")
    spec = config.get_rl_module_spec()
    assert spec.model_config["temperature"] == 0.7 and spec.model_config["compute_dtype"] == "bfloat16"
    config.rl_module(model_config={"temperature": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        config.get_rl_module_spec()


def test_a_local_gpu_learner_next_to_gpu_runners_is_refused():
    from gigpo_rllib.algorithm import _check_gpu_placement

    config = valid_config().env_runners(num_env_runners=1, num_gpus_per_env_runner=1).learners(
        num_learners=0, num_gpus_per_learner=1)
    with pytest.raises(ValueError, match="num_learners=1"):
        _check_gpu_placement(config)
    _check_gpu_placement(config.copy(copy_frozen=False).learners(num_learners=1))


def test_the_top_level_exports():
    import gigpo_rllib
    from gigpo_rllib import GiGPO, GiGPOConfig as Config, LLMActionWrapper
    from gigpo_rllib.wrappers import AnchorStateWrapper

    assert gigpo_rllib.AnchorStateWrapper is AnchorStateWrapper and Config is GiGPOConfig
    assert GiGPO.get_default_config().__class__ is GiGPOConfig and LLMActionWrapper.__name__ == "LLMActionWrapper"
    with pytest.raises(AttributeError, match="no attribute 'GiGPOTrainer'"):
        gigpo_rllib.GiGPOTrainer


@pytest.mark.parametrize("truncation", [dict(top_p=0.9), dict(top_k=20)])
def test_vllm_sampler_log_probs_are_refused_with_a_truncated_distribution(truncation):
    # vLLM records log-probs after top-p/top-k truncation; the learner scores the full distribution, so the ratio
    # would start below 1.
    config = valid_config(sampler_backend="vllm", old_logprobs_source="sampler", **truncation)
    with pytest.raises(ValueError, match=r"old_logprobs_source='sampler' cannot be used with the vLLM sampler"):
        config.validate()
    config.training(old_logprobs_source="auto")
    config.validate()  # resolves to the learner's own log-probs
    config.training(old_logprobs_source="sampler", top_p=1.0, top_k=-1)
    config.validate()


def test_keys_set_to_minus_one_survive_the_copy_build_makes():
    # RLlib's Algorithm copies the config with from_state(get_state()), which drops every value equal to -1.
    config = GiGPOConfig().training(invalid_action_penalty=-1, env_error_penalty=-1.0)
    copied = GiGPOConfig.from_state(config.get_state())
    assert copied.invalid_action_penalty == -1 and copied.env_error_penalty == -1.0
