"""Text FrozenLake: random solvable maps, Gymnasium dynamics, text observations, registration."""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.frozen_lake import ACTION_WORDS, TextFrozenLakeEnv

MOVES = {"Left": (0, -1), "Down": (1, 0), "Right": (0, 1), "Up": (-1, 0)}


def parse_grid(text: str) -> list[list[str]]:
    return [line.split(" ") for line in text.split("\n")]


def shortest_path(desc: list[str]) -> list[str] | None:
    """Independent BFS over the Gymnasium ``desc`` map: the action words from S to G, or None."""
    size = len(desc)
    start = next((r, c) for r in range(size) for c in range(size) if desc[r][c] == "S")
    previous = {start: None}
    frontier = deque([start])
    while frontier:
        cell = frontier.popleft()
        if desc[cell[0]][cell[1]] == "G":
            path = []
            while previous[cell] is not None:
                cell, word = previous[cell]
                path.append(word)
            return path[::-1]
        for word, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in previous and desc[nxt[0]][nxt[1]] != "H":
                previous[nxt] = (cell, word)
                frontier.append(nxt)
    return None


def test_500_seeds_all_have_a_path_and_a_consistent_grid():
    env = TextFrozenLakeEnv()
    for seed in range(500):
        observation, info = env.reset(seed=seed)
        desc = info["map"]
        assert shortest_path(desc) is not None, seed
        grid = parse_grid(observation)
        assert len(grid) == 4 and all(len(row) == 4 for row in grid)
        assert sum(row.count("P") for row in grid) == 1 and sum(row.count("G") for row in grid) == 1
        for r, row in enumerate(desc):
            for c, cell in enumerate(row):
                expected = {"S": "P", "F": "_", "H": "O", "G": "G"}[cell]
                assert grid[r][c] == expected


def test_following_the_shortest_path_reaches_the_goal():
    env = envs.make_llm_env("FrozenLake", max_steps=20)
    for seed in range(30):
        _, info = env.reset(seed=seed)
        path = shortest_path(env.unwrapped.desc)
        for i, word in enumerate(path):
            observation, reward, terminated, truncated, info = env.step(f"<answer>{word.lower()}</answer>")
            assert info["action_is_valid"]
            assert terminated == (i == len(path) - 1) and not truncated
        assert reward == 1.0 and info["success"] is True and "√" in observation and "P" not in observation


def test_hole_ends_the_episode_with_x():
    env = TextFrozenLakeEnv(size=5, p=0.6)
    for seed in range(200):
        env.reset(seed=seed)
        grid = parse_grid(env._observation())
        r, c = next((r, c) for r, row in enumerate(grid) for c, cell in enumerate(row) if cell == "P")
        for action, (dr, dc) in enumerate(MOVES[word] for word in ACTION_WORDS):
            if 0 <= r + dr < 5 and 0 <= c + dc < 5 and grid[r + dr][c + dc] == "O":
                observation, reward, terminated, truncated, info = env.step(action)
                assert terminated and reward == 0.0 and info["success"] is False
                assert parse_grid(observation)[r + dr][c + dc] == "X"
                return
    pytest.fail("no start next to a hole in 200 seeds")


def test_truncates_after_max_steps():
    env = TextFrozenLakeEnv(size=3, p=1.0, max_steps=3)
    env.reset(seed=0)
    outcomes = [env.step(0)[2:] for _ in range(3)]  # bumping into walls or walking
    if not any(terminated for terminated, *_ in outcomes):
        assert outcomes[-1][1] is True and outcomes[-1][2] == {"success": False}
        assert not outcomes[0][1] and not outcomes[1][1]


@pytest.mark.parametrize("kwargs", [{}, {"is_slippery": True}, {"size": 6, "p": 0.7}])
def test_same_seed_same_map_and_trajectory(kwargs):
    def rollout(seed):
        env = envs.make_llm_env("FrozenLake", **kwargs)
        observation, info = env.reset(seed=seed)
        trace = [(observation, info["anchor_id"])]
        for word in ["Right", "Down", "oops", "Left", "Up", "Down", "Right", "Right"]:
            observation, reward, terminated, truncated, info = env.step(f"<answer>{word}</answer>")
            trace.append((observation, reward, terminated, truncated, info["anchor_id"]))
            if terminated or truncated:
                break
        return trace

    assert rollout(7) == rollout(7)
    assert rollout(7)[0] != rollout(8)[0]


def test_check_env_and_registration():
    check_env(TextFrozenLakeEnv(), skip_render_check=True)
    check_env(TextFrozenLakeEnv(size=7, p=0.5, is_slippery=True), skip_render_check=True)
    check_env(gym.make("TextFrozenLake-v0", size=5).unwrapped)
    env = envs.make_env_from_tag("FrozenLake", size=5)
    assert isinstance(env, TextFrozenLakeEnv) and env.size == 5 and env.action_words == ACTION_WORDS
    assert "<answer>" not in env.instructions and "√" in env.instructions
    assert "answer" in envs.make_llm_env("FrozenLake").instructions


def test_observation_is_the_bare_grid():
    env = TextFrozenLakeEnv(render_mode="ansi")
    observation, _ = env.reset(seed=3)
    assert set(observation) <= set("P_OGX√ \n") and env.render() == observation


@pytest.mark.parametrize(
    "kwargs, name",
    [({"size": 1}, "size"), ({"p": 0.0}, "p"), ({"p": 1.5}, "p"), ({"is_slippery": "yes"}, "is_slippery"),
     ({"max_steps": 0}, "max_steps"), ({"render_mode": "human"}, "render_mode")],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TextFrozenLakeEnv(**kwargs)


@pytest.mark.parametrize("tag", ["FrozenLake", "Sokoban"])
def test_compact_instructions_are_short_and_name_the_actions(tag):
    import envs

    full = envs.make_env_from_tag(tag).instructions
    compact = envs.make_env_from_tag(tag, instructions_style="compact").instructions
    assert len(compact) * 3 < len(full)
    assert all(word in compact for word in envs.make_env_from_tag(tag).action_words)
    with pytest.raises(ValueError, match="instructions_style"):
        envs.make_env_from_tag(tag, instructions_style="terse")
