"""A Gymnasium adapter over the ``textarena`` game collection.

Single-player games run as they are; two-player games run against a built-in opponent. The observation is the
game's text for the learning player without the game's prompt (that goes to ``instructions``): the latest
board for games that draw one, the transcript of the game's messages otherwise.

``VERIFIED_GAMES`` lists the games this adapter is tested with, offline, on Python 3.11 and textarena 0.7.4.
Other single-player games may work. Games that need an nltk corpus, an API key, data files or the network
raise :class:`MissingResourceError` at construction, naming the missing resource.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import string
from typing import Any, Callable, Iterator

import gymnasium as gym
from gymnasium import spaces

BOARD, TRANSCRIPT = "board", "transcript"

SINGLE_PLAYER_GAMES = {
    "2048": BOARD,
    "FifteenPuzzle": BOARD,
    "GuessTheNumber": TRANSCRIPT,
    "Mastermind": TRANSCRIPT,
    "Minesweeper": BOARD,
    "PegJump": BOARD,
    "Sudoku": BOARD,
    "TowerOfHanoi": BOARD,
}
"""Verified single-player games -> how the observation is taken from the game's messages."""


def _tic_tac_toe_moves(game: Any) -> list[str]:
    board = game.state.game_state["board"]
    return [f"[{row * 3 + col}]" for row in range(3) for col in range(3) if board[row][col] == ""]


def _connect_four_moves(game: Any) -> list[str]:
    top_row = game.state.game_state["board"][0]
    return [f"[{col}]" for col, cell in enumerate(top_row) if cell == "."]


TWO_PLAYER_GAMES: dict[str, Callable[[Any], list[str]]] = {
    "ConnectFour": _connect_four_moves,
    "TicTacToe": _tic_tac_toe_moves,
}
"""Verified two-player games (all drawn as boards) -> their legal moves, for the built-in opponent."""

VERIFIED_GAMES = tuple(sorted(f"{name}-v0" for name in (*SINGLE_PLAYER_GAMES, *TWO_PLAYER_GAMES)))
OPPONENTS = ("random", "scripted")

OBSERVATION_CHARSET = frozenset(
    string.printable
    + "".join(chr(code) for code in range(0xA0, 0x180))  # Latin-1 supplement, Latin extended-A
    + "".join(chr(code) for code in range(0x2000, 0x2800))  # punctuation, arrows, math, box drawing, shapes
    + "\ufffd"
)
"""Characters of the observation space; any other character of a game's text is replaced by U+FFFD."""
MAX_OBSERVATION_LENGTH = 16_384
"""Longer observations (long transcripts) keep their last ``MAX_OBSERVATION_LENGTH`` characters."""


class MissingResourceError(RuntimeError):
    """A textarena game needs something this machine does not have (nltk corpus, API key, data file, network)."""


def normalize_game_id(game: str) -> str:
    """``"TowerOfHanoi"`` -> ``"TowerOfHanoi-v0"``; ids that already carry ``-v0`` (and a variant) stay."""
    if not isinstance(game, str) or not game:
        raise ValueError(f"game must be a textarena game name such as 'TowerOfHanoi-v0', got {game!r}")
    return game if "-v" in game else f"{game}-v0"


def _base_name(game_id: str) -> str:
    return game_id.split("-v", 1)[0]


def _make_game(game_id: str) -> Any:
    """``textarena.make`` of the unwrapped ("-raw") game, with missing resources turned into clear errors."""
    import textarena
    from textarena.envs.registration import ENV_REGISTRY

    if game_id not in ENV_REGISTRY:
        raise ValueError(f"game must be a textarena game id; {game_id!r} is not registered. Verified: {VERIFIED_GAMES}")
    raw_id = f"{game_id}-raw" if f"{game_id}-raw" in ENV_REGISTRY else game_id
    try:
        return textarena.make(raw_id)
    except LookupError as error:  # nltk raises LookupError for a corpus it cannot find or download
        corpus = re.search(r"Resource\W+(\w+)", str(error))
        name = corpus.group(1) if corpus else "unknown"
        raise MissingResourceError(
            f"textarena game {game_id!r} needs the nltk corpus {name!r}, which is not installed and could not be "
            f"downloaded; install it with `python -m nltk.downloader {name}`"
        ) from error
    except FileNotFoundError as error:
        raise MissingResourceError(f"textarena game {game_id!r} needs a data file that is missing: {error}") from error
    except OSError as error:
        raise MissingResourceError(f"textarena game {game_id!r} needs network access: {error}") from error
    except ValueError as error:
        if "API key" in str(error) or "API_KEY" in str(error):
            raise MissingResourceError(f"textarena game {game_id!r} needs an API key: {error}") from error
        raise


