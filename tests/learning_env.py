"""A one-turn text env where one action word always pays: the smallest task on which a working policy-gradient
pipeline must visibly learn (the untrained tiny model picks it 1 time in 4)."""

import gymnasium as gym
from gymnasium import spaces


class PreferredActionEnv(gym.Env):
    """Observation: a fixed text. Actions: Left / Down / Right / Up. Reward 1 and success for Up, else 0.
    The episode ends after one turn."""

    action_words = ("Left", "Down", "Right", "Up")
    instructions = "Choose a direction. Reply with one of Left, Down, Right, Up inside <answer>...</answer>."
    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Text(max_length=64)
        self.action_space = spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "A crossroads.", {}

    def step(self, action):
        reward = float(action == 3)
        return "A crossroads.", reward, True, False, {"success": reward > 0}


gym.register("PreferredAction-v0", entry_point="tests.learning_env:PreferredActionEnv", max_episode_steps=1)


class CorridorEnv(gym.Env):
    """A corridor ``P _ _ G``: Right moves towards the goal, Left away, Up and Down waste the turn. Reward 1 on
    reaching the goal (success, episode ends); ``max_steps`` turns otherwise. The right move never depends on
    the state, so the tiny model can learn it, but credit must go to the *steps* that moved right: the task
    where GiGPO's anchor-state step advantages should beat episode-only (GRPO) credit."""

    action_words = ("Left", "Down", "Right", "Up")
    instructions = "Walk to G. Reply with one of Left, Down, Right, Up inside <answer>...</answer>."
    metadata = {"render_modes": []}

    def __init__(self, length: int = 4, max_steps: int = 6):
        self.length, self.max_steps = length, max_steps
        self.observation_space = spaces.Text(max_length=2 * length, charset="P_G√ ")
        self.action_space = spaces.Discrete(4)

    def _observation(self) -> str:
        cells = ["_"] * self.length
        cells[-1] = "√" if self.position == self.length - 1 else "G"
        if self.position < self.length - 1:
            cells[self.position] = "P"
        return " ".join(cells)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position, self.turns = 0, 0
        return self._observation(), {}

    def step(self, action):
        self.turns += 1
        self.position = min(max(self.position + {0: -1, 2: 1}.get(int(action), 0), 0), self.length - 1)
        reached = self.position == self.length - 1
        truncated = not reached and self.turns >= self.max_steps
        return self._observation(), float(reached), reached, truncated, {"success": reached}


gym.register("Corridor-v0", entry_point="tests.learning_env:CorridorEnv")


class OddSeedFailingEnv(PreferredActionEnv):
    """Raises on reset with an odd seed: makes one env runner fail while the others work."""

    def __init__(self, max_steps: int = 1):
        super().__init__()
        self.max_steps = max_steps

    def reset(self, *, seed=None, options=None):
        if seed is not None and seed % 2:
            raise RuntimeError(f"deliberate failure for seed {seed}")
        return super().reset(seed=seed, options=options)


gym.register("OddSeedFailing-v0", entry_point="tests.learning_env:OddSeedFailingEnv")
