"""TextArena adapter: verified games offline, opponents, isolation of randomness, clear resource errors."""

from __future__ import annotations

import os

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.textarena import VERIFIED_GAMES, MissingResourceError, TextArenaEnv

FIRST_MOVES = {
    "2048-v0": "[up]", "ConnectFour-v0": "[3]", "FifteenPuzzle-v0": "[left]", "GuessTheNumber-v0": "[10]",
    "Mastermind-v0": "[1 2 3 4]", "Minesweeper-v0": "[3 3]", "PegJump-v0": "[4 1]", "Sudoku-v0": "[1 1 1]",
    "TicTacToe-v0": "[4]", "TowerOfHanoi-v0": "[A C]",
}
HANOI_SOLUTION = ["[A C]", "[A B]", "[C B]", "[A C]", "[B A]", "[B C]", "[A C]"]


def test_every_verified_game_has_a_first_move():
    assert set(FIRST_MOVES) == set(VERIFIED_GAMES)


@pytest.mark.parametrize("game", VERIFIED_GAMES)
def test_verified_games_run_offline_and_replay_per_seed(game):
    def rollout(seed):
        env = envs.make_llm_env(game)
        observation, info = env.reset(seed=seed)
        trace = [(observation, info["anchor_id"])]
        for reply in (f"<answer>{FIRST_MOVES[game]}</answer>", "no tags", f"<answer>{FIRST_MOVES[game]}</answer>"):
            observation, reward, terminated, truncated, info = env.step(reply)
            trace.append((observation, reward, terminated, truncated, info["anchor_id"], info["action_is_valid"]))
            if terminated or truncated:
                break
        return trace, env

    trace, env = rollout(3)
    assert rollout(3)[0] == trace
    assert trace[1][-1] is True and trace[2][-1] is False and trace[2][0] == trace[1][0]
    instructions = env.get_wrapper_attr("instructions")
    assert "<answer>" in instructions and instructions.split("\n")[0] not in trace[0][0]
    assert env.get_wrapper_attr("action_words") is None


@pytest.mark.parametrize("game", ["TowerOfHanoi-v0", "Mastermind-v0", "TicTacToe-v0", "ConnectFour-v0"])
def test_check_env(game):
    check_env(TextArenaEnv(game), skip_render_check=True)
    check_env(gym.make("TextArena-v0", game=game).unwrapped)


def test_solving_tower_of_hanoi_gives_reward_one_and_success():
    env = envs.make_env_from_tag("TowerOfHanoi")
    observation, _ = env.reset(seed=0)
    assert observation.startswith("Current Board") and "[3, 2, 1]" in observation
    for i, move in enumerate(HANOI_SOLUTION):
        observation, reward, terminated, truncated, info = env.step(move)
        assert terminated == (i == len(HANOI_SOLUTION) - 1)
    assert reward == 1.0 and info["success"] is True and "C: [3, 2, 1]" in observation


def test_transcript_games_show_moves_and_feedback_but_not_the_prompt():
    env = TextArenaEnv("GuessTheNumber")
    observation, _ = env.reset(seed=0)
    assert observation == ""
    observation, *_ = env.step("[10]")
    assert observation.startswith("> [10]\n") and "GuessTheNumber" not in observation
    assert "number" in env.instructions.lower()


def test_truncation_after_max_steps():
    env = TextArenaEnv("Mastermind-v0", max_steps=2)
    env.reset(seed=0)
    assert env.step("[1 2 3 4]")[3] is False
    *_, terminated, truncated, info = env.step("[2 3 4 5]")
    assert truncated and not terminated and info["success"] is False


def test_envs_stepped_side_by_side_stay_reproducible():
    moves = ["[up]", "[left]", "[down]", "[right]"] * 3

    def solo():
        env = TextArenaEnv("2048-v0")
        return [env.reset(seed=5)[0]] + [env.step(move)[0] for move in moves]

    first, second, other = TextArenaEnv("2048-v0"), TextArenaEnv("2048-v0"), TextArenaEnv("2048-v0")
    traces = [[first.reset(seed=5)[0]], [second.reset(seed=5)[0]]]
    other.reset(seed=6)
    for move in moves:
        traces[0].append(first.step(move)[0])
        other.step(move)
        traces[1].append(second.step(move)[0])
    assert traces[0] == traces[1] == solo()


def _tic_tac_toe_cells(env: TextArenaEnv) -> list[str]:
    return [cell for row in env._game.state.game_state["board"] for cell in row]


def test_scripted_opponent_blocks_an_immediate_win():
    lines = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]
    for seed in range(10):
        env = TextArenaEnv("TicTacToe", opponent="scripted")
        env.reset(seed=seed)
        env.step("[4]")
        cells = _tic_tac_toe_cells(env)
        mine = cells[4]
        line = next(line for line in lines if 4 in line and all(cells[i] in ("", mine) for i in line))
        threat, gap = [i for i in line if i != 4]
        env.step(f"[{threat}]")
        assert _tic_tac_toe_cells(env)[gap] not in ("", mine), seed


def test_two_player_outcome_rewards_and_learner_second():
    env = TextArenaEnv("TicTacToe", opponent="random", learner_player=1)
    observation, _ = env.reset(seed=0)
    assert sum(cell != "" for cell in _tic_tac_toe_cells(env)) == 1  # the opponent already moved
    for _ in range(9):
        empty = [i for i, cell in enumerate(_tic_tac_toe_cells(env)) if cell == ""]
        observation, reward, terminated, truncated, info = env.step(f"[{empty[0]}]")
        if terminated:
            break
    assert terminated and reward in (-1.0, 0.0, 1.0) and info["success"] == (reward == 1.0)


def test_unknown_and_unsupported_games_fail_clearly():
    with pytest.raises(ValueError, match="not registered"):
        TextArenaEnv("NoSuchGame-v0")
    with pytest.raises(ValueError, match="two-player"):
        TextArenaEnv("Nim-v0")
    with pytest.raises(ValueError, match="opponent"):
        TextArenaEnv("TicTacToe", opponent="minimax")
    with pytest.raises(ValueError, match="known tags"):
        envs.make_env_from_tag("Wordle")


def test_missing_nltk_corpus_is_named():
    try:
        TextArenaEnv("Wordle-v0")
    except MissingResourceError as error:
        assert "nltk" in str(error) and "words" in str(error)
    else:
        pytest.skip("the nltk 'words' corpus is installed here")


@pytest.mark.skipif(bool(os.environ.get("OPENROUTER_API_KEY")), reason="an OpenRouter key is set")
def test_missing_api_key_is_named():
    with pytest.raises(MissingResourceError, match="API key"):
        TextArenaEnv("Debate-v0")


def test_tags_map_to_the_textarena_id():
    for name in ("TowerOfHanoi", "TowerOfHanoi-v0", "Sudoku", "ConnectFour-v0"):
        env_id, kwargs = envs.TAGS[name]
        assert env_id == "TextArena-v0" and kwargs["game"].startswith(name.split("-v0")[0])
    env = envs.make_env_from_tag("Sudoku", max_steps=7)
    assert isinstance(env, TextArenaEnv) and env.game_id == "Sudoku-v0" and env.max_steps == 7
