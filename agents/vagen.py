"""VAGEN-style agent: it says what state it is in, predicts the next state, then acts.

Models and pure functions only (the training loop is :mod:`agents.train_vagen`):

- :class:`Vocab` — the structured response vocabulary of one grid size: cell tokens ``c{x},{y}``,
  directions, carried-object kinds, door states, ``none``, the seven actions, and ``<bos>``.
- Response templates per strategy (:data:`STRATEGIES`) and :func:`parse_response`, which turns
  sampled token ids into a :class:`ParsedResponse` (well-formed or not, fields, action).
- :func:`state_fields` — the true fields of a symbolic state array, in the same token ids.
- :func:`world_model_reward` — the per-turn reward for a correct estimate and prediction.
- :func:`bilevel_gae`, :func:`turn_level_advantages` — credit assignment, on :func:`agents.rl.gae`.
- :class:`VagenNet` — a tiny prefix-LM transformer: the frame's tiles and the turn history are the
  prefix, the response is decoded causally; one value per response position.
- :class:`VagenAgent` — the saved policy behind the common interface of :mod:`agents.policy`.

A response is a fixed template of typed slots. With the WorldModeling strategy::

    agent_pos agent_dir key_pos carrying door_pos door goal_pos | agent_pos' agent_dir' ... goal_pos' | action

The first seven slots are the state estimate (fields of the state before the step), the next seven
the prediction (after the action that follows), the last one the action. Decoding samples every
token from the full vocabulary (no grammar masking), so a response can break the template: a
wrong token type in a slot, or an action token too early (an action token always ends the turn).
Such a response is malformed: it earns only the format penalty and the env gets the no-op
``done`` action.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from agents.policy import NUM_ACTIONS, Policy, PolicyInput, register_policy
from agents.rl import gae
from envs.state import DOOR, DOOR_CLOSED, DOOR_LOCKED, DOOR_OPEN, EMPTY, GOAL, KEY, StateCodec

STRATEGIES = ("NoThink", "FreeThink", "StateEstimation", "TransitionModeling", "WorldModeling")
# The order matters to an autoregressive response: a field written after another can read it. The
# key's position comes before what the agent carries (a carried key is on no tile, and the frame
# does not draw it: "carrying a key" is "the key's position is none"), and the door's position before
# its state (the state is a read-out of the door's tile).
FIELDS = ("agent_pos", "agent_dir", "key_pos", "carrying", "door_pos", "door", "goal_pos")
ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
NOOP_ACTION = 6  # "done": no effect in navigation tasks; what a malformed response does
DIRECTION_NAMES = ("east", "south", "west", "north")
CARRY_NAMES = ("key", "ball", "box")
DOOR_STATE_NAMES = {DOOR_OPEN: "open", DOOR_CLOSED: "closed", DOOR_LOCKED: "locked"}
_CARRY_KIND = {KEY: "key", 6: "ball", 7: "box"}  # minigrid OBJECT_TO_IDX: key 5, ball 6, box 7


# ---------------------------------------------------------------------------------------------
# Vocabulary, templates, parsing
# ---------------------------------------------------------------------------------------------


class Vocab:
    """The response vocabulary for a ``width`` x ``height`` grid; token ids are dense from 0.

    Slot types (what a slot accepts): ``cell`` (agent position), ``cell_or_none`` (key, goal),
    ``dir``, ``carry`` (``none`` or an object kind), ``door`` (``none`` or a door state),
    ``action``, ``free`` (any token but ``<bos>`` and the actions).
    """

    def __init__(self, width: int, height: int):
        self.width, self.height = int(width), int(height)
        names = ["<bos>", "none"]
        names += [f"carry_{n}" for n in CARRY_NAMES]
        names += [f"door_{n}" for n in ("open", "closed", "locked")]
        names += list(DIRECTION_NAMES)
        names += [f"c{x},{y}" for y in range(self.height) for x in range(self.width)]
        names += [f"act_{n}" for n in ACTION_NAMES]
        self.names = names
        self.ids = {n: i for i, n in enumerate(names)}
        self.bos, self.none = self.ids["<bos>"], self.ids["none"]
        # [first, end) ids of the attribute values a tile shows: carried kinds, door states, directions.
        self.attribute_tokens = (self.ids[f"carry_{CARRY_NAMES[0]}"], self.ids[DIRECTION_NAMES[-1]] + 1)
        self.action_ids = np.array([self.ids[f"act_{n}"] for n in ACTION_NAMES])
        self.first_action = int(self.action_ids[0])
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
        """Env action (0..6) of an action token."""
        return int(token) - self.first_action

    def text(self, tokens: Sequence[int]) -> str:
        return " ".join(self.names[int(t)] for t in tokens)


FIELD_SLOT = {
    "agent_pos": "cell", "agent_dir": "dir", "carrying": "carry",
    "key_pos": "cell_or_none", "door_pos": "cell_or_none", "door": "door", "goal_pos": "cell_or_none",
}


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
        return ParsedResponse(False, NOOP_ACTION, error=f"{len(tokens)} tokens for {len(slots)} slots ({where})")
    for i, ((part, slot), token) in enumerate(zip(slots, tokens)):
        if not 0 <= token < len(vocab) or token not in vocab.slot_tokens[slot]:
            name = vocab.names[token] if 0 <= token < len(vocab) else str(token)
            return ParsedResponse(False, NOOP_ACTION, error=f"slot {i} ({part} {slot}) holds '{name}'")
    fields: dict[str, dict[str, int]] = {"state": {}, "prediction": {}}
    cursor = {"state": 0, "prediction": 0}
    for (part, _), token in zip(slots, tokens):
        if part in fields:
            fields[part][FIELDS[cursor[part]]] = token
            cursor[part] += 1
    has_state = strategy in ("StateEstimation", "WorldModeling")
    has_prediction = strategy in ("TransitionModeling", "WorldModeling")
    return ParsedResponse(
        True,
        vocab.action_of(tokens[-1]),
        state=fields["state"] if has_state else None,
        prediction=fields["prediction"] if has_prediction else None,
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
    0 for a malformed response with that part)."""

    reward: float
    state_accuracy: float
    prediction_accuracy: float
    slot_rewards: tuple[float, ...] | None = None  # well-formed, with fields: each slot's share of ``reward``, in template order


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
    has_state = strategy in ("StateEstimation", "WorldModeling")
    has_prediction = strategy in ("TransitionModeling", "WorldModeling")
    nan = float("nan")
    if not parsed.well_formed:
        return WorldModelReward(float(format_penalty), 0.0 if has_state else nan, 0.0 if has_prediction else nan)
    state_acc = field_accuracy(parsed.state, true_state, field_weights) if has_state else nan
    pred_acc = field_accuracy(parsed.prediction, true_next_state, field_weights) if has_prediction else nan
    reward = (state_weight * state_acc if has_state else 0.0) + (prediction_weight * pred_acc if has_prediction else 0.0)
    # Each field's own share of the reward, in the order the template writes the slots: the state's
    # fields, then the prediction's, then the action (which earns none).
    total = sum(float(field_weights.get(f, 0.0)) for f in FIELDS)

    def shares(said: dict[str, int], truth: dict[str, int], weight: float) -> list[float]:
        return [weight * float(field_weights.get(f, 0.0)) / total if said[f] == truth[f] else 0.0 for f in FIELDS]

    slot_rewards = (shares(parsed.state, true_state, state_weight) if has_state else []) + (
        shares(parsed.prediction, true_next_state, prediction_weight) if has_prediction else []
    )
    if not slot_rewards:  # NoThink, FreeThink: no fields to share out
        return WorldModelReward(float(reward), state_acc, pred_acc)
    slot_rewards.append(0.0)
    return WorldModelReward(float(reward), state_acc, pred_acc, tuple(slot_rewards))


