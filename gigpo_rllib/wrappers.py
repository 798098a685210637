"""Gymnasium wrappers that make a text environment GiGPO-ready.

* :class:`AnchorStateWrapper` puts ``info["anchor_id"]`` (the hashed canonical observation, see
  :mod:`gigpo_rllib.anchors`) on every ``reset`` and ``step``, so steps that start from the same state can be
  grouped (paper Sec. 3.2, Eq. 6).
* :class:`LLMActionWrapper` lets an LLM drive the env: ``step`` takes the model's raw reply, parses the action
  out of ``<answer>...</answer>`` with :func:`parse_answer`, and turns a malformed reply into a penalised turn
  that leaves the env state unchanged.

The usual stack is ``AnchorStateWrapper(LLMActionWrapper(base_env))``; ``envs.make_llm_env`` builds it.

A *base text env* is any ``gymnasium.Env`` whose observation is text. It may also declare ``action_words`` (a
tuple of words whose index is the env's action; without it, or ``None``, the answer text itself is the action),
``instructions`` (the prompt's task text: rules, legend; without it a generic text is used) and ``max_steps``
(the turn budget that invalid replies count against). None of them is required.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Sequence, SupportsFloat

import gymnasium as gym
from gymnasium import spaces

from gigpo_rllib.anchors import Canonicalizer, canonicalize as canonical_text, hash_canonical, SUPPORTED_BITS

REPLY_CHARSET = frozenset(string.printable)
"""Characters :class:`LLMActionWrapper`'s action space samples from; ``step`` accepts any ``str``."""
MAX_REPLY_LENGTH = 65_536
"""Nominal ``max_length`` of the reply space (a sampling bound only: longer replies are still parsed)."""

_ASCII_NOCASE = re.IGNORECASE | re.ASCII  # "<ANSWER>" matches, "<anſwer>" (long s) does not
_ANSWER_OPEN = re.compile(r"<answer>", _ASCII_NOCASE)
_ANSWER_CLOSE = re.compile(r"</answer>", _ASCII_NOCASE)
_THINK_OPEN = re.compile(r"<think>", _ASCII_NOCASE)
_THINK_CLOSE = re.compile(r"</think>", _ASCII_NOCASE)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", _ASCII_NOCASE | re.DOTALL)
_THINK_THEN_ANSWER = re.compile(
    r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*", _ASCII_NOCASE | re.DOTALL
)


GENERIC_INSTRUCTIONS = ("You act in a text environment. Each message shows what you observe now; reply with your "
                        "next action.")
"""The task text of an env that declares no ``instructions``."""


def answer_format(require_think: bool = False, example: str = "Up") -> str:
    """The reply format the parser accepts, as a line for the prompt."""
    if require_think:
        return (
            "Think step by step inside <think>...</think>, then give exactly one action inside "
            f"<answer>...</answer>, e.g. <think>...</think><answer>{example}</answer>. Nothing may follow the answer."
        )
    return f"Give exactly one action inside <answer>...</answer>, e.g. <answer>{example}</answer>."


@dataclass(frozen=True)
class ParsedReply:
    """Result of :func:`parse_answer`.

    Attributes:
        action: the canonical action word (spelled as in ``action_words``) or, for free-form envs, the stripped
            answer text; ``None`` when the reply is invalid.
        action_index: index of ``action`` in ``action_words``; ``None`` for free-form envs or invalid replies.
        error: why the reply is invalid; ``None`` when it is valid.
    """

    action: str | None
    action_index: int | None = None
    error: str | None = None

    @property
    def is_valid(self) -> bool:
        return self.error is None


def _invalid(error: str) -> ParsedReply:
    return ParsedReply(action=None, action_index=None, error=error)


