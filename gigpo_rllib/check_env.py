"""Will GiGPO help this env? A model-free check of a text env before training (``rllib check-env``).

:func:`check_env` plays episode groups of an env with a random (or scripted) policy over its allowed actions,
through the same pieces as training: the env is built by :func:`~gigpo_rllib.rollout.make_env_factory`
(``AnchorStateWrapper(LLMActionWrapper(base_env))`` with the config's anchor keys), the episodes are played by
:class:`~gigpo_rllib.rollout.StepCollector` (``group_size`` envs per group, all reset with the group's seed, prompts
built as training builds them), and the anchor groups are those of
:func:`~gigpo_rllib.advantages.compute_gigpo_advantages`. So the anchor figures are the ones training would log
as ``anchor_mean_group_size`` and ``anchor_singleton_fraction`` for the same episodes. No model runs: the
"sampler" is the policy, replying ``<answer>WORD</answer>``; only the model's tokenizer is loaded, to count prompt
tokens. Nothing here uses RLlib, and the check starts no Ray.

The verdict rests on the steps after the first turn: the first turn of every episode of a group starts from the
group's one reset state, so its anchor is always shared and says nothing about recurrence (docs/design.md
"Checking an env before training").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import string
import types
from typing import Any, Sequence

import numpy as np
import torch

from gigpo_rllib.advantages import anchor_group_stats, compute_gigpo_advantages
from gigpo_rllib.anchors import anchor_ids
from gigpo_rllib.models import TINY_MODEL_NAME
from gigpo_rllib import rollout as rollout_module
from gigpo_rllib.rollout import GroupSpec, RolloutSettings, StepCollector, load_function, make_env_factory
from gigpo_rllib.sampling.base import Completion, Sampler, SamplingParams

POLICIES = ("random", "first")
"""``random``: a uniformly random allowed action per turn; ``first``: always the first one (a scripted policy:
with a deterministic env every episode of a group is the same, so every anchor is shared)."""

RECURRENCE_THRESHOLD = 0.2
"""Below this share of steps after the first turn in a shared anchor, the step baseline hardly ever applies and
GiGPO's advantage is (almost) GRPO's."""

DEFAULT_HISTORY_LENGTH = 2
"""``history_length``'s default in ``GIGPO_KEYS`` (a test keeps them equal; the config module needs RLlib)."""
DEFAULT_GROUP_SIZE = 8
"""``train_env_manager.group_size``'s default in ``GIGPO_KEYS``."""
DEFAULT_GROUPS = 8
"""Episode groups played when no number of episodes is given."""
DEFAULT_INVALID_ACTION_PENALTY = -0.1
"""``invalid_action_penalty``'s default in ``GIGPO_KEYS``."""
DEFAULT_SEQUENCE_LENGTH = 1024
"""``sequence_length``'s default in ``GIGPO_KEYS``."""
DEFAULT_MAX_NEW_TOKENS = 32
"""``max_new_tokens``'s default in ``GIGPO_KEYS``."""
ANSWER_FORMATS = ("answer", "think_answer")
"""``answer_format``'s choices in ``GIGPO_KEYS``."""

_FREE_TEXT_CHARS = string.ascii_lowercase + string.digits
_NUMBERS = re.compile(r"\d+")
_MAX_ENVS_AT_ONCE = 256
_NO_PROMPT_LIMIT = 1 << 30  # prompts are measured, never cut


class EnvCheckError(ValueError):
    """The env cannot be checked (or trained): unknown, not a text env, no turn limit, or it raised. The message
    is one line naming the env and what is wrong."""


@dataclasses.dataclass(frozen=True)
class TurnAnchors:
    """Anchor sharing of the step samples at one turn index (or a range of them)."""

    first_turn: int
    last_turn: int
    steps: int
    shared_fraction: float
    """Share of these steps whose anchor group holds another step (their step advantage is not 0)."""
    mean_group_size: float
    """Mean size of the anchor groups these steps belong to, weighted by step."""