def full_world_model_reward(strategy: str, state_weight: float, prediction_weight: float) -> float:
    """The reward of a perfect, well-formed response (what centring subtracts each turn)."""
    return (state_weight if strategy in ("StateEstimation", "WorldModeling") else 0.0) + (
        prediction_weight if strategy in ("TransitionModeling", "WorldModeling") else 0.0
    )


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


def readout_tokens_at(strategy: str, vocab: Vocab, free_think_len: int = 12) -> tuple[tuple[int, ...], ...]:
    """Per read-out position (:func:`readout_positions`), the attribute tokens its slot accepts:
    the read-out scores only those (a direction slot, directions; a door slot, door states)."""
    lo, hi = vocab.attribute_tokens
    mask = slot_mask(strategy, vocab, free_think_len)
    return tuple(tuple(int(t) for t in range(lo, hi) if mask[i, t]) for i in readout_positions(strategy, vocab, free_think_len))


def random_well_formed(
    strategy: str, vocab: Vocab, batch_size: int, generator: torch.Generator, free_think_len: int = 12
) -> torch.Tensor:
    """(B, L) responses with a uniformly random token in every slot: grammar without content."""
    columns = []
    for legal in slot_mask(strategy, vocab, free_think_len):
        allowed = legal.nonzero().squeeze(-1)
        columns.append(allowed[torch.randint(len(allowed), (batch_size,), generator=generator)])
    return torch.stack(columns, dim=1)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    lengths = mask.sum(-1).long()
    if (lengths < 1).any():
        raise ValueError("every turn needs at least one valid token (mask row of zeros found)")
    return lengths - 1


