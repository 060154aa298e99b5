"""The response language of the VAGEN-style agent: vocabulary, templates, parsing, and the field rewards.

A response is a fixed template of typed slots. With the WorldModeling strategy::

    agent_pos agent_dir key_pos carrying door_pos door goal_pos | agent_pos' agent_dir' ... goal_pos' | action

The first seven slots are the state estimate (fields of the state before the step), the next seven
the prediction (after the action that follows), the last one the action. Decoding samples every
token from the full vocabulary (no grammar masking), so a response can break the template: a
wrong token type in a slot, or an action token too early (an action token always ends the turn).
Such a response is malformed: it earns only the format penalty and the env gets the no-op action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from envs.state import DOOR, DOOR_CLOSED, DOOR_LOCKED, DOOR_OPEN, EMPTY, GOAL, KEY, StateCodec

STRATEGIES = ("NoThink", "FreeThink", "StateEstimation", "TransitionModeling", "WorldModeling")
# The order matters to an autoregressive response: a field written after another can read it. The
# key's position comes before what the agent carries (a carried key is on no tile, and the frame
# does not draw it: "carrying a key" is "the key's position is none"), and the door's position before
# its state (the state is a read-out of the door's tile).
FIELDS = ("agent_pos", "agent_dir", "key_pos", "carrying", "door_pos", "door", "goal_pos")
ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")  # MiniGrid's numbering
DIRECTION_NAMES = ("east", "south", "west", "north")
CARRY_NAMES = ("key", "ball", "box")
DOOR_STATE_NAMES = {DOOR_OPEN: "open", DOOR_CLOSED: "closed", DOOR_LOCKED: "locked"}
_CARRY_KIND = {KEY: "key", 6: "ball", 7: "box"}  # minigrid OBJECT_TO_IDX: key 5, ball 6, box 7
FIELD_SLOT = {
    "agent_pos": "cell", "agent_dir": "dir", "carrying": "carry",
    "key_pos": "cell_or_none", "door_pos": "cell_or_none", "door": "door", "goal_pos": "cell_or_none",
}


def has_state(strategy: str) -> bool:
    """Whether the strategy's response carries a state estimate."""
    return strategy in ("StateEstimation", "WorldModeling")


def has_prediction(strategy: str) -> bool:
    """Whether the strategy's response carries a next-state prediction."""
    return strategy in ("TransitionModeling", "WorldModeling")


class Vocab:
    """The response vocabulary for a ``width`` x ``height`` grid and an env of ``num_actions``
    actions (the first ``num_actions`` of MiniGrid's); token ids are dense from 0, actions last.

    Slot types (what a slot accepts): ``cell`` (agent position), ``cell_or_none`` (key, goal),
    ``dir``, ``carry`` (``none`` or an object kind), ``door`` (``none`` or a door state),
    ``action``, ``free`` (any token but ``<bos>`` and the actions).
    """

    def __init__(self, width: int, height: int, num_actions: int = len(ACTION_NAMES)):
        if not 1 <= num_actions <= len(ACTION_NAMES):
            raise ValueError(f"num_actions must be 1..{len(ACTION_NAMES)} (MiniGrid's actions), got {num_actions}")
        self.width, self.height, self.num_actions = int(width), int(height), int(num_actions)
        names = ["<bos>", "none"]
        names += [f"carry_{n}" for n in CARRY_NAMES]
        names += [f"door_{n}" for n in ("open", "closed", "locked")]
        names += list(DIRECTION_NAMES)
        names += [f"c{x},{y}" for y in range(self.height) for x in range(self.width)]
        names += [f"act_{n}" for n in ACTION_NAMES[: self.num_actions]]
        self.names = names
        self.ids = {n: i for i, n in enumerate(names)}
        self.bos, self.none = self.ids["<bos>"], self.ids["none"]
        # [first, end) ids of the attribute values a tile shows: carried kinds, door states, directions.
        self.attribute_tokens = (self.ids[f"carry_{CARRY_NAMES[0]}"], self.ids[DIRECTION_NAMES[-1]] + 1)
        self.action_ids = np.array([self.ids[f"act_{n}"] for n in ACTION_NAMES[: self.num_actions]])
        self.first_action = int(self.action_ids[0])
        # What a malformed response does: "done" (no effect in navigation tasks), or turning left
        # where the env has no "done" (Dynamic-Obstacles' three actions): it moves nothing.
        self.noop_action = ACTION_NAMES.index("done") if self.num_actions == len(ACTION_NAMES) else 0
        cells = [self.ids[f"c{x},{y}"] for y in range(self.height) for x in range(self.width)]
        self.slot_tokens: dict[str, frozenset[int]] = {
            "cell": frozenset(cells),
            "cell_or_none": frozenset(cells + [self.none]),
            "dir": frozenset(self.ids[n] for n in DIRECTION_NAMES),
            "carry": frozenset([self.none] + [self.ids[f"carry_{n}"] for n in CARRY_NAMES]),
            "door": frozenset([self.none] + [self.ids[f"door_{n}"] for n in ("open", "closed", "locked")]),
            "action": frozenset(int(a) for a in self.action_ids),
            "free": frozenset(range(1, self.first_action)),
        }

    def __len__(self) -> int:
        return len(self.names)

    def cell(self, x: int, y: int) -> int:
        return self.ids[f"c{x},{y}"]

    def is_action(self, token: int) -> bool:
        return token >= self.first_action

    def action_of(self, token: int) -> int:
        """Env action (0 .. num_actions - 1) of an action token."""
        return int(token) - self.first_action

    def text(self, tokens: Sequence[int]) -> str:
        return " ".join(self.names[int(t)] for t in tokens)