def parse_answer(reply: Any, action_words: Sequence[str] | None, require_think: bool = False) -> ParsedReply:
    """Parse an LLM reply into an env action. Never raises.

    A reply is valid when it holds exactly one ``<answer>...</answer>`` block (tags case-insensitive) whose
    content, trimmed, equals one of ``action_words`` ignoring case. There is no substring matching:
    ``<answer>upright</answer>`` is invalid. With ``action_words=None`` (free-form envs) any non-empty answer is
    valid and is returned trimmed. With ``require_think`` the whole reply must be
    ``<think>...</think><answer>...</answer>`` (whitespace allowed around the blocks), each tag exactly once.
    """
    if not isinstance(reply, str):
        return _invalid(f"the reply must be a str, got {type(reply).__name__}")
    answer_opens, answer_closes = len(_ANSWER_OPEN.findall(reply)), len(_ANSWER_CLOSE.findall(reply))
    if answer_opens != 1 or answer_closes != 1:
        return _invalid(
            f"the reply must contain exactly one <answer>...</answer> block, found {answer_opens} opening and "
            f"{answer_closes} closing tags"
        )
    if require_think:
        think_opens, think_closes = len(_THINK_OPEN.findall(reply)), len(_THINK_CLOSE.findall(reply))
        match = _THINK_THEN_ANSWER.fullmatch(reply) if think_opens == 1 and think_closes == 1 else None
        if match is None:
            return _invalid("the reply must be <think>...</think><answer>...</answer>, each tag exactly once")
    else:
        match = _ANSWER_BLOCK.search(reply)
        if match is None:
            return _invalid("</answer> comes before <answer>")
    answer = match.group(1).strip()
    if action_words is None:
        return ParsedReply(action=answer) if answer else _invalid("the answer is empty")
    wanted = answer.casefold()
    for index, word in enumerate(action_words):
        if word.casefold() == wanted:
            return ParsedReply(action=word, action_index=index)
    return _invalid(f"{answer[:80]!r} is not one of the actions {tuple(action_words)}")


class ActionStepError(RuntimeError):
    """The wrapped env raised while stepping a reply that parsed as a valid action (its own error is the
    ``__cause__``), as opposed to an error of the env that has nothing to do with the reply."""

    def __init__(self, action: str, error: BaseException):
        super().__init__(f"{type(error).__name__} on the valid action {action!r}: {error}")
        self.action = action


class LLMActionWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Take the LLM's raw reply as the action; step the wrapped env with the parsed action.

    Valid reply: the wrapped env steps with the action's index in ``action_words`` (or with the answer text for
    free-form envs, ``action_words=None``); ``info["action_is_valid"] = True`` and ``info["action"]`` is the parsed
    action.

    Valid reply on which the wrapped env raises: :class:`ActionStepError`, from the env's error.

    Invalid reply: the wrapped env is not touched. The step returns the current observation again, reward
    ``invalid_action_penalty``, ``terminated=False``, and ``info["action_is_valid"] = False`` with
    ``info["parse_error"]``. It still uses one turn: once ``max_steps`` turns (valid or not) are used the episode
    is truncated, the same budget as for valid moves.

    Prompt answer format (:attr:`instructions` ends with it): ``<answer>Up</answer>``; with ``require_think``,
    ``<think>...</think><answer>Up</answer>``.

    Args:
        env: a base text env (see the module docstring: ``action_words``, ``instructions`` and ``max_steps`` are
            optional).
        invalid_action_penalty: reward of an invalid reply (usually <= 0).
        require_think: demand a ``<think>...</think>`` block before the answer.
        max_steps: the turn budget; default the env's ``max_steps`` attribute (None: no budget of its own).
        instructions: the task text of the prompt, replacing the env's own ``instructions`` (the answer format is
            still appended: the parser needs it followed).
    """

    def __init__(self, env: gym.Env, invalid_action_penalty: float = -0.1, require_think: bool = False,
                 max_steps: int | None = None, instructions: str | None = None):
        gym.utils.RecordConstructorArgs.__init__(
            self, invalid_action_penalty=invalid_action_penalty, require_think=require_think, max_steps=max_steps,
            instructions=instructions,
        )
        gym.Wrapper.__init__(self, env)
        if not isinstance(invalid_action_penalty, (int, float)) or isinstance(invalid_action_penalty, bool):
            raise ValueError(f"invalid_action_penalty must be a number, got {invalid_action_penalty!r}")
        if not isinstance(require_think, bool):
            raise ValueError(f"require_think must be True or False, got {require_think!r}")
        if instructions is not None and (not isinstance(instructions, str) or not instructions.strip()):
            raise ValueError(f"instructions must be a non-empty str or None, got {instructions!r}")
        self._instructions_override = instructions
        self.invalid_action_penalty = float(invalid_action_penalty)
        self.require_think = require_think
        self.action_words: tuple[str, ...] | None = _optional_attr(env, "action_words")
        self.max_steps: int | None = max_steps if max_steps is not None else _optional_attr(env, "max_steps")
        self.action_space = spaces.Text(MAX_REPLY_LENGTH, min_length=0, charset=REPLY_CHARSET)
        self._turns_used = 0
        self._last_observation: Any = None

    @property
    def instructions(self) -> str:
        """:attr:`task_instructions` followed by the answer format this wrapper parses."""
        example = self.action_words[0] if self.action_words else "your action"
        return f"{self.task_instructions}\n{answer_format(self.require_think, example)}"

    @property
    def task_instructions(self) -> str:
        """The task text alone: the override, else the wrapped env's ``instructions``, else
        :data:`GENERIC_INSTRUCTIONS` (a sampler constrained to the allowed replies needs no answer format)."""
        return self._instructions_override or _optional_attr(self.env, "instructions") or GENERIC_INSTRUCTIONS

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        self._turns_used = 0
        self._last_observation = observation
        return observation, info

    def step(self, action: Any):
        parsed = parse_answer(action, self.action_words, self.require_think)
        self._turns_used += 1
        budget_used = self.max_steps is not None and self._turns_used >= self.max_steps
        if not parsed.is_valid:
            info: dict[str, Any] = {"action_is_valid": False, "parse_error": parsed.error}
            if budget_used:
                info["success"] = False
            return self._last_observation, self.invalid_action_penalty, False, budget_used, info
        env_action = parsed.action if self.action_words is None else parsed.action_index
        try:
            observation, reward, terminated, truncated, info = self.env.step(env_action)
        except Exception as error:
            raise ActionStepError(parsed.action, error) from error
        self._last_observation = observation
        info = {**info, "action_is_valid": True, "action": parsed.action}
        truncated = bool(truncated or (budget_used and not terminated))
        if truncated and "success" not in info:
            info["success"] = False
        return observation, reward, terminated, truncated, info


def _optional_attr(env: gym.Env, name: str) -> Any:
    try:
        return env.get_wrapper_attr(name)
    except AttributeError:
        return None


class AnchorStateWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Add ``info["anchor_id"]``, the id of the observed state, on every ``reset`` and ``step``.

    The id is ``hash_canonical(canonicalize(observation, canonicalize), bits)``: it depends on the observation
    text only (never on the prompt, the history or the info), so equal states in different trajectories share
    it. ``bits=64`` gives a signed int64-valued int, ``bits=128`` a non-negative Python int.

    Args:
        env: any env whose observation is text: a ``gymnasium.spaces.Text`` observation space, or no declared
            space and ``str`` observations. Any other space raises ``TypeError``.
        canonicalize: optional function that removes volatile parts of the text (turn counters, timestamps)
            before whitespace folding; see :func:`gigpo_rllib.anchors.canonicalize`.
        bits: 64 or 128.
        include_canonical_text: also put the canonical text in ``info["canonical_observation"]``.
    """

    def __init__(
        self,
        env: gym.Env,
        canonicalize: Canonicalizer | None = None,
        bits: int = 64,
        include_canonical_text: bool = False,
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self, canonicalize=canonicalize, bits=bits, include_canonical_text=include_canonical_text
        )
        gym.Wrapper.__init__(self, env)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if canonicalize is not None and not callable(canonicalize):
            raise ValueError(f"canonicalize must be a callable str -> str or None, got {canonicalize!r}")
        space = getattr(env, "observation_space", None)
        if space is not None and not isinstance(space, spaces.Text):
            raise TypeError(
                f"AnchorStateWrapper needs a text observation (gymnasium.spaces.Text), but the env's "
                f"observation space is {space!r}"
            )
        self.canonicalize = canonicalize
        self.bits = bits
        self.include_canonical_text = include_canonical_text

    @property
    def instructions(self) -> str:
        """The wrapped env's ``instructions`` (``AttributeError`` if it has none)."""
        return self.env.get_wrapper_attr("instructions")

    @property
    def task_instructions(self) -> str:
        """The wrapped env's ``task_instructions`` (``AttributeError`` if it has none)."""
        return self.env.get_wrapper_attr("task_instructions")

    @property
    def action_words(self) -> tuple[str, ...] | None:
        """The wrapped env's ``action_words`` (``AttributeError`` if it has none)."""
        return self.env.get_wrapper_attr("action_words")

    def _with_anchor(self, observation: Any, info: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(observation, str):
            raise TypeError(
                f"AnchorStateWrapper needs str observations, got {type(observation).__name__} "
                f"(observation space {getattr(self.env, 'observation_space', None)!r})"
            )
        canonical = canonical_text(observation, self.canonicalize)
        info = {**info, "anchor_id": hash_canonical(canonical, self.bits)}
        if self.include_canonical_text:
            info["canonical_observation"] = canonical
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        return observation, self._with_anchor(observation, info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward, terminated, truncated, self._with_anchor(observation, info)
