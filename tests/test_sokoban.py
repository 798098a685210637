"""Text Sokoban: every generated room solvable (independent BFS on the text), rewards, determinism, speed."""

from __future__ import annotations

import random
from collections import deque

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.sokoban import ACTION_WORDS, Room, TextSokobanEnv, generate_room

DIRECTIONS = {"Up": (-1, 0), "Down": (1, 0), "Left": (0, -1), "Right": (0, 1)}


def parse_room(text: str):
    """(walls, targets, boxes, player) as sets of (row, col), read from the observation text only."""
    walls, targets, boxes, player = set(), set(), set(), None
    for r, line in enumerate(text.split("\n")):
        for c, symbol in enumerate(line.split(" ")):
            if symbol == "#":
                walls.add((r, c))
            if symbol in "O√S":
                targets.add((r, c))
            if symbol in "X√":
                boxes.add((r, c))
            if symbol in "PS":
                player = (r, c)
    return walls, targets, frozenset(boxes), player


def solve(text: str) -> list[str] | None:
    """Independent breadth-first Sokoban solver: the shortest list of action words, or None."""
    walls, targets, boxes, player = parse_room(text)
    start = (player, boxes)
    previous = {start: None}
    frontier = deque([start])
    while frontier:
        state = frontier.popleft()
        position, boxes_now = state
        if boxes_now <= targets:
            plan = []
            while previous[state] is not None:
                state, word = previous[state]
                plan.append(word)
            return plan[::-1]
        for word, (dr, dc) in DIRECTIONS.items():
            step = (position[0] + dr, position[1] + dc)
            if step in walls:
                continue
            moved = boxes_now
            if step in boxes_now:
                beyond = (step[0] + dr, step[1] + dc)
                if beyond in walls or beyond in boxes_now:
                    continue
                moved = (boxes_now - {step}) | {beyond}
            nxt = (step, moved)
            if nxt not in previous:
                previous[nxt] = (state, word)
                frontier.append(nxt)
    return None


def test_500_seeds_all_rooms_solvable_and_not_solved_at_start():
    env = TextSokobanEnv()
    for seed in range(500):
        observation, _ = env.reset(seed=seed)
        walls, targets, boxes, player = parse_room(observation)
        assert len(boxes) == 1 and len(targets) == 1 and player is not None and not boxes <= targets
        assert all((r, c) in walls for r in range(6) for c in range(6) if r in (0, 5) or c in (0, 5))
        assert solve(observation), seed


def test_two_box_rooms_are_solvable():
    env = TextSokobanEnv(dim_room=(7, 7), num_boxes=2)
    for seed in range(40):
        observation, _ = env.reset(seed=seed)
        assert len(parse_room(observation)[2]) == 2
        assert solve(observation) is not None, seed


def test_playing_the_solution_earns_the_documented_rewards():
    env = envs.make_llm_env("Sokoban", max_steps=50)
    for seed in range(30):
        observation, _ = env.reset(seed=seed)
        plan = solve(observation)
        for i, word in enumerate(plan):
            observation, reward, terminated, truncated, info = env.step(f"<answer>{word}</answer>")
            if i < len(plan) - 1:
                assert not terminated and reward in (pytest.approx(-0.1), pytest.approx(0.9), pytest.approx(-1.1))
        assert terminated and not truncated and info["success"] is True
        assert reward == pytest.approx(-0.1 + 1 + 10)
        assert "X" not in observation and "√" in observation


def test_pushing_a_box_off_its_target_costs_one():
    # Hand-built position: the player pushes the box from the target to the right.
    env = TextSokobanEnv(dim_room=(5, 6), num_boxes=1)
    env.reset(seed=0)
    width = 6
    floor = frozenset(2 * width + c for c in range(1, 5))
    env.room = Room(5, width, floor, frozenset({2 * width + 2}), frozenset({2 * width + 2}), 2 * width + 1)
    env._boxes, env._player = {2 * width + 2}, 2 * width + 1
    _, reward, terminated, _, _ = env.step(ACTION_WORDS.index("Right"))
    assert reward == pytest.approx(-1.1) and not terminated
    _, reward, *_ = env.step(ACTION_WORDS.index("Right"))  # box against the wall: nothing moves
    assert reward == pytest.approx(-0.1)


def test_truncates_after_max_steps_and_walls_block():
    env = TextSokobanEnv(max_steps=3)
    observation, _ = env.reset(seed=1)
    walls = parse_room(observation)[0]
    results = [env.step(ACTION_WORDS.index("Up")) for _ in range(3)]
    if not any(r[2] for r in results):
        assert results[-1][3] is True and results[-1][4] == {"success": False}
        assert all(not r[3] for r in results[:2])
    assert parse_room(results[-1][0])[3] not in walls


def test_same_seed_same_room_and_trajectory():
    def rollout(seed):
        env = envs.make_llm_env("Sokoban")
        observation, info = env.reset(seed=seed)
        trace = [(observation, info["anchor_id"])]
        for word in ["Up", "Left", "bad", "Down", "Right", "Right", "Up", "Down", "Left", "Left"]:
            observation, reward, terminated, truncated, info = env.step(f"<answer>{word}</answer>")
            trace.append((observation, reward, terminated, truncated, info["anchor_id"]))
            if terminated or truncated:
                break
        return trace

    assert rollout(11) == rollout(11)
    rooms = {TextSokobanEnv().reset(seed=seed)[0] for seed in range(50)}
    assert len(rooms) > 40
    assert generate_room(rng=random.Random(5)) == generate_room(rng=random.Random(5))


def test_check_env_and_registration():
    check_env(TextSokobanEnv(), skip_render_check=True)
    check_env(TextSokobanEnv(dim_room=(8, 7), num_boxes=2, max_steps=30), skip_render_check=True)
    check_env(gym.make("TextSokoban-v0", dim_room=(7, 7)).unwrapped)
    env = envs.make_env_from_tag("Sokoban", num_boxes=2)
    assert isinstance(env, TextSokobanEnv) and env.num_boxes == 2 and env.action_words == ACTION_WORDS
    observation, _ = env.reset(seed=0)
    assert set(observation) <= set("#_OX√PS \n") and "Sokoban" not in observation
    assert "√" in env.instructions and "Up" in env.instructions


@pytest.mark.parametrize(
    "kwargs, name",
    [({"dim_room": (3, 6)}, "dim_room"), ({"dim_room": 6}, "dim_room"), ({"num_boxes": 0}, "num_boxes"),
     ({"num_boxes": 20}, "num_boxes"), ({"max_steps": -1}, "max_steps"), ({"render_mode": "rgb"}, "render_mode")],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TextSokobanEnv(**kwargs)
