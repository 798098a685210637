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


gym.register("PreferredAction-v0", entry_point="tests.learning_env:PreferredActionEnv")
