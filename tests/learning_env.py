"""A one-turn text env where one action word always pays: the smallest task on which a working policy-gradient
pipeline must visibly learn (the untrained tiny model picks it 1 time in 4)."""

import random
import time

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


class HalfFlatEnv(PreferredActionEnv):
    """One turn. An even seed pays nothing whatever the reply (every group on it ends alike: no signal); an odd seed
    pays the action's index / 3 (a group's tries almost always differ)."""

    def reset(self, *, seed=None, options=None):
        self._pays = seed is not None and seed % 2 == 1
        return super().reset(seed=seed, options=options)

    def step(self, action):
        reward = int(action) / 3 if self._pays else 0.0
        return "A crossroads.", reward, True, False, {"success": reward == 1.0}


gym.register("HalfFlat-v0", entry_point="tests.learning_env:HalfFlatEnv", max_episode_steps=1)


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


class FaultyCorridorEnv(CorridorEnv):
    """The corridor with faults: ``step`` raises with probability ``raise_rate``, returns a NaN reward with
    probability ``nan_rate``, and with ``hang_once_s`` the first step in each process (of the episode reset with
    ``hang_seed``, when given) sleeps that long (a hang)."""

    _hung_in_this_process = False

    def __init__(self, length: int = 4, max_steps: int = 6, raise_rate: float = 0.0, nan_rate: float = 0.0,
                 hang_once_s: float = 0.0, reset_raise_rate: float = 0.0, hang_seed: int | None = None):
        super().__init__(length=length, max_steps=max_steps)
        self.raise_rate, self.nan_rate, self.hang_once_s = raise_rate, nan_rate, hang_once_s
        self.reset_raise_rate, self.hang_seed = reset_raise_rate, hang_seed
        self._faults = random.Random()
        self._seed = None

    def reset(self, *, seed=None, options=None):
        if self._faults.random() < self.reset_raise_rate:
            raise RuntimeError("deliberate reset failure")
        self._seed = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        hang_here = self.hang_seed is None or self._seed == self.hang_seed
        if self.hang_once_s and hang_here and not FaultyCorridorEnv._hung_in_this_process:
            FaultyCorridorEnv._hung_in_this_process = True
            time.sleep(self.hang_once_s)
        if self._faults.random() < self.raise_rate:
            raise RuntimeError("deliberate step failure")
        observation, reward, terminated, truncated, info = super().step(action)
        if self._faults.random() < self.nan_rate:
            reward = float("nan")
        return observation, reward, terminated, truncated, info


gym.register("FaultyCorridor-v0", entry_point="tests.learning_env:FaultyCorridorEnv")
gym.register("FlakyCorridor-v0", entry_point="tests.learning_env:FaultyCorridorEnv", kwargs={"raise_rate": 0.2})
gym.register("HangingCorridor-v0", entry_point="tests.learning_env:FaultyCorridorEnv", kwargs={"hang_once_s": 1000.0})


class PlainTextEnv(gym.Env):
    """A Gymnasium text env written without this project in mind: no ``instructions``, no ``action_words``, no
    ``max_steps`` (its turn limit comes from the registration). Reward 1 when the reply names the room's colour."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Text(max_length=64)
        self.action_space = spaces.Text(max_length=64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.colour = ("red", "blue", "green")[int(self.np_random.integers(3))]
        return f"You are in a {self.colour} room.", {}

    def step(self, action):
        reward = float(self.colour in str(action).lower())
        return f"You said: {action}", reward, reward > 0, False, {"success": reward > 0}


class BoxObservationEnv(gym.Env):
    """Not a text env: its observations are vectors."""

    metadata = {"render_modes": []}
    observation_space = spaces.Box(0.0, 1.0, (3,))
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, True, False, {}


gym.register("PlainText-v0", entry_point="tests.learning_env:PlainTextEnv", max_episode_steps=3)
gym.register("PlainTextNoLimit-v0", entry_point="tests.learning_env:PlainTextEnv")
gym.register("BoxObservation-v0", entry_point="tests.learning_env:BoxObservationEnv", max_episode_steps=3)