@dataclasses.dataclass(frozen=True, eq=False)
class EnvCheckReport:
    """What :func:`check_env` found; ``str(report)`` (or :meth:`text`) is what ``rllib check-env`` prints."""

    env: str
    env_config: dict[str, Any]
    policy: str
    episodes: int
    group_size: int
    seeds: tuple[int, ...]
    observation_space: str
    action_space: str
    action_words: tuple[str, ...] | None
    policy_actions: tuple[str, ...] | None
    """What the policy chose from: the env's action words, the ``actions`` given, or None (random text)."""
    max_steps: int
    episode_lengths: np.ndarray
    episode_returns: np.ndarray
    success_rate: float
    invalid_turn_fraction: float
    trajectories_lost: int
    first_fault: str | None
    model: str
    history_length: int
    first_prompt_tokens: np.ndarray
    """Prompt tokens of each episode's first turn (instructions + first observation)."""
    max_prompt_tokens: int
    """The longest prompt of any turn, with ``history_length`` earlier turns shown."""
    anchor_num_groups: int
    anchor_mean_group_size: float
    """Mean step samples per anchor group: training's ``anchor_mean_group_size``."""
    anchor_singleton_fraction: float
    """Share of anchor groups that hold one step: training's ``anchor_singleton_fraction``."""
    shared_step_fraction: float
    """Share of all steps in an anchor group with another step: where GiGPO's step baseline applies."""
    shared_step_fraction_after_first_turn: float | None
    """The same over the steps after each episode's first turn; None when every episode lasted one turn."""
    shared_after_first_turn_without_numbers: float | None
    """:attr:`shared_step_fraction_after_first_turn` were every number in the observations ignored: how much a
    counter or clock in the text may be hiding (real state in numbers is ignored too)."""
    by_turn: tuple[TurnAnchors, ...]
    anchor_canonicalizer: str | None
    anchor_similarity_threshold: float | None
    rollout: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    """What :meth:`StepCollector.collect` returned (step columns; ``episodes`` with each episode's transcript)."""

    @property
    def states_recur(self) -> bool:
        """Whether enough later steps share an anchor for GiGPO's step baseline to matter."""
        fraction = self.shared_step_fraction_after_first_turn
        return fraction is not None and fraction >= RECURRENCE_THRESHOLD

    @property
    def verdict(self) -> str:
        if self.shared_step_fraction_after_first_turn is None:
            return ("episodes last one turn: every step acts from the group's reset state, so GiGPO's step baseline "
                    "is the episode baseline and GiGPO reduces to GRPO here")
        applies = (f"GiGPO's step baseline applies to {self.shared_step_fraction:.0%} of steps "
                   f"({self.shared_step_fraction_after_first_turn:.0%} after the first turn)")
        if self.states_recur:
            return f"states recur: {applies}"
        numbers = self.shared_after_first_turn_without_numbers
        hint = (f"; numbers in the observations split anchors (with every number ignored, {numbers:.0%} of later "
                "steps would share one: is one a turn counter or a clock?)" if numbers >= RECURRENCE_THRESHOLD else "")
        return (f"states rarely recur: {applies}; GiGPO reduces to GRPO here{hint}; consider `anchor_canonicalizer` "
                "(a function that drops volatile text such as turn counters before hashing) or "
                "`anchor_similarity_threshold` (near-duplicate states share an anchor)")

    def text(self) -> str:
        return "\n".join(_report_lines(self))

    def __str__(self) -> str:
        return self.text()


class PolicySampler(Sampler):
    """A model-free :class:`Sampler`: each reply is ``<answer>ACTION</answer>`` with ACTION drawn from ``actions``
    (uniformly, or always the first), or a random short word when ``actions`` is None (free-text envs)."""

    def __init__(self, tokenizer: Any, actions: Sequence[str] | None, policy: str):
        self.tokenizer = tokenizer
        self.actions = tuple(actions) if actions else None
        self.policy = policy

    def _reply(self, rng: random.Random) -> str:
        if self.actions is None:
            return "".join(rng.choices(_FREE_TEXT_CHARS, k=rng.randint(1, 6)))
        return self.actions[0] if self.policy == "first" else rng.choice(self.actions)

    def generate(self, prompt_ids, params: SamplingParams, allowed_responses=None, seed: int | None = None
                 ) -> list[Completion]:
        rng = random.Random(seed)
        completions = []
        for _ in prompt_ids:
            ids = self.tokenizer(f"<answer>{self._reply(rng)}</answer>", add_special_tokens=False)["input_ids"]
            ids = [*ids, self.tokenizer.eos_token_id]
            completions.append(Completion(ids, [0.0] * len(ids), "stop"))
        return completions

    def load_weights(self, state_dict) -> None:
        raise NotImplementedError("the check-env policy has no weights")