def template(strategy: str, free_think_len: int = 12) -> list[tuple[str, str]]:
    """The slots of a response: a list of ``(part, slot_type)``; part is state, prediction, free or action."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}': choose one of {STRATEGIES}")
    state = [("state", FIELD_SLOT[f]) for f in FIELDS]
    prediction = [("prediction", FIELD_SLOT[f]) for f in FIELDS]
    slots = {
        "NoThink": [],
        "FreeThink": [("free", "free")] * int(free_think_len),
        "StateEstimation": state,
        "TransitionModeling": prediction,
        "WorldModeling": state + prediction,
    }[strategy]
    return slots + [("action", "action")]


@dataclass
class ParsedResponse:
    """A response read against its template. ``state``/``prediction`` map field -> token id (None
    when the strategy has no such part or the response is malformed); ``action`` is the env action
    to execute (the no-op for a malformed response); ``error`` says what broke the template."""

    well_formed: bool
    action: int
    state: dict[str, int] | None = None
    prediction: dict[str, int] | None = None
    error: str = ""


def parse_response(tokens: Sequence[int], strategy: str, vocab: Vocab, free_think_len: int = 12) -> ParsedResponse:
    """Read a response (its valid tokens only, without ``<bos>``) against the strategy's template."""
    slots = template(strategy, free_think_len)
    tokens = [int(t) for t in tokens]
    if len(tokens) != len(slots):
        where = "an action token came early" if tokens and vocab.is_action(tokens[-1]) else "no action token"
        return ParsedResponse(False, vocab.noop_action, error=f"{len(tokens)} tokens for {len(slots)} slots ({where})")
    for i, ((part, slot), token) in enumerate(zip(slots, tokens)):
        if not 0 <= token < len(vocab) or token not in vocab.slot_tokens[slot]:
            name = vocab.names[token] if 0 <= token < len(vocab) else str(token)
            return ParsedResponse(False, vocab.noop_action, error=f"slot {i} ({part} {slot}) holds '{name}'")
    fields: dict[str, dict[str, int]] = {"state": {}, "prediction": {}}
    cursor = {"state": 0, "prediction": 0}
    for (part, _), token in zip(slots, tokens):
        if part in fields:
            fields[part][FIELDS[cursor[part]]] = token
            cursor[part] += 1
    return ParsedResponse(
        True,
        vocab.action_of(tokens[-1]),
        state=fields["state"] if has_state(strategy) else None,
        prediction=fields["prediction"] if has_prediction(strategy) else None,
    )


def state_fields(state_array: np.ndarray, codec: StateCodec, vocab: Vocab) -> dict[str, int]:
    """The true token of every field of a symbolic state array (``codec`` layout), field -> token id.

    The first key/door/goal in (x, y) order stands for its kind (DoorKey has one of each). A value
    no token can say (a world model's state head may predict an impossible state) maps to -1,
    which no response matches.
    """
    state = codec.decode(state_array)
    kind = state.carrying[0]
    carrying = vocab.none if kind == EMPTY or kind not in _CARRY_KIND else vocab.ids[f"carry_{_CARRY_KIND[kind]}"]
    keys, doors, goals = state.objects(KEY), state.objects(DOOR), state.objects(GOAL)
    cell = lambda x, y: vocab.ids.get(f"c{x},{y}", -1)  # noqa: E731
    door_state = DOOR_STATE_NAMES.get(doors[0][3]) if doors else None
    return {
        "agent_pos": cell(*state.agent_pos),
        "agent_dir": vocab.ids[DIRECTION_NAMES[state.agent_dir]] if 0 <= state.agent_dir < 4 else -1,
        "carrying": carrying,
        "key_pos": cell(keys[0][0], keys[0][1]) if keys else vocab.none,
        "door_pos": cell(doors[0][0], doors[0][1]) if doors else vocab.none,
        "door": (vocab.ids[f"door_{door_state}"] if door_state else -1) if doors else vocab.none,
        "goal_pos": cell(goals[0][0], goals[0][1]) if goals else vocab.none,
    }


