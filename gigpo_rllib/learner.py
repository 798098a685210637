"""`GiGPOTorchLearner`: GiGPO advantages on the learner's device, then a token-level clipped-PPO update.

Once per update, on the learner's whole shard (device tensors): :func:`compute_gigpo_advantages`, optional
scaling over response tokens and clamping, and only then :func:`batch_adjust` so the shard splits into full
minibatches; then, with ``old_logprobs_source="learner"``, the old log-probs are recomputed with the pre-update
weights (docs/design.md "Off-policy correction"), and the loss's per-token weights are fixed for the whole update
(:func:`loss_token_weights`, ``loss_agg_mode``). Each minibatch then gets :func:`gigpo_policy_loss`.

Loss aggregation. RLlib steps the optimizer once per minibatch, and with several learners DDP averages the
learners' gradients of each step. The weights make the loss of a minibatch ``M · W · Σ_t w_t ℓ_t`` (``M``
minibatches per epoch, ``W`` learners, ``w_t`` the global aggregation weight, e.g. 1 / tokens of the whole
update batch), so the gradient of one step is on average the gradient of the global aggregate (the size of
step a per-minibatch mean gave), and the gradients of one epoch's steps sum to exactly ``M`` times it, however
the rows are ordered into minibatches (length bucketing) or split over learners. A token's weight no longer
depends on how long the other replies of its minibatch are.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.schedules.piecewise_schedule import PiecewiseSchedule

from gigpo_rllib.advantages import (AnchorGroupStats, anchor_group_counts, batch_adjust, compute_gigpo_advantages,
                                    stalled_groups)
from gigpo_rllib.logprobs import forced_response_tokens, forward_token_logprobs
from gigpo_rllib.losses import (gigpo_policy_loss, k3_kl, loss_token_weights, masked_mean, shape_advantages,
                                truncated_is_weights)
from gigpo_rllib.rl_module import HOST_MASKS, TOKEN_ENTROPY, TOKEN_LOGPROBS
from gigpo_rllib.weight_sync import pack_weights

# Per-minibatch metrics are averaged over the minibatches of one update and stay tensors until RLlib reduces them
# at the end of the update: no host synchronisation per minibatch (an unwindowed mean would check each value for
# NaN on the host).
PER_UPDATE_MEAN = {"reduce": "mean", "window": 1 << 30}
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


class GiGPOTorchLearner(TorchLearner):
    """Learner of the GiGPO algorithm (see module docstring)."""

    def build(self) -> None:
        super().build()
        torch.set_num_threads(self.config.torch_threads(remote_learner=self.config.num_learners > 0))
        if self._device.type == "cuda":
            # float32 matmuls (float32 compute, or what autocast leaves in float32) on TF32 tensor cores.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        self._compute_dtype = module.compute_dtype
        self._old_logprobs_from_forward = False
        self._reference_model = None
        if self.config.init_kl_coef > 0:
            # A frozen copy of the initial policy, kept only when the KL term is on, and held exactly like the policy
            # (float32 weights, forward under the same autocast): bfloat16 weights would round every weight, and the
            # KL would not be 0 at step 0.
            self._reference_model = copy.deepcopy(module.model).eval()
            self._reference_model.requires_grad_(False)
        self._skipped_in_a_row = torch.zeros((), device=self._device)
        self._start_update_totals()
        coef = self.config.entropy_loss_coef
        points = coef if isinstance(coef, (list, tuple)) else [[0, coef]]  # a fixed value: a one-point schedule
        self._entropy_schedule = PiecewiseSchedule(points, outside_value=points[-1][1], framework=None)
        self._entropy_coef = float(points[0][1])
        # Minibatches per epoch that the driver planned for every learner (the largest shard's count), known while
        # an update builds its batch; 0 outside an update.
        self._planned_minibatches = 0

    def packed_weights(self, dtype: str):
        """The policy's weights for the samplers: :func:`pack_weights` of the HF model in ``dtype`` (rank 0 only: with
        several learners the weights are identical, and one copy is enough; other ranks return None)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() != 0:
            return None
        with torch.no_grad():
            return pack_weights(self.module[DEFAULT_MODULE_ID].unwrapped().sampler_state_dict(), dtype)

    def get_parameters(self, module) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates: the trainable ones (with LoRA the adapters alone, so the optimizer
        keeps state for them only; otherwise every weight)."""
        return [parameter for parameter in module.parameters() if parameter.requires_grad]

    # ------------------------------------------------------------------------ once per update, whole shard

    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        """Set this update's entropy coefficient from its schedule, by the env steps sampled so far (computed from
        the step count, not carried as state, so a restored run continues the schedule exactly)."""
        super().before_gradient_based_update(timesteps=timesteps)
        self._entropy_coef = float(self._entropy_schedule.value(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0)))
        self.metrics.log_value((DEFAULT_MODULE_ID, "entropy_coef"), self._entropy_coef, window=1)
        self._start_update_totals()

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        self._end_of_update_checks()

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
        keep = batch_adjust(len(advantages), self.config.minibatch_size, self.config.batch_adjust_mode,
                            seed=self._weights_seq_no)
        self.metrics.log_value((ALL_MODULES, "batch_adjust_delta"), float(len(keep) - len(advantages)), window=1)
        # Rows arrive in rollout order (runner, wave, turn) and RLlib shuffles only from a second epoch on: shuffle
        # here so every minibatch mixes turns, runners and the batch-adjust copies.
        shuffle = torch.randperm(len(keep), generator=torch.Generator().manual_seed(self._weights_seq_no))
        keep = keep[shuffle]
        if self.config.length_bucketing:
            lengths = columns["attention_mask"].sum(-1).cpu()  # the row order is built on the host, where keep is
            keep = keep[bucket_by_length(lengths[keep], self.config.minibatch_size)]
        # Every learner runs the driver's planned number of minibatches (DDP's collectives must line up). A smaller
        # shard is topped up with rows of weight 0, which RLlib's iterator would otherwise fill by wrapping around,
        # training some rows twice per epoch.
        minibatch = self.config.minibatch_size
        minibatches = max(self._planned_minibatches, len(keep) // minibatch)
        trained = torch.ones(minibatches * minibatch, dtype=torch.bool)
        trained[len(keep):] = False
        filler = keep[torch.arange(minibatches * minibatch - len(keep)) % max(len(keep), 1)]
        keep = torch.cat([keep, filler]).to(advantages.device)
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
        two and, with ``truncated_is_cap``, add the truncated importance weights."""
        sampler_logprobs = columns[OLD_LOGPROBS]
        mask = columns["response_mask"].bool()
        gap = (learner_logprobs - sampler_logprobs).abs().masked_fill(~mask, 0.0)
        # Device tensors, reduced with the other per-update metrics: no host read here.
        self.metrics.log_value((DEFAULT_MODULE_ID, "logprob_gap_mean"), gap.sum() / mask.sum().clamp(min=1),
                               window=1)
        self.metrics.log_value((DEFAULT_MODULE_ID, "logprob_gap_max"), gap.max(), window=1)
        columns[OLD_LOGPROBS] = learner_logprobs
        if self.config.truncated_is_cap is not None:
            columns[IS_WEIGHTS] = truncated_is_weights(learner_logprobs, sampler_logprobs,
                                                       self.config.truncated_is_cap)

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

    # --------------------------------------------------------------------------------- per minibatch

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = batch[LOSS_WEIGHTS]
        counted = weights > 0  # the tokens that count: diagnostics are means over them
        logprobs = fwd_out[TOKEN_LOGPROBS]
        if self._old_logprobs_from_forward:
            batch = dict(batch)
            self._use_learner_old_logprobs(batch, logprobs.detach())
        loss, diagnostics = gigpo_policy_loss(
            logprobs, batch[OLD_LOGPROBS], batch[ADVANTAGES], counted, pg_clip=config.pg_clip,
            pg_clip_high=config.pg_clip_high, dual_clip_ratio=config.dual_clip_ratio if config.dual_clip_loss else None,
            is_weights=batch.get(IS_WEIGHTS), token_weights=weights)
        entropy = fwd_out[TOKEN_ENTROPY]
        metrics = {"policy_loss": loss, "entropy": masked_mean(entropy.detach(), counted), **diagnostics}
        if self._entropy_coef:
            loss = loss - self._entropy_coef * (entropy * weights).sum()
        if "reference_logprobs" in batch:
            kl = k3_kl(logprobs, batch["reference_logprobs"])
            loss = loss + config.init_kl_coef * (kl * weights).sum()
            metrics["reference_kl"] = masked_mean(kl.detach(), counted)
        for name, value in metrics.items():
            self.metrics.log_value((module_id, name), value.detach(), **PER_UPDATE_MEAN)
        self._update_totals[3] += batch["response_mask"].sum()
        return loss

    def postprocess_gradients_for_module(self, *, module_id, config=None, module_gradients_dict):
        """Clip the global gradient norm; a non-finite norm (from a non-finite loss or gradient) marks the step to be
        skipped. All on the device: whether it was finite is read once per update (:meth:`_end_of_update_checks`)."""
        gradients = [g for g in module_gradients_dict.values() if g is not None]
        norm = torch.nn.utils.get_total_norm(gradients).float()
        self._step_is_finite = torch.isfinite(norm)
        if config.max_grad_norm is not None:
            # A non-finite norm makes the gradients NaN here; the step is skipped anyway.
            scale = (config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for gradient in gradients:
                gradient.mul_(scale)
        finite = self._step_is_finite.float()
        self._update_totals[:3] += torch.stack([torch.where(self._step_is_finite, norm, 0.0), finite, 1 - finite])
        return module_gradients_dict

    def apply_gradients(self, gradients_dict) -> None:
        """Step the optimizer, or skip a non-finite step entirely (weights and optimizer state untouched) without
        reading anything back to the host: fused Adam skips on the device when ``found_inf`` is 1, as under AMP's
        gradient scaler."""
        skipped = (~self._step_is_finite).float()
        for optimizer in self._optimizer_parameters:
            optimizer.found_inf = skipped
        super().apply_gradients(gradients_dict)
        self._skipped_in_a_row = (self._skipped_in_a_row + 1) * skipped
        self._longest_skip_run = torch.maximum(self._longest_skip_run, self._skipped_in_a_row)

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        """RLlib's Adam, fused: one kernel per step, and a step that :meth:`apply_gradients` skips on the device."""
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.Adam(params, fused=True), params=params,
                                lr_or_lr_schedule=config.lr)

    def _start_update_totals(self) -> None:
        # Summed over the minibatches of one update: finite gradient norms, finite steps, skipped steps, tokens.
        self._update_totals = torch.zeros(4, device=self._device)
        self._longest_skip_run = self._skipped_in_a_row.clone()

    def _end_of_update_checks(self) -> None:
        """Log the update's gradient norm, skipped steps and tokens, and stop after
        ``max_consecutive_skipped_updates`` skipped steps in a row: the policy or the data is broken. This is the
        update's one host synchronisation on the minibatch path."""
        norm_sum, finite_steps, skipped, tokens, longest_run = torch.cat(
            [self._update_totals, self._longest_skip_run.reshape(1)]).tolist()
        if finite_steps:
            self.metrics.log_value((DEFAULT_MODULE_ID, "grad_norm"), norm_sum / finite_steps, window=1)
        self.metrics.log_value((ALL_MODULES, "skipped_updates"), skipped, reduce="sum")
        self.metrics.log_value((DEFAULT_MODULE_ID, "response_tokens"), tokens, reduce="sum")
        limit = self.config.max_consecutive_skipped_updates
        if longest_run >= limit:
            raise FloatingPointError(
                f"{int(longest_run)} minibatch updates in a row had a non-finite loss or gradient norm and were "
                f"skipped (max_consecutive_skipped_updates={limit}); check the rewards and the learning rate")
