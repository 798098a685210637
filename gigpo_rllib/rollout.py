"""Turn-by-turn rollout of episode groups into GiGPO step samples (docs/design.md "Data flow", step 2).

No RLlib here: the env runner wraps :class:`StepCollector`, and tests drive it directly. Every env of a wave
acts once per turn; all prompts of the turn go to the sampler in one call. Every turn of every trajectory, valid
or not, becomes one step sample, and the prompt history records every turn.

A misbehaving env costs its own trajectory, never the batch (docs/design.md "Lost trajectories"): a ``reset`` or
``step`` that raises, takes longer than ``step_timeout_s`` or returns a non-finite reward ends that trajectory.
Its samples are dropped (never filled in), the env is replaced, the fault is logged once per kind and counted by
cause. With ``env_error_penalty`` set, a ``step`` that raises on a reply that parsed as a valid action
(:class:`~gigpo_rllib.wrappers.ActionStepError`) ends its trajectory instead, as a terminal turn with that reward,
and the trajectory trains (counted in ``ended_by_env_error``). A group left with fewer than two finished
trajectories has no baseline: it is dropped from the samples and counted too (its episodes still count in the
episode metrics).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import math
import queue
import re
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from gigpo_rllib.anchors import group_similar_texts
from gigpo_rllib.sampling.base import Sampler, SamplingParams
from gigpo_rllib.wrappers import ActionStepError

logger = logging.getLogger(__name__)

LOSS_CAUSES = ("env_error", "step_timeout", "non_finite_reward", "group_dropped")
"""Why a trajectory left the batch, in the collector; the algorithm adds ``runner_failed`` and ``runner_timeout``."""


@dataclass(frozen=True)
class GroupSpec:
    """One episode group: ``group_size`` envs of one tag, all reset with ``seed``."""

    group_id: int
    tag: str
    tag_id: int
    seed: int


@dataclass(frozen=True)
class RolloutSettings:
    """What the collector needs from the config (see GiGPOConfig for each key)."""

    sampling: SamplingParams
    sequence_length: int
    history_length: int
    max_envs: int
    action_constraint: bool
    anchor_similarity: float | None = None
    """When set, near-duplicate states of one episode group share an anchor (see group_similar_texts)."""
    step_timeout_s: float | None = None
    """An env ``reset``/``step`` that takes longer loses its trajectory; None waits forever."""
    env_error_penalty: float | None = None
    """When set, a ``step`` that raises on a valid action ends its trajectory as a terminal turn with this reward
    instead of losing it (see ``GiGPOConfig``'s ``env_error_penalty``)."""


@dataclass
class _Trajectory:
    env: gym.Env
    traj_id: int
    group: GroupSpec
    observation: str
    anchor_id: int
    canonical: str | None
    history: list[tuple[str, str]] = field(default_factory=list)
    episode_return: float = 0.0
    invalid_turns: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Its step samples, added to the batch only if the trajectory finishes."""
    turns: list[dict[str, Any]] = field(default_factory=list)
    """Its transcript, when the collector is asked for transcripts."""
    length: int = 0
    success: bool = False


class EnvFault(Exception):
    """An env's ``reset`` or ``step`` raised, hung, or returned a non-finite reward: its trajectory is lost."""

    def __init__(self, cause: str, message: str, details: str = ""):
        super().__init__(message)
        self.cause = cause
        self.details = details or message


class EnvWorker:
    """A daemon thread that makes one env's calls, so each call can be given up on after a timeout without
    starting a thread per call.

    Python cannot stop a call that hangs: after a :class:`TimeoutError` the call may still be running inside the
    env, so the caller must drop the env and this worker (the collector replaces both).
    """

    def __init__(self, name: str = "gigpo-env-worker"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True, name=name).start()

    def _serve(self) -> None:
        while (job := self._calls.get()) is not None:
            function, future = job
            try:
                future.set_result(function())
            except BaseException as error:  # noqa: BLE001 - handed to the calling thread by the future
                future.set_exception(error)

    def call(self, function: Callable[[], Any], timeout_s: float) -> Any:
        """``function()`` on the worker's thread, or ``TimeoutError`` when it has not returned after ``timeout_s``
        seconds."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((function, future))
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None

    def stop(self) -> None:
        """Let the thread end once its current call (if any) returns."""
        self._calls.put(None)


def mix_seeds(*seeds: int) -> int:
    """A 32-bit seed derived from several non-negative ints (distinct inputs give independent streams, and no
    arithmetic on large seeds can overflow)."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0])


EPISODE_COLUMNS = ("return", "length", "success", "invalid_turns", "tag", "group_id")
SAMPLE_COLUMNS = ("rewards", "traj_ids", "step_ids", "group_ids", "tag_ids", "anchor_ids", "action_is_valid",
                  "prompt_truncated", "episode_ends", "episode_success")


FUNCTION_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""What a ``"module:function"`` reference looks like (any other string is plain text)."""


def load_function(reference: str):
    """Import ``"module:function"``."""
    module_name, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {reference!r} (expected 'module:function'): {error}") from error


def system_prompt_for(system_prompt: str | None):
    """``tag -> task text or None`` for the ``system_prompt`` key: None (the env's own), a plain string, or a
    ``"module:function"`` reference to a ``tag -> str`` function."""
    if system_prompt is None or not FUNCTION_REFERENCE.fullmatch(system_prompt):
        return lambda tag: system_prompt
    function = load_function(system_prompt)

    def instructions(tag: str) -> str:
        text = function(tag)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"system_prompt function {system_prompt!r} must return a non-empty str for tag {tag!r}, "
                             f"got {text!r}")
        return text

    return instructions


def make_env_factory(config):
    """``tag -> fully wrapped LLM env``, built from the config's env keys: ``env_config``, ``invalid_action_penalty``,
    ``answer_format``, ``anchor_canonicalizer``, ``anchor_similarity_threshold`` and ``system_prompt`` (a
    :class:`~gigpo_rllib.config.GiGPOConfig`, or any object with these attributes: ``rllib check-env`` builds
    its envs with it too, without RLlib)."""
    import envs

    canonicalize = load_function(config.anchor_canonicalizer) if config.anchor_canonicalizer else None
    instructions = system_prompt_for(config.system_prompt)

    def make(tag: str) -> gym.Env:
        return envs.make_llm_env(tag, invalid_action_penalty=config.invalid_action_penalty,
                                 require_think=config.answer_format == "think_answer", canonicalize=canonicalize,
                                 include_canonical_text=config.anchor_similarity_threshold is not None,
                                 instructions=instructions(tag), **dict(config.env_config))

    return make


def merge_similar_anchors(anchor_ids: np.ndarray, group_ids: np.ndarray, canonical_texts: list[str | None],
                          threshold: float) -> None:
    """Give near-duplicate states of one episode group one anchor id, in place (docs/design.md
    "Anchor-state ids"). Within each group the distinct canonical texts are clustered in sorted order, so the result does
    not depend on the order of trajectories; each text takes the anchor of its cluster's representative."""
    if any(text is None for text in canonical_texts):
        raise ValueError("anchor similarity grouping needs the canonical observation of every sample "
                         "(AnchorStateWrapper(include_canonical_text=True))")
    for group in np.unique(group_ids):
        rows = np.flatnonzero(group_ids == group)
        anchor_of_text = {canonical_texts[row]: anchor_ids[row] for row in rows}
        distinct = sorted(anchor_of_text)
        representatives = group_similar_texts(distinct, threshold)
        merged = {text: anchor_of_text[distinct[rep]] for text, rep in zip(distinct, representatives)}
        anchor_ids[rows] = [merged[canonical_texts[row]] for row in rows]


class PromptBuilder:
    """Chat prompt of one turn: system = the env's instructions; then the last ``history_length`` turns as
    user (observation) / assistant (reply) messages; then the current observation.

    Over budget (``sequence_length - max_new_tokens`` tokens) the prompt is cut in this order: the oldest history
    turns, then the oldest lines of the current observation, then the start of its last line. The instructions are
    never cut (``GiGPOConfig`` refuses a budget that cannot hold them plus an observation). Any cut counts as a
    truncation.
    """

    def __init__(self, tokenizer: Any, sequence_length: int, max_new_tokens: int, history_length: int):
        self.tokenizer = tokenizer
        self.budget = sequence_length - max_new_tokens
        self.history_length = history_length

    @staticmethod
    def _messages(instructions: str, history: list[tuple[str, str]], observation: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": instructions}]
        for past_observation, reply in history:
            messages += [{"role": "user", "content": past_observation}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": observation})
        return messages

    def _encode_many(self, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        """Render and tokenise several chats in one call each (the tokenizer batches them)."""
        texts = self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode(self, instructions: str, history: list[tuple[str, str]], observation: str) -> list[int]:
        return self._encode_many([self._messages(instructions, history, observation)])[0]

    def _shown(self, history: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return history[len(history) - self.history_length:] if self.history_length else []

    def build_many(self, requests: Sequence[tuple[str, list[tuple[str, str]], str]]) -> list[tuple[list[int], bool]]:
        """:meth:`build` of each ``(instructions, history, observation)``. The prompts that fit with all their
        shown history (the usual case) are rendered and tokenised in one batch; the others are cut one by one."""
        whole = self._encode_many([self._messages(instructions, self._shown(history), observation)
                                   for instructions, history, observation in requests])
        return [(ids, False) if len(ids) <= self.budget else self.build(*request)
                for ids, request in zip(whole, requests)]

    def build(self, instructions: str, history: list[tuple[str, str]], observation: str) -> tuple[list[int], bool]:
        """Returns ``(prompt token ids, truncated)``."""
        shown = self._shown(history)
        for start in range(len(shown) + 1):
            ids = self._encode(instructions, shown[start:], observation)
            if len(ids) <= self.budget:
                return ids, start > 0
        lines = observation.split("\n")
        for first in range(1, len(lines)):
            ids = self._encode(instructions, [], "\n".join(lines[first:]))
            if len(ids) <= self.budget:
                return ids, True
        return self._encode(instructions, [], self._tail_that_fits(instructions, lines[-1])), True

    def _tail_that_fits(self, instructions: str, line: str) -> str:
        """The longest end of ``line`` whose prompt fits the budget (bisection on characters)."""
        if len(self._encode(instructions, [], "")) > self.budget:
            raise ValueError(f"sequence_length leaves {self.budget} prompt tokens, fewer than the instructions alone "
                             f"take ({len(self._encode(instructions, [], ''))}); raise sequence_length or shorten the "
                             "instructions (system_prompt, or instructions_style: compact)")
        low, high = 0, len(line)  # line[high:] is "": it fits, checked above
        while low < high:
            middle = (low + high) // 2
            if len(self._encode(instructions, [], line[middle:])) <= self.budget:
                high = middle
            else:
                low = middle + 1
        return line[low:]

    def prompt_tokens(self, instructions: str, observation: str) -> int:
        """Tokens of the prompt of ``observation`` with no history (for the budget check at build time)."""
        return len(self._encode(instructions, [], observation))


class StepCollector:
    """Runs episode groups with an LLM sampler and returns their step samples.

    Args:
        sampler: generates replies (its ``tokenizer`` is used for prompts and decoding).
        make_env: ``tag -> env`` building a fully wrapped LLM env (``envs.make_llm_env``); envs are reused.
        settings: see :class:`RolloutSettings`.
    """

    def __init__(self, sampler: Sampler, make_env: Callable[[str], gym.Env], settings: RolloutSettings):
        self.sampler = sampler
        self.tokenizer = sampler.tokenizer
        self.settings = settings
        self.prompts = PromptBuilder(self.tokenizer, settings.sequence_length, settings.sampling.max_new_tokens,
                                     settings.history_length)
        self._make_env = make_env
        self._idle_envs: dict[str, list[gym.Env]] = defaultdict(list)
        self._workers: dict[int, EnvWorker] = {}  # id(env) -> the thread that makes its calls (with a timeout)
        self._allowed_replies: dict[str, list[list[int]]] = {}
        self._reported: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------------------------------------ public

    def collect(self, groups: list[GroupSpec], group_size: int, sample_seed: int, transcripts: bool = False,
                greedy: bool = False, temperature: float | None = None) -> dict[str, Any]:
        """Roll out ``group_size`` trajectories per group. Trajectory ids are ``group_id * group_size + k``.
        With ``greedy`` every reply is decoded greedily, else ``temperature`` (when given) replaces the settings'
        sampling temperature (both for evaluation; see :class:`SamplingParams`).

        Returns a dict of per-sample columns (numpy arrays of length N for :data:`SAMPLE_COLUMNS`; lists of
        int arrays ``prompt_ids``, ``response_ids`` and float arrays ``response_logprobs``; with the action constraint,
        ``allowed_replies``: each sample's allowed replies as token-id lists), per-trajectory
        ``episodes`` (dict of arrays: ``return``, ``length``, ``success``, ``invalid_turns``, ``tag``, ``group_id``),
        ``timing`` (seconds in generation and in env steps), ``token_counts`` (``prompt`` tokens sent to the
        sampler and how many of them it took from its prefix ``cached``), ``lost`` (trajectories lost, by cause of
        :data:`LOSS_CAUSES`), ``groups_dropped``, ``ended_by_env_error`` (trajectories ended with
        ``env_error_penalty``) and ``first_fault`` (the first lost trajectory's error, or None).
        With ``transcripts``, ``episodes["transcript"]`` holds each episode's turns: ``observation`` (what the
        policy saw), ``reply``, ``action`` (the parsed action, None when invalid), ``valid`` and ``reward``.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        groups_per_wave = max(1, self.settings.max_envs // group_size)
        batch = _Batch(record_transcripts=transcripts)
        sampling = self.settings.sampling
        if greedy:
            sampling = replace(sampling, greedy=True)
        elif temperature is not None:
            sampling = replace(sampling, temperature=temperature)
        for wave_start in range(0, len(groups), groups_per_wave):
            wave = groups[wave_start:wave_start + groups_per_wave]
            self._run_wave(wave, group_size, mix_seeds(sample_seed, wave_start), sampling, batch)
        return batch.columns(self.settings)

    # ----------------------------------------------------------------------------------------- details

    def _acquire_env(self, tag: str) -> gym.Env:
        if self._idle_envs[tag]:
            return self._idle_envs[tag].pop()
        env = self._make_env(tag)
        if env.get_wrapper_attr("max_steps") is None:
            raise ValueError(f"env {tag!r} has no turn limit, so a rollout could never end: give it a max_steps "
                             "attribute or register it with max_episode_steps")
        return env

    def _allowed_for(self, trajectory: _Trajectory) -> list[list[int]]:
        """The allowed replies of the trajectory's env; [] (unconstrained) for envs without a fixed action set."""
        tag = trajectory.group.tag
        if tag not in self._allowed_replies:
            try:
                words = trajectory.env.get_wrapper_attr("action_words")
            except AttributeError:
                words = None
            if not words:
                logger.warning("action_constraint is unavailable for env %r: it declares no action_words, so its "
                               "replies are free-form", tag)
                self._allowed_replies[tag] = []
                return []
            self._allowed_replies[tag] = allowed_reply_ids(self.tokenizer, words, self.settings.sampling.max_new_tokens,
                                                           tag)
        return self._allowed_replies[tag]

    def _call_env(self, env: gym.Env, function: Callable[[], Any], what: str) -> Any:
        """Call into ``env``, turning a raise or a hang into an :class:`EnvFault`. With a step timeout the call runs
        on the env's own worker thread, the same one for all its calls."""
        timeout_s = self.settings.step_timeout_s
        try:
            if timeout_s is None:
                return function()
            worker = self._workers.get(id(env))
            if worker is None:
                worker = self._workers[id(env)] = EnvWorker(f"gigpo-env-{len(self._workers)}")
            return worker.call(function, timeout_s)
        except TimeoutError as error:
            raise EnvFault("step_timeout", f"{what} did not return within {self.settings.step_timeout_s:g} s") from error
        except Exception as error:  # noqa: BLE001 - any env bug costs only its trajectory
            raise EnvFault("env_error", f"{what} raised {type(error).__name__}: {error}",
                           traceback.format_exc()) from error

    def _lose(self, trajectory_tag: str, group: GroupSpec, turn: int, fault: EnvFault, env: gym.Env,
              batch: "_Batch") -> None:
        """Count a lost trajectory, log its fault once per (env, cause, error type), and replace its env."""
        batch.lost[fault.cause] += 1
        message = f"env {trajectory_tag!r} (seed {group.seed}, turn {turn}): {fault}"
        if batch.first_fault is None:
            batch.first_fault = f"{message}\n{fault.details}"
        kind = (trajectory_tag, fault.cause, type(fault.__cause__).__name__)
        if kind not in self._reported:
            self._reported.add(kind)
            logger.warning("%s; its trajectory is dropped and counted under trajectories_lost_by_cause/%s (further "
                           "faults of this kind are only counted)\n%s", message, fault.cause, fault.details)
        self._discard(env, close=fault.cause != "step_timeout")  # a hung call may still be running inside it

    def _discard(self, env: gym.Env, close: bool = True) -> None:
        """Drop an env that will not be used again, and its worker thread."""
        worker = self._workers.pop(id(env), None)
        if worker is not None:
            worker.stop()
        if close:
            _close_quietly(env)

    def _end_on_env_error(self, trajectory: _Trajectory, turn: int, fault: EnvFault, batch: "_Batch"
                          ) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """The step result that ends a trajectory whose env raised on a valid action: a terminal, failed turn with
        reward ``env_error_penalty``, staying in the state it was in. Counted, and logged once per kind."""
        batch.ended_by_env_error += 1
        tag = trajectory.group.tag
        kind = (tag, "ended_by_env_error", type(fault.__cause__.__cause__).__name__)
        if kind not in self._reported:
            self._reported.add(kind)
            logger.warning("env %r (seed %d, turn %d): %s; the trajectory ends there with reward env_error_penalty=%g "
                           "and is counted under trajectories_ended_by_env_error (further faults of this kind are only "
                           "counted)\n%s", tag, trajectory.group.seed, turn, fault, self.settings.env_error_penalty,
                           fault.details)
        info = {"action_is_valid": True, "action": fault.__cause__.action, "success": False,
                "anchor_id": trajectory.anchor_id, "canonical_observation": trajectory.canonical}
        return trajectory.observation, self.settings.env_error_penalty, True, False, info

    def _reset(self, group: GroupSpec, traj_id: int, batch: "_Batch") -> _Trajectory | None:
        env = self._acquire_env(group.tag)
        try:
            observation, info = self._call_env(env, lambda: env.reset(seed=group.seed), "reset")
        except EnvFault as fault:
            self._lose(group.tag, group, 0, fault, env, batch)
            return None
        return _Trajectory(env, traj_id, group, observation, int(info["anchor_id"]), info.get("canonical_observation"))

    def _run_wave(self, wave: list[GroupSpec], group_size: int, seed: int, sampling: SamplingParams,
                  batch: "_Batch") -> None:
        active = [trajectory for group in wave for member in range(group_size)
                  if (trajectory := self._reset(group, group.group_id * group_size + member, batch)) is not None]
        finished: list[_Trajectory] = []
        try:
            self._play(active, seed, sampling, batch, finished)
        except BaseException:
            # The wave failed as a whole (the sampler, say): envs left mid-episode cannot be reused.
            returned = {id(trajectory) for trajectory in finished}
            for trajectory in active:
                if id(trajectory) not in returned:
                    self._discard(trajectory.env)
            raise
        batch.add_wave(wave, group_size, finished)

    def _play(self, active: list[_Trajectory], seed: int, sampling: SamplingParams, batch: "_Batch",
              finished: list[_Trajectory]) -> None:
        """Turn by turn until every trajectory of ``active`` has finished or is lost; appends to ``finished``."""
        active = list(active)
        turn = 0
        while active:
            allowed = [self._allowed_for(t) for t in active] if self.settings.action_constraint else None
            prompts, truncated = zip(*self.prompts.build_many([
                (prompt_instructions(t.env, bool(allowed and allowed[k])), t.history, t.observation)
                for k, t in enumerate(active)]))
            started = time.perf_counter()
            completions = self.sampler.generate(list(prompts), sampling, allowed,
                                                seed=mix_seeds(seed, turn))
            batch.timing["generate_s"] += time.perf_counter() - started
            batch.token_counts["prompt"] += sum(len(prompt) for prompt in prompts)
            batch.token_counts["cached"] += sum(completion.extra.get("cached_tokens", 0) for completion in completions)
            started = time.perf_counter()
            still_active = []
            for k, (trajectory, prompt, was_truncated, completion) in enumerate(zip(active, prompts, truncated, completions)):
                reply = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                env_failed = False
                try:
                    observation, reward, terminated, truncated_episode, info = self._call_env(
                        trajectory.env, lambda env=trajectory.env: env.step(reply), "step")
                    if not math.isfinite(float(reward)):
                        raise EnvFault("non_finite_reward", f"step returned the reward {reward!r}")
                except EnvFault as fault:
                    if self.settings.env_error_penalty is None or not isinstance(fault.__cause__, ActionStepError):
                        self._lose(trajectory.group.tag, trajectory.group, turn, fault, trajectory.env, batch)
                        continue
                    observation, reward, terminated, truncated_episode, info = self._end_on_env_error(
                        trajectory, turn, fault, batch)
                    env_failed = True
                done = bool(terminated or truncated_episode)
                valid = bool(info.get("action_is_valid", True))
                trajectory.rows.append(_sample_row(trajectory, turn, float(reward), valid, was_truncated, done, prompt,
                                                   completion, allowed[k] if allowed is not None else None))
                if batch.record_transcripts:
                    trajectory.turns.append({"observation": trajectory.observation, "reply": reply,
                                             "action": info.get("action"), "valid": valid, "reward": float(reward)})
                trajectory.history.append((trajectory.observation, reply))
                trajectory.observation, trajectory.anchor_id = observation, int(info["anchor_id"])
                trajectory.canonical = info.get("canonical_observation")
                trajectory.episode_return += float(reward)
                trajectory.invalid_turns += not valid
                if done:
                    trajectory.length, trajectory.success = turn + 1, bool(info.get("success", False))
                    finished.append(trajectory)
                    if env_failed:
                        self._discard(trajectory.env)
                    else:
                        self._idle_envs[trajectory.group.tag].append(trajectory.env)
                else:
                    still_active.append(trajectory)
            batch.timing["env_step_s"] += time.perf_counter() - started
            active = still_active
            turn += 1


def prompt_instructions(env: gym.Env, constrained: bool) -> str:
    """The system text of an env's prompts: its instructions with the answer-format line, or without it when its
    replies are constrained to the allowed ones (the constraint enforces the format; the line would only cost
    tokens)."""
    return env.get_wrapper_attr("task_instructions" if constrained else "instructions")


def allowed_reply_ids(tokenizer: Any, action_words: Sequence[str], max_new_tokens: int, tag: str) -> list[list[int]]:
    """Token ids of the complete allowed replies ``<answer>WORD</answer>`` + EOS of an env's action words. Raises
    ``ValueError`` when the longest does not fit ``max_new_tokens`` (every constrained reply would be cut off)."""
    eos = tokenizer.eos_token_id
    replies = [tokenizer(f"<answer>{word}</answer>", add_special_tokens=False)["input_ids"] + [eos]
               for word in action_words]
    longest = max(len(reply) for reply in replies)
    if longest > max_new_tokens:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) is shorter than the longest allowed reply of env {tag!r} "
                         f"({longest} tokens with EOS): every constrained reply would be cut off and invalid; set "
                         f"max_new_tokens >= {longest}")
    return replies


def _close_quietly(env: gym.Env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001 - the env is being discarded anyway
        pass


def _sample_row(trajectory: _Trajectory, turn: int, reward: float, valid: bool, truncated: bool, done: bool,
                prompt: list[int], completion, allowed: list[list[int]] | None) -> dict[str, Any]:
    return {"rewards": reward, "traj_ids": trajectory.traj_id, "step_ids": turn,
            "group_ids": trajectory.group.group_id, "tag_ids": trajectory.group.tag_id,
            "anchor_ids": trajectory.anchor_id, "action_is_valid": valid, "prompt_truncated": truncated,
            "episode_ends": done, "canonical_texts": trajectory.canonical,
            "prompt_ids": np.asarray(prompt, dtype=np.int64),
            "response_ids": np.asarray(completion.token_ids, dtype=np.int64),
            "response_logprobs": np.asarray(completion.logprobs, dtype=np.float32), "allowed_replies": allowed}


@dataclass
class _Batch:
    """What a :meth:`StepCollector.collect` call gathers, wave by wave."""

    samples: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    episodes: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    timing: dict[str, float] = field(default_factory=lambda: {"generate_s": 0.0, "env_step_s": 0.0})
    token_counts: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "cached": 0})
    lost: Counter = field(default_factory=Counter)
    groups_dropped: int = 0
    ended_by_env_error: int = 0
    first_fault: str | None = None
    record_transcripts: bool = False

    def add_wave(self, wave: list[GroupSpec], group_size: int, finished: list[_Trajectory]) -> None:
        """Every finished trajectory counts as an episode; its samples join the batch unless its group lost
        trajectories and kept fewer than two (no baseline left)."""
        by_group: dict[int, list[_Trajectory]] = defaultdict(list)
        for trajectory in finished:
            by_group[trajectory.group.group_id].append(trajectory)
        for group in wave:
            done = sorted(by_group[group.group_id], key=lambda trajectory: trajectory.traj_id)
            for trajectory in done:
                for name, value in (("return", trajectory.episode_return), ("length", trajectory.length),
                                    ("success", trajectory.success), ("invalid_turns", trajectory.invalid_turns),
                                    ("tag", group.tag), ("group_id", group.group_id)):
                    self.episodes[name].append(value)
                if self.record_transcripts:
                    self.episodes["transcript"].append(trajectory.turns)
            if len(done) < group_size and len(done) < 2:
                self.groups_dropped += 1
                self.lost["group_dropped"] += len(done)
                continue
            for trajectory in done:
                for row in trajectory.rows:
                    for name, value in row.items():
                        self.samples[name].append(value)
                    # Known only once the episode ended: every turn carries its episode's outcome.
                    self.samples["episode_success"].append(trajectory.success)

    def columns(self, settings: RolloutSettings) -> dict[str, Any]:
        samples = self.samples
        out: dict[str, Any] = {name: np.asarray(samples[name]) for name in SAMPLE_COLUMNS}
        if settings.anchor_similarity is not None:
            merge_similar_anchors(out["anchor_ids"], out["group_ids"], samples["canonical_texts"],
                                  settings.anchor_similarity)
        for name in ("prompt_ids", "response_ids", "response_logprobs"):
            out[name] = samples[name]
        if settings.action_constraint:
            out["allowed_replies"] = samples["allowed_replies"]
        out["episodes"] = {name: np.asarray(self.episodes[name]) for name in EPISODE_COLUMNS}
        if self.record_transcripts:
            out["episodes"]["transcript"] = self.episodes["transcript"]
        out["timing"] = self.timing
        out["token_counts"] = self.token_counts
        out["lost"] = {cause: self.lost[cause] for cause in LOSS_CAUSES}
        out["groups_dropped"] = self.groups_dropped
        out["ended_by_env_error"] = self.ended_by_env_error
        out["first_fault"] = self.first_fault
        return out
