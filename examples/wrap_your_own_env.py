"""Make your own text environment GiGPO-ready, and (with --train) train on it with GiGPO.

    python3 examples/wrap_your_own_env.py                 # wrap the env, play two scripted episodes, print anchors
    python3 examples/wrap_your_own_env.py --train [--iters 3]

What it shows:

1. A small text env written here (`LineWalkEnv`: walk along a line of cells to a goal). A base text env is a
   `gymnasium.Env` with a `spaces.Text` observation space plus `action_words` (answer word -> action index)
   and `instructions` (the prompt), optionally `max_steps`.
2. `LLMActionWrapper` turns a model reply (`<answer>Right</answer>`) into an action; malformed replies cost
   `invalid_action_penalty` and leave the state unchanged. `AnchorStateWrapper` adds `info["anchor_id"]`: equal
   states give equal ids, in any trajectory, which is what GiGPO's step-level groups are built from. A
   `canonicalize` function drops volatile text (here a turn counter) so it does not split anchor groups.
3. `--train`: this module registers the env with Gymnasium when imported, and the config names it as
   `"examples.wrap_your_own_env:LineWalk-v0"`: each remote env runner imports the module (which registers the
   id) before making the env, so sampling runs in a separate actor. The turn counter is shown during training
   too, and `anchor_canonicalizer` points the runners at the same `strip_turn_counter` function.

Time on a 2-core CPU: the wrapping demo takes about 2 s; --train about 15 s to build plus a few seconds per
iteration with the tiny offline model.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from gigpo_rllib.wrappers import AnchorStateWrapper, LLMActionWrapper  # noqa: E402

ENV_ID = "LineWalk-v0"


class LineWalkEnv(gym.Env):
    """A line of ``length`` cells; the player ``P`` walks Left/Right to the goal ``G``.

    Observation: the line as text, e.g. ``"_ P _ _ G _"`` (with ``show_turn``, prefixed by ``"Turn 3: "``, a
    volatile part that a canonicalize function should strip). Reward 1 on reaching the goal (terminated),
    else 0; truncated after ``max_steps`` moves. ``info["success"]`` is set at the end of an episode.
    """

    metadata = {"render_modes": []}
    action_words = ("Left", "Right")

    def __init__(self, length: int = 6, max_steps: int = 6, show_turn: bool = False):
        self.length, self.max_steps, self.show_turn = length, max_steps, show_turn
        self.observation_space = spaces.Text(max_length=256, charset="PG_ :Turn0123456789")
        self.action_space = spaces.Discrete(2)
        self._player = self._goal = self._turn = 0

    @property
    def instructions(self) -> str:
        return (f"You walk on a line of {self.length} cells. P is you, G is the goal, _ is an empty cell. "
                "Reach the goal. Actions: Left, Right.")

    def _observation(self) -> str:
        cells = ["P" if i == self._player else "G" if i == self._goal else "_" for i in range(self.length)]
        line = " ".join(cells)
        return f"Turn {self._turn}: {line}" if self.show_turn else line

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._player, self._goal = (int(x) for x in self.np_random.choice(self.length, size=2, replace=False))
        self._turn = 0
        return self._observation(), {}

    def step(self, action):
        self._player = int(np.clip(self._player + (1 if action == 1 else -1), 0, self.length - 1))
        self._turn += 1
        terminated = self._player == self._goal
        truncated = not terminated and self._turn >= self.max_steps
        info = {"success": terminated} if terminated or truncated else {}
        return self._observation(), float(terminated), terminated, truncated, info


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=LineWalkEnv)
# "module:id": worker processes import the module, which runs the registration above.
TRAINING_ENV_ID = f"examples.wrap_your_own_env:{ENV_ID}"


def strip_turn_counter(text: str) -> str:
    return re.sub(r"^Turn \d+: ", "", text)


def demo() -> None:
    env = AnchorStateWrapper(LLMActionWrapper(LineWalkEnv(show_turn=True), invalid_action_penalty=-0.1),
                             canonicalize=strip_turn_counter)
    print("instructions (the prompt's system message):\n  " + env.instructions.replace("\n", "\n  "))
    # Two episodes from the same seed (one GiGPO group): the second wastes a turn on a malformed reply and
    # walks back and forth, so it revisits states; equal states share an anchor id despite the turn counter.
    scripts = {
        "trajectory A": ["<answer>Left</answer>", "<answer>Right</answer>", "<answer>Right</answer>"],
        "trajectory B": ["<answer>leftish</answer>", "<answer>Right</answer>", "<answer>Left</answer>",
                         "<answer>Left</answer>"],
    }
    seen: dict[int, list[str]] = {}
    for name, replies in scripts.items():
        observation, info = env.reset(seed=3)
        print(f"\n{name}: reset {'':20} -> {observation!r:32} anchor {info['anchor_id']:>21}")
        seen.setdefault(info["anchor_id"], []).append(f"{name} t=0")
        for turn, reply in enumerate(replies, start=1):
            observation, reward, terminated, truncated, info = env.step(reply)
            valid = info["action_is_valid"]
            print(f"  {reply:26} -> {observation!r:32} anchor {info['anchor_id']:>21} reward {reward:+.1f}"
                  f"{'' if valid else '  (invalid: ' + info['parse_error'] + ')'}")
            seen.setdefault(info["anchor_id"], []).append(f"{name} t={turn}")
            if terminated or truncated:
                break
    print("\nanchor groups (t = the turn whose step acts from this state; GiGPO compares those steps):")
    for anchor, members in seen.items():
        print(f"  {anchor:>21}: {', '.join(members)}")


def train(iterations: int) -> None:
    import ray

    import envs  # noqa: F401  (the bundled envs; make_llm_env lives there)
    from gigpo_rllib import GiGPOConfig
    from gigpo_rllib.cli import progress_line

    envs.make_llm_env(TRAINING_ENV_ID, max_steps=4)  # the full LLM stack builds from the Gymnasium id
    config = (
        GiGPOConfig()
        .environment(TRAINING_ENV_ID, env_config={"length": 5, "max_steps": 4, "show_turn": True})
        .training(train_env_manager={"num_env_groups": 4, "group_size": 4, "max_env_num_per_worker": 16},
                  rollout_batch_size=16, action_constraint=True, max_new_tokens=16, sequence_length=512,
                  reward_normalization={"method": "mean_std"}, lr=1e-3, minibatch_size=16,
                  anchor_canonicalizer="examples.wrap_your_own_env:strip_turn_counter")
        .env_runners(num_env_runners=1)  # a separate sampling actor: it registers the env by importing us
    )
    ray.init(include_dashboard=False)
    try:
        algo = config.build_algo()
        for _ in range(iterations):
            print(progress_line(algo.train()), flush=True)
        algo.stop()
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="also train GiGPO on the env")
    parser.add_argument("--iters", type=int, default=3, help="training iterations with --train (default 3)")
    args = parser.parse_args()
    demo()
    if args.train:
        print(f"\ntraining GiGPO on {ENV_ID} for {args.iters} iteration(s)")
        train(args.iters)


if __name__ == "__main__":
    main()