def _sanitize(text: str) -> str:
    text = "".join(char if char in OBSERVATION_CHARSET else "\ufffd" for char in text)
    return text[-MAX_OBSERVATION_LENGTH:]


class TextArenaEnv(gym.Env):
    """
    ## Description
    One textarena game as a Gymnasium env for LLM agents. Single-player games are played as they are. In
    two-player games the learning player faces a built-in opponent that plays a uniformly random legal move
    (``opponent="random"``) or a one-ply scripted policy (``opponent="scripted"``: win at once if it can,
    otherwise avoid moves that let the learner win at once, otherwise random).

    Every env keeps its own random stream (textarena games use Python's global ``random``; the adapter swaps
    in the env's own state around each game call), so envs stepped side by side stay reproducible per seed.

    ## Action Space
    ``Text``: the move as the game expects it (e.g. ``"[A C]"`` in TowerOfHanoi); ``action_words`` is ``None``
    (free-form): ``LLMActionWrapper`` passes the text inside ``<answer>...</answer>`` to the game. A move the
    game rejects is handled by the game's own rules (usually one retry, then a loss).

    ## Observation Space
    ``Text``: the game's text for the learning player, without the game's prompt. For games that draw a board,
    the latest board; for the others (GuessTheNumber, Mastermind) the transcript of moves and the game's
    replies since the reset. The game's prompt (rules and move format) is ``instructions``.
    ``info["game_messages"]`` holds the game's messages of the step (e.g. why a move was rejected).

    ## Starting State
    The game's own reset for the seed; in two-player games where the learner moves second, the opponent's
    first move has been played.

    ## Rewards
    The learner's outcome reward from the game when it ends (two-player: 1 win, 0 draw, -1 loss;
    single-player: the game's score, 1 for solved), 0 on every other step.

    ## Episode End
    Terminated when the game is over; truncated after ``max_steps`` moves. ``info["success"]`` (reward >= 1)
    is set at the end of every episode.

    ## Arguments
    ``gymnasium.make("TextArena-v0", game="TowerOfHanoi-v0", opponent="random", learner_player=0, max_steps=50)``

    * ``game``: a textarena id (``"Sudoku-v0"``, ``"TowerOfHanoi-v0-medium"``) or name (``"Sudoku"``).
      ``VERIFIED_GAMES`` lists the tested ones; unverified single-player games may work, unverified two-player
      games raise ``ValueError``.
    * ``opponent``: ``"random"`` or ``"scripted"`` (two-player games).
    * ``learner_player``: 0 (moves first) or 1 (two-player games).
    * ``max_steps``: learner moves before truncation, >= 1.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    action_words = None

    def __init__(
        self,
        game: str = "TowerOfHanoi-v0",
        opponent: str = "random",
        learner_player: int = 0,
        max_steps: int = 50,
        render_mode: str | None = None,
    ):
        self.game_id = normalize_game_id(game)
        name = _base_name(self.game_id)
        if opponent not in OPPONENTS:
            raise ValueError(f"opponent must be one of {OPPONENTS}, got {opponent!r}")
        if learner_player not in (0, 1):
            raise ValueError(f"learner_player must be 0 or 1, got {learner_player!r}")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            allowed = [None, *self.metadata["render_modes"]]
            raise ValueError(f"render_mode must be one of {allowed}, got {render_mode!r}")
        self._game = _make_game(self.game_id)
        self._random_state = random.Random(0).getstate()
        self._opponent_rng = random.Random(0)
        self.legal_moves = TWO_PLAYER_GAMES.get(name)
        self.num_players = 2 if self.legal_moves is not None else 1
        if self.num_players == 1 and not self._is_single_player():
            raise ValueError(
                f"game {self.game_id!r} is not a single-player game and has no built-in opponent; two-player games "
                f"supported: {tuple(f'{n}-v0' for n in TWO_PLAYER_GAMES)}"
            )
        self.observation_mode = SINGLE_PLAYER_GAMES.get(name, BOARD)
        self.opponent = opponent
        self.learner_player = learner_player if self.num_players == 2 else 0
        self.max_steps = max_steps
        self.render_mode = render_mode
        self.action_space = spaces.Text(MAX_OBSERVATION_LENGTH, min_length=0, charset=frozenset(string.printable))
        self.observation_space = spaces.Text(MAX_OBSERVATION_LENGTH, min_length=0, charset=OBSERVATION_CHARSET)
        self._prompt = ""
        self._board = ""
        self._transcript: list[str] = []
        self._steps = 0

    def _is_single_player(self) -> bool:
        try:
            with self._own_random():
                self._game.reset(num_players=1, seed=0)
        except (AssertionError, ValueError):
            return False
        return True

    @contextlib.contextmanager
    def _own_random(self) -> Iterator[None]:
        """Run game code on this env's random stream, leaving the global ``random`` state as it was."""
        outer_state = random.getstate()
        random.setstate(self._random_state)
        try:
            yield
        finally:
            self._random_state = random.getstate()
            random.setstate(outer_state)

    @property
    def instructions(self) -> str:
        """The game's prompt for the learner (known after ``reset``) and how the answer becomes the move."""
        return (
            f"{self._prompt}\nYour answer is passed to the game as your move, written the way the rules above "
            "ask for it."
        )

    def _read_messages(self) -> list[str]:
        """Consume the learner's new messages; update the board/transcript; return the non-prompt texts."""
        import textarena

        messages = self._game.state.observations[self.learner_player]
        self._game.state.observations[self.learner_player] = []
        texts = []
        for _, text, kind in messages:
            if kind == textarena.ObservationType.PROMPT:
                self._prompt = text
                continue
            if kind == textarena.ObservationType.GAME_BOARD:
                self._board = text
            prefix = "> " if kind == textarena.ObservationType.PLAYER_ACTION else ""
            self._transcript.append(prefix + text)
            texts.append(text)
        return texts

    def _observation(self) -> str:
        if self.observation_mode == BOARD:
            return _sanitize(self._board)
        return _sanitize("\n".join(self._transcript))

    def _learner_to_move(self) -> bool:
        return self._game.state.current_player_id == self.learner_player

    def _play_opponent(self) -> None:
        """Opponent moves until it is the learner's turn or the game is over."""
        while not self._game.state.done and not self._learner_to_move():
            self._game.state.observations[self._game.state.current_player_id] = []  # the opponent reads nothing
            self._game.step(self._choose_opponent_move())

    def _choose_opponent_move(self) -> str:
        moves = self.legal_moves(self._game)
        if self.opponent == "scripted":
            opponent = self._game.state.current_player_id
            safe_moves = []
            for move in moves:
                after = self._simulate(self._game, move)
                if after.state.done and (after.state.rewards or {}).get(opponent, 0) > 0:
                    return move
                if not any(self._learner_wins_with(after, reply) for reply in self.legal_moves(after)):
                    safe_moves.append(move)
            moves = safe_moves or moves
        return self._opponent_rng.choice(moves)

    def _simulate(self, game: Any, move: str) -> Any:
        trial = copy.deepcopy(game)
        trial.step(move)
        return trial

    def _learner_wins_with(self, game: Any, move: str) -> bool:
        if game.state.done:
            return False
        after = self._simulate(game, move)
        return after.state.done and (after.state.rewards or {}).get(self.learner_player, 0) > 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        game_seed = int(self.np_random.integers(2**31))
        self._opponent_rng = random.Random(int(self.np_random.integers(2**31)))
        self._random_state = random.Random(game_seed).getstate()
        self._board, self._transcript, self._steps = "", [], 0
        with self._own_random():
            self._game.reset(num_players=self.num_players, seed=game_seed)
            if self.num_players == 2:
                self._play_opponent()
            messages = self._read_messages()
        return self._observation(), {"game_messages": messages}

    def step(self, action: str):
        if not isinstance(action, str):
            raise ValueError(f"action must be a str (the move text), got {type(action).__name__}")
        with self._own_random():
            self._game.step(action)
            if self.num_players == 2:
                self._play_opponent()
            messages = self._read_messages()
            terminated = bool(self._game.state.done)
            rewards = self._game.state.rewards if terminated else None
        self._steps += 1
        reward = float((rewards or {}).get(self.learner_player, 0.0))
        truncated = not terminated and self._steps >= self.max_steps
        info: dict[str, Any] = {"game_messages": messages}
        if terminated or truncated:
            info["success"] = reward >= 1.0
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> str | None:
        return self._observation() if self.render_mode == "ansi" else None
