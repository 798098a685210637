"""`GiGPOTorchLearner`: the token-level clipped-PPO loss and the update loop of GiGPO.

The shard is prepared once per update by :class:`~gigpo_rllib.preparation.ShardPreparation` (advantages, batch
adjust, row order, loss weights, old and reference log-probs); each minibatch then gets :func:`gigpo_policy_loss`,
gradient clipping and the non-finite check, all on the device.

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
from typing import Any

import torch
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.schedules.piecewise_schedule import PiecewiseSchedule

from gigpo_rllib.losses import gigpo_policy_loss, k3_kl, masked_mean
from gigpo_rllib.preparation import ADVANTAGES, IS_WEIGHTS, LOSS_WEIGHTS, OLD_LOGPROBS, ShardPreparation
from gigpo_rllib.rl_module import TOKEN_ENTROPY, TOKEN_LOGPROBS
from gigpo_rllib.sharding import full_tensor, gathered_optimizer_state, shard_model, shard_optimizer_state
from gigpo_rllib.weight_sync import pack_weights

# Per-minibatch metrics are averaged over the minibatches of one update and stay tensors until RLlib reduces them
# at the end of the update: no host synchronisation per minibatch (an unwindowed mean would check each value for
# NaN on the host).
PER_UPDATE_MEAN = {"reduce": "mean", "window": 1 << 30}


class GiGPOTorchLearner(ShardPreparation, TorchLearner):
    """Learner of the GiGPO algorithm (see module docstring); its batch preparation is :class:`ShardPreparation`."""

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
        if self.is_sharded:
            # The algorithm's setup reads the new weights from one learner (for its samplers), which alone cannot
            # gather them: they are gathered now, while every learner builds.
            self.gather_state()

    @property
    def is_sharded(self) -> bool:
        """Whether the model is sharded over the learners (``learner_sharding: fsdp`` with several learners)."""
        return self.config.learner_sharding == "fsdp" and self.config.num_learners > 1

    def _make_module(self):
        """RLlib's module on the learner's device, sharded per decoder layer when :attr:`is_sharded`: before the
        optimizer is built, so that it holds (and keeps state for) this learner's shards only."""
        module = super()._make_module()
        if self.is_sharded:
            rl_module = module[DEFAULT_MODULE_ID]
            shard_model(rl_module.model, compute_dtype=rl_module.compute_dtype,
                        cpu_offload=self.config.fsdp_cpu_offload)
        return module

    def _make_modules_ddp_if_necessary(self) -> None:
        # A sharded model already reduces its gradients (FSDP2); DDP would hold a whole copy again.
        if not self.is_sharded:
            super()._make_modules_ddp_if_necessary()

    # ------------------------------------------------------------------ state of a sharded learner

    def gather_state(self) -> None:
        """Gather this sharded learner's whole state (weights and optimizer state, each tensor in turn), for the
        next :meth:`get_state`. A collective: every learner calls it (the algorithm does, before it saves). RLlib
        then asks one learner for the state, which alone could not gather it; rank 0 keeps it, the layout of one
        unsharded learner, so a checkpoint restores into any number of learners."""
        state = super().get_state()
        self._gathered_state = state if torch.distributed.get_rank() == 0 else None

    def get_state(self, components=None, *, not_components=None, **kwargs):
        """RLlib's learner state; a sharded learner returns the state of its last :meth:`gather_state` (or the one
        it was last given by :meth:`set_state`), as asked for by ``components``."""
        if not self.is_sharded:
            return super().get_state(components, not_components=not_components, **kwargs)
        state = getattr(self, "_gathered_state", None)
        if state is None:
            raise RuntimeError("a sharded learner's (learner_sharding='fsdp') state is gathered by all learners "
                               "together: call gather_state() on every learner first, then get_state() on rank 0")
        return {name: value for name, value in state.items()
                if name not in self._state_component_names or self._check_component(name, components, not_components)}

    def set_state(self, state) -> None:
        super().set_state(state)
        if self.is_sharded:
            # RLlib's restore reads the weights back from one learner right after: the state just loaded is that.
            self._gathered_state = state if torch.distributed.get_rank() == 0 else None

    @property
    def _state_component_names(self) -> set[str]:
        from ray.rllib.core import COMPONENT_METRICS_LOGGER, COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE

        return {COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER, COMPONENT_METRICS_LOGGER}

    def _get_optimizer_state(self):
        """RLlib's optimizer state; a sharded learner's gathered whole, tensor by tensor (see
        :func:`gathered_optimizer_state`)."""
        if not self.is_sharded:
            return super()._get_optimizer_state()
        return {name: {"module_id": self._optimizer_name_to_module[name],
                       "state": convert_to_numpy(gathered_optimizer_state(optimizer))}
                for name, optimizer in self._named_optimizers.items()}

    def _set_optimizer_state(self, state) -> None:
        super()._set_optimizer_state(state)
        if self.is_sharded:
            for optimizer in self._named_optimizers.values():
                shard_optimizer_state(optimizer)

    # ------------------------------------------------------------------------------ weights out

    def sampler_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """``(tensors, adapter config)``: what a sync hands the samplers. The HF model's weights and None (with LoRA
        merged into them), or with ``lora_sync: adapter`` the adapters alone and their peft config."""
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        with torch.no_grad():
            if self.config.lora_sync == "adapter":
                return module.sampler_adapter()
            return module.sampler_state_dict(), None

    def packed_weights(self, dtype: str):
        """The policy's weights for the samplers: :func:`pack_weights` of :meth:`sampler_weights` in ``dtype`` (rank 0
        only: with several learners one copy is enough; other ranks return None). A sharded model is gathered tensor
        by tensor, so every rank takes part in the gathers, and only rank 0 holds the buffer."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        keep = not distributed or torch.distributed.get_rank() == 0
        if not keep and not self.is_sharded:
            return None
        tensors, adapter_config = self.sampler_weights()
        with torch.no_grad():
            return pack_weights(tensors, dtype, keep=keep, adapter_config=adapter_config)

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
        self._gathered_state = None  # a gathered state describes the weights before this update

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        self._end_of_update_checks()

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
        # Sharded gradients give a partial norm; its full value is the global norm over all shards.
        norm = full_tensor(torch.nn.utils.get_total_norm(gradients)).float()
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