def check_env(env: str, env_config: dict[str, Any] | None = None, *, episodes: int | None = None,
              group_size: int = DEFAULT_GROUP_SIZE, policy: str = "random", actions: Sequence[str] | None = None,
              model: str = TINY_MODEL_NAME, seed: int = 0, history_length: int = DEFAULT_HISTORY_LENGTH,
              anchor_canonicalizer: str | None = None, anchor_similarity_threshold: float | None = None,
              system_prompt: str | None = None, answer_format: str = "answer",
              invalid_action_penalty: float = DEFAULT_INVALID_ACTION_PENALTY) -> EnvCheckReport:
    """Play ``episodes`` episodes of ``env`` in groups of ``group_size`` (group ``g`` reset with seed ``seed + g``)
    with a model-free policy and report what GiGPO training would meet (see the module docstring).

    Args:
        env: an env tag (``FrozenLake``, ``Sokoban``, a TextArena game), a registered Gymnasium id, or
            ``"module:EnvId"``, as the config's ``env``.
        env_config: the env's keyword arguments, as the config's ``env_config``.
        episodes: episodes in all; a multiple of ``group_size``, at least one group (default
            :data:`DEFAULT_GROUPS` groups).
        group_size: episodes per group (training's ``train_env_manager.group_size``).
        policy: ``random`` or ``first`` (see :data:`POLICIES`).
        actions: what the policy answers in an env without ``action_words`` (free text), e.g. TicTacToe's
            ``["[0]", ..., "[8]"]``; without them it answers random short words. Refused for envs with action words.
        model: whose tokenizer counts the prompt tokens (the config's ``model_name_or_path``).
        seed: the first group's env seed.
        history_length, anchor_canonicalizer, anchor_similarity_threshold, system_prompt, answer_format,
            invalid_action_penalty: the config keys of the same names.

    Raises:
        EnvCheckError: one line naming the env and what is wrong (unknown env, not text, no turn limit, its
            constructor or ``reset`` raised, every trajectory lost) or the bad argument.
    """
    env_config = dict(env_config or {})
    if episodes is None and isinstance(group_size, int):
        episodes = DEFAULT_GROUPS * group_size
    _check_arguments(episodes, group_size, policy, anchor_similarity_threshold, history_length)
    if answer_format not in ANSWER_FORMATS:
        raise EnvCheckError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    settings = types.SimpleNamespace(
        env_config=env_config, invalid_action_penalty=invalid_action_penalty, answer_format=answer_format,
        anchor_canonicalizer=anchor_canonicalizer, anchor_similarity_threshold=anchor_similarity_threshold,
        system_prompt=system_prompt)
    try:
        make_env = make_env_factory(settings)
    except ValueError as error:
        raise EnvCheckError(str(error)) from error
    probe = _made(make_env, env, env_config)
    try:
        shape = _probe(probe, env, seed)
    finally:
        probe.close()
    action_words = shape["action_words"]
    if actions is not None:
        if action_words:
            raise EnvCheckError(f"env {env!r} declares its action words {action_words}; `actions` is only for "
                                "free-text envs")
        if not actions or not all(isinstance(action, str) and action.strip() for action in actions):
            raise EnvCheckError(f"actions must be a non-empty list of non-empty strings, got {actions!r}")
    policy_actions = tuple(action_words or actions or ()) or None
    if policy == "first" and policy_actions is None:
        raise EnvCheckError(f"env {env!r} takes free text and declares no action words: the `first` policy needs "
                            "`actions` to take the first of")

    tokenizer = _tokenizer(model)
    collector = StepCollector(
        PolicySampler(tokenizer, policy_actions, policy), make_env,
        RolloutSettings(sampling=SamplingParams(max_new_tokens=1 << 16), sequence_length=_NO_PROMPT_LIMIT,
                        history_length=history_length, max_envs=max(group_size, min(episodes, _MAX_ENVS_AT_ONCE)),
                        action_constraint=False, anchor_similarity=anchor_similarity_threshold))
    num_groups = episodes // group_size
    groups = [GroupSpec(group_id=g, tag=env, tag_id=0, seed=seed + g) for g in range(num_groups)]
    try:
        with _rollout_warnings_silenced():
            rollout = collector.collect(groups, group_size, sample_seed=seed, transcripts=True)
    except ValueError as error:  # e.g. an env made later in the rollout without a turn limit
        raise EnvCheckError(f"env {env!r}: {error}") from error
    lost = sum(rollout["lost"].values())
    if len(rollout["rewards"]) == 0:
        raise EnvCheckError(f"env {env!r}: every trajectory was lost; first fault: "
                            f"{_first_line(rollout['first_fault'])}")
    return _report(env, env_config, policy, group_size, groups, shape, policy_actions, rollout, lost, model,
                   history_length, anchor_canonicalizer, anchor_similarity_threshold)


