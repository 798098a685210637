"""Text FrozenLake: a fresh random lake per seed, Gymnasium's own FrozenLake dynamics, a text grid observation."""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

ACTION_WORDS = ("Left", "Down", "Right", "Up")  # index = gymnasium FrozenLake action (0 left ... 3 up)
_MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0))

PLAYER, FROZEN, HOLE, GOAL, PLAYER_IN_HOLE, PLAYER_ON_GOAL = "P", "_", "O", "G", "X", "√"
OBSERVATION_CHARSET = frozenset(PLAYER + FROZEN + HOLE + GOAL + PLAYER_IN_HOLE + PLAYER_ON_GOAL + " \n")

INSTRUCTIONS = f"""You are playing FrozenLake. Walk from your position to the goal without falling into a hole.
Map legend: {PLAYER} you, {FROZEN} frozen ice (safe), {HOLE} hole (the episode ends), {GOAL} goal, \
{PLAYER_IN_HOLE} you in a hole, {PLAYER_ON_GOAL} you on the goal.
Rows go top to bottom, columns left to right. Moving off the edge of the map leaves you where you are.
Reaching the goal gives reward 1; everything else gives 0.
Actions: {", ".join(ACTION_WORDS)}."""

COMPACT_INSTRUCTIONS = (f"FrozenLake: move {PLAYER} to {GOAL}, avoid {HOLE}. Actions: {', '.join(ACTION_WORDS)}.")
"""About a fifth of the tokens of :data:`INSTRUCTIONS`: for small models and short token budgets."""
INSTRUCTION_STYLES = ("full", "compact")


def generate_lake(size: int, frozen_probability: float, rng: np.random.Generator) -> list[str]:
    """A ``size``x``size`` FrozenLake map (Gymnasium ``desc`` rows of ``S F H G``) with a start-to-goal path.

    Cells are frozen with probability ``frozen_probability``; the start and goal are two distinct random cells;
    maps without a path (4-neighbour BFS over non-hole cells) are redrawn.
    """
    while True:
        grid = np.where(rng.random((size, size)) < frozen_probability, "F", "H")
        start, goal = rng.choice(size * size, size=2, replace=False)
        grid[divmod(int(start), size)] = "S"
        grid[divmod(int(goal), size)] = "G"
        rows = ["".join(row) for row in grid]
        if lake_has_path(rows):
            return rows


def lake_has_path(desc: list[str]) -> bool:
    """Whether a 4-neighbour path over non-hole cells joins ``S`` and ``G`` in a ``desc`` map."""
    size = len(desc)
    start = next((r, c) for r, row in enumerate(desc) for c, cell in enumerate(row) if cell == "S")
    seen, frontier = {start}, deque([start])
    while frontier:
        r, c = frontier.popleft()
        if desc[r][c] == "G":
            return True
        for dr, dc in _MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < size and 0 <= nc < len(desc[nr]) and (nr, nc) not in seen and desc[nr][nc] != "H":
                seen.add((nr, nc))
                frontier.append((nr, nc))
    return False


def render_lake(desc: list[str], player: tuple[int, int]) -> str:
    """The text grid: one row per line, cells separated by a space."""
    symbols = {"S": FROZEN, "F": FROZEN, "H": HOLE, "G": GOAL}
    on_cell = {"H": PLAYER_IN_HOLE, "G": PLAYER_ON_GOAL}
    lines = []
    for r, row in enumerate(desc):
        cells = [
            on_cell.get(cell, PLAYER) if (r, c) == player else symbols[cell] for c, cell in enumerate(row)
        ]
        lines.append(" ".join(cells))
    return "\n".join(lines)


