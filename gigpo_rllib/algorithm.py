"""`GiGPO(Algorithm)`: one training iteration = sample → prepare (padded rows here; each learner prepares its shard:
:mod:`gigpo_rllib.preparation`) → update → weight sync. With ``max_off_policy_steps: 1`` the runners sample the
next iteration's batch during the update (on a driver thread), and the sync waits for both.

Each block is timed under RLlib's ``timers``; rollout metrics go under ``env_runners``, learner metrics under
``learners``, validation under ``validation`` and throughput under ``throughput``.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core import ALL_MODULES, DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from gigpo_rllib.batch import (WEIGHTS_VERSION, groups_with_signal, merge_rollouts, minibatches_per_shard,
                               pad_token_batch, shard_rows, take_groups, take_rows)
from gigpo_rllib.config import PER_SEED_METRICS_MAX_POOL, POOL_SEED_LIMIT, GiGPOConfig
from gigpo_rllib.rollout import GroupSpec, mix_seeds
from gigpo_rllib.weight_sync import distinct_tensors, synced_bytes

logger = logging.getLogger(__name__)

VALIDATION_RESULTS = "validation"
THROUGHPUT = "throughput"
# Validation env and sampling seeds live far above the training ones, so the two sets never meet.
VALIDATION_SEED_OFFSET = POOL_SEED_LIMIT
WEIGHT_SYNC_TIMEOUT_S = 600.0
# Timers report this iteration's seconds (RLlib's default is a slow moving average).
THIS_ITERATION = {"reduce": "mean", "window": 1}


def success_by_seed(rollout: dict[str, Any], groups: Sequence[GroupSpec]) -> dict[str, float]:
    """The success rate of each env seed's episodes in ``rollout`` (collected for ``groups``), keyed by the seed,
    or by ``"tag/seed"`` when the groups span several env tags. A seed whose episodes were all lost is absent."""
    ends = np.flatnonzero(rollout["episode_ends"])  # one row per episode: its last step
    by_group = {group.group_id: group for group in groups}
    several_tags = len({group.tag for group in groups}) > 1
    wins: dict[str, list[float]] = {}
    for group_id, success in zip(rollout["group_ids"][ends].tolist(), rollout["episode_success"][ends].tolist()):
        group = by_group[group_id]
        wins.setdefault(f"{group.tag}/{group.seed}" if several_tags else str(group.seed), []).append(success)
    return {seed: float(np.mean(values)) for seed, values in wins.items()}


def split_by_tag(groups_per_tag: Sequence[int], count: int) -> list[int]:
    """``count`` episode groups split over the env tags in the proportions of ``groups_per_tag`` (rounded down,
    the remainder to the first tag)."""
    weights = np.asarray(groups_per_tag, dtype=np.float64)
    per_tag = np.floor(weights / weights.sum() * count).astype(int)
    per_tag[0] += count - per_tag.sum()
    return per_tag.tolist()


def pass_at_k(samples: int, successes: int, k: int) -> float:
    """The unbiased estimate of pass@k (the chance that at least one of k samples solves the task) from ``samples``
    samples of which ``successes`` succeeded: ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"). With n = k it is 1 when any sample succeeded, else 0; with k = 1 it is c / n."""
    if not 0 <= successes <= samples or not 1 <= k <= samples:
        raise ValueError(f"pass@k needs 0 <= successes <= samples and 1 <= k <= samples, got samples={samples}, "
                         f"successes={successes}, k={k}")
    return 1.0 - math.comb(samples - successes, k) / math.comb(samples, k)


