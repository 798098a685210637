"""Text Sokoban with a built-in room generator whose rooms are solvable by construction.

Generation (:func:`generate_room`): a random walk carves the floor out of a walled room, boxes are put on
random targets (the solved position), and then the game is played *backwards* from there: the player walks
at random and pulls any box it walks away from. Every pull is the reverse of a legal push, so replaying the
backward walk forwards solves the room. The position reached with the boxes farthest from their targets
becomes the starting position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ACTION_WORDS = ("Up", "Down", "Left", "Right")
WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", "O", "X", "√", "P", "S"
OBSERVATION_CHARSET = frozenset(WALL + FLOOR + TARGET + BOX + BOX_ON_TARGET + PLAYER + PLAYER_ON_TARGET + " \n")

STEP_REWARD = -0.1
BOX_ON_TARGET_REWARD = 1.0
BOX_OFF_TARGET_REWARD = -1.0
SOLVED_REWARD = 10.0

INSTRUCTIONS = f"""You are playing Sokoban. Push every box onto a target.
Map legend: {WALL} wall, {FLOOR} floor, {TARGET} target, {BOX} box, {BOX_ON_TARGET} box on a target, \
{PLAYER} you, {PLAYER_ON_TARGET} you on a target.
Rows go top to bottom, columns left to right. You move one cell per action. Walking into a box pushes it one \
cell further if that cell is free (floor or target); boxes cannot be pulled, and you cannot push two boxes \
or walk through walls.
Rewards: {STEP_REWARD} per step, +{BOX_ON_TARGET_REWARD:g} for pushing a box onto a target, \
{BOX_OFF_TARGET_REWARD:g} for pushing one off, +{SOLVED_REWARD:g} when all boxes are on targets.
Actions: {", ".join(ACTION_WORDS)}."""

COMPACT_INSTRUCTIONS = (f"Sokoban: you are {PLAYER}; push every {BOX} onto a {TARGET}; {WALL} is a wall. "
                        f"Actions: {', '.join(ACTION_WORDS)}.")
"""A fraction of the tokens of :data:`INSTRUCTIONS`: for small models and short token budgets."""
INSTRUCTION_STYLES = ("full", "compact")


@dataclass(frozen=True)
class Room:
    """A Sokoban position on a ``height``x``width`` grid; cells are flat indices ``row * width + col``."""

    height: int
    width: int
    floor: frozenset[int]
    targets: frozenset[int]
    boxes: frozenset[int]
    player: int

    def offsets(self) -> tuple[int, int, int, int]:
        """Flat-index offsets of the moves in ``ACTION_WORDS`` order (Up, Down, Left, Right)."""
        return (-self.width, self.width, -1, 1)

    def render(self, boxes: frozenset[int] | set[int] | None = None, player: int | None = None) -> str:
        """Text grid of this room with the given (default: initial) box and player positions."""
        boxes = self.boxes if boxes is None else boxes
        player = self.player if player is None else player
        lines = []
        for row in range(self.height):
            cells = []
            for cell in range(row * self.width, (row + 1) * self.width):
                on_target = cell in self.targets
                if cell == player:
                    cells.append(PLAYER_ON_TARGET if on_target else PLAYER)
                elif cell in boxes:
                    cells.append(BOX_ON_TARGET if on_target else BOX)
                elif cell in self.floor:
                    cells.append(TARGET if on_target else FLOOR)
                else:
                    cells.append(WALL)
            lines.append(" ".join(cells))
        return "\n".join(lines)


def _carve_floor(height: int, width: int, rng: random.Random) -> set[int]:
    """Random-walk topology: a walker starts inside the walls and clears every cell it visits."""
    interior_rows, interior_cols = height - 2, width - 2
    row, col = rng.randrange(1, height - 1), rng.randrange(1, width - 1)
    moves = ((-1, 0), (1, 0), (0, -1), (0, 1))
    direction = rng.choice(moves)
    floor = {row * width + col}
    for _ in range(int(1.5 * interior_rows * interior_cols)):
        if rng.random() < 0.35:
            direction = rng.choice(moves)
        next_row, next_col = row + direction[0], col + direction[1]
        if 1 <= next_row < height - 1 and 1 <= next_col < width - 1:
            row, col = next_row, next_col
            floor.add(row * width + col)
    return floor


def _play_backwards(
    floor: set[int], targets: list[int], width: int, rng: random.Random, num_steps: int
) -> tuple[frozenset[int], int] | None:
    """Walk backwards from the solved position, pulling boxes; return the hardest (boxes, player) reached.

    The walker keeps its direction with probability 0.6, so boxes get pulled over longer stretches. "Hardest" =
    the largest total distance of the boxes from the targets they started on, among positions with at least
    one box off the targets. The player then stands on a random cell it can walk to without moving a box.
    ``None`` when no backward walk moved a box off its target.
    """
    offsets = (-width, width, -1, 1)
    boxes = list(targets)  # box i started on targets[i]
    occupied = set(boxes)
    free = sorted(cell for cell in floor if cell not in occupied)
    if not free:
        return None
    player = rng.choice(free)
    offset = rng.choice(offsets)
    target_set = set(targets)
    best_score, best = 0, None
    for _ in range(num_steps):
        if rng.random() < 0.4:
            offset = rng.choice(offsets)
        destination = player + offset
        if destination not in floor or destination in occupied:
            continue
        behind = player - offset
        if behind in occupied:
            boxes[boxes.index(behind)] = player
            occupied.discard(behind)
            occupied.add(player)
        player = destination
        if occupied <= target_set:
            continue
        score = sum(
            abs(box // width - home // width) + abs(box % width - home % width) for box, home in zip(boxes, targets)
        )
        if score > best_score:
            best_score, best = score, (frozenset(occupied), player)
    if best is None:
        return None
    best_boxes, best_player = best
    return best_boxes, rng.choice(_walkable_from(best_player, floor, best_boxes, offsets))


def _walkable_from(start: int, floor: set[int], boxes: frozenset[int], offsets: tuple[int, ...]) -> list[int]:
    """Cells the player reaches from ``start`` without moving a box, in a deterministic order."""
    seen, stack = {start}, [start]
    while stack:
        cell = stack.pop()
        for offset in offsets:
            neighbour = cell + offset
            if neighbour in floor and neighbour not in boxes and neighbour not in seen:
                seen.add(neighbour)
                stack.append(neighbour)
    return sorted(seen)


def generate_room(
    height: int = 6, width: int = 6, num_boxes: int = 1, rng: random.Random | None = None, num_backward_steps: int = 60
) -> Room:
    """A random solvable Sokoban room (see the module docstring); deterministic for a seeded ``rng``."""
    rng = rng or random.Random()
    while True:
        floor = _carve_floor(height, width, rng)
        if len(floor) < num_boxes + 2:
            continue
        targets = rng.sample(sorted(floor), num_boxes)
        reached = _play_backwards(floor, targets, width, rng, num_backward_steps)
        if reached is not None:
            boxes, player = reached
            return Room(height, width, frozenset(floor), frozenset(targets), boxes, player)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class TextSokobanEnv(gym.Env):
    """
    ## Description
    Sokoban with text observations for LLM agents. Every reset generates a new room from the seed with
    :func:`generate_room`: a random-walk floor plan, then backward play from the solved position, so every room
    is solvable.

    ## Action Space
    ``Discrete(4)``: 0 Up, 1 Down, 2 Left, 3 Right; ``action_words`` is ``("Up", "Down", "Left", "Right")``.

    ## Observation Space
    ``Text``: the bare grid, one row per line, cells separated by spaces, no instructions or step counter.
    Legend: ``#`` wall, ``_`` floor, ``O`` target, ``X`` box, ``√`` box on target, ``P`` player, ``S`` player on
    target. Example (6x6, 1 box)::

        # # # # # #
        # _ _ # # #
        # _ X _ O #
        # P _ _ _ #
        # # # # # #
        # # # # # #

    ``instructions`` holds the rules, the legend and the action words (``instructions_style="compact"``: one
    line, for small models and short token budgets).

    ## Starting State
    The generated room: no box layout is solved at the start.

    ## Rewards
    -0.1 per step; +1 for pushing a box onto a target; -1 for pushing a box off a target; +10 more when the
    last box reaches a target.

    ## Episode End
    Terminated when every box is on a target; truncated after ``max_steps`` steps. ``info["success"]`` (room
    solved) is set at the end of every episode.

    ## Arguments
    ``gymnasium.make("TextSokoban-v0", dim_room=(6, 6), num_boxes=1, max_steps=10, instructions_style="full")``

    * ``dim_room``: ``(height, width)`` including the outer walls, each >= 4.
    * ``num_boxes``: number of boxes (and targets), >= 1.
    * ``max_steps``: steps before truncation, >= 1.
    * ``num_backward_steps``: length of the backward walk of the generator (longer: boxes end farther away).
    * ``instructions_style``: ``"full"`` (rules, legend, rewards) or ``"compact"`` (one line).
    * ``render_mode``: ``None`` or ``"ansi"`` (returns the observation text).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    action_words = ACTION_WORDS

    def __init__(
        self,
        dim_room: tuple[int, int] = (6, 6),
        num_boxes: int = 1,
        max_steps: int = 10,
        num_backward_steps: int = 60,
        instructions_style: str = "full",
        render_mode: str | None = None,
    ):
        if instructions_style not in INSTRUCTION_STYLES:
            raise ValueError(f"instructions_style must be one of {INSTRUCTION_STYLES}, got {instructions_style!r}")
        if (
            not isinstance(dim_room, (tuple, list))
            or len(dim_room) != 2
            or not all(_is_int(side) and side >= 4 for side in dim_room)
        ):
            raise ValueError(f"dim_room must be (height, width) with ints >= 4, got {dim_room!r}")
        height, width = int(dim_room[0]), int(dim_room[1])
        if not _is_int(num_boxes) or num_boxes < 1:
            raise ValueError(f"num_boxes must be an int >= 1, got {num_boxes!r}")
        if num_boxes + 2 > (height - 2) * (width - 2):
            raise ValueError(
                f"num_boxes must leave room for the player: at most {(height - 2) * (width - 2) - 2} for "
                f"dim_room={dim_room!r}, got {num_boxes!r}"
            )
        if not _is_int(max_steps) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if not _is_int(num_backward_steps) or num_backward_steps < 1:
            raise ValueError(f"num_backward_steps must be an int >= 1, got {num_backward_steps!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            allowed = [None, *self.metadata["render_modes"]]
            raise ValueError(f"render_mode must be one of {allowed}, got {render_mode!r}")
        self.dim_room = (height, width)
        self.num_boxes = int(num_boxes)
        self.max_steps = int(max_steps)
        self.num_backward_steps = int(num_backward_steps)
        self.instructions_style = instructions_style
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(ACTION_WORDS))
        self.observation_space = spaces.Text(
            max_length=height * 2 * width, min_length=1, charset=OBSERVATION_CHARSET
        )
        self.room: Room | None = None
        self._boxes: set[int] = set()
        self._player = 0
        self._steps = 0

    @property
    def instructions(self) -> str:
        return COMPACT_INSTRUCTIONS if self.instructions_style == "compact" else INSTRUCTIONS

    def _observation(self) -> str:
        return self.room.render(self._boxes, self._player)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        rng = random.Random(int(self.np_random.integers(2**63)))
        self.room = generate_room(*self.dim_room, self.num_boxes, rng, self.num_backward_steps)
        self._boxes = set(self.room.boxes)
        self._player = self.room.player
        self._steps = 0
        return self._observation(), {}

    def step(self, action: int):
        if self.room is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in [0, {len(ACTION_WORDS)}) ({ACTION_WORDS}), got {action!r}")
        offset = self.room.offsets()[int(action)]
        destination = self._player + offset
        reward = STEP_REWARD
        if destination in self._boxes:
            box_destination = destination + offset
            if box_destination in self.room.floor and box_destination not in self._boxes:
                self._boxes.remove(destination)
                self._boxes.add(box_destination)
                reward += BOX_OFF_TARGET_REWARD * (destination in self.room.targets)
                reward += BOX_ON_TARGET_REWARD * (box_destination in self.room.targets)
                self._player = destination
        elif destination in self.room.floor:
            self._player = destination
        self._steps += 1
        terminated = self._boxes <= self.room.targets
        if terminated:
            reward += SOLVED_REWARD
        truncated = not terminated and self._steps >= self.max_steps
        info: dict[str, Any] = {"success": terminated} if terminated or truncated else {}
        return self._observation(), float(reward), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi" and self.room is not None:
            return self._observation()
        return None
