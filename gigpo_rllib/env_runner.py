"""`GiGPOEnvRunner`: the RLlib `EnvRunner` that collects GiGPO step samples (ROLL's ``StepEnvManager`` role).

It owns a sampler (its own copy of the policy weights) and a :class:`~gigpo_rllib.rollout.StepCollector`.
Text never passes through RLlib's env-to-module connectors (they mangle strings): ``sample(groups=...)``
returns plain numpy step samples that the algorithm turns into learner batches.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import gymnasium as gym
import numpy as np
import ray
import torch
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, WEIGHTS_SEQ_NO

from gigpo_rllib.batch import WEIGHTS_VERSION
from gigpo_rllib.rl_module import MODULE_PREFIX, state_dict_to_numpy, to_sampler_state_dict
# load_function and system_prompt_for are imported from here too (tests, older user code).
from gigpo_rllib.rollout import (GroupSpec, RolloutSettings, StepCollector, load_function,  # noqa: F401
                                 make_env_factory, system_prompt_for)
from gigpo_rllib.sampling import make_sampler
from gigpo_rllib.sampling.base import SamplingParams
from gigpo_rllib.weight_sync import unpack_weights

logger = logging.getLogger(__name__)

# RLlib builds a learner module from these; the LLM module ignores them (text is not an RLlib space).
PLACEHOLDER_SPACES = (gym.spaces.Box(0.0, 1.0, (1,)), gym.spaces.Discrete(1))


def sampling_params(config) -> SamplingParams:
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                          max_new_tokens=config.max_new_tokens)


def probe_envs(config) -> None:
    """Make one env of every training tag as a rollout would, reset it, and check what a rollout needs: text
    observations, a turn limit, and a token budget (``sequence_length``) that holds the instructions and a first
    observation. An env that cannot be used is refused here, with one message naming it and what is missing, never
    deep inside a rollout. Raises ``ValueError``."""
    from gigpo_rllib.models import load_tokenizer
    from gigpo_rllib.rollout import PromptBuilder, allowed_reply_ids, prompt_instructions

    make = make_env_factory(config)
    tokenizer = load_tokenizer(config.model_name_or_path)
    prompts = PromptBuilder(tokenizer, config.sequence_length, config.max_new_tokens, history_length=0)
    for tag in config.env_tags:
        try:
            env = make(tag)
        except Exception as error:  # noqa: BLE001 - any failure to build the env is a config problem here
            raise ValueError(f"env {tag!r} cannot be made with env_config {dict(config.env_config)}: "
                             f"{type(error).__name__}: {error}") from error
        try:
            if env.get_wrapper_attr("max_steps") is None:
                raise ValueError(f"env {tag!r} has no turn limit, so a rollout could never end: give it a max_steps "
                                 "attribute or register it with max_episode_steps")
            try:
                observation, _ = env.reset(seed=config.seed or 0)
            except Exception as error:  # noqa: BLE001
                raise ValueError(f"env {tag!r} cannot be reset: {type(error).__name__}: {error}") from error
            constrained = bool(config.action_constraint and getattr(env, "action_words", None))
            needed = prompts.prompt_tokens(prompt_instructions(env, constrained), observation)
            if needed > prompts.budget:
                raise ValueError(f"sequence_length={config.sequence_length} leaves {prompts.budget} prompt tokens after "
                                 f"max_new_tokens={config.max_new_tokens}, but env {tag!r}'s instructions and first "
                                 f"observation alone take {needed}: raise sequence_length to at least "
                                 f"{needed + config.max_new_tokens}, or shorten the instructions (system_prompt, or "
                                 "env_config instructions_style: compact)")
            if config.action_constraint:
                words = getattr(env, "action_words", None)
                if words:
                    allowed_reply_ids(tokenizer, words, config.max_new_tokens, tag)
                else:
                    logger.warning("action_constraint is unavailable for env %r: it declares no action_words, so its "
                                   "replies are free-form", tag)
        finally:
            env.close()


class GiGPOEnvRunner(EnvRunner, Checkpointable):
    """Collects step samples for the episode groups the algorithm hands it (see module docstring)."""

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        torch.set_num_threads(config.torch_threads(remote_runner=self.worker_index > 0))
        self.sampler = make_sampler(config.sampler_backend, config.model_name_or_path, device=config.runner_device,
                                    dtype=config.resolved_sampler_dtype, max_model_len=config.sequence_length,
                                    seed=config.seed or 0, engine_kwargs=config.vllm_engine_kwargs,
                                    lora_rank=config.lora["r"] if config.lora_sync == "adapter" else None)
        self.collector = StepCollector(
            self.sampler, make_env_factory(config),
            RolloutSettings(sampling=sampling_params(config), sequence_length=config.sequence_length,
                            history_length=config.history_length,
                            max_envs=config.train_env_manager["max_env_num_per_worker"],
                            action_constraint=config.action_constraint,
                            anchor_similarity=config.anchor_similarity_threshold,
                            step_timeout_s=config.env_step_timeout_s,
                            env_error_penalty=config.env_error_penalty))
        self.weights_seq_no = 0

    def sample(self, *, groups: list[GroupSpec] | None = None, group_size: int | None = None, seed: int = 0,
               transcripts: bool = False, weights_seq_no: int | None = None, greedy: bool = False,
               temperature: float | None = None, **kwargs) -> dict[str, Any]:
        """Roll out ``groups`` (``group_size`` trajectories each; greedy replies with ``greedy``, else sampled at
        ``temperature`` when given: :meth:`StepCollector.collect`) and return their
        step samples (with this runner's ``worker_index``, and per sample the number of the weights that sampled it,
        ``weights_seq_no``), or ``{"error": traceback, "worker_index": i}`` when the
        rollout failed as a whole, or when the sampler does not hold the weights numbered ``weights_seq_no`` (a sync
        that never arrived)."""
        if groups is None or group_size is None:
            raise ValueError("GiGPOEnvRunner.sample needs groups=[GroupSpec, ...] and group_size=int; the GiGPO "
                             "algorithm assigns them (RLlib's generic sampling does not apply to text envs)")
        if weights_seq_no is not None and weights_seq_no != self.weights_seq_no:
            return {"error": f"env runner {self.worker_index} holds weights number {self.weights_seq_no}, but the "
                             f"learner's are number {weights_seq_no}: a weight sync did not reach it, and its "
                             "samples would come from another policy", "worker_index": self.worker_index}
        try:
            out = self.collector.collect(groups, group_size, seed, transcripts=transcripts, greedy=greedy,
                                         temperature=temperature)
        except Exception:  # noqa: BLE001 - reported to the driver, which raises it or counts the lost share
            # Raising would kill and restart this actor (about a minute) and leave only "see the worker log".
            return {"error": traceback.format_exc(), "worker_index": self.worker_index}
        self.num_env_steps_sampled_lifetime += len(out["rewards"])
        out["worker_index"] = self.worker_index
        out[WEIGHTS_VERSION] = np.full(len(out["rewards"]), self.weights_seq_no, dtype=np.int64)
        return out

    def get_spaces(self):
        return {DEFAULT_MODULE_ID: PLACEHOLDER_SPACES}

    def assert_healthy(self):
        assert self.sampler is not None, "GiGPOEnvRunner has no sampler"

    def stop(self) -> None:
        self.sampler.close()

    # -------------------------------------------------------------------------------- Checkpointable

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime,
                 WEIGHTS_SEQ_NO: self.weights_seq_no}
        # The learner owns the weights (they are checkpointed there); hand them out only when asked by name.
        if components is not None and self._check_component(COMPONENT_RL_MODULE, components, not_components):
            weights = {MODULE_PREFIX + name: value
                       for name, value in state_dict_to_numpy(self.sampler.state_dict()).items()}
            state[COMPONENT_RL_MODULE] = {DEFAULT_MODULE_ID: weights}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        # RLlib's own syncs (a restore) hand out merged weights, which an engine serving the adapters alone cannot
        # take (it would apply them twice): GiGPO syncs such a runner itself right after (restore_from_path,
        # restore_env_runners), and until then its weights number says it is behind.
        if COMPONENT_RL_MODULE in state and self.config.lora_sync != "adapter":
            weights = state[COMPONENT_RL_MODULE]
            if isinstance(weights, ray.ObjectRef):
                weights = ray.get(weights)
            weights = weights.get(DEFAULT_MODULE_ID, weights)
            self.sampler.load_weights(to_sampler_state_dict(weights))
            self.weights_seq_no = state.get(WEIGHTS_SEQ_NO, self.weights_seq_no)
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]

    def load_packed_weights(self, packed, weights_seq_no: int) -> None:
        """Copy the learner's packed weights (:class:`~gigpo_rllib.weight_sync.PackedWeights`, or an ``ObjectRef``
        to them) into the sampler in place."""
        if isinstance(packed, ray.ObjectRef):
            packed = ray.get(packed)
        self.load_weights(unpack_weights(packed), weights_seq_no, adapter_config=packed.adapter_config)

    def load_weights(self, weights, weights_seq_no: int, adapter_config: dict[str, Any] | None = None) -> None:
        """Copy ``weights`` (HF names -> tensors on any device: the learner's own when it shares this process) into
        the sampler in place; with ``adapter_config`` they are a LoRA adapter (peft's names) that the sampler
        serves on its base weights from now on."""
        if adapter_config is None:
            self.sampler.load_weights(weights)
        else:
            self.sampler.load_adapter(weights, adapter_config)
        self.weights_seq_no = weights_seq_no

    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config}
