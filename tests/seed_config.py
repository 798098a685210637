"""The seed configuration's keys and values (docs/design.md "Seed configuration keys"), checked against both the
config defaults and configs/example_gigpo.yaml.

Every seed key works; one seed value is no longer the default: ``advantage_clip: 0.2`` clamped the scaled advantages
(units of their root mean square) to little more than their sign, so the default is ``null``.
``whiten_advantages: true`` keeps its name and value, and now scales without re-centring (README "Advantage scaling").
"""

SEED_VALUES_NOT_DEFAULT = {"advantage_clip": 0.2}

SEED_VALUES = {
    "adv_estimator": "gigpo", "batch_adjust_mode": "copy", "step_reward_weight": 1.0, "episode_reward_weight": 1.0,
    "step_reward_gamma": 0.95, "rollout_batch_size": 1024, "val_batch_size": 1024, "sequence_length": 1024,
    "ppo_epochs": 1, "init_kl_coef": 0.0, "whiten_advantages": True, "entropy_loss_coef": 0,
    "max_grad_norm": 1.0, "reward_normalization": {"grouping": "traj_group_id", "method": "mean"},
    "train_env_manager": {"max_env_num_per_worker": 16, "num_env_groups": 128, "group_size": 8,
                          "tags": ["FrozenLake"], "num_groups_partition": [128]},
}


def has_seed_value(config, key: str) -> bool:
    """Whether ``config.key`` holds the seed value; a nested key may carry further sub-keys of ours (with the seed's
    sub-keys unchanged)."""
    value, seed = getattr(config, key), SEED_VALUES[key]
    if isinstance(seed, dict):
        return isinstance(value, dict) and {name: value.get(name) for name in seed} == seed
    return value == seed
