"""Text environments for LLM agents; importing this package registers their Gymnasium ids.

Registered ids (keyword arguments are the env class's arguments):

* ``"TextFrozenLake-v0"``: :class:`envs.frozen_lake.TextFrozenLakeEnv` (``size=4, p=0.8, is_slippery=False,
  max_steps=10``).
* ``"TextSokoban-v0"``: :class:`envs.sokoban.TextSokobanEnv` (``dim_room=(6, 6), num_boxes=1, max_steps=10``).
* ``"TextArena-v0"``: :class:`envs.textarena.TextArenaEnv`, one id for all textarena games, chosen with the
  ``game=`` keyword (``gymnasium.make("TextArena-v0", game="Sudoku-v0")``); ``opponent="random"|"scripted"``
  for two-player games. ``envs.textarena.VERIFIED_GAMES`` lists the games tested offline.

Training-config tags (``TAGS``): ``"FrozenLake"``, ``"Sokoban"`` and every verified textarena game by name or id
(``"TowerOfHanoi"`` or ``"TowerOfHanoi-v0"``). :func:`make_env_from_tag` builds the bare text env of a tag;
:func:`make_llm_env` builds what an LLM rollout steps: ``AnchorStateWrapper(LLMActionWrapper(base_env))``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.textarena import VERIFIED_GAMES
from gigpo_rllib.anchors import Canonicalizer
from gigpo_rllib.wrappers import AnchorStateWrapper, LLMActionWrapper

FROZEN_LAKE_ID = "TextFrozenLake-v0"
SOKOBAN_ID = "TextSokoban-v0"
TEXTARENA_ID = "TextArena-v0"

_ENTRY_POINTS = {
    FROZEN_LAKE_ID: "envs.frozen_lake:TextFrozenLakeEnv",
    SOKOBAN_ID: "envs.sokoban:TextSokobanEnv",
    TEXTARENA_ID: "envs.textarena:TextArenaEnv",
}
for _env_id, _entry_point in _ENTRY_POINTS.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=_entry_point)

TAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "FrozenLake": (FROZEN_LAKE_ID, {}),
    "Sokoban": (SOKOBAN_ID, {}),
    **{game.split("-v0")[0]: (TEXTARENA_ID, {"game": game}) for game in VERIFIED_GAMES},
    **{game: (TEXTARENA_ID, {"game": game}) for game in VERIFIED_GAMES},
}
"""Config tag -> (registered Gymnasium id, keyword arguments the tag fixes)."""


def _make_base(env_id: str, kwargs: dict[str, Any]) -> gym.Env:
    # The bare env, not gymnasium.make's checker/order wrappers, so attributes such as ``instructions`` and
    # ``action_words`` are read directly; gymnasium.make still applies the registered spec and sets ``spec``.
    return _make_with_limit(env_id, kwargs)[0]


def _make_with_limit(env_id: str, kwargs: dict[str, Any]) -> tuple[gym.Env, int | None]:
    """The bare env and the ``max_episode_steps`` it was registered with (its TimeLimit is not kept)."""
    made = gym.make(env_id, disable_env_checker=True, **kwargs)
    return made.unwrapped, made.spec.max_episode_steps if made.spec else None


def make_env_from_tag(tag: str, **kwargs: Any) -> gym.Env:
    """The bare text env of a config tag (see ``TAGS``); ``kwargs`` override the env's arguments."""
    if tag not in TAGS:
        raise ValueError(f"unknown env tag {tag!r}; known tags: {sorted(TAGS)}")
    env_id, tag_kwargs = TAGS[tag]
    return _make_base(env_id, {**tag_kwargs, **kwargs})


def make_llm_env(
    tag_or_id: str,
    *,
    invalid_action_penalty: float = -0.1,
    require_think: bool = False,
    canonicalize: Canonicalizer | None = None,
    anchor_bits: int = 64,
    include_canonical_text: bool = False,
    instructions: str | None = None,
    **env_kwargs: Any,
) -> gym.Env:
    """``AnchorStateWrapper(LLMActionWrapper(base_env))`` for a config tag, a registered Gymnasium id, or
    ``"module:EnvId"`` (the module is imported first, which registers the id).

    ``step`` takes the model's raw reply; ``info`` carries ``anchor_id`` and ``action_is_valid``; the prompt text
    is ``env.get_wrapper_attr("instructions")`` (``instructions`` when given, else the env's own, else a generic
    text; it ends with the answer format).
    """
    registered_limit = None
    if tag_or_id in TAGS:
        base = make_env_from_tag(tag_or_id, **env_kwargs)
    elif tag_or_id in gym.registry or ":" in tag_or_id:
        # "my_package.my_module:MyEnv-v0": gymnasium imports the module first, so its registration also runs in
        # Ray worker processes that never imported it.
        base, registered_limit = _make_with_limit(tag_or_id, env_kwargs)
    else:
        raise ValueError(f"unknown env tag or id {tag_or_id!r}; known tags: {sorted(TAGS)}; for your own env pass "
                         "a registered Gymnasium id, or 'module:EnvId' so that worker processes can import it")
    # A user env registered with max_episode_steps keeps that budget (the LLM wrapper enforces it).
    max_steps = getattr(base, "max_steps", None) or registered_limit
    llm_env = LLMActionWrapper(base, invalid_action_penalty=invalid_action_penalty, require_think=require_think,
                               max_steps=max_steps, instructions=instructions)
    return AnchorStateWrapper(llm_env, canonicalize=canonicalize, bits=anchor_bits,
                              include_canonical_text=include_canonical_text)


__all__ = ["FROZEN_LAKE_ID", "SOKOBAN_ID", "TEXTARENA_ID", "TAGS", "make_env_from_tag", "make_llm_env"]
