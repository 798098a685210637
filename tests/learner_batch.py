"""A GiGPO learner built in the test process (no Ray), and hand-made padded batches for it: the learner's batch
preparation and loss can then be checked in a few seconds, minibatch by minibatch."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from gigpo_rllib import GiGPOConfig
from gigpo_rllib.batch import pad_token_batch

EOS = 2
# Allowed replies of a constrained row: after 5 the policy picks 9 or 7, after 11 (and after 5 9, 5 7) the EOS is
# forced, so rows mix chosen and forced tokens.
REPLIES = [[5, 9, EOS], [5, 7, EOS], [11, EOS]]


def learner_config(**training) -> GiGPOConfig:
    settings = dict(train_env_manager={"num_env_groups": 2, "group_size": 2}, rollout_batch_size=4,
                    minibatch_size=4, max_new_tokens=8, action_constraint=True, lr=1e-3)
    return GiGPOConfig().environment("TextFrozenLake-v0").training(**{**settings, **training})


def local_learner(**training):
    """The config's learner, built here (``num_learners=0``): its module, optimizer and loss, without Ray."""
    spaces = {"default_policy": (gym.spaces.Box(0, 1, (1,)), gym.spaces.Discrete(2))}
    return learner_config(**training).build_learner(env=None, spaces=spaces)


def synthetic_batch(groups: int = 4, group_size: int = 2, seed: int = 0, constrained: bool = True,
                    turns: int | None = None) -> dict[str, np.ndarray]:
    """Padded learner columns (as :func:`pad_token_batch` makes them) of ``groups`` x ``group_size``
    trajectories of ``turns`` turns (1-3 at random when None): prompts of 3-12 tokens, replies from :data:`REPLIES` (free-form replies of 1-9
    tokens when not ``constrained``), reward 1 at the end of some trajectories."""
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in ("prompt_ids", "response_ids", "response_logprobs", "allowed_replies",
                                     "rewards", "traj_ids", "step_ids", "group_ids", "tag_ids", "anchor_ids",
                                     "action_is_valid", "prompt_truncated", "episode_ends", "episode_success")}
    for traj in range(groups * group_size):
        length = turns or int(rng.integers(1, 4))
        won = bool(rng.random() < 0.5)
        for step in range(length):
            samples["prompt_ids"].append(rng.integers(10, 300, size=int(rng.integers(3, 13))).tolist())
            if constrained:
                reply = REPLIES[int(rng.integers(len(REPLIES)))]
            else:
                reply = rng.integers(10, 300, size=int(rng.integers(1, 10))).tolist()
            samples["response_ids"].append(reply)
            samples["response_logprobs"].append([0.0] * len(reply))
            samples["allowed_replies"].append(REPLIES if constrained else [])
            last = step == length - 1
            samples["rewards"].append(1.0 if (last and won) else 0.0)
            samples["traj_ids"].append(traj)
            samples["step_ids"].append(step)
            samples["group_ids"].append(traj // group_size)
            samples["tag_ids"].append(0)
            samples["anchor_ids"].append(int(rng.integers(0, 3)) + 10 * (traj // group_size))
            samples["action_is_valid"].append(1)
            samples["prompt_truncated"].append(0)
            samples["episode_ends"].append(int(last))
            samples["episode_success"].append(int(last and won))
    columns = {name: np.asarray(values) for name, values in samples.items()
               if name not in ("prompt_ids", "response_ids", "response_logprobs", "allowed_replies")}
    columns.update({name: samples[name] for name in ("prompt_ids", "response_ids", "response_logprobs")})
    return pad_token_batch(columns, pad_token_id=0, allowed_replies=samples["allowed_replies"])


def prepared_batch(learner, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The learner's once-per-update preparation of ``batch`` (advantages, adjust, shuffle, bucketing, old and
    reference log-probs): the columns its minibatches are cut from."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.learner.training_data import TrainingData
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    data = TrainingData(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(batch))},
                                              env_steps=len(batch["rewards"])))
    return dict(learner._make_batch_if_necessary(data).policy_batches[DEFAULT_MODULE_ID])


def update_minibatches(learner, batch: dict[str, np.ndarray], num_total_minibatches: int = 0,
                       num_epochs: int = 1) -> list[dict[str, torch.Tensor]]:
    """The minibatches an update of ``batch`` trains on, in order, from RLlib's own iterator (as
    ``Learner.update`` gets them; ``num_total_minibatches`` as the algorithm plans it, 0: the shard's own count)."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.learner.training_data import TrainingData
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    data = TrainingData(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(batch))},
                                              env_steps=len(batch["rewards"])))
    iterator = learner._create_iterator_if_necessary(
        training_data=data, num_total_minibatches=num_total_minibatches, num_epochs=num_epochs,
        minibatch_size=learner.config.minibatch_size, shuffle_batch_per_epoch=False)
    return [dict(minibatch.policy_batches[DEFAULT_MODULE_ID]) for minibatch in iterator]


def summed_gradient(learner, minibatches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The gradients of the minibatches' losses, summed without any optimizer step (what one epoch's steps add up
    to, to first order)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    module = learner.module[DEFAULT_MODULE_ID]
    module.zero_grad(set_to_none=True)
    for minibatch in minibatches:
        fwd_out = module.forward_train(minibatch)
        learner.compute_loss_for_module(module_id=DEFAULT_MODULE_ID, config=learner.config, batch=minibatch,
                                        fwd_out=fwd_out).backward()
    return {name: param.grad.detach().clone() for name, param in module.named_parameters() if param.grad is not None}


def run_update(learner, batch: dict[str, np.ndarray], num_epochs: int = 1) -> dict:
    """One ``Learner.update`` of ``batch`` as the algorithm calls it (one learner); its reduced metrics."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from gigpo_rllib.batch import minibatches_per_shard

    rows = len(batch["rewards"])
    config = learner.config
    per_epoch = minibatches_per_shard([rows], config.minibatch_size, config.batch_adjust_mode)
    return learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(batch))}, env_steps=rows),
                          minibatch_size=config.minibatch_size, num_epochs=num_epochs,
                          num_total_minibatches=per_epoch * num_epochs, shuffle_batch_per_epoch=True)