class TextFrozenLakeEnv(gym.Env):
    """
    ## Description
    FrozenLake with text observations for LLM agents. Every reset draws a new random lake from the seed: a
    ``size``x``size`` grid whose cells are frozen with probability ``p`` (holes otherwise), with a random start
    and a random goal, redrawn until a path joins them (BFS). The dynamics are Gymnasium's
    ``FrozenLakeEnv`` on that map.

    ## Action Space
    ``Discrete(4)``: 0 Left, 1 Down, 2 Right, 3 Up. ``action_words`` is ``("Left", "Down", "Right", "Up")`` in
    that order (the words an LLM answers with, see ``gigpo_rllib.wrappers.LLMActionWrapper``).

    ## Observation Space
    ``Text``: the bare grid, one row per line, cells separated by spaces, no instructions or step counter.
    Legend: ``P`` player, ``_`` frozen, ``O`` hole, ``G`` goal, ``X`` player in a hole, ``√`` player on the
    goal. Example (4x4)::

        _ _ O _
        P _ _ O
        _ O _ _
        _ _ _ G

    ``instructions`` holds the rules, the legend and the action words, separate from the observation
    (``instructions_style="compact"``: one line, for small models and short token budgets).

    ## Starting State
    The player stands on the random start cell of the seed's lake.

    ## Rewards
    1 for reaching the goal, 0 otherwise.

    ## Episode End
    Terminated when the player falls into a hole or reaches the goal; truncated after ``max_steps`` steps.
    ``info["success"]`` (goal reached) is set at the end of every episode.

    ## Arguments
    ``gymnasium.make("TextFrozenLake-v0", size=4, p=0.8, is_slippery=False, max_steps=10, instructions_style="full")``

    * ``size``: side of the square lake, >= 2.
    * ``p``: probability that a cell is frozen, in (0, 1].
    * ``is_slippery``: Gymnasium's slippery ice (the intended move succeeds with probability 1/3).
    * ``max_steps``: steps before truncation, >= 1.
    * ``instructions_style``: ``"full"`` (rules, legend, rewards) or ``"compact"`` (one line).
    * ``render_mode``: ``None`` or ``"ansi"`` (returns the observation text).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    action_words = ACTION_WORDS

    def __init__(
        self,
        size: int = 4,
        p: float = 0.8,
        is_slippery: bool = False,
        max_steps: int = 10,
        instructions_style: str = "full",
        render_mode: str | None = None,
    ):
        if instructions_style not in INSTRUCTION_STYLES:
            raise ValueError(f"instructions_style must be one of {INSTRUCTION_STYLES}, got {instructions_style!r}")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 2:
            raise ValueError(f"size must be an int >= 2, got {size!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
            raise ValueError(f"p must be a number in (0, 1], got {p!r}")
        if not isinstance(is_slippery, bool):
            raise ValueError(f"is_slippery must be True or False, got {is_slippery!r}")
        if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            allowed = [None, *self.metadata["render_modes"]]
            raise ValueError(f"render_mode must be one of {allowed}, got {render_mode!r}")
        self.size = int(size)
        self.p = float(p)
        self.is_slippery = is_slippery
        self.max_steps = int(max_steps)
        self.instructions_style = instructions_style
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(ACTION_WORDS))
        self.observation_space = spaces.Text(
            max_length=self.size * (2 * self.size), min_length=1, charset=OBSERVATION_CHARSET
        )
        self.desc: list[str] = []
        self._lake: FrozenLakeEnv | None = None
        self._steps = 0

    @property
    def instructions(self) -> str:
        return COMPACT_INSTRUCTIONS if self.instructions_style == "compact" else INSTRUCTIONS

    def _observation(self) -> str:
        return render_lake(self.desc, divmod(int(self._lake.s), self.size))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.desc = generate_lake(self.size, self.p, self.np_random)
        self._lake = FrozenLakeEnv(desc=self.desc, is_slippery=self.is_slippery)
        self._lake.reset(seed=int(self.np_random.integers(2**31)))
        self._steps = 0
        return self._observation(), {"map": list(self.desc)}

    def step(self, action: int):
        if self._lake is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in [0, {len(ACTION_WORDS)}) ({ACTION_WORDS}), got {action!r}")
        state, reward, terminated, _, _ = self._lake.step(int(action))
        self._steps += 1
        truncated = not terminated and self._steps >= self.max_steps
        info: dict[str, Any] = {}
        if terminated or truncated:
            row, col = divmod(int(state), self.size)
            info["success"] = self.desc[row][col] == "G"
        return self._observation(), float(reward), bool(terminated), truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi" and self._lake is not None:
            return self._observation()
        return None