def field_accuracy(said: dict[str, int], truth: dict[str, int], field_weights: dict[str, float]) -> float:
    """Weighted fraction of fields said right: sum of the weights of correct fields / sum of weights."""
    total = sum(float(field_weights.get(f, 0.0)) for f in FIELDS)
    if total <= 0:
        raise ValueError(f"field weights must have a positive sum over {FIELDS}, got {field_weights}")
    right = sum(float(field_weights.get(f, 0.0)) for f in FIELDS if said.get(f) == truth[f])
    return right / total


@dataclass
class WorldModelReward:
    """One turn's world-modeling reward and the accuracies it came from (NaN: part not in strategy;
    0 for a malformed response with that part). ``slot_rewards``: for a well-formed response with
    fields, each slot's share of ``reward`` in template order (the action's share is 0)."""

    reward: float
    state_accuracy: float
    prediction_accuracy: float
    slot_rewards: tuple[float, ...] | None = None


def world_model_reward(
    parsed: ParsedResponse,
    strategy: str,
    true_state: dict[str, int],
    true_next_state: dict[str, int],
    *,
    state_weight: float,
    prediction_weight: float,
    field_weights: dict[str, float],
    format_penalty: float,
) -> WorldModelReward:
    """Reward for being right: ``state_weight * acc(estimate, truth before the step) +
    prediction_weight * acc(prediction, truth after it)`` for a well-formed response;
    ``format_penalty`` alone (it should be negative) for a malformed one."""
    with_state, with_prediction = has_state(strategy), has_prediction(strategy)
    nan = float("nan")
    if not parsed.well_formed:
        return WorldModelReward(float(format_penalty), 0.0 if with_state else nan, 0.0 if with_prediction else nan)
    state_acc = field_accuracy(parsed.state, true_state, field_weights) if with_state else nan
    pred_acc = field_accuracy(parsed.prediction, true_next_state, field_weights) if with_prediction else nan
    reward = (state_weight * state_acc if with_state else 0.0) + (prediction_weight * pred_acc if with_prediction else 0.0)
    # Each field's own share of the reward, in the order the template writes the slots: the state's
    # fields, then the prediction's, then the action (which earns none).
    total = sum(float(field_weights.get(f, 0.0)) for f in FIELDS)

    def shares(said: dict[str, int], truth: dict[str, int], weight: float) -> list[float]:
        return [weight * float(field_weights.get(f, 0.0)) / total if said[f] == truth[f] else 0.0 for f in FIELDS]

    slot_rewards = (shares(parsed.state, true_state, state_weight) if with_state else []) + (
        shares(parsed.prediction, true_next_state, prediction_weight) if with_prediction else []
    )
    if not slot_rewards:  # NoThink, FreeThink: no fields to share out
        return WorldModelReward(float(reward), state_acc, pred_acc)
    slot_rewards.append(0.0)
    return WorldModelReward(float(reward), state_acc, pred_acc, tuple(slot_rewards))


def full_world_model_reward(strategy: str, state_weight: float, prediction_weight: float) -> float:
    """The reward of a perfect, well-formed response (0: the strategy earns no world-modeling reward)."""
    return (state_weight if has_state(strategy) else 0.0) + (prediction_weight if has_prediction(strategy) else 0.0)


def chance_state_accuracy(vocab: Vocab, field_weights: dict[str, float]) -> float:
    """Expected field accuracy of a uniform guess within each field's slot type (the chance level)."""
    total = sum(float(field_weights.get(f, 0.0)) for f in FIELDS)
    return sum(float(field_weights.get(f, 0.0)) / len(vocab.slot_tokens[FIELD_SLOT[f]]) for f in FIELDS) / total


def slot_mask(strategy: str, vocab: Vocab, free_think_len: int = 12) -> torch.Tensor:
    """(L, V) bool: the tokens each position of the strategy's template accepts."""
    slots = template(strategy, free_think_len)
    mask = torch.zeros(len(slots), len(vocab), dtype=torch.bool)
    for i, (_, slot) in enumerate(slots):
        mask[i, sorted(vocab.slot_tokens[slot])] = True
    return mask


def readout_positions(strategy: str, vocab: Vocab, free_think_len: int = 12) -> tuple[int, ...]:
    """The positions of the strategy's template whose slot accepts an attribute token (object
    kind, door state, direction): where the cell read-out belongs."""
    lo, hi = vocab.attribute_tokens
    return tuple(i for i, legal in enumerate(slot_mask(strategy, vocab, free_think_len)) if bool(legal[lo:hi].any()))


def random_well_formed(
    strategy: str, vocab: Vocab, batch_size: int, generator: torch.Generator, free_think_len: int = 12
) -> torch.Tensor:
    """(B, L) responses with a uniformly random token in every slot: grammar without content."""
    columns = []
    for legal in slot_mask(strategy, vocab, free_think_len):
        allowed = legal.nonzero().squeeze(-1)
        columns.append(allowed[torch.randint(len(allowed), (batch_size,), generator=generator)])
    return torch.stack(columns, dim=1)
