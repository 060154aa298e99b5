"""Symbolic ground-truth state of a MiniGrid step, its fixed-size integer codec and text form.

The state is what the world model's state head predicts and what the VAGEN-style agent states:
the grid encoding (object, colour, state per cell), the agent's position and direction and the
object it carries. For a grid of ``width`` x ``height`` the codec's array has
``width * height * 3 + 6`` uint8 entries::

    [ grid.encode() flattened in (x, y, channel) order | agent_x, agent_y, agent_dir |
      carried_type, carried_color, carried_state ]

"Carrying nothing" is encoded as the empty object ``(1, 0, 0)``, like an empty cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from minigrid.core.constants import COLOR_TO_IDX, IDX_TO_COLOR, IDX_TO_OBJECT, OBJECT_TO_IDX, STATE_TO_IDX

EMPTY = OBJECT_TO_IDX["empty"]
WALL = OBJECT_TO_IDX["wall"]
DOOR = OBJECT_TO_IDX["door"]
KEY = OBJECT_TO_IDX["key"]
GOAL = OBJECT_TO_IDX["goal"]
LAVA = OBJECT_TO_IDX["lava"]
DOOR_OPEN, DOOR_CLOSED, DOOR_LOCKED = STATE_TO_IDX["open"], STATE_TO_IDX["closed"], STATE_TO_IDX["locked"]
IDX_TO_STATE = {v: k for k, v in STATE_TO_IDX.items()}
DIRECTION_NAMES = ("east", "south", "west", "north")  # minigrid: 0 = +x, 1 = +y (down), ...
NUM_OBJECTS = len(OBJECT_TO_IDX)
NUM_COLORS = len(COLOR_TO_IDX)
NUM_STATES = len(STATE_TO_IDX)

_ASCII = {
    "unseen": "?", "empty": ".", "wall": "#", "floor": "_", "key": "k", "ball": "o", "box": "x",
    "goal": "G", "lava": "~",
}
_DOOR_ASCII = {DOOR_OPEN: "/", DOOR_CLOSED: "d", DOOR_LOCKED: "D"}
_AGENT_ASCII = (">", "v", "<", "^")


@dataclass
class SymbolicState:
    """One step's ground truth. ``grid`` is (width, height, 3) uint8 as ``Grid.encode`` gives it."""

    grid: np.ndarray  # (W, H, 3) uint8: object, colour, state per cell
    agent_pos: tuple[int, int]
    agent_dir: int
    carrying: tuple[int, int, int]  # (object, colour, state); (EMPTY, 0, 0) when empty-handed

    @property
    def width(self) -> int:
        return int(self.grid.shape[0])

    @property
    def height(self) -> int:
        return int(self.grid.shape[1])

    def objects(self, kind: int) -> list[tuple[int, int, int, int]]:
        """``(x, y, colour, state)`` of every cell holding object ``kind``, in (x, y) order."""
        xs, ys = np.nonzero(self.grid[:, :, 0] == kind)
        return [(int(x), int(y), int(self.grid[x, y, 1]), int(self.grid[x, y, 2])) for x, y in zip(xs, ys)]

    @property
    def goal_positions(self) -> list[tuple[int, int]]:
        return [(x, y) for x, y, _, _ in self.objects(GOAL)]

    def text(self) -> str:
        """A stable, human-readable description (used by the VAGEN-style agent and in reports)."""
        x, y = self.agent_pos
        lines = [f"agent at ({x}, {y}) facing {DIRECTION_NAMES[self.agent_dir]}, carrying {self.carrying_text()}"]
        for gx, gy, _, _ in self.objects(GOAL):
            lines.append(f"goal at ({gx}, {gy})")
        for kind in (KEY, OBJECT_TO_IDX["ball"], OBJECT_TO_IDX["box"]):
            for ox, oy, color, _ in self.objects(kind):
                lines.append(f"{IDX_TO_COLOR[color]} {IDX_TO_OBJECT[kind]} at ({ox}, {oy})")
        for dx, dy, color, state in self.objects(DOOR):
            lines.append(f"{IDX_TO_COLOR[color]} door at ({dx}, {dy}) {IDX_TO_STATE[state]}")
        lines.append("grid:")
        lines.extend(self.ascii_rows())
        return "\n".join(lines)

    def carrying_text(self) -> str:
        kind, color, _ = self.carrying
        if kind == EMPTY:
            return "nothing"
        return f"{IDX_TO_COLOR[color]} {IDX_TO_OBJECT[kind]}"

    def ascii_rows(self) -> list[str]:
        """One string per grid row (y), one character per cell; the agent drawn as > v < ^."""
        rows = []
        for y in range(self.height):
            chars = []
            for x in range(self.width):
                if (x, y) == tuple(self.agent_pos):
                    chars.append(_AGENT_ASCII[self.agent_dir])
                    continue
                kind, _, state = (int(v) for v in self.grid[x, y])
                chars.append(_DOOR_ASCII[state] if kind == DOOR else _ASCII.get(IDX_TO_OBJECT[kind], "?"))
            rows.append("".join(chars))
        return rows