def bilevel_gae(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    last_value: torch.Tensor,
    *,
    turn_gamma: float,
    turn_lambda: float,
    token_gamma: float,
    token_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bi-level GAE (VAGEN): turn-level GAE across turns, then token-level GAE inside each turn.

    rewards, dones: (N, T) per turn; values: (N, T, L) the critic's value before each response
    token; mask: (N, T, L) valid response tokens (a prefix of each row, at least one);
    last_value: (N,) the turn value after the last turn.

    1. A turn's value is the value at its last token; turn-level GAE with ``turn_gamma``,
       ``turn_lambda`` over the turn rewards gives the turn advantage ``A_t``.
    2. Inside turn t the last token's advantage is ``A_t`` (its "reward" is the turn return
       ``A_t + V_t`` with nothing after it); earlier tokens get no reward, so
       ``delta_i = token_gamma * V_{i+1} - V_i`` and ``A_i = delta_i + token_gamma * token_lambda * A_{i+1}``.

    With one token per turn this is ordinary GAE. Returns (advantages (N, T, L), returns
    (N, T, L) = advantages + values, both zero off the mask; turn advantages (N, T)).
    """
    mask = mask.to(values.dtype)
    last = _last_token_index(mask)
    turn_values = values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    turn_adv, _ = gae(rewards, dones, turn_values, last_value, turn_gamma, turn_lambda)
    N, T, L = values.shape
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros(N, T, dtype=values.dtype)
    positions = torch.arange(L)
    for i in reversed(range(L)):
        next_value = values[..., i + 1] if i + 1 < L else torch.zeros(N, T, dtype=values.dtype)
        inner = token_gamma * next_value - values[..., i] + token_gamma * token_lambda * next_adv
        adv_i = torch.where(last == positions[i], turn_adv, inner) * mask[..., i]
        advantages[..., i] = adv_i
        next_adv = adv_i
    returns = (advantages + values) * mask
    return advantages, returns, turn_adv


def turn_level_advantages(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    last_value: torch.Tensor,
    *,
    turn_gamma: float,
    turn_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn-level-only GAE (the comparison): every token of turn t gets the turn advantage ``A_t``
    and the turn return as its value target. Shapes as :func:`bilevel_gae`."""
    mask = mask.to(values.dtype)
    last = _last_token_index(mask)
    turn_values = values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    turn_adv, turn_ret = gae(rewards, dones, turn_values, last_value, turn_gamma, turn_lambda)
    return turn_adv.unsqueeze(-1) * mask, turn_ret.unsqueeze(-1) * mask, turn_adv


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


@dataclass
class VagenModelConfig:
    """Shape of :class:`VagenNet` (saved in the checkpoint)."""

    vocab_size: int
    grid_width: int
    grid_height: int
    tile_size: int
    max_response_len: int
    history_len: int = 2
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    encoder_layers: int = 0
    mlp_ratio: int = 2
    first_cell_token: int = -1  # id of c0,0 (cells follow in tile order); -1: no pointer logits
    detach_critic: bool = True  # value head on the actor's features with the gradient stopped
    cell_inputs: bool = False  # a cell token, once written, is read with its tile's pixel embedding
    cell_readout: str = "none"  # embedding or pixels: the token after a cell gets a linear read-out of that tile's in its logits
    value_streams: int = 1  # critic outputs: 1 (the turn reward), or 2 (task reward; world-modeling reward)
    readout_tokens: tuple[int, int] = (0, 0)  # [first, end) token ids the read-out scores (attributes: kinds, door states, directions)
    # Response positions whose logits get the read-out: the slots that accept attribute tokens
    # (:func:`readout_positions`). None: every position, as in checkpoints from before this field.
    readout_positions: tuple[int, ...] | None = None
    # Per read-out position, the attribute token ids its slot accepts (:func:`readout_tokens_at`);
    # None: every attribute token, as in checkpoints from before this field.
    readout_tokens_at: tuple[tuple[int, ...], ...] | None = None
    # The action's logits also read a query token run through the decoder over the prefix alone
    # (what NoThink's action sees). False in checkpoints from before this field.
    action_query: bool = False
    # The query goes through decoder blocks of its own (same shape), not the response's: the
    # thinking tokens' gradients then reach the action's path only through the shared encoder.
    action_query_own_blocks: bool = False