@contextlib.contextmanager
def _rollout_warnings_silenced():
    """The collector logs each lost trajectory's traceback; the report carries the count and the first fault in
    one line instead."""
    rollout_logger = logging.getLogger(rollout_module.__name__)
    level = rollout_logger.level
    rollout_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        rollout_logger.setLevel(level)


def _check_arguments(episodes: int, group_size: int, policy: str, threshold: float | None,
                     history_length: int) -> None:
    if policy not in POLICIES:
        raise EnvCheckError(f"policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise EnvCheckError(f"group_size must be an integer >= 2 (a group of one has no baseline), got {group_size!r}")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < group_size \
            or episodes % group_size:
        raise EnvCheckError(f"episodes must be a positive multiple of group_size={group_size}, got {episodes!r}")
    if threshold is not None and not 0 < threshold <= 1:
        raise EnvCheckError(f"anchor_similarity_threshold must be in (0, 1] or None, got {threshold!r}")
    if isinstance(history_length, bool) or not isinstance(history_length, int) or history_length < 0:
        raise EnvCheckError(f"history_length must be an integer >= 0, got {history_length!r}")


def _first_line(text: str | None) -> str:
    return (text or "unknown").strip().splitlines()[0]


def _made(make_env, env: str, env_config: dict[str, Any]):
    try:
        return make_env(env)
    except Exception as error:  # noqa: BLE001 - whatever the env's constructor raises is reported as one line
        with_config = f" with env_config {env_config}" if env_config else ""
        raise EnvCheckError(f"env {env!r} cannot be made{with_config}: {type(error).__name__}: "
                            f"{_first_line(str(error))}") from error


def _probe(env, name: str, seed: int) -> dict[str, Any]:
    """The env's spaces, action words and turn limit; one ``reset``, so that an env that cannot even start is
    refused before any rollout."""
    max_steps = env.get_wrapper_attr("max_steps")
    if max_steps is None:
        raise EnvCheckError(f"env {name!r} has no turn limit, so no episode is sure to end: give it a max_steps "
                            "attribute (or env_config max_steps), or register it with max_episode_steps")
    try:
        env.reset(seed=seed)
    except Exception as error:  # noqa: BLE001
        raise EnvCheckError(f"env {name!r}: reset(seed={seed}) raised {type(error).__name__}: "
                            f"{_first_line(str(error))}") from error
    base = env.unwrapped
    return {"observation_space": _one_line(repr(getattr(base, "observation_space", None))),
            "action_space": _one_line(repr(getattr(base, "action_space", None))),
            "action_words": env.get_wrapper_attr("action_words"), "max_steps": int(max_steps)}


def _one_line(text: str, width: int = 100) -> str:
    """A space's repr on one line, cut to ``width`` characters (a Text space lists its whole charset)."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else f"{text[:width - 5]} ...)"


def _tokenizer(model: str):
    from gigpo_rllib.models import load_tokenizer

    try:
        return load_tokenizer(model)
    except ValueError as error:
        raise EnvCheckError(_first_line(str(error))) from error


def _report(env, env_config, policy, group_size, groups, shape, policy_actions, rollout, lost, model,
            history_length, canonicalizer, threshold) -> EnvCheckReport:
    anchor_groups, group_size_of_step = _anchor_groups(rollout, rollout["anchor_ids"])
    stats = anchor_group_stats(anchor_groups)
    step_ids = rollout["step_ids"]
    later = step_ids > 0
    group_size_without_numbers = _anchor_groups(rollout, _anchor_ids_without_numbers(rollout, canonicalizer))[1]
    episodes = rollout["episodes"]
    prompt_lengths = np.array([len(ids) for ids in rollout["prompt_ids"]])
    return EnvCheckReport(
        env=env, env_config=env_config, policy=policy, episodes=len(episodes["return"]), group_size=group_size,
        seeds=tuple(group.seed for group in groups), observation_space=shape["observation_space"],
        action_space=shape["action_space"], action_words=shape["action_words"], policy_actions=policy_actions,
        max_steps=shape["max_steps"], episode_lengths=episodes["length"],
        episode_returns=episodes["return"].astype(float), success_rate=float(np.mean(episodes["success"])),
        invalid_turn_fraction=float(1 - np.mean(rollout["action_is_valid"])), trajectories_lost=lost,
        first_fault=_first_line(rollout["first_fault"]) if lost else None, model=model, history_length=history_length,
        first_prompt_tokens=prompt_lengths[step_ids == 0], max_prompt_tokens=int(prompt_lengths.max()),
        anchor_num_groups=stats.num_groups, anchor_mean_group_size=stats.mean_group_size,
        anchor_singleton_fraction=stats.singleton_fraction,
        shared_step_fraction=float(np.mean(group_size_of_step > 1)),
        shared_step_fraction_after_first_turn=float(np.mean(group_size_of_step[later] > 1)) if later.any() else None,
        shared_after_first_turn_without_numbers=(float(np.mean(group_size_without_numbers[later] > 1))
                                                 if later.any() else None),
        by_turn=_by_turn(step_ids, group_size_of_step), anchor_canonicalizer=canonicalizer,
        anchor_similarity_threshold=threshold, rollout=rollout)


def _anchor_groups(rollout: dict[str, Any], anchors: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Training's anchor groups of the rollout's steps (episode group x anchor id, Eq. 6) under ``anchors``, and the
    size of each step's group."""
    columns = {name: torch.as_tensor(rollout[name]) for name in ("traj_ids", "step_ids", "group_ids")}
    groups = compute_gigpo_advantages(torch.as_tensor(rollout["rewards"], dtype=torch.float32),
                                      anchor_ids=torch.as_tensor(anchors), **columns).anchor_group_ids
    return groups, torch.bincount(groups)[groups].numpy()


def _anchor_ids_without_numbers(rollout: dict[str, Any], canonicalizer: str | None) -> np.ndarray:
    """The anchor id of each step's observation with every number replaced by ``#`` (after the configured
    canonicalizer). The samples of the rollout follow its episodes in order, less the groups that were dropped."""
    user_function = load_function(canonicalizer) if canonicalizer else None
    kept = set(rollout["group_ids"].tolist())
    episodes = rollout["episodes"]
    observations = [turn["observation"] for group, transcript in zip(episodes["group_id"], episodes["transcript"])
                    if group in kept for turn in transcript]
    return anchor_ids(observations, lambda text: _NUMBERS.sub("#", user_function(text) if user_function else text))


def _by_turn(step_ids: np.ndarray, group_size_of_step: np.ndarray, rows: int = 10) -> tuple[TurnAnchors, ...]:
    """Anchor sharing per turn index; long episodes are shown in about ``rows`` equal ranges of turns."""
    last = int(step_ids.max())
    width = -(-(last + 1) // rows)
    table = []
    for first in range(0, last + 1, width):
        at = (step_ids >= first) & (step_ids < first + width)
        if at.any():
            sizes = group_size_of_step[at]
            table.append(TurnAnchors(first, min(first + width, last + 1) - 1, int(at.sum()), float(np.mean(sizes > 1)),
                                     float(np.mean(sizes))))
    return tuple(table)


def _distribution(values: np.ndarray, digits: int) -> str:
    return (f"mean {np.mean(values):.{digits}f}, std {np.std(values):.{digits}f}, min {np.min(values):g}, "
            f"median {np.median(values):g}, max {np.max(values):g}")


def _report_lines(report: EnvCheckReport) -> list[str]:
    seeds = report.seeds
    lines = [f"check-env {report.env}" + (f" env_config={report.env_config}" if report.env_config else ""),
             f"  {report.episodes} episodes of the {report.policy} policy in {len(seeds)} groups of {report.group_size} "
             f"(group g reset with seed {seeds[0]} + g: one seed per group, as in training)"]
    if report.anchor_canonicalizer or report.anchor_similarity_threshold is not None:
        lines.append(f"  anchor_canonicalizer={report.anchor_canonicalizer} "
                     f"anchor_similarity_threshold={report.anchor_similarity_threshold}")
    if report.action_words:
        replies = f"action words {', '.join(report.action_words)}"
    else:
        replies = "free text (no action_words; the answer text is the move)"
    if report.action_words:
        policy_note = ""
    elif report.policy_actions:
        policy_note = f"; the policy answers one of {', '.join(report.policy_actions)}"
    else:
        policy_note = "; the policy answers random short words (pass `actions` to choose among real moves)"
    lines += ["", "spaces",
              f"  observation  {report.observation_space}",
              f"  action       {report.action_space}",
              f"  replies      {replies}{policy_note}",
              f"  turn limit   {report.max_steps}",
              "  can train    yes: text observations, a turn limit, "
              + ("action words (action_constraint works)" if report.action_words else
                 "free-text replies (action_constraint does not apply)"),
              "", "episodes",
              f"  length       {_distribution(report.episode_lengths, 1)}",
              f"  return       {_distribution(report.episode_returns, 3)}",
              f"  success      {report.success_rate:.1%} of episodes ({report.policy} policy)",
              f"  invalid      {report.invalid_turn_fraction:.1%} of turns"]
    if report.trajectories_lost:
        lines.append(f"  lost         {report.trajectories_lost} trajectories; first fault: {report.first_fault}")
    first = report.first_prompt_tokens
    lines += ["", f"prompt tokens ({report.model}'s tokenizer, history_length {report.history_length})",
              f"  first turn   mean {np.mean(first):.0f}, max {np.max(first)}",
              f"  any turn     max {report.max_prompt_tokens}: with max_new_tokens {DEFAULT_MAX_NEW_TOKENS}, "
              f"sequence_length >= {report.max_prompt_tokens + DEFAULT_MAX_NEW_TOKENS} keeps every prompt whole "
              f"(default {DEFAULT_SEQUENCE_LENGTH})",
              "", f"anchors (episode groups of {report.group_size}, as training groups them)",
              f"  step samples per anchor group   mean {report.anchor_mean_group_size:.2f} "
              f"over {report.anchor_num_groups} anchor groups",
              f"  singleton anchors               {report.anchor_singleton_fraction:.1%} of anchor groups",
              "  turn     steps  in a shared anchor  mean anchor group size"]
    for row in report.by_turn:
        turns = str(row.first_turn) if row.first_turn == row.last_turn else f"{row.first_turn}-{row.last_turn}"
        lines.append(f"  {turns:<7}{row.steps:>6}  {row.shared_fraction:>18.1%}  {row.mean_group_size:>22.2f}")
    lines += ["", f"verdict: {report.verdict}"]
    if report.policy_actions is None:
        lines.append("  (the policy's random words are rarely real moves, so the env may only have rejected them: "
                     "pass `actions` for figures that mean something)")
    return lines


__all__ = ["EnvCheckError", "EnvCheckReport", "POLICIES", "PolicySampler", "RECURRENCE_THRESHOLD", "TurnAnchors",
           "check_env"]