def pass_rates(episodes: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """``{"pass@1": ..., "pass@k": ...}``: each estimator averaged over the tasks (episode groups, one env seed
    each) of ``episodes``, a rollout's per-episode columns. A task that lost trajectories and has fewer than k
    episodes is left out of ``pass@k`` (the loss is counted in ``trajectories_lost``)."""
    by_task: dict[int, list[bool]] = {}
    for group_id, success in zip(episodes["group_id"].tolist(), episodes["success"].tolist()):
        by_task.setdefault(group_id, []).append(bool(success))
    counts = [(len(results), sum(results)) for results in by_task.values()]
    rates = {"pass@1": float(np.mean([pass_at_k(n, c, 1) for n, c in counts]))}
    complete = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    rates[f"pass@{k}"] = float(np.mean(complete)) if complete else math.nan
    return rates


def _check_gpu_placement(config: GiGPOConfig) -> None:
    """Refuse a layout in which an env runner's engine could land on the local learner's GPU.

    With ``num_learners=0`` the learner trains in the driver process. Inside a Tune trial the trial's placement
    group reserves the driver's GPU, but a plain driver holds none: Ray may hand the learner's GPU to a runner.
    """
    local_gpu_learner = config.num_learners == 0 and config.num_gpus_per_learner
    gpu_runners = config.num_env_runners > 0 and config.num_gpus_per_env_runner
    in_placement_group = ray.is_initialized() and ray.util.get_current_placement_group() is not None
    if local_gpu_learner and gpu_runners and not in_placement_group:
        raise ValueError(
            "num_learners=0 trains on a GPU in the driver process, which Ray does not reserve, so an env runner with "
            "num_gpus_per_env_runner > 0 could be placed on the same GPU. Use num_learners=1 (a learner actor with a "
            "GPU of its own), or run the algorithm through Ray Tune, which reserves the driver's GPU.")


def _pack_for_samplers(learner, dtype: str, put_in_object_store: bool):
    """Runs on a learner: ``(packed weights or an ObjectRef to them, bytes, their sequence number)``, or None on
    ranks other than 0."""
    packed = learner.packed_weights(dtype)
    if packed is None:
        return None
    return (ray.put(packed) if put_in_object_store else packed), packed.nbytes, learner_weights_seq_no(learner)


def _copy_to_sampler_in_process(learner, runner, dtype: str) -> tuple[int, int]:
    """Runs on a learner that shares its process (and device) with ``runner``: copies the HF model's weights into
    the runner's sampler directly, device to device; returns ``(bytes written, the weights' sequence number)``."""
    with torch.no_grad():
        tensors, adapter_config = learner.sampler_weights()
        weights, _ = distinct_tensors(tensors)
        weights_seq_no = learner_weights_seq_no(learner)
        runner.load_weights(weights, weights_seq_no, adapter_config=adapter_config)
    return synced_bytes(weights, dtype), weights_seq_no


def learner_weights_seq_no(learner) -> int:
    """The sequence number of the learner's weights: RLlib's learner counts its updates, and every RLlib weight sync
    (a restore, a restarted runner, ``evaluate``) hands the runners that number, so GiGPO's own sync does too."""
    return learner._weights_seq_no


def episode_group_seeds(first_draw: int, count: int, base: int, pool: Sequence[int] | None) -> list[int]:
    """Env seeds of ``count`` episode groups, the ``first_draw``-th group drawn so far coming first.

    Without a pool every group gets a fresh seed, ``base + draw``. With a pool (a list of N seeds) the draws walk
    it in a new random order on every pass (draws ``k·N .. (k+1)·N − 1`` are one permutation, seeded by ``base``
    and ``k``), so every pool seed is used equally often and a batch of at most N groups holds no seed twice.
    """
    draws = range(first_draw, first_draw + count)
    if pool is None:
        return [base + draw for draw in draws]
    orders: dict[int, np.ndarray] = {}
    seeds = []
    for draw in draws:
        epoch = draw // len(pool)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng(mix_seeds(base, epoch)).permutation(len(pool))
        seeds.append(int(pool[orders[epoch][draw % len(pool)]]))
    return seeds


@dataclass
class TrainingSample:
    """One training batch as the runners delivered it: ``sampled`` (every step sample, whose ``weights_seq_no``
    column numbers the weights that sampled it), its ``groups``, ``training`` (the samples to train on: all of
    them, or with dynamic sampling the groups with signal), ``signal_metrics`` (dynamic sampling's), and when its
    sampling ``started`` and ``ended`` (``time.perf_counter``)."""

    sampled: dict[str, Any]
    groups: list[GroupSpec]
    training: dict[str, Any]
    signal_metrics: dict[str, float]
    started: float
    ended: float


class GiGPO(Algorithm):
    """GiGPO (arXiv 2505.10978) for LLM agents on text environments; configure it with :class:`GiGPOConfig`."""

    @classmethod
    def get_default_config(cls) -> GiGPOConfig:
        return GiGPOConfig()

    def setup(self, config: GiGPOConfig) -> None:
        from gigpo_rllib.env_runner import probe_envs

        _check_gpu_placement(config)
        probe_envs(config)
        super().setup(config)
        from gigpo_rllib.models import load_tokenizer

        tokenizer = load_tokenizer(config.model_name_or_path)
        self._pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Episode groups drawn so far, for training and for validation: they index the env seeds (see
        # episode_group_seeds) and seed the sampling, so a resumed run continues where it stopped.
        self._train_draws = 0
        self._val_draws = 0
        self._update_started = False
        # The sequence number of the weights every sampler must hold (see learner_weights_seq_no); None: ask the
        # learner (after a restore).
        self._weights_seq_no: int | None = 0
        # max_off_policy_steps > 0: the batch sampled during the last update, to be trained next (or the error that
        # sampling it raised), and the driver thread that samples beside the update.
        self._pending_sample: TrainingSample | BaseException | None = None
        self._sampling_thread: ThreadPoolExecutor | None = None

    @property
    def checkpoint_is_consistent(self) -> bool:
        """Whether a checkpoint taken now holds the state of ``iteration``. False from the start of an iteration's
        learner update until that iteration ends: the weights, optimizer state and seed counters are then already
        the next iteration's (a failure in validation or evaluation would otherwise save them under the old
        iteration, and a resume would apply the update twice). A failure while sampling leaves the state consistent:
        it only uses up that batch's env seeds."""
        return not self._update_started

    def step(self) -> dict[str, Any]:
        results = super().step()
        # The iteration is over: Algorithm.train counts it as soon as this returns.
        self._update_started = False
        return results

    # ------------------------------------------------------------------------------------ the iteration

    def training_step(self) -> None:
        self._check_not_stopped()
        config = self.config
        sample = self._training_sample()
        self._log_sample(sample)
        batch = pad_token_batch(sample.training, self._pad_token_id, sample.training.get("allowed_replies"))
        self._update_started = True
        learner_results, update_seconds = self._update_beside_sampling(batch, sample)
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        # The learners' own count: after batch adjust, over all epochs and learners.
        trained_tokens = self.metrics.peek((LEARNER_RESULTS, DEFAULT_MODULE_ID, "response_tokens"), default=0.0)
        self.metrics.log_value((THROUGHPUT, "train_tokens_per_s"), trained_tokens / update_seconds, window=1)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER), **THIS_ITERATION):
            self._sync_weights()

        if config.val_interval and (self.iteration + 1) % config.val_interval == 0:
            self.validate()

    def _update_beside_sampling(self, batch: dict[str, np.ndarray], sample: TrainingSample) -> tuple[list[dict], float]:
        """The learners' update of ``batch``: ``(their results, seconds)``. With ``max_off_policy_steps`` > 0 the
        runners sample the next batch meanwhile, with the weights they hold; it is collected before the weight sync,
        so each of its groups comes from one weight version."""
        overlapped = self.config.overlaps_sampling
        if overlapped:
            self._log_staleness(sample)
        next_sample = self._start_sampling() if overlapped else None
        started = time.perf_counter()
        try:
            with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER), **THIS_ITERATION):
                learner_results = self._update(batch)
            update_ended = time.perf_counter()
        finally:
            if next_sample is not None:
                self._pending_sample = self._finish_sampling(next_sample, started, time.perf_counter())
        return learner_results, update_ended - started

    def _training_sample(self) -> TrainingSample:
        """This iteration's batch: the one sampled during the last update (``max_off_policy_steps`` > 0), or a new
        one. A sampling failure of the last iteration is raised here, before any update, so the state saved after it
        is that of the last iteration."""
        pending, self._pending_sample = self._pending_sample, None
        if isinstance(pending, BaseException):
            raise pending
        return pending if pending is not None else self._sample_training_batch()

    def _start_sampling(self) -> Future:
        """Sample the next batch on a driver thread, with the weights the runners hold now. The thread only waits on
        the runners and merges their outputs; it logs nothing (the metrics logger is not thread-safe)."""
        if self._sampling_thread is None:
            self._sampling_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigpo-sampling")
        self._current_weights_seq_no()  # asked of the learners here, never from the thread
        return self._sampling_thread.submit(self._sample_training_batch)

    def _finish_sampling(self, future: Future, update_started: float, update_ended: float
                         ) -> TrainingSample | BaseException:
        """Wait for the batch sampled during the update; log how long each side waited for the other and how long
        both were busy. A failed sampling is returned, to be raised at the start of the next iteration."""
        try:
            sample = future.result()
        except Exception as error:  # noqa: BLE001 - raised by the next iteration, see _training_sample
            return error
        overlap = max(0.0, min(sample.ended, update_ended) - max(sample.started, update_started))
        self.metrics.log_dict({"overlap_s": overlap, "learner_waited_s": max(0.0, sample.ended - update_ended),
                               "sampler_waited_s": max(0.0, update_ended - sample.ended)}, key=TIMERS,
                              **THIS_ITERATION)
        return sample

    def _log_staleness(self, sample: TrainingSample) -> None:
        """How many weight versions the batch lags the learner that trains it (the most of its samples)."""
        versions = sample.training[WEIGHTS_VERSION]
        staleness = self._current_weights_seq_no() - int(versions.min()) if len(versions) else 0
        self.metrics.log_value((LEARNER_RESULTS, ALL_MODULES, "staleness"), float(staleness), window=1)

    def _log_sample(self, sample: TrainingSample) -> None:
        self.metrics.log_value((TIMERS, ENV_RUNNER_SAMPLING_TIMER), sample.ended - sample.started, **THIS_ITERATION)
        self._log_rollout(sample.sampled, ENV_RUNNER_RESULTS, sample.ended - sample.started,
                          sample.groups if self._per_seed_metrics else None)
        self.metrics.log_dict(sample.signal_metrics, key=ENV_RUNNER_RESULTS, window=1)
        self.metrics.log_value((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), len(sample.sampled["rewards"]),
                               reduce="lifetime_sum")

    def _sample_training_batch(self) -> TrainingSample:
        """A new training batch (see :class:`TrainingSample`). Without ``dynamic_sampling`` one round of
        ``num_env_groups`` groups, all trained on. With it, groups without return spread are left out and further
        rounds (each about the expected shortfall, at the signal rate seen so far) sample more, until
        ``num_env_groups`` groups with signal are in or ``dynamic_sampling_max_rounds`` extra rounds are spent;
        the batch then takes the first ``num_env_groups`` groups with signal (all of the first round when none has
        any). Each round draws fresh env seeds, so a resumed run continues exactly. Logs nothing (it may run on
        the sampling thread)."""
        started = time.perf_counter()
        config = self.config
        group_size = config.train_env_manager["group_size"]
        wanted = sum(config.groups_per_tag)
        rounds = 1 + (config.dynamic_sampling_max_rounds if config.dynamic_sampling else 0)
        rollouts: list[dict[str, Any]] = []
        groups: list[GroupSpec] = []
        with_signal: list[np.ndarray] = []
        per_tag = config.groups_per_tag
        for round_number in range(rounds):
            found = sum(len(ids) for ids in with_signal)
            if round_number:
                if found >= wanted:
                    break
                rate = max(found, 1) / len(groups)
                per_tag = split_by_tag(config.groups_per_tag, min(wanted, math.ceil((wanted - found) / rate)))
            count = sum(per_tag)
            seeds = episode_group_seeds(self._train_draws, count, self._base_seed, config.pool_seeds)
            new_groups = self._groups(per_tag, seeds, first_group_id=len(groups))
            sampling_seed = self._base_seed + self._train_draws
            self._train_draws += count
            rollouts.append(self._rollout(new_groups, group_size, seed=sampling_seed))
            groups += new_groups
            with_signal.append(groups_with_signal(rollouts[-1]))
        sampled = merge_rollouts(rollouts, sequential=True) if len(rollouts) > 1 else rollouts[0]
        signal = np.concatenate(with_signal)
        signal_metrics = {"groups_with_signal_fraction": len(signal) / len(groups),
                          "dynamic_sampling_rounds": float(len(rollouts) - 1)}
        if not config.dynamic_sampling:
            training = sampled
        else:
            training = take_groups(sampled, signal[:wanted]) if len(signal) else rollouts[0]
        return TrainingSample(sampled, groups, training, signal_metrics, started, time.perf_counter())

    def validate(self, episodes: int | None = None, transcripts: int = 0) -> dict[str, Any]:
        """Roll out one episode on each of ``episodes`` (default ``val_batch_size``) tasks on held-out seeds (never
        used in training); with a ``seed_pool``, also as many on the pool's seeds. The episodes decode greedily
        unless ``eval_greedy`` is off, and the success rate is also reported as ``success_rate_greedy`` (or
        ``success_rate_sampled``); with ``eval_pass_k`` = k > 1, k more episodes are sampled on each task for
        ``pass@1`` and ``pass@k`` (see :func:`pass_rates`). Logs the metrics under ``validation/`` and returns
        them: ``{metric: value}`` without a pool, ``{"pool": {...}, "held_out": {...}}`` with one. With
        ``transcripts=N`` the result also holds ``"transcripts"``: the turns (observation, reply, parsed action,
        validity, reward) of the first N held-out episodes."""
        return self._validation(episodes, transcripts, log_under=VALIDATION_RESULTS)

    def evaluate(self, parallel_train_future=None) -> dict[str, Any]:
        """RLlib's evaluation entry point (``algo.evaluate()``, or every ``evaluation_interval`` iterations): the
        validation episodes of :meth:`validate`, ``evaluation_duration`` of them (``"auto"``: ``val_batch_size``),
        on the training env runners. Returns ``{"env_runners": metrics}``, which RLlib reports under
        ``evaluation/``."""
        duration = self.config.evaluation_duration
        return {ENV_RUNNER_RESULTS: self._validation(None if duration == "auto" else duration, 0, log_under=None)}

    @classmethod
    def _should_create_evaluation_env_runners(cls, eval_config) -> bool:
        # Evaluation episodes run on the training env runners (GiGPOConfig refuses evaluation_num_env_runners > 0):
        # a separate group would hold one more copy of the model per runner.
        return False

    def _validation(self, episodes: int | None, transcripts: int, log_under: str | None) -> dict[str, Any]:
        self._check_not_stopped()
        config = self.config
        count = episodes or config.val_batch_size
        per_tag = split_by_tag(config.groups_per_tag, count)
        pool = config.pool_seeds
        held_out = [self._base_seed + VALIDATION_SEED_OFFSET + self._val_draws + i for i in range(count)]
        if pool is None:
            return self._validation_rollout(per_tag, held_out, log_under and (log_under,), transcripts)
        results = {"pool": self._validation_rollout(per_tag, [pool[i % len(pool)] for i in range(count)],
                                                    log_under and (log_under, "pool"), 0,
                                                    per_seed=self._per_seed_metrics),
                   "held_out": self._validation_rollout(per_tag, held_out, log_under and (log_under, "held_out"),
                                                        transcripts)}
        if transcripts:
            results["transcripts"] = results["held_out"].pop("transcripts")
        return results

    def _validation_rollout(self, per_tag: list[int], seeds: list[int], key: tuple[str, ...] | None,
                            transcripts: int, per_seed: bool = False) -> dict[str, Any]:
        config = self.config
        groups = self._groups(per_tag, seeds)
        started = time.perf_counter()
        rollout = self._validation_episodes(groups, 1, greedy=config.eval_greedy, transcripts=transcripts > 0)
        metrics: dict[str, Any] = self._log_rollout(rollout, None, time.perf_counter() - started,
                                                    groups if per_seed else None)
        metrics["success_rate_greedy" if config.eval_greedy else "success_rate_sampled"] = metrics["success_rate"]
        if config.eval_pass_k > 1:
            samples = self._validation_episodes(groups, config.eval_pass_k, greedy=False, transcripts=False)
            metrics.update(pass_rates(samples["episodes"], config.eval_pass_k))
        if key is not None:
            self.metrics.log_dict(metrics, key=key, window=1)
        if transcripts:
            metrics["transcripts"] = list(rollout["episodes"]["transcript"][:transcripts])
        return metrics

    def _validation_episodes(self, groups: list[GroupSpec], group_size: int, *, greedy: bool, transcripts: bool
                             ) -> dict[str, Any]:
        sampling_seed = self._base_seed + VALIDATION_SEED_OFFSET + self._val_draws
        self._val_draws += len(groups)
        return self._rollout(groups, group_size, seed=sampling_seed, transcripts=transcripts, greedy=greedy,
                             temperature=self.config.eval_temperature)

    def stop(self) -> None:
        self._stopped = True
        if getattr(self, "_sampling_thread", None) is not None:
            self._sampling_thread.shutdown(wait=True)
        super().stop()

    def _check_not_stopped(self) -> None:
        if getattr(self, "_stopped", False):
            raise RuntimeError("this GiGPO algorithm was stopped (algo.stop() released its env runners and "
                               "learners); build a new one, or restore a checkpoint, to train or validate again")

    # ----------------------------------------------------------------------------------------- sampling

    @property
    def _per_seed_metrics(self) -> bool:
        pool = self.config.pool_seeds
        return pool is not None and len(pool) <= PER_SEED_METRICS_MAX_POOL

    @property
    def _base_seed(self) -> int:
        return self.config.seed if self.config.seed is not None else 0

    def _groups(self, groups_per_tag: list[int], seeds: Sequence[int], first_group_id: int = 0) -> list[GroupSpec]:
        """Episode groups of each tag, in tag order, taking their env seeds from ``seeds`` in order; group ids count
        from ``first_group_id`` (a batch sampled in several rounds keeps them distinct)."""
        groups = []
        for tag_id, (tag, count) in enumerate(zip(self.config.env_tags, groups_per_tag)):
            for _ in range(count):
                groups.append(GroupSpec(group_id=first_group_id + len(groups), tag=tag, tag_id=tag_id,
                                        seed=int(seeds[len(groups)])))
        return groups

    def _rollout(self, groups: list[GroupSpec], group_size: int, seed: int, transcripts: bool = False,
                 greedy: bool = False, temperature: float | None = None) -> dict[str, Any]:
        """Step samples of ``groups`` from the env runners; ``seed`` (unique per batch, set by ``config.seed``) seeds
        the sampling, mixed with each runner's index; ``greedy`` decodes greedily instead, and ``temperature``
        replaces the training temperature (evaluation).

        A runner whose rollout failed as a whole, or that did not answer within ``sample_timeout_s`` (it is then
        restarted, and RLlib brings it back with the current weights before the next iteration), loses its share;
        losses are counted by cause in ``rollout["lost"]``. Raises only when at least ``max_lost_fraction`` of the
        batch's trajectories are lost, or none is left to train on, with the first fault's traceback.
        """
        config = self.config
        runners = self.env_runner_group
        remote = runners.num_remote_env_runners() > 0
        indices = self._healthy_runner_indices() if remote else [0]
        # Round-robin keeps each runner's share of every tag about equal.
        shares = {index: groups[position::len(indices)] for position, index in enumerate(indices)}
        weights_seq_no = self._current_weights_seq_no()
        outputs = runners.foreach_env_runner(
            lambda runner: runner.sample(groups=shares[runner.worker_index], group_size=group_size,
                                         seed=mix_seeds(seed, runner.worker_index), transcripts=transcripts,
                                         weights_seq_no=weights_seq_no, greedy=greedy, temperature=temperature),
            local_env_runner=not remote, timeout_seconds=config.sample_timeout_s if remote else None)
        answered = [out for out in outputs if "error" not in out]
        runner_lost = {"runner_failed": 0, "runner_timeout": 0}
        first_fault = None
        for failure in (out for out in outputs if "error" in out):
            runner_lost["runner_failed"] += len(shares[failure["worker_index"]]) * group_size
            first_fault = first_fault or f"env runner {failure['worker_index']} failed:\n{failure['error']}"
            logger.warning("env runner %d failed; its share of this batch is lost:\n%s", failure["worker_index"],
                           failure["error"])
        silent = sorted(set(shares) - {out["worker_index"] for out in outputs}) if remote else []
        for index in silent:
            runner_lost["runner_timeout"] += len(shares[index]) * group_size
            first_fault = first_fault or f"env runner {index} did not answer within {config.sample_timeout_s} s"
            self._restart_env_runner(index)
        rollout = merge_rollouts(answered) if answered else None
        if rollout is not None:
            first_fault = first_fault or rollout["first_fault"]
        lost = {**(rollout["lost"] if rollout is not None else {}), **runner_lost}
        total = len(groups) * group_size
        if rollout is None or not len(rollout["rewards"]) or sum(lost.values()) >= config.max_lost_fraction * total:
            raise RuntimeError(f"{sum(lost.values())} of {total} trajectories were lost this iteration ({lost}); "
                               f"max_lost_fraction is {config.max_lost_fraction}. The first fault:\n{first_fault}")
        rollout["lost"] = lost
        return rollout

    def _healthy_runner_indices(self) -> list[int]:
        """Remote runners that can take a share now. A restarted runner rejoins once RLlib's restore step (before
        each iteration) has found it up and synced it; until then the others take its share."""
        runners = self.env_runner_group
        indices = runners.healthy_env_runner_ids()
        if not indices:
            self.restore_env_runners(runners)
            indices = runners.healthy_env_runner_ids()
        if not indices:
            raise RuntimeError(f"none of the {runners.num_remote_env_runners()} env runners is healthy (they are "
                               "restarting or failed; their logs say why)")
        return sorted(indices)

    def _restart_env_runner(self, index: int) -> None:
        """Kill a runner that does not answer; Ray restarts the actor (RLlib's ``max_num_env_runner_restarts``), and
        RLlib's restore step gives it the current weights before the next iteration."""
        manager = self.env_runner_group._worker_manager  # RLlib 2.60 exposes restarts only through its actor manager
        logger.warning("env runner %d did not answer within sample_timeout_s=%s s: restarting it; its share of this "
                       "batch is lost", index, self.config.sample_timeout_s)
        ray.kill(manager.actors()[index], no_restart=False)
        manager.set_actor_state(index, healthy=False)

    def _log_rollout(self, rollout: dict[str, Any], key: str | tuple[str, ...] | None, seconds: float,
                     per_seed_groups: Sequence[GroupSpec] | None = None) -> dict[str, Any]:
        """The rollout's metrics, logged under ``key`` (not logged when ``key`` is None); with ``per_seed_groups``
        (the rollout's groups) also ``pool_seed_success``, the success rate of each seed."""
        episodes = rollout["episodes"]
        steps = len(rollout["rewards"])
        response_tokens = sum(len(r) for r in rollout["response_ids"])
        metrics = {
            "episode_return_mean": float(np.mean(episodes["return"])),
            "episode_len_mean": float(np.mean(episodes["length"])),
            "success_rate": float(np.mean(episodes["success"])),
            "invalid_action_rate": float(1.0 - np.mean(rollout["action_is_valid"])),
            "prompt_truncations": float(np.sum(rollout["prompt_truncated"])),
            "num_episodes": float(len(episodes["return"])),
            "trajectories_lost": float(sum(rollout["lost"].values())),
            "groups_dropped": float(rollout["groups_dropped"]),
            "trajectories_ended_by_env_error": float(rollout["ended_by_env_error"]),
            "num_env_steps": float(steps),
            "env_steps_per_s": steps / seconds,
            "sample_tokens_per_s": response_tokens / seconds,
            "generate_time_s": rollout["timing"]["generate_s"],
            "prefix_cache_hit_rate": rollout["token_counts"]["cached"] / max(rollout["token_counts"]["prompt"], 1),
            "env_step_time_s": rollout["timing"]["env_step_s"],
        }
        metrics["trajectories_lost_by_cause"] = {cause: float(count) for cause, count in rollout["lost"].items()}
        if per_seed_groups is not None:
            metrics["pool_seed_success"] = success_by_seed(rollout, per_seed_groups)
        if key is not None:
            prefix = key if isinstance(key, tuple) else (key,)
            self.metrics.log_dict(metrics, key=prefix, window=1)
        return metrics

    # ------------------------------------------------------------------------------------------- update

    def _update(self, batch: dict[str, np.ndarray]) -> list[dict]:
        config = self.config
        minibatch = config.minibatch_size
        if config.num_learners > 1:
            by = "tag_ids" if config.reward_normalization["grouping"] == "tags" else "group_ids"
            shards = [take_rows(batch, rows) for rows in shard_rows(batch, config.num_learners, by)]
        else:
            shards = [batch]
        per_epoch = minibatches_per_shard([len(s["rewards"]) for s in shards], minibatch, config.batch_adjust_mode)
        batches = [MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(s)}, env_steps=len(s["rewards"])) for s in shards]
        # The sampled-step count drives RLlib's learning-rate schedules (``lr=[[step, value], ...]``).
        sampled = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        # RLlib's per-epoch reshuffle would undo length bucketing (the learner orders rows once per update).
        common = dict(minibatch_size=minibatch, num_epochs=config.ppo_epochs,
                      shuffle_batch_per_epoch=not config.length_bucketing,
                      num_total_minibatches=per_epoch * config.ppo_epochs,
                      timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: sampled})
        if config.num_learners > 1:
            return self.learner_group.update(batches=batches, **common)
        return self.learner_group.update(batch=batches[0], **common)

    def _sync_weights(self, runner_ids: list[int] | None = None) -> None:
        """The learner's weights into every sampler (or the remote runners ``runner_ids``), in place. When learner
        and sampler share the driver process (``num_learners=0``, ``num_env_runners=0``: the one-GPU layout) they
        are copied device to device. Otherwise they are packed once in the samplers' dtype, put into the object
        store once (by the learner that packed them) and fetched by each runner (see
        :mod:`gigpo_rllib.weight_sync`). With ``lora_sync: adapter`` they are the LoRA adapters alone."""
        dtype = self.config.resolved_sampler_dtype
        remote = self.config.num_learners > 0
        runners = self.env_runner_group
        if not remote and runners.num_remote_env_runners() == 0:
            local_runner = runners.local_env_runner
            nbytes, weights_seq_no = next(call.get() for call in self.learner_group.foreach_learner(
                lambda learner: _copy_to_sampler_in_process(learner, local_runner, dtype)))
        else:
            results = [call.get() for call in self.learner_group.foreach_learner(
                lambda learner: _pack_for_samplers(learner, dtype, put_in_object_store=remote))]
            packed, nbytes, weights_seq_no = next(result for result in results if result is not None)
            reference = packed if remote else ray.put(packed)
            runners.foreach_env_runner(lambda runner: runner.load_packed_weights(reference, weights_seq_no),
                                       remote_worker_ids=runner_ids,
                                       local_env_runner=runners.num_remote_env_runners() == 0 and runner_ids is None,
                                       timeout_seconds=WEIGHT_SYNC_TIMEOUT_S)
        self.metrics.log_value((LEARNER_RESULTS, ALL_MODULES, "weight_sync_bytes"), float(nbytes), window=1)
        self._weights_seq_no = weights_seq_no

    def restore_env_runners(self, env_runner_group) -> list[int]:
        """RLlib's step for runners that came back after a restart (it counts them), with GiGPO's own weight sync
        instead of RLlib's: RLlib reads the weights through ``learner_group.get_state``, which one learner of a
        sharded model cannot answer alone, and hands merged weights to every runner, which an engine serving the
        LoRA adapters alone (``lora_sync: adapter``) cannot take."""
        if env_runner_group is not self.env_runner_group:
            return super().restore_env_runners(env_runner_group)
        restored = env_runner_group.probe_unhealthy_env_runners() if self.config.is_online else []
        if restored:
            self._counters["total_num_restored_workers"] += len(restored)
            self._sync_weights(runner_ids=restored)
        return restored

    def _current_weights_seq_no(self) -> int:
        if self._weights_seq_no is None:
            self._weights_seq_no = next(iter(self.learner_group.foreach_learner(learner_weights_seq_no))).get()
        return self._weights_seq_no

    # -------------------------------------------------------------------------------------- checkpoints

    def _gather_sharded_learner_state(self) -> None:
        """RLlib asks one learner for the learners' state or weights (now, or in the learner group's save that
        follows): sharded, they are gathered by all learners together first."""
        if self.config.learner_sharding == "fsdp" and self.config.num_learners > 1:
            for call in self.learner_group.foreach_learner(lambda learner: learner.gather_state()):
                call.get()

    def get_weights(self, policies: list[str] | None = None) -> dict:
        self._gather_sharded_learner_state()
        return super().get_weights(policies)

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        self._gather_sharded_learner_state()
        state = super().get_state(components, not_components=not_components, **kwargs)
        state["seed_counters"] = {"train": self._train_draws, "validation": self._val_draws}
        # The batch sampled during the last update is saved with the weights it was not yet trained on, so a resume
        # trains it next, as the run would have: none is lost or trained twice.
        state["pending_sample"] = self._pending_sample if isinstance(self._pending_sample, TrainingSample) else None
        return state

    def restore_from_path(self, path, *args, **kwargs) -> None:
        """RLlib's restore, then the restored weights pushed into every sampler by GiGPO's own blocking sync: RLlib's
        restore sync is asynchronous and skips a runner that still has a sync in flight (its start-up one, say),
        which then kept the initial weights."""
        super().restore_from_path(path, *args, **kwargs)
        self._sync_weights()

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._weights_seq_no = None  # the restored learner's number, which RLlib's restore has synced to the runners
        counters = state.get("seed_counters")
        if counters:
            self._train_draws, self._val_draws = counters["train"], counters["validation"]
        if "pending_sample" in state:
            self._pending_sample = state["pending_sample"]