def _add_to_tokens(logits: torch.Tensor, first: int, extra: torch.Tensor) -> torch.Tensor:
    """``logits`` (..., V) with ``extra`` (..., K) added to tokens first .. first + K - 1 (out of place)."""
    end = first + extra.shape[-1]
    return torch.cat([logits[..., :first], logits[..., first:end] + extra, logits[..., end:]], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """q (B, Sq, D), k/v (B, Sk, D) -> (B, Sq, D), multi-head.

    Written out (matmul, softmax, matmul) rather than ``F.scaled_dot_product_attention``: at these
    sizes (head width 8, a few dozen keys) the CPU kernel of the latter cost ~3 ms a call, 57% of
    decoding time, against a few hundred microseconds for the plain version."""
    B, Sq, D = q.shape
    Sk = k.shape[1]
    hs = D // heads
    q = q.view(B, Sq, heads, hs).transpose(1, 2)  # (B, nh, Sq, hs)
    k = k.view(B, Sk, heads, hs).permute(0, 2, 3, 1)  # (B, nh, hs, Sk)
    v = v.view(B, Sk, heads, hs).transpose(1, 2)  # (B, nh, Sk, hs)
    scores = torch.matmul(q, k) * (1.0 / math.sqrt(hs))
    if causal:
        scores = scores.masked_fill(_causal_mask(Sq, Sk, scores.device), float("-inf"))
    y = torch.matmul(torch.softmax(scores, dim=-1), v)
    return y.transpose(1, 2).reshape(B, Sq, D)


_MASKS: dict[tuple[int, int, str], torch.Tensor] = {}


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """True where query i (the last ``sq`` of ``sk`` positions) may not see key j (j > i)."""
    key = (sq, sk, str(device))
    if key not in _MASKS:
        with torch.inference_mode(False):  # a mask first made while decoding must also serve autograd passes
            _MASKS[key] = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
    return _MASKS[key]


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention block over the prefix (tiles and history), bidirectional."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(_attend(q, k, v, self.heads, causal=False))
        return x + self.mlp(self.norm2(x))


class _DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention over the response, cross-attention to the prefix, MLP.

    The prefix's keys and values (:meth:`memory_kv`) are computed once per turn and reused for
    every decoded token, so decoding costs the response, not the prefix, per token.
    """

    def __init__(self, d_model: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.cross_q = nn.Linear(d_model, d_model)
        self.cross_kv = nn.Linear(d_model, 2 * d_model)
        self.cross_proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * d_model, d_model))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_kv(memory).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(_attend(q, k, v, self.heads, causal=True))
        x = x + self.cross_proj(_attend(self.cross_q(self.norm2(x)), *memory_kv, self.heads, causal=False))
        return x + self.mlp(self.norm3(x))

    def step(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor, i: int) -> torch.Tensor:
        """Incremental decoding: x (B, 1, d) is response position ``i``; ``cache`` (B, L, 2d) holds the
        self-attention keys and values of positions < i and receives position i's. The same result
        as :meth:`forward` at position i, for one position's work instead of i + 1."""
        q, kv = self.qkv(self.norm1(x)).split([x.shape[-1], 2 * x.shape[-1]], dim=-1)
        cache[:, i : i + 1] = kv
        k, v = cache[:, : i + 1].chunk(2, dim=-1)
        x = x + self.proj(_attend(q, k, v, self.heads, causal=False))  # position i sees all of 0..i
        x = x + self.cross_proj(_attend(self.cross_q(self.norm2(x)), *memory_kv, self.heads, causal=False))
        return x + self.mlp(self.norm3(x))


@dataclass
class Memory:
    """The encoded prefix of a batch: ``kv`` per decoder block (keys, values (B, P + K, d)) and the
    tile embeddings ``tiles`` (B, P, d) that pointer logits score against."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    tiles: torch.Tensor
    content: torch.Tensor  # (B, P, d) the tiles' pixel embeddings, without position (cell inputs)
    pixels: torch.Tensor | None = None  # (B, P, tile_size^2 * 3) the tiles' pixels in [0, 1] (cell read-out)
    query: torch.Tensor | None = None  # (B, d) the action query's features (action_query)


class VagenNet(nn.Module):
    """A tiny transformer decoder reading [frame tiles | action history], writing the response.

    The prefix is one token per grid tile (a small MLP on the tile's pixels plus a position
    embedding: the same granularity as the tokenizer's one token per tile) and one token per
    remembered action, optionally refined by ``encoder_layers`` self-attention blocks. The decoder
    attends causally over the response and across to the prefix. Logits and value at response
    input position i (``<bos>`` is position 0) are for response token i: the value is the
    estimate before that token is written (a head on the features, gradient stopped).
    """

    def __init__(self, config: VagenModelConfig):
        super().__init__()
        self.config = config
        c = config
        pixels = c.tile_size * c.tile_size * 3
        self.tile_embed = nn.Sequential(nn.Linear(pixels, c.d_model), nn.GELU(approximate="tanh"), nn.Linear(c.d_model, c.d_model))
        self.tile_pos = nn.Parameter(torch.zeros(c.grid_width * c.grid_height, c.d_model))
        self.history_embed = nn.Embedding(NUM_ACTIONS + 1, c.d_model)  # + "no action yet"
        self.history_pos = nn.Parameter(torch.zeros(max(c.history_len, 1), c.d_model))
        self.encoder = nn.ModuleList([_EncoderBlock(c.d_model, c.heads, c.mlp_ratio) for _ in range(c.encoder_layers)])
        self.memory_norm = nn.LayerNorm(c.d_model)
        self.token_embed = nn.Embedding(c.vocab_size, c.d_model)
        self.token_pos = nn.Parameter(torch.zeros(c.max_response_len, c.d_model))
        self.blocks = nn.ModuleList([_DecoderBlock(c.d_model, c.heads, c.mlp_ratio) for _ in range(c.layers)])
        self.norm = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size)
        # The critic is a head on the actor's features with the gradient stopped: it costs no
        # extra pass, and its returns (tens of units with a dense world-modeling reward) cannot
        # pull on the actor's features, which broke the response format within two updates when
        # the value loss trained the shared trunk.
        self.value_head = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.Tanh(), nn.Linear(c.d_model, c.value_streams))
        # Pointer logits: a cell token's logit also scores the decoder state against that tile's
        # embedding, so "where is the key" can be answered by finding the tile that looks like one.
        self.pointer = nn.Linear(c.d_model, c.d_model, bias=False) if c.first_cell_token >= 0 else None
        # Cell inputs, the pointer's other direction: when a response names a cell (the agent's
        # position, the key's), the next positions read that tile's pixel embedding (without its
        # position) along with the token, so "which way does the agent face" is a read-out of the
        # tile just named rather than a search over the frame by cross-attention, which RL alone
        # did not learn in 8k steps even when the direction was the only rewarded field.
        self.cell_input = nn.Linear(c.d_model, c.d_model) if c.cell_inputs and c.first_cell_token >= 0 else None
        # Cell read-out: a direct linear path from the named tile's pixel embedding to the next
        # token's logits (zero at the start), past the decoder's layers and norms, so "the agent at
        # c2,1 faces ..." is a 4-way linear read-out of features that already tell the directions apart.
        self.cell_readout = None
        if c.cell_readout not in ("none", "embedding", "pixels"):
            raise ValueError(f"cell_readout must be none, embedding or pixels, not {c.cell_readout!r}")
        if c.cell_readout != "none" and self.cell_input is not None:
            lo, hi = c.readout_tokens
            if not 0 <= lo < hi <= c.vocab_size:
                raise ValueError(f"readout_tokens {c.readout_tokens} is not a token range of a {c.vocab_size}-token vocabulary")
            self.cell_readout = nn.Linear(c.d_model if c.cell_readout == "embedding" else pixels, hi - lo, bias=False)
            nn.init.zeros_(self.cell_readout.weight)
        # Where the read-out may act. Applied at every position, it also pushed attribute tokens into
        # the slots after the goal's cell (the next agent position, the action), which cannot take
        # them: as its weights grew the action slot came to hold 'door_locked' in every response (the
        # format of DoorKey-5x5 WorldModeling seed 0 collapsed, 0.98 -> 0.00, between 30k and 50k steps).
        # And which tokens: in a direction slot, scoring the door states and object kinds too let
        # 'door_locked' into the slot as the weights grew (DoorKey-5x5 WorldModeling seed 0 of the
        # 55b0464 benchmark: format 0.99 -> 0.73 in its last update, the direction slot holding
        # door_locked or carry_key). With readout_tokens_at (vagen.readout_per_slot, off by default:
        # docs/vagen.md, seventh round) each slot's read-out scores only the tokens it accepts.
        lo, hi = c.readout_tokens
        positions = range(c.max_response_len) if c.readout_positions is None else c.readout_positions
        accepts = c.readout_tokens_at if c.readout_tokens_at is not None else [range(lo, hi)] * len(positions)
        if len(accepts) != len(positions):
            raise ValueError(f"readout_tokens_at has {len(accepts)} entries for {len(positions)} read-out positions")
        gate = torch.zeros(c.max_response_len, max(hi - lo, 1))
        for i, tokens in zip(positions, accepts):
            if not 0 <= i < c.max_response_len:
                raise ValueError(f"readout position {i} is outside a {c.max_response_len}-token response")
            if any(not lo <= t < hi for t in tokens):
                raise ValueError(f"readout tokens {list(tokens)} at position {i} are not all in the read-out's tokens [{lo}, {hi})")
            gate[i, [t - lo for t in tokens]] = 1.0
        self.register_buffer("readout_gate", gate, persistent=False)
        # The action query: a learned token that goes through the decoder's blocks with the prefix
        # and nothing else, as NoThink's <bos> does, and a linear map (zero at the start) from its
        # features to the action logits at the response's last slot. Without it the action, last of
        # 15 tokens, read a frame seen through a response that is noise until the estimate is learned
        # (~40k steps on DoorKey-5x5): WorldModeling's task learning waited for it, and it finished
        # 100k steps with 200-step evaluation episodes where NoThink took 164 (docs/vagen.md, seventh round).
        self.action_query = self.action_readout = None
        if c.action_query and c.max_response_len > 1:
            self.action_query = nn.Parameter(torch.randn(c.d_model) * 0.5)
            if c.action_query_own_blocks:
                self.query_blocks = nn.ModuleList([_DecoderBlock(c.d_model, c.heads, c.mlp_ratio) for _ in range(c.layers)])
                self.query_norm = nn.LayerNorm(c.d_model)
            self.action_readout = nn.Linear(c.d_model, NUM_ACTIONS)
            nn.init.zeros_(self.action_readout.weight)
            nn.init.zeros_(self.action_readout.bias)
        for p in (self.tile_pos, self.history_pos, self.token_pos):
            nn.init.normal_(p, std=0.5)  # large enough that slots and tiles are told apart from the start
        nn.init.zeros_(self.value_head[-1].weight)
        nn.init.zeros_(self.value_head[-1].bias)

    def encode(self, frames: torch.Tensor, history: torch.Tensor) -> "Memory":
        """frames (B, H, W, 3) uint8, history (B, K) int64 in [0, 7] (7: none) -> the prefix: per
        decoder block its cross-attention keys and values, each (B, P + K, d), and the tiles (B, P, d)."""
        c = self.config
        B, H, W, _ = frames.shape
        gh, gw, ts = H // c.tile_size, W // c.tile_size, c.tile_size
        if gh * gw != c.grid_width * c.grid_height or gh * ts != H or gw * ts != W:
            raise ValueError(
                f"frame {H}x{W} is not a {c.grid_height}x{c.grid_width} grid of {ts}-pixel tiles: "
                "was the policy trained on another env or tile size?"
            )
        tiles = frames.float().div(255.0).view(B, gh, ts, gw, ts, 3).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, -1)
        content = self.tile_embed(tiles)
        parts = [content + self.tile_pos]
        if c.history_len > 0:
            parts.append(self.history_embed(history) + self.history_pos)
        memory = torch.cat(parts, dim=1)
        for block in self.encoder:
            memory = block(memory)
        memory = self.memory_norm(memory)
        kv = [block.memory_kv(memory) for block in self.blocks]
        query = None
        if self.action_query is not None:
            query = self.action_query.view(1, 1, -1).expand(B, 1, -1)
            own = self.config.action_query_own_blocks
            for block, block_kv in zip(self.query_blocks if own else self.blocks, kv):
                query = block(query, block.memory_kv(memory) if own else block_kv)
            query = (self.query_norm if own else self.norm)(query[:, 0])
        return Memory(kv, memory[:, : gh * gw], content, tiles, query)

    def decode(self, memory: "Memory", inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, L) response input ids starting with ``<bos>`` -> logits (B, L, V), values (B, L)
        ((B, L, S) with S > 1 value streams)."""
        x, named = self._embed(memory, inputs)
        x = x + self.token_pos[: inputs.shape[1]]
        for block, kv in zip(self.blocks, memory.kv):
            x = block(x, kv)
        logits, values = self._heads(memory, x, named, self.readout_gate[: inputs.shape[1]])
        if self.action_query is not None and inputs.shape[1] == self.config.max_response_len:
            logits = torch.cat([logits[:, :-1], self._add_action_query(memory, logits[:, -1]).unsqueeze(1)], dim=1)
        return logits, values

    def _add_action_query(self, memory: "Memory", logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) of the response's last slot, plus the action query's read-out on the action tokens."""
        return _add_to_tokens(logits, logits.shape[-1] - NUM_ACTIONS, self.action_readout(memory.query))

    def _embed(self, memory: "Memory", inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs (B, L) token ids -> (B, L, d): the token embedding, plus for cell tokens (with
        ``cell_inputs``) a projection of the named tile's pixel embedding; and that pixel embedding
        (B, L, d), zero where the input is not a cell (None without ``cell_inputs``)."""
        x = self.token_embed(inputs)
        if self.cell_input is None:
            return x, None
        cell = inputs - self.config.first_cell_token
        is_cell = (cell >= 0) & (cell < memory.content.shape[1])
        index = cell.clamp(0, memory.content.shape[1] - 1).unsqueeze(-1)
        keep = is_cell.unsqueeze(-1).to(memory.content.dtype)

        def named(per_tile: torch.Tensor) -> torch.Tensor:  # (B, P, C) -> the named tile's row (B, L, C), 0 off cells
            return per_tile.gather(1, index.expand(-1, -1, per_tile.shape[-1])) * keep

        content = named(memory.content)  # (B, L, d)
        readout_input = named(memory.pixels) if self.config.cell_readout == "pixels" else content
        return x + self.cell_input(content) * keep, readout_input

    def _heads(
        self, memory: "Memory", x: torch.Tensor, named: torch.Tensor | None = None, gate: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values from decoder features x (B, L, d); ``gate`` (L, K): where the read-out
        acts, and on which of its K tokens."""
        h = self.norm(x)
        logits = self.lm_head(h)
        if self.cell_readout is not None and named is not None:
            logits = _add_to_tokens(logits, self.config.readout_tokens[0], self.cell_readout(named) * gate)
        if self.pointer is not None:
            scores = self.pointer(h) @ memory.tiles.transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, L, P)
            logits = _add_to_tokens(logits, self.config.first_cell_token, scores)
        values = self.value_head(h.detach() if self.config.detach_critic else h)  # (B, L, streams)
        return logits, values.squeeze(-1) if self.config.value_streams == 1 else values

    def new_cache(self, batch_size: int, length: int) -> list[torch.Tensor]:
        """Empty self-attention key/value caches for :meth:`decode_step`, one (B, L, 2d) per block."""
        return [torch.zeros(batch_size, length, 2 * self.config.d_model) for _ in self.blocks]

    def decode_step(self, memory: "Memory", token: torch.Tensor, i: int, cache: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``token`` (B,) is response input position ``i`` (``<bos>`` at 0) ->
        logits (B, V) and value (B,) for response token i. Positions < i must have been fed, in
        order, through the same ``cache`` (:meth:`new_cache`). Equals :meth:`decode` at position i."""
        x, named = self._embed(memory, token.unsqueeze(1))
        x = x + self.token_pos[i]
        for block, kv, block_cache in zip(self.blocks, memory.kv, cache):
            x = block.step(x, kv, block_cache, i)
        logits, values = self._heads(memory, x, named, self.readout_gate[i : i + 1])
        logits = logits[:, 0]
        if self.action_query is not None and i == self.config.max_response_len - 1:
            logits = self._add_action_query(memory, logits)
        return logits, values[:, 0]

    def forward(self, frames: torch.Tensor, history: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, H, W, 3) uint8, history (B, K), inputs (B, L) -> logits (B, L, V), values (B, L)
        ((B, L, S) with S > 1 value streams)."""
        return self.decode(self.encode(frames, history), inputs)


@dataclass
class Generation:
    """Sampled responses. tokens (B, L) (``<bos>`` id 0 past the end), mask (B, L) valid tokens,
    logprobs (B, L) of the sampled tokens, values (B, L) the critic before each token (0 off the mask;
    (B, L, S) with S > 1 value streams)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor


@torch.no_grad()
def generate(
    net: VagenNet,
    frames: torch.Tensor,
    history: torch.Tensor,
    length: int,
    first_action: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> Generation:
    """Decode up to ``length`` tokens per row from the full vocabulary (no grammar mask); a row
    stops after its first action token (id >= ``first_action``). ``temperature`` 0 is greedy.
    frames (B, H, W, 3) uint8, history (B, K) int64. The prefix is encoded once per turn and the
    response's self-attention keys and values are cached, so each token costs one position's work.
    The outputs are ordinary tensors (PPO trains on them); the decoding runs in inference mode."""
    B = frames.shape[0]
    token = torch.zeros(B, dtype=torch.long)  # <bos>
    tokens = torch.zeros(B, length, dtype=torch.long)
    mask = torch.zeros(B, length, dtype=torch.bool)
    logprobs = torch.zeros(B, length)
    streams = net.config.value_streams
    values = torch.zeros(B, length) if streams == 1 else torch.zeros(B, length, streams)
    with torch.inference_mode():
        alive = torch.ones(B, dtype=torch.bool)
        memory = net.encode(frames, history)  # once per turn
        cache = net.new_cache(B, length)
        for i in range(length):
            logits, value = net.decode_step(memory, token, i, cache)
            values[:, i] = value * (alive if streams == 1 else alive.unsqueeze(-1))
            if temperature <= 0:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(-1)
            token = torch.where(alive, token, torch.zeros_like(token))
            tokens[:, i] = token
            mask[:, i] = alive
            logprobs[:, i] = torch.log_softmax(logits, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1) * alive
            alive = alive & (token < first_action)
            if not alive.any():
                break
    return Generation(tokens, mask, logprobs, values)


def token_logprobs(
    net: VagenNet, frames: torch.Tensor, history: torch.Tensor, tokens: torch.Tensor, entropy_mask: torch.Tensor | None = None
):
    """Teacher-forced pass over response tokens (B, L): log-probs (B, L), entropies (B, L) and
    values (B, L, the value before each token) at every position (mask them outside).

    With ``entropy_mask`` (L, V) bool (:func:`slot_mask`), a position's entropy is that of its
    distribution renormalised over the tokens its slot accepts: an entropy bonus then spreads
    probability over well-formed choices, where over the whole vocabulary it also rewards
    moving mass onto tokens that break the format."""
    inputs = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
    logits, values = net(frames, history, inputs)
    log_p = torch.log_softmax(logits, dim=-1)
    logprobs = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if entropy_mask is not None:
        log_q = torch.log_softmax(logits.masked_fill(~entropy_mask, float("-inf")), dim=-1)
        entropy = -(log_q.exp() * log_q.masked_fill(~entropy_mask, 0.0)).sum(-1)
    else:
        entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy, values


# ---------------------------------------------------------------------------------------------
# The saved policy
# ---------------------------------------------------------------------------------------------


@register_policy("vagen")
class VagenAgent(Policy):
    """The trained agent behind the common interface: reads ``frames`` (B, H, W, 3), keeps the last
    ``history_len`` actions of each row, writes a response per row and returns its action (the
    no-op for a malformed response). ``last_responses`` holds the parsed responses of the last call.
    """

    inputs = ("frames",)

    def __init__(
        self,
        net: VagenNet,
        strategy: str,
        vocab: Vocab,
        free_think_len: int = 12,
        temperature: float = 1.0,
        config: dict | None = None,
        name: str | None = None,
    ):
        super().__init__(name or f"vagen-{strategy}")
        self.net = net.eval()
        self.strategy = strategy
        self.vocab = vocab
        self.free_think_len = free_think_len
        self.length = len(template(strategy, free_think_len))
        self.temperature = temperature
        self.config = dict(config or {})
        self.generator = torch.Generator().manual_seed(0)
        self.history = np.full((0, net.config.history_len), NUM_ACTIONS, dtype=np.int64)
        self.last_responses: list[ParsedResponse] = []

    def reset(self, batch_size: int, seed: int | None = None) -> None:
        super().reset(batch_size, seed)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        self.history = np.full((batch_size, self.net.config.history_len), NUM_ACTIONS, dtype=np.int64)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Clear the action history of the rows whose episode restarted."""
        self.history[rows] = NUM_ACTIONS

    def act(self, inp: PolicyInput) -> np.ndarray:
        frames = inp.require("frames", self.name)
        if len(self.history) != len(frames):
            self.reset(len(frames))
        gen = generate(
            self.net, torch.from_numpy(np.ascontiguousarray(frames)), torch.from_numpy(self.history), self.length,
            self.vocab.first_action, self.generator, self.temperature,
        )
        self.last_responses = [
            parse_response(gen.tokens[b, : int(gen.mask[b].sum())].tolist(), self.strategy, self.vocab, self.free_think_len)
            for b in range(len(frames))
        ]
        actions = np.array([r.action for r in self.last_responses], dtype=np.int64)
        if self.history.shape[1] > 0:
            self.history = np.concatenate([self.history[:, 1:], actions[:, None]], axis=1)
        return actions

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model_config": asdict(self.net.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "strategy": self.strategy,
            "grid": [self.vocab.width, self.vocab.height],
            "free_think_len": self.free_think_len,
            "fields": list(FIELDS),
            "temperature": self.temperature,
            "config": self.config,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu") -> "VagenAgent":
        config = VagenModelConfig(**checkpoint["model_config"])
        parts = [part for part, _ in template(checkpoint["strategy"], int(checkpoint["free_think_len"]))]
        slots = len(parts)
        if config.max_response_len != slots:
            raise ValueError(
                f"this {checkpoint['strategy']} policy writes {config.max_response_len}-token responses but the template "
                f"has {slots} slots (fields {', '.join(FIELDS)}): it was saved by a version with other state fields; retrain it"
            )
        saved_fields = checkpoint.get("fields")
        if ("state" in parts or "prediction" in parts) and saved_fields != list(FIELDS):  # its responses name the fields
            said = ", ".join(saved_fields) if saved_fields else "not recorded: saved before the key's position moved ahead of carrying"
            raise ValueError(
                f"this {checkpoint['strategy']} policy writes its fields in another order ({said}) than today's template "
                f"({', '.join(FIELDS)}): its responses would be misread; retrain it"
            )
        net = VagenNet(config)
        net.load_state_dict(checkpoint["state_dict"])
        width, height = checkpoint["grid"]
        return cls(
            net, checkpoint["strategy"], Vocab(width, height), int(checkpoint["free_think_len"]),
            float(checkpoint.get("temperature", 1.0)), checkpoint.get("config"),
        )


def chance_state_accuracy(vocab: Vocab, field_weights: dict[str, float]) -> float:
    """Expected field accuracy of a uniform guess within each field's slot type (the chance level)."""
    total = sum(float(field_weights.get(f, 0.0)) for f in FIELDS)
    return sum(float(field_weights.get(f, 0.0)) / len(vocab.slot_tokens[FIELD_SLOT[f]]) for f in FIELDS) / total


def is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