class StateCodec:
    """SymbolicState <-> fixed-size uint8 array for a grid of ``width`` x ``height``."""

    def __init__(self, width: int, height: int):
        self.width = int(width)
        self.height = int(height)
        self.grid_size = self.width * self.height * 3
        self.size = self.grid_size + 6

    def encode(self, state: SymbolicState) -> np.ndarray:
        """(size,) uint8 array."""
        if state.grid.shape != (self.width, self.height, 3):
            raise ValueError(
                f"state grid is {state.grid.shape[:2]}, codec was built for ({self.width}, {self.height})"
            )
        out = np.empty(self.size, dtype=np.uint8)
        out[: self.grid_size] = state.grid.reshape(-1)
        out[self.grid_size : self.grid_size + 3] = (state.agent_pos[0], state.agent_pos[1], state.agent_dir)
        out[self.grid_size + 3 :] = state.carrying
        return out

    def decode(self, array: np.ndarray) -> SymbolicState:
        """The inverse of :meth:`encode`; ``array`` is (size,) of any integer dtype."""
        array = np.asarray(array)
        if array.shape != (self.size,):
            raise ValueError(f"state array has shape {array.shape}, expected ({self.size},)")
        grid = array[: self.grid_size].astype(np.uint8).reshape(self.width, self.height, 3)
        ax, ay, adir = (int(v) for v in array[self.grid_size : self.grid_size + 3])
        carrying = tuple(int(v) for v in array[self.grid_size + 3 :])
        return SymbolicState(grid=grid, agent_pos=(ax, ay), agent_dir=adir, carrying=carrying)  # type: ignore[arg-type]

    def agent_slice(self) -> slice:
        """Where (agent_x, agent_y, agent_dir, carried_type, carried_color, carried_state) lie."""
        return slice(self.grid_size, self.size)

    @staticmethod
    def for_array_size(size: int, width: int | None = None) -> "StateCodec":
        """Recover a codec from an array length: a square grid's, or ``width``'s for a non-square one.

        A length alone cannot tell 7x3 from 3x7 (or 21x1); readers of a dataset should prefer
        :meth:`for_card`, which uses the grid size the card records.
        """
        cells = (size - 6) // 3
        hint = "" if width is None else f" and width {width}"
        if width is None:
            width = int(round(cells**0.5))
        if width <= 0 or cells % width or width * (cells // width) * 3 + 6 != size:
            raise ValueError(f"no grid matches a state array of length {size}{hint} "
                             "(a non-square grid needs its width: pass width, or use StateCodec.for_card)")
        return StateCodec(width, cells // width)

    @staticmethod
    def for_card(card: dict, state_size: int | None = None) -> "StateCodec":
        """The codec of a dataset from its card's ``grid_size`` ([width, height]), checked against
        ``state_size`` (the card's own, or the arrays' length when given). A card without
        ``grid_size`` falls back to :meth:`for_array_size` (square grids)."""
        size = int(state_size if state_size is not None else card["state_size"])
        grid_size = card.get("grid_size") if isinstance(card, dict) else None
        if not grid_size:
            return StateCodec.for_array_size(size)
        codec = StateCodec(int(grid_size[0]), int(grid_size[1]))
        if codec.size != size:
            raise ValueError(f"the card's grid_size {list(grid_size)} gives states of length {codec.size}, "
                             f"the data's are {size}")
        return codec


def state_from_env(env) -> SymbolicState:
    """Read the symbolic state off a (possibly wrapped) MiniGrid env."""
    base = env.unwrapped
    carrying = base.carrying.encode() if base.carrying is not None else (EMPTY, 0, 0)
    return SymbolicState(
        grid=base.grid.encode(),
        agent_pos=(int(base.agent_pos[0]), int(base.agent_pos[1])),
        agent_dir=int(base.agent_dir),
        carrying=tuple(int(v) for v in carrying),  # type: ignore[arg-type]
    )
