"""Turn-by-turn rollout of episode groups into GiGPO step samples (DESIGN.md data flow, step 2).

No RLlib here: the env runner wraps :class:`StepCollector`, and tests drive it directly. Every env of a wave
acts once per turn; all prompts of the turn go to the sampler in one call. Every turn of every trajectory, valid
or not, becomes one step sample, and the prompt history records every turn.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from gigpo_rllib.anchors import group_similar_texts
from gigpo_rllib.sampling.base import Sampler, SamplingParams


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


def mix_seeds(*seeds: int) -> int:
    """A 32-bit seed derived from several non-negative ints (distinct inputs give independent streams, and no
    arithmetic on large seeds can overflow)."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0])


SAMPLE_COLUMNS = ("rewards", "traj_ids", "step_ids", "group_ids", "tag_ids", "anchor_ids", "action_is_valid",
                  "prompt_truncated", "episode_ends")


def merge_similar_anchors(anchor_ids: np.ndarray, group_ids: np.ndarray, canonical_texts: list[str | None],
                          threshold: float) -> None:
    """Give near-duplicate states of one episode group one anchor id, in place (DESIGN.md's optional similarity
    grouping). Within each group the distinct canonical texts are clustered in sorted order, so the result does
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
    user (observation) / assistant (reply) messages; then the current observation. History is dropped oldest
    first until prompt + ``max_new_tokens`` fits ``sequence_length``; a prompt that still does not fit keeps
    its last tokens. Either counts as a truncation."""

    def __init__(self, tokenizer: Any, sequence_length: int, max_new_tokens: int, history_length: int):
        self.tokenizer = tokenizer
        self.budget = sequence_length - max_new_tokens
        self.history_length = history_length

    def _encode(self, instructions: str, history: list[tuple[str, str]], observation: str) -> list[int]:
        messages = [{"role": "system", "content": instructions}]
        for past_observation, reply in history:
            messages += [{"role": "user", "content": past_observation}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": observation})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(self, instructions: str, history: list[tuple[str, str]], observation: str) -> tuple[list[int], bool]:
        """Returns ``(prompt token ids, truncated)``."""
        shown = history[len(history) - self.history_length:] if self.history_length else []
        for start in range(len(shown) + 1):
            ids = self._encode(instructions, shown[start:], observation)
            if len(ids) <= self.budget:
                return ids, start > 0
        return ids[-self.budget:], True


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
        self._allowed_replies: dict[str, list[list[int]]] = {}

    # ------------------------------------------------------------------------------------------ public

    def collect(self, groups: list[GroupSpec], group_size: int, sample_seed: int) -> dict[str, Any]:
        """Roll out ``group_size`` trajectories per group. Trajectory ids are ``group_id * group_size + k``.

        Returns a dict of per-sample columns (numpy arrays of length N for :data:`SAMPLE_COLUMNS`; lists of
        int arrays ``prompt_ids``, ``response_ids`` and float arrays ``response_logprobs``; with the action constraint,
        ``allowed_replies``: each sample's allowed replies as token-id lists), per-trajectory
        ``episodes`` (dict of arrays: ``return``, ``length``, ``success``, ``invalid_turns``, ``tag``),
        ``timing`` (seconds in generation and in env steps) and ``token_counts`` (``prompt`` tokens sent to the
        sampler and how many of them it took from its prefix ``cached``).
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        groups_per_wave = max(1, self.settings.max_envs // group_size)
        samples: dict[str, list] = defaultdict(list)
        episodes: dict[str, list] = defaultdict(list)
        timing = {"generate_s": 0.0, "env_step_s": 0.0}
        token_counts = {"prompt": 0, "cached": 0}
        for wave_start in range(0, len(groups), groups_per_wave):
            wave = groups[wave_start:wave_start + groups_per_wave]
            self._run_wave(wave, group_size, mix_seeds(sample_seed, wave_start), samples, episodes, timing,
                           token_counts)
        out: dict[str, Any] = {name: np.asarray(samples[name]) for name in SAMPLE_COLUMNS}
        if self.settings.anchor_similarity is not None:
            merge_similar_anchors(out["anchor_ids"], out["group_ids"], samples["canonical_texts"],
                                  self.settings.anchor_similarity)
        for name in ("prompt_ids", "response_ids", "response_logprobs"):
            out[name] = samples[name]
        if self.settings.action_constraint:
            out["allowed_replies"] = samples["allowed_replies"]
        out["episodes"] = {name: np.asarray(values) for name, values in episodes.items()}
        out["timing"] = timing
        out["token_counts"] = token_counts
        return out

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
        tag = trajectory.group.tag
        if tag not in self._allowed_replies:
            words = getattr(trajectory.env, "action_words", None)
            if not words:
                raise ValueError(f"action_constraint needs envs with a fixed action set; env {tag!r} declares "
                                 "no action_words (free-form actions)")
            eos = self.tokenizer.eos_token_id
            replies = [self.tokenizer(f"<answer>{word}</answer>", add_special_tokens=False)["input_ids"] + [eos]
                       for word in words]
            longest = max(len(reply) for reply in replies)
            if longest > self.settings.sampling.max_new_tokens:
                raise ValueError(f"max_new_tokens ({self.settings.sampling.max_new_tokens}) is shorter than the "
                                 f"longest allowed reply of env {tag!r} ({longest} tokens with EOS): every constrained "
                                 f"reply would be cut off and invalid; set max_new_tokens >= {longest}")
            self._allowed_replies[tag] = replies
        return self._allowed_replies[tag]

    def _run_wave(self, wave: list[GroupSpec], group_size: int, seed: int, samples, episodes, timing,
                  token_counts) -> None:
        active: list[_Trajectory] = []
        for group in wave:
            for member in range(group_size):
                env = self._acquire_env(group.tag)
                observation, info = env.reset(seed=group.seed)
                active.append(_Trajectory(env, group.group_id * group_size + member, group, observation,
                                          int(info["anchor_id"]), info.get("canonical_observation")))
        turn = 0
        while active:
            prompts, truncated = zip(*(self.prompts.build(t.env.instructions, t.history, t.observation) for t in active))
            allowed = [self._allowed_for(t) for t in active] if self.settings.action_constraint else None
            started = time.perf_counter()
            completions = self.sampler.generate(list(prompts), self.settings.sampling, allowed,
                                                seed=mix_seeds(seed, turn))
            timing["generate_s"] += time.perf_counter() - started
            token_counts["prompt"] += sum(len(prompt) for prompt in prompts)
            token_counts["cached"] += sum(completion.extra.get("cached_tokens", 0) for completion in completions)
            started = time.perf_counter()
            still_active = []
            for k, (trajectory, prompt, was_truncated, completion) in enumerate(zip(active, prompts, truncated, completions)):
                reply = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                observation, reward, terminated, truncated_episode, info = trajectory.env.step(reply)
                done = bool(terminated or truncated_episode)
                valid = bool(info.get("action_is_valid", True))
                self._record(samples, trajectory, turn, float(reward), valid, was_truncated, done, prompt, completion)
                if allowed is not None:
                    samples["allowed_replies"].append(allowed[k])
                trajectory.history.append((trajectory.observation, reply))
                trajectory.observation, trajectory.anchor_id = observation, int(info["anchor_id"])
                trajectory.canonical = info.get("canonical_observation")
                trajectory.episode_return += float(reward)
                trajectory.invalid_turns += not valid
                if done:
                    self._finish(episodes, trajectory, turn + 1, bool(info.get("success", False)))
                else:
                    still_active.append(trajectory)
            timing["env_step_s"] += time.perf_counter() - started
            active = still_active
            turn += 1

    @staticmethod
    def _record(samples, trajectory: _Trajectory, turn: int, reward: float, valid: bool, truncated: bool,
                done: bool, prompt: list[int], completion) -> None:
        row = {"rewards": reward, "traj_ids": trajectory.traj_id, "step_ids": turn,
               "group_ids": trajectory.group.group_id, "tag_ids": trajectory.group.tag_id,
               "anchor_ids": trajectory.anchor_id, "action_is_valid": valid, "prompt_truncated": truncated,
               "episode_ends": done}
        for name, value in row.items():
            samples[name].append(value)
        samples["canonical_texts"].append(trajectory.canonical)
        samples["prompt_ids"].append(np.asarray(prompt, dtype=np.int64))
        samples["response_ids"].append(np.asarray(completion.token_ids, dtype=np.int64))
        samples["response_logprobs"].append(np.asarray(completion.logprobs, dtype=np.float32))

    def _finish(self, episodes, trajectory: _Trajectory, length: int, success: bool) -> None:
        episodes["return"].append(trajectory.episode_return)
        episodes["length"].append(length)
        episodes["success"].append(success)
        episodes["invalid_turns"].append(trajectory.invalid_turns)
        episodes["tag"].append(trajectory.group.tag)
        self._idle_envs[trajectory.group.tag].append(trajectory.env)
