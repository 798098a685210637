"""A text env whose observations carry a turn counter: the case where no state recurs until a canonicalizer
drops the counter (``rllib check-env`` must say so and name the fix)."""

import re

import gymnasium as gym
from gymnasium import spaces

RING = 32


class RingJumpEnv(gym.Env):
    """A ring of ``RING`` cells; action ``Jk`` jumps ``k`` cells clockwise. Observation ``"Turn t: at cell c"``
    (with ``show_turn``; else ``"at cell c"``). Reward 1 and success on reaching cell 0; truncated after
    ``max_steps`` turns. With many actions, two episodes rarely stand on the same cell at the same turn, but over
    an episode group they visit the same cells often: the counter alone hides the recurrence."""

    action_words = tuple(f"J{k}" for k in range(1, RING + 1))
    metadata = {"render_modes": []}

    def __init__(self, max_steps: int = 8, show_turn: bool = True):
        self.max_steps, self.show_turn = max_steps, show_turn
        self.observation_space = spaces.Text(max_length=64)
        self.action_space = spaces.Discrete(RING)

    def _observation(self) -> str:
        where = f"at cell {self.cell}"
        return f"Turn {self.turn}: {where}" if self.show_turn else where

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cell, self.turn = int(self.np_random.integers(1, RING)), 0
        return self._observation(), {}

    def step(self, action):
        self.cell, self.turn = (self.cell + int(action) + 1) % RING, self.turn + 1
        reached = self.cell == 0
        truncated = not reached and self.turn >= self.max_steps
        return self._observation(), float(reached), reached, truncated, {"success": reached}


def strip_turn(text: str) -> str:
    """The canonicalizer that fixes it: drop the ``Turn t:`` prefix."""
    return re.sub(r"^Turn \d+: ", "", text)


gym.register("RingJump-v0", entry_point="tests.turn_counter_env:RingJumpEnv")
