"""Batch preparation: what a GiGPO learner does once per update, on its whole shard, before the first minibatch.

RLlib hands a learner its shard in ``_make_batch_if_necessary`` (device tensors). There, in order: the GiGPO
advantages (:meth:`ShardPreparation.compute_advantages`: :func:`compute_gigpo_advantages`, optional scaling over
response tokens and clamping), batch adjust, shuffle, length bucketing and the top-up to the planned minibatch
count (:func:`training_rows`), the per-token loss weights of the whole update (:func:`loss_token_weights`,
``loss_agg_mode``), and with ``old_logprobs_source="learner"`` the old log-probs recomputed with the pre-update
weights and the truncated importance weights (docs/design.md "Off-policy correction"); with ``init_kl_coef > 0``
the reference model scores the rows too. The loss (:mod:`gigpo_rllib.learner`) then only combines these columns.
"""

from __future__ import annotations

import math
import time

import torch
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from gigpo_rllib.advantages import (AnchorGroupStats, anchor_group_counts, batch_adjust, compute_gigpo_advantages,
                                    stalled_groups)
from gigpo_rllib.logprobs import forced_response_tokens, forward_token_logprobs
from gigpo_rllib.losses import loss_token_weights, shape_advantages, truncated_is_weights
from gigpo_rllib.rl_module import HOST_MASKS

ADVANTAGES = "advantages"
OLD_LOGPROBS = "old_logprobs"
IS_WEIGHTS = "is_weights"
LOSS_WEIGHTS = "loss_weights"


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


BUCKET_MINIBATCHES = 8


def bucket_by_length(lengths: torch.Tensor, minibatch_size: int) -> torch.Tensor:
    """A row order in which consecutive minibatches hold rows of similar length, so trimming each minibatch to its
    longest row removes most padding: rows (already shuffled) are taken in megabatches of
    :data:`BUCKET_MINIBATCHES` minibatches and sorted by length within each, longest first. Which rows share a
    megabatch stays random. ``(N,)`` lengths -> ``(N,)`` permutation."""
    megabatch = minibatch_size * BUCKET_MINIBATCHES
    order = [start + torch.argsort(lengths[start:start + megabatch], descending=True, stable=True)
             for start in range(0, len(lengths), megabatch)]
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


