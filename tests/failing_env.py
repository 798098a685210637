"""A FrozenLake that fails on demand, to test what training does when a rollout fails.

``FailingLake.resets_left = n`` lets the next ``n`` resets succeed, then every reset raises. Used in-process
(``num_env_runners: 0``), so the test and the env runner share this module.
"""

import gymnasium as gym

from envs.frozen_lake import TextFrozenLakeEnv

ENV_ID = "tests.failing_env:FailingLake-v0"


class FailingLake(TextFrozenLakeEnv):
    resets_left: int | None = None

    def reset(self, *, seed=None, options=None):
        if FailingLake.resets_left is not None:
            FailingLake.resets_left -= 1
            if FailingLake.resets_left < 0:
                raise RuntimeError("the lake froze over")
        return super().reset(seed=seed, options=options)


if "FailingLake-v0" not in gym.registry:
    gym.register("FailingLake-v0", entry_point="tests.failing_env:FailingLake")