def training_rows(rows: int, minibatch_size: int, batch_adjust_mode: str, *, seed: int,
                  lengths: torch.Tensor | None = None, planned_minibatches: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows of a shard of ``rows`` samples in the order the update trains them: ``(row indices, trained,
    minibatches)``. :func:`batch_adjust` drops or copies rows so the shard splits into full minibatches, the rows
    are shuffled (seeded by ``seed``), sorted by length within megabatches when ``lengths`` are given
    (:func:`bucket_by_length`), and topped up to ``planned_minibatches`` with rows that ``trained`` marks False."""
    keep = batch_adjust(rows, minibatch_size, batch_adjust_mode, seed=seed)
    # Rows arrive in rollout order (runner, wave, turn) and RLlib shuffles only from a second epoch on: shuffle
    # here so every minibatch mixes turns, runners and the batch-adjust copies.
    keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))]
    if lengths is not None:
        keep = keep[bucket_by_length(lengths[keep], minibatch_size)]
    # Every learner runs the driver's planned number of minibatches (DDP's collectives must line up). A smaller
    # shard is topped up with rows of weight 0, which RLlib's iterator would otherwise fill by wrapping around,
    # training some rows twice per epoch.
    minibatches = max(planned_minibatches, len(keep) // minibatch_size)
    trained = torch.ones(minibatches * minibatch_size, dtype=torch.bool)
    trained[len(keep):] = False
    filler = keep[torch.arange(minibatches * minibatch_size - len(keep)) % max(len(keep), 1)]
    return torch.cat([keep, filler]), trained, minibatches


class ShardPreparation:
    """The batch-preparation stage of :class:`~gigpo_rllib.learner.GiGPOTorchLearner` (a mixin placed before
    RLlib's ``TorchLearner``; see the module docstring). It reads the learner's ``config``, ``metrics``, ``module``,
    ``_weights_seq_no`` (seeds the row order), ``_reference_model`` and ``_compute_dtype``, and sets
    ``_old_logprobs_from_forward`` for the loss."""

    # Minibatches per epoch that the driver planned for every learner (the largest shard's count), known while an
    # update builds its batch; 0 outside an update.
    _planned_minibatches = 0

    def _create_iterator_if_necessary(self, *, training_data, num_total_minibatches: int = 0, num_epochs: int = 1,
                                      **kwargs):
        """RLlib's minibatch iterator; the planned minibatch count is kept for :meth:`_make_batch_if_necessary`."""
        self._planned_minibatches = num_total_minibatches // max(num_epochs, 1)
        try:
            return super()._create_iterator_if_necessary(training_data=training_data,
                                                         num_total_minibatches=num_total_minibatches,
                                                         num_epochs=num_epochs, **kwargs)
        finally:
            self._planned_minibatches = 0

    def _make_batch_if_necessary(self, training_data) -> MultiAgentBatch:
        batch = super()._make_batch_if_necessary(training_data)
        columns = batch.policy_batches[DEFAULT_MODULE_ID]
        started = time.perf_counter()
        advantages = self.compute_advantages(columns)
        self.metrics.log_value((ALL_MODULES, "advantages_time_s"), time.perf_counter() - started, window=1)
        config = self.config
        # The row order is built on the host: the lengths are read back once.
        lengths = columns["attention_mask"].sum(-1).cpu() if config.length_bucketing else None
        keep, trained, minibatches = training_rows(len(advantages), config.minibatch_size, config.batch_adjust_mode,
                                                   seed=self._weights_seq_no, lengths=lengths,
                                                   planned_minibatches=self._planned_minibatches)
        self.metrics.log_value((ALL_MODULES, "batch_adjust_delta"), float(int(trained.sum()) - len(advantages)),
                               window=1)
        keep = keep.to(advantages.device)
        adjusted = {name: value[keep] for name, value in columns.items() if torch.is_tensor(value)}
        adjusted[ADVANTAGES] = advantages[keep]
        adjusted[LOSS_WEIGHTS] = self._loss_weights(adjusted, trained.to(advantages.device), minibatches)
        # The masks in host memory too (read back once here): each minibatch finds its response positions there
        # instead of waiting for the device. copy=True keeps them apart from the device columns on a CPU learner.
        for host_name, name in zip(HOST_MASKS, ("attention_mask", "response_mask")):
            adjusted[host_name] = adjusted[name].to("cpu", copy=True)
        # One optimizer step per update (one minibatch, one epoch): its own forward runs on the pre-update weights, so
        # its detached log-probs are the learner's old log-probs and the separate no-grad pass would repeat it.
        self._old_logprobs_from_forward = (self.config.resolved_old_logprobs_source == "learner"
                                           and minibatches == 1 and self.config.ppo_epochs == 1)
        if self.config.resolved_old_logprobs_source == "learner":
            started = time.perf_counter()
            if not self._old_logprobs_from_forward:
                learner_logprobs = self._score_without_grad(self.module[DEFAULT_MODULE_ID].unwrapped().model, adjusted)
                self._use_learner_old_logprobs(adjusted, learner_logprobs)
            self.metrics.log_value((ALL_MODULES, "old_logprobs_time_s"), time.perf_counter() - started, window=1)
        if self._reference_model is not None:
            adjusted["reference_logprobs"] = self._score_without_grad(self._reference_model, adjusted)
        return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(adjusted)}, env_steps=len(keep))

    def _loss_weights(self, columns: dict[str, torch.Tensor], trained: torch.Tensor, minibatches: int) -> torch.Tensor:
        """``(N, S)`` per-token loss weights of the shard (see the module docstring): 0 on padding, on top-up rows and
        on tokens the action constraint forces; the denominators are the whole update batch's (one all-reduce)."""
        counted = columns["response_mask"].bool() & trained.unsqueeze(-1)
        allowed = columns.get("allowed_responses")
        if allowed is not None:
            counted &= ~forced_response_tokens(allowed, columns["input_ids"], columns["response_mask"])
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        learners = torch.distributed.get_world_size() if distributed else 1
        return loss_token_weights(counted, self.config.loss_agg_mode, scale=minibatches * learners,
                                  sum_over_learners=_all_reduce_sum if distributed else None)

    def _use_learner_old_logprobs(self, columns: dict[str, torch.Tensor], learner_logprobs: torch.Tensor) -> None:
        """Replace the sampler's old log-probs with the learner's own (pre-update weights), log the gap between the
        two and, with a truncated-importance cap (``truncated_is_cap``, or the default cap of stale batches), add the
        importance weights ``min(π_learner / π_sampler, cap)`` of the decoupled objective (docs/design.md "Overlapped
        sampling and the decoupled objective"), logging their mean, max and the share of tokens at the cap."""
        sampler_logprobs = columns[OLD_LOGPROBS]
        mask = columns["response_mask"].bool()
        gap = (learner_logprobs - sampler_logprobs).abs().masked_fill(~mask, 0.0)
        # Device tensors, reduced with the other per-update metrics: no host read here.
        self.metrics.log_value((DEFAULT_MODULE_ID, "logprob_gap_mean"), gap.sum() / mask.sum().clamp(min=1),
                               window=1)
        self.metrics.log_value((DEFAULT_MODULE_ID, "logprob_gap_max"), gap.max(), window=1)
        columns[OLD_LOGPROBS] = learner_logprobs
        cap = self.config.resolved_truncated_is_cap
        if cap is not None:
            weights = truncated_is_weights(learner_logprobs, sampler_logprobs, cap)
            columns[IS_WEIGHTS] = weights
            tokens = mask.sum().clamp(min=1)
            capped = (learner_logprobs - sampler_logprobs >= math.log(cap)) & mask
            on_tokens = weights.masked_fill(~mask, 0.0)
            self.metrics.log_value((DEFAULT_MODULE_ID, "is_weight_mean"), on_tokens.sum() / tokens, window=1)
            self.metrics.log_value((DEFAULT_MODULE_ID, "is_weight_max"), on_tokens.max(), window=1)
            self.metrics.log_value((DEFAULT_MODULE_ID, "is_capped_fraction"), capped.sum() / tokens, window=1)

    def compute_advantages(self, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final per-sample advantages ``(N,)`` of this learner's shard (device tensors), before batch_adjust.
        With several learners every learner must call it at once (scaling and the group counts all-reduce)."""
        config = self.config
        norm = config.reward_normalization
        out = compute_gigpo_advantages(
            columns["rewards"].float(), columns["traj_ids"], columns["step_ids"], columns["group_ids"],
            columns["anchor_ids"], gamma=config.step_reward_gamma, episode_weight=config.episode_reward_weight,
            step_weight=config.effective_step_reward_weight, method=norm["method"], grouping=norm["grouping"],
            tag_ids=columns["tag_ids"], episode_stats=config.episode_advantage_stats)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        # Episode groups where every try failed alike teach nothing at either level: their share says how much of
        # the batch is stuck (e.g. one pool map the policy never solves). One row per trajectory (its last) is enough.
        last_rows = columns["episode_ends"].nonzero().squeeze(1)
        stalled = stalled_groups(out.episode_returns[last_rows], columns["group_ids"][last_rows],
                                 columns["episode_success"][last_rows])
        counts = torch.cat([anchor_group_counts(out.anchor_group_ids),
                            torch.tensor([float(stalled.sum()), float(len(stalled))], dtype=torch.float64)])
        if distributed:  # groups never span shards, so summed counts are the whole batch's
            counts = _all_reduce_sum(counts.to(out.advantages.device)).cpu()
        for name, value in AnchorGroupStats.from_counts(counts[:3]).as_dict().items():
            self.metrics.log_value((ALL_MODULES, name), value, window=1)
        self.metrics.log_value((ALL_MODULES, "stalled_group_fraction"), float(counts[3] / counts[4].clamp(min=1)),
                               window=1)
        self.metrics.log_value((ALL_MODULES, "episode_advantage_abs_mean"), float(out.episode_advantages.abs().mean()), window=1)
        self.metrics.log_value((ALL_MODULES, "step_advantage_abs_mean"), float(out.step_advantages.abs().mean()), window=1)
        lengths = columns["response_mask"].sum(-1)
        return shape_advantages(out.advantages, lengths, scaling=config.advantage_scaling, clip=config.advantage_clip,
                                sum_over_learners=_all_reduce_sum if distributed else None)

    @torch.no_grad()
    def _score_without_grad(self, model: torch.nn.Module, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, S)`` token log-probs of the shard's responses under ``model``, without gradients. Chunks are the
        training minibatches (same rows, same order), so a model scores each row exactly as the update will."""
        chunks = []
        for start in range(0, len(columns["input_ids"]), self.config.minibatch_size):
            rows = slice(start, start + self.config.minibatch_size)
            allowed = columns.get("allowed_responses")
            logprobs, _ = forward_token_logprobs(
                model, columns["input_ids"][rows], columns["attention_mask"][rows],
                columns["response_mask"][rows], temperature=self.config.temperature,
                allowed_responses=None if allowed is None else allowed[rows], autocast_dtype=self._compute_dtype,
                host_masks=(columns[HOST_MASKS[0]][rows], columns[HOST_MASKS[1]][rows]), check_constraint=False)
            chunks.append(logprobs)
        return torch.cat(chunks)
