"""The action-conditioned dynamics model: token history + action -> next frame's tokens, reward,
termination and the symbolic state of every frame.

Shape of the model (chosen by measurement on a 2-core CPU, see docs/dynamics.md):

```
frame t tokens (h, w) ──embed [+ pos]──▶ frame encoder (blocks within the frame) ──▶ E_t (N, d)
E_t ──project + pool / flatten──▶ summary s_t ──┐
prev action a_{t-1} ──embed─────────────────────┴─▶ GRU memory ──▶ c_t (frames <= t, actions < t)
(E_t, c_t) ──▶ state head ──▶ symbolic state of frame t
(E_t, c_t, action a_t, [partly known next tokens]) ──▶ frame decoder ──▶ logits of all N tokens
                                                                      of frame t+1, reward, termination
```

- Causal in time by construction: the encoder sees one frame, the memory is a recurrent net fed
  frames <= t and actions < t, the decoder adds the action a_t. A rollout carries the memory as
  its cache (:class:`DynamicsCache`), so H imagined steps cost H steps, whatever the history.
- All N tokens of the next frame come out of one decoder pass. Where the next frame is uncertain
  (partial view), tokens are sampled with a temperature and optionally refined MaskGIT-style: the
  decoder also takes the next frame's tokens with some of them masked, so a few passes can fix the
  most confident tokens first and sample the rest given them (training draws random masks).
- Action dropout: during training an action is replaced by a learned "no action" embedding with
  probability ``action_dropout``; the same model then learns from action-free video (action -1),
  and classifier-free action guidance ``logits_uncond + g * (logits_cond - logits_uncond)`` is a
  sampling option (Vid2World).

- Egocentric view (``memory="map"``): the rollout also carries an allocentric map of the last token
  seen at every cell and the agent's dead-reckoned pose (:mod:`worldmodel.memory`); the decoder reads
  the map under the next pose (``unknown`` where never seen) instead of the current frame, so what was
  seen comes back as it was. Whether a step forward moved, the reward and the termination come from
  the cell in front of the agent and the action (one small head); training uses the true poses.

- Full view: no parameter depends on the grid's size (no learned positions, pooled summary, a
  per-cell state head), so one model runs on any grid (:meth:`DynamicsModel.on_grid`) and one
  model can learn many envs (``data.mix``, docs/dynamics.md).

Token grids are (h, w) = (H / patch, W / patch); N = h * w. ``S`` is the symbolic state length.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.atomic import ArtifactError
from common.checkpoints import read_checkpoint
from envs.state import NUM_COLORS, NUM_OBJECTS, NUM_STATES, StateCodec
from worldmodel import memory as token_map

# ---------------------------------------------------------------------------------------------
# Config and typed inputs / outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class DynamicsModelConfig:
    """The model's shape: everything needed to rebuild it before loading weights. No defaults for
    what the stage config sets: ``worldmodel.train_dynamics.model_config`` derives them from it."""

    vocab_size: int  # tokenizer vocabulary V
    grid_height: int  # h: token rows per frame
    grid_width: int  # w: token columns per frame
    state_width: int  # symbolic state grid width (cells); state length S = W * H * 3 + 6
    state_height: int
    num_actions: int
    dim: int  # width of the per-token features
    heads: int  # attention heads, or channel groups of the "mix" block
    block: str  # conv | mix | attention: how tokens of a frame exchange information
    encoder_layers: int  # blocks reading the current frame before memory and state head
    decoder_layers: int  # blocks predicting the next frame
    mlp_ratio: int
    memory_dim: int  # GRU width
    summary_channels: int  # egocentric: per-token channels flattened into the frame summary (full view: pooled features)
    state_hidden: int
    action_dropout: float  # probability an action is replaced by "no action" in training
    # What the heads' memory holds: "recurrent" (a GRU over every frame and action so far: what the
    # partial view needs) or "frame" (the GRU's first step on the current frame alone: the model is
    # Markov in the frame). With a few dozen goal steps in the data, a recurrent memory lets the heads
    # tie rare events to the histories they happened after (measured on DoorKey-5x5 random data:
    # the goal step right from a one-frame context, wrong after any longer one); where the frame is
    # the whole state (full view), "frame" generalises from those few. "map" (egocentric view): an
    # allocentric token map written at a dead-reckoned pose (worldmodel/memory.py); the decoder reads
    # the map under the next pose, so what was seen comes back as it was (object permanence by
    # construction); the GRU stays for the state head.
    memory: str
    # What the next-frame decoder and the reward/termination heads see: "global" (every token also
    # gets the memory; the heads read the pooled decoder features and the memory) or "local" (no
    # memory: a token's prediction depends on its neighbourhood of decoder_layers tiles only, and
    # reward/termination are read off the transition cell by cell — each position's token before
    # and after, and the action — combined by a noisy-or). Gridworld dynamics are local;
    # with one success in the data, the global model tied it to the whole frame it happened in
    # (the key and the door elsewhere) and missed it in every other layout.
    decoder_context: str
    presence: bool  # local decoding: add the max-pooled tiles of the whole frame (position-free)
    refine_fraction: float  # share of training transitions whose next frame is partly given (MaskGIT)
    change_weight: float  # extra loss weight of tokens that change from one frame to the next
    event_weight: float  # BCE weight of the rare positive reward / termination steps (oversampled in training too)
    # The tokens the decoder can output (sorted ids; empty: the whole vocabulary). A tokenizer's
    # vocabulary is often far larger than the tiles a game has (512 codes, ~20 tiles): predicting
    # over the tokens seen in training makes the output layer, the loss and sampling that much cheaper.
    output_tokens: list[int] = field(default_factory=list)
    # Token positions (row-major) that hold the same token in every training frame: the outer wall
    # of a full-view room (20 of DoorKey-6x6's 36). The decoder copies them and spends its per-token
    # work (MLP, output layer) on the others only: imagination ~1.3x faster (docs/dynamics.md).
    # Empty: every position is predicted.
    static_cells: list[int] = field(default_factory=list)
    # memory="map": the token of a hidden (occluded, drawn black) view cell, never written into the
    # map, and the map's side (cells). -1 / 0 for the other memories.
    hidden_token: int = -1
    map_size: int = 0
    # memory="map", for the state head (:meth:`DynamicsModel.place_state`): the cell content (object,
    # colour, state) each token draws (V rows, -1: unknown), the env's layouts (L rows of W * H
    # structures, worldmodel.metrics.structure) and the one content of each structure class (5 rows,
    # -1 where it varies). Empty: the head's MLP states every field.
    tile_contents: list = field(default_factory=list)
    layouts: list = field(default_factory=list)
    structure_contents: list = field(default_factory=list)
    # The token grid is the agent's view, not the world grid (env.obs=partial). Told, not inferred
    # from the shapes: LavaGapS7's 7x7 world is the size of the 7x7 egocentric view.
    egocentric: bool = False
    reward_weight: float = 1.0
    termination_weight: float = 1.0
    state_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dynamics dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if self.decoder_context not in DECODER_CONTEXTS:
            raise ValueError(f"unknown dynamics decoder_context '{self.decoder_context}': choose one of {DECODER_CONTEXTS}")
        if self.memory not in MEMORY_TYPES:
            raise ValueError(f"unknown dynamics memory '{self.memory}': choose one of {MEMORY_TYPES}")
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"unknown dynamics block type '{self.block}': choose one of {BLOCK_TYPES}")
        for name in ("vocab_size", "grid_height", "grid_width", "state_width", "state_height", "num_actions"):
            if getattr(self, name) < 1:
                raise ValueError(f"dynamics {name} must be positive, got {getattr(self, name)}")
        if self.memory == "map" and not self.egocentric:
            raise ValueError("dynamics memory 'map' is for the egocentric view (egocentric=True)")
        if self.memory == "map":
            if self.grid_height != self.grid_width:
                raise ValueError("dynamics memory 'map' needs a square egocentric view (one token per tile)")
            if not 0 <= self.hidden_token < self.vocab_size:
                raise ValueError(f"dynamics memory 'map' needs hidden_token in [0, {self.vocab_size}), got {self.hidden_token}")
            if self.map_size < 2 * self.grid_height - 1:
                raise ValueError(f"dynamics map_size ({self.map_size}) must be at least 2 * view - 1 = {2 * self.grid_height - 1}")
            if self.decoder_context != "local":
                raise ValueError("dynamics memory 'map' decodes locally: the map, not the GRU, is what the decoder reads")
            if self.static_cells:
                raise ValueError("dynamics memory 'map': an egocentric view has no static cells")
        if self.tile_contents or self.layouts or self.structure_contents:
            if self.memory != "map":
                raise ValueError("dynamics tile_contents / layouts / structure_contents are for memory 'map'")
            cells = self.state_width * self.state_height
            if (len(self.tile_contents) != self.vocab_size or len(self.structure_contents) != 5 or not self.layouts
                    or any(len(row) != cells for row in self.layouts)):
                raise ValueError(f"dynamics placement tables: tile_contents needs {self.vocab_size} rows, "
                                 f"structure_contents 5, layouts at least one of {cells} cells")
        if any(not 0 <= int(v) < self.num_tokens for v in self.static_cells):
            raise ValueError(f"dynamics static_cells must lie in [0, {self.num_tokens})")
        if len(set(int(v) for v in self.static_cells)) >= self.num_tokens:
            raise ValueError("dynamics static_cells cover the whole frame: nothing would be predicted")

    @property
    def num_tokens(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def full_view(self) -> bool:
        """The token grid is the world grid: a token per cell, a model of any grid size (:meth:`DynamicsModel.on_grid`)."""
        return not self.egocentric and (self.grid_height, self.grid_width) == (self.state_height, self.state_width)

    @property
    def state_size(self) -> int:
        return StateCodec(self.state_width, self.state_height).size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DynamicsModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"dynamics model config has unknown fields {unknown}")
        return cls(**values)


CELL_FIELDS = (NUM_OBJECTS, NUM_COLORS, NUM_STATES)  # classes of a cell's fields: object, colour, state
POOLED_FIELDS = (4, NUM_OBJECTS, NUM_COLORS, NUM_STATES)  # the agent's direction and carried object


def state_field_classes(width: int, height: int) -> list[int]:
    """Number of classes of every field of the state array (see :mod:`envs.state`)."""
    return list(CELL_FIELDS) * (width * height) + [width, height, *POOLED_FIELDS]


@dataclass
class DynamicsBatch:
    """Training windows as tensors. A transition t -> t+1 counts where mask[t + 1] and actions[t] >= 0
    or (action-free video) where mask[t + 1]; ``action_free`` marks windows without actions."""

    tokens: torch.Tensor  # (B, T, h, w) int64
    actions: torch.Tensor  # (B, T) int64, -1 = no action (last frame, or action-free video)
    rewards: torch.Tensor  # (B, T) float32: outcome of actions[t]
    terminated: torch.Tensor  # (B, T) bool
    states: torch.Tensor  # (B, T, S) int64
    mask: torch.Tensor  # (B, T) bool: a real frame

    def to(self, device: torch.device | str) -> "DynamicsBatch":
        return DynamicsBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


@dataclass
class Losses:
    """A total to minimise and its named parts (the parts become log keys)."""

    total: torch.Tensor  # scalar
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> scalar (detached)


@dataclass
class DynamicsOutput:
    """Teacher-forced predictions for every position of a window."""

    token_logits: torch.Tensor  # (B, T, N, K): logits of frame t+1's tokens over the K output tokens
    reward_logit: torch.Tensor  # (B, T): non-zero reward after actions[t]
    reward_value: torch.Tensor  # (B, T): its value, where non-zero
    termination_logit: torch.Tensor  # (B, T)
    state_logits: torch.Tensor  # (B, T, S, K): symbolic state of frame t
    moved_logit: torch.Tensor | None = None  # (B, T): memory="map": did actions[t] move the agent


@dataclass
class DynamicsCache:
    """What a rollout carries between steps: the current frame's features and the memory."""

    tokens: torch.Tensor  # (B, N): the current frame's tokens
    features: torch.Tensor  # (B, N, d): encoder features E_t of the current frame
    # (B, m): GRU state c_t (frames <= t, actions < t). None with ``memory="frame"``: then it is a
    # function of the features alone, computed only when read (DynamicsModel.memory_of).
    memory: torch.Tensor | None
    # memory="map" only (else None): the token map and the agent's pose (worldmodel/memory.py).
    map: torch.Tensor | None = None  # (B, M * M + 1) int64
    pose: torch.Tensor | None = None  # (B, 3) int64
    # memory="map" with the placement tables: the map's placement in the world (B,) and the structure
    # its fitting layouts agree on (B, W * H) (:func:`worldmodel.memory.place`).
    placement: torch.Tensor | None = None
    agreed: torch.Tensor | None = None

    def place_of(self) -> token_map.MapState:
        """The cache's map, pose and placement as a :class:`worldmodel.memory.MapState`."""
        assert self.map is not None and self.pose is not None
        return token_map.MapState(self.map, self.pose, self.placement, self.agreed)

    def replace_rows(self, index: torch.Tensor, other: "DynamicsCache", other_memory: torch.Tensor | None) -> "DynamicsCache":
        """A new cache whose rows ``index`` (R,) come from ``other`` (R rows; ``other_memory`` its memory)."""
        def put(mine, theirs):
            return None if mine is None else mine.index_copy(0, index, theirs)
        return DynamicsCache(tokens=put(self.tokens, other.tokens), features=put(self.features, other.features),
                             memory=put(self.memory, other_memory), map=put(self.map, other.map),
                             pose=put(self.pose, other.pose), placement=put(self.placement, other.placement),
                             agreed=put(self.agreed, other.agreed))


@dataclass
class StepPrediction:
    """One imagined transition (before or after sampling)."""

    tokens: torch.Tensor  # (B, h, w) int64: the next frame
    reward: torch.Tensor  # (B,) float32
    terminated: torch.Tensor  # (B,) bool
    reward_probability: torch.Tensor  # (B,)
    termination_probability: torch.Tensor  # (B,)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    """Pre-norm transformer block over the N tokens of one frame (no mask: within-frame only)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, grid: tuple[int, int]):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, d) -> (B, N, d), or (B, R, d): only the positions ``rows`` (R,) after the mixing."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d/heads)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, d))
        if rows is not None:
            x = x.index_select(1, rows)
        return x + self.mlp(self.norm2(x))


class ConvBlock(nn.Module):
    """Pre-norm residual block over one frame's token grid: a 3x3 convolution (a token's next value
    depends mostly on its neighbours: the agent moves one tile), optionally a learned per-channel-group
    mixing of all N positions (``mix``: global, content-independent moves such as the egocentric
    view turning with the agent), then a per-token MLP. About half the cost of attention at batch
    256 on the CPU (measured), which is what imagination speed hangs on."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, grid: tuple[int, int], mix: bool = False):
        super().__init__()
        self.grid = grid
        n = grid[0] * grid[1]
        self.norm1 = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.groups = heads
        self.mix = nn.Parameter(torch.zeros(heads, n, n)) if mix else None  # (groups, N, N), starts as no-op
        self.norm_mix = nn.LayerNorm(dim) if mix else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, d) on a ``grid`` (h, w) (default: the one it was built for; a ``mix`` block
        knows that one only) -> (B, N, d), or (B, R, d): only the positions ``rows`` (R,) after the mixing."""
        b, n, d = x.shape
        h, w = self.grid if grid is None or self.mix is not None else grid
        # (B, h, w, d) permuted to NCHW is channels-last in memory: the fast CPU conv path, no copy.
        y = self.norm1(x).view(b, h, w, d).permute(0, 3, 1, 2)
        if rows is not None and self.mix is None:
            # Only the rows' outputs: the convolution over their bounding box, unpadded where the box
            # lies inside the frame (the interior of a walled room: 16 of 36 positions in DoorKey-6x6).
            box, inside = _bounding_box(rows, w)
            r0, r1, c0, c1 = box
            if r0 >= 1 and c0 >= 1 and r1 <= h - 2 and c1 <= w - 2:
                window = y[:, :, r0 - 1:r1 + 2, c0 - 1:c1 + 2]
            else:
                window = F.pad(y, (1, 1, 1, 1))[:, :, r0:r1 + 3, c0:c1 + 3]
            out = F.conv2d(window, self.conv.weight, self.conv.bias)  # (B, d, box h, box w)
            x = x.index_select(1, rows) + out.permute(0, 2, 3, 1).reshape(b, -1, d).index_select(1, inside)
            return x + self.mlp(self.norm2(x))
        x = x + self.conv(y).permute(0, 2, 3, 1).reshape(b, n, d)
        if self.mix is not None and self.norm_mix is not None:
            y = self.norm_mix(x).view(b, n, self.groups, d // self.groups)
            x = x + torch.einsum("bngc,gnm->bmgc", y, self.mix).reshape(b, n, d)
        if rows is not None:
            x = x.index_select(1, rows)
        return x + self.mlp(self.norm2(x))


def _bounding_box(rows: torch.Tensor, width: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """Row-major positions (R,) -> their bounding box (r0, r1, c0, c1) and each one's index inside it."""
    r, c = rows // width, rows % width
    box = (int(r.min()), int(r.max()), int(c.min()), int(c.max()))
    return box, (r - box[0]) * (box[3] - box[2] + 1) + (c - box[2])


BLOCK_TYPES = ("conv", "mix", "attention")
MEMORY_TYPES = ("recurrent", "frame", "map")
# The most cell comparisons (placements x layouts x world cells) the egocentric state head's
# placement may cost per frame: DoorKey-8x8's 36 x 4 x 20 x 64 = 184k; DoorKey-16x16's 31M is off.
PLACEMENT_LIMIT = 1 << 20
DECODER_CONTEXTS = ("global", "local")
SAMPLING_ORDERS = ("parallel", "sequential", "objects")
# Sequential sampling takes a cell's most likely token without drawing when it is at least this
# likely: the deterministic cells of a frame cost one pass, and their long tail is cut.
SURE_PROBABILITY = 0.99
STATIC_LOGIT = -30.0  # logit of every token but the current one at a static position (probability ~1e-13)


def make_block(kind: str, dim: int, heads: int, mlp_ratio: int, grid: tuple[int, int]) -> nn.Module:
    if kind == "attention":
        return AttentionBlock(dim, heads, mlp_ratio, grid)
    if kind in ("conv", "mix"):
        return ConvBlock(dim, heads, mlp_ratio, grid, mix=kind == "mix")
    raise ValueError(f"unknown dynamics block type '{kind}': choose one of {BLOCK_TYPES}")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DynamicsModel(nn.Module):
    """Frame encoder + GRU memory + parallel frame decoder, with reward, termination and state heads.

    Action index ``num_actions`` is the learned "no action" embedding; token index ``vocab_size``
    is the decoder's MASK input (a next-frame token not yet known).
    """

    def __init__(self, config: DynamicsModelConfig):
        super().__init__()
        self.config = config
        c = config
        n, d = c.num_tokens, c.dim
        self.no_action = c.num_actions
        self.mask_token = c.vocab_size
        self.token_embedding = nn.Embedding(c.vocab_size, d)
        # Full view: no parameter depends on the grid's size, so one model runs on any grid
        # (:meth:`on_grid`): gridworld rules do not depend on where they happen, the blocks are
        # convolutions, the summary and the agent's and carried object's fields are pooled over
        # the cells. The egocentric view keeps learned positions: its cells are fixed places
        # relative to the agent, and its state head states the world from the view.
        self.grid_free = c.full_view
        self.grid = (c.grid_height, c.grid_width)
        self.position = None if self.grid_free else nn.Parameter(torch.randn(n, d) * 0.02)
        self.encoder = nn.ModuleList([make_block(c.block, d, c.heads, c.mlp_ratio, self.grid) for _ in range(c.encoder_layers)])
        self.encoder_norm = nn.LayerNorm(d)
        # Summary: a small projection per token, flattened (keeps *where* things are); for the full
        # view, the features mean- and max-pooled over the cells (any grid; all d channels: through
        # an 8-channel projection the pool lost which colour the locked door is, so which key is
        # carried: KeyCorridor's state head 0.984 against 0.997 flattened).
        self.summary_in = None if self.grid_free else nn.Linear(d, c.summary_channels)
        summary_width = 2 * d if self.grid_free else n * c.summary_channels
        self.summary = nn.Linear(summary_width, c.memory_dim)
        self.memory_action = nn.Embedding(c.num_actions + 1, c.memory_dim)
        self.memory = nn.GRU(c.memory_dim, c.memory_dim, batch_first=True)
        # State head: the frame's own features (cells) plus the memory (what the frame cannot show).
        # Full view: the token grid *is* the world grid, so a cell's fields and whether the agent
        # stands there are read from its own token's features (a per-token head); the agent's x and
        # y are the pooled "agent here" logits over the columns and rows, and the MLP only states
        # direction and carried object. Egocentric view: the MLP states every field from the view
        # and the memory.
        self._set_state_grid(c.state_width, c.state_height)
        outputs = sum(POOLED_FIELDS) if self.grid_free else len(self.state_classes) * self.state_max_classes
        self.state_head = nn.Sequential(
            nn.Linear(summary_width + c.memory_dim, c.state_hidden),
            nn.GELU(),
            nn.Linear(c.state_hidden, outputs),
        )
        self.cell_state_head = (
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, sum(CELL_FIELDS) + 1))
            if self.grid_free else None
        )
        # Decoder conditioning: memory (global decoding only) and action are added to every token's features.
        self.decoder_memory: nn.Linear | None = nn.Linear(c.memory_dim, d)
        self.decoder_action = nn.Embedding(c.num_actions + 1, d)
        self.next_token_embedding = nn.Embedding(c.vocab_size + 1, d)
        self.decoder = nn.ModuleList([make_block(c.block, d, c.heads, c.mlp_ratio, self.grid) for _ in range(c.decoder_layers)])
        self.decoder_norm = nn.LayerNorm(d)
        output = sorted(set(int(v) for v in c.output_tokens)) or list(range(c.vocab_size))
        if output[0] < 0 or output[-1] >= c.vocab_size:
            raise ValueError(f"dynamics output_tokens must lie in [0, {c.vocab_size})")
        self.num_outputs = len(output)
        to_output = torch.full((c.vocab_size + 1,), -1, dtype=torch.long)
        to_output[torch.tensor(output)] = torch.arange(len(output))
        self.register_buffer("output_tokens", torch.tensor(output, dtype=torch.long), persistent=False)  # (K,)
        self.register_buffer("token_to_output", to_output, persistent=False)  # (V + 1,), -1: not an output
        self.token_head = nn.Linear(d, self.num_outputs)
        static = torch.zeros(n, dtype=torch.bool)
        static[[int(v) for v in c.static_cells]] = True
        self.register_buffer("static_mask", static, persistent=False)  # (N,)
        # (D,) the positions the decoder predicts; None: all of them
        self.register_buffer("dynamic_cells", (~static).nonzero()[:, 0] if static.any() else None, persistent=False)
        # Most tokens do not change from one frame to the next: a learned bonus on the current
        # token's logit starts the decoder at "copy the frame" and lets it learn the changes.
        self.copy_bias = nn.Parameter(torch.tensor(3.0))
        self.local = c.decoder_context == "local"
        self.outcome_head = nn.Sequential(nn.Linear(d if self.local else d + c.memory_dim, c.state_hidden // 2),
                                          nn.GELU(), nn.Linear(c.state_hidden // 2, 3))
        # Local decoding still needs one thing a neighbourhood cannot show: what lies elsewhere (is
        # the key on the floor or carried? a locked door opens only in the second case). The
        # tiles present anywhere in the frame, max-pooled without position, say it for any layout.
        self.presence = nn.Linear(d, d) if self.local and c.presence else None
        if self.local:  # per-cell transition features: token before, token after, action
            self.outcome_before = nn.Embedding(c.vocab_size, d)
            self.outcome_after = nn.Embedding(c.vocab_size, d)
            self.outcome_action = nn.Embedding(c.num_actions + 1, d)
            self.outcome_unchanged = nn.Parameter(torch.zeros(d))
        self.map_memory = c.memory == "map"
        if self.map_memory:
            self.unknown_token = c.vocab_size  # a map cell never seen (the decoder's input only)
            self.unknown_embedding = nn.Parameter(torch.zeros(d))
            # The cell in front and the action decide all a step does besides what the view draws:
            # whether the agent moves (the pose), the reward and the termination. One head reads
            # them: [reward non-zero, reward value, termination, moved] logits.
            self.front_token = nn.Embedding(c.vocab_size, d)
            self.front_action = nn.Embedding(c.num_actions + 1, d)
            self.front_head = nn.Sequential(nn.Linear(d, c.state_hidden // 2), nn.GELU(), nn.Linear(c.state_hidden // 2, 4))
        # The egocentric state head's exact part: the map placed in the world (worldmodel/memory.py).
        # Off (the MLP states every field) without the tables, or where matching every placement
        # against every layout would cost more than PLACEMENT_LIMIT cell comparisons per frame.
        self.placing = False
        if self.map_memory and c.layouts:
            origins, index = token_map.placements(c.state_width, c.state_height, c.map_size)
            layouts = torch.tensor(c.layouts, dtype=torch.long)
            if index.numel() * len(layouts) <= PLACEMENT_LIMIT:
                self.placing = True
                contents = torch.cat([torch.tensor(c.tile_contents, dtype=torch.long), torch.full((1, 3), -1)])
                structure = token_map.structure_of(contents)
                self.register_buffer("placement_origins", origins, persistent=False)  # (P, 3)
                self.register_buffer("placement_index", index, persistent=False)  # (P, W * H)
                self.register_buffer("layouts", layouts, persistent=False)  # (L, W * H)
                self.register_buffer("tile_content", contents, persistent=False)  # (V + 1, 3); row V: never seen
                self.register_buffer("tile_structure", torch.where(contents[:, 0] >= 0, structure, -1), persistent=False)
                self.register_buffer("structure_content", torch.tensor(c.structure_contents + [[-1, -1, -1]],
                                                                       dtype=torch.long), persistent=False)  # (6, 3); row 5: none
                self.register_buffer("map_world", token_map.world_cells(index, c.map_size), persistent=False)  # (P, M * M + 1)
                # What the placed layout says of a never-seen cell (:meth:`prior_view`): its structure
                # class + 1 (0: nothing, the cell is seen or the layouts differ), added to the UNKNOWN embedding.
                self.layout_hint = nn.Embedding(6, d)
        self.apply(self._init)
        # Conditioning inputs are added to layer-normed (unit-scale) token features: at the usual
        # 0.02 scale the action would be a whisper the decoder takes hundreds of steps to hear
        # (measured: turns stuck at 45% exact), so they start at the features' scale.
        for embedding in (self.decoder_action, self.memory_action, self.next_token_embedding):
            nn.init.normal_(embedding.weight, std=1.0)
        for linear in (self.decoder_memory, self.summary):
            nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
        if self.map_memory:
            for embedding in (self.front_token, self.front_action):
                nn.init.normal_(embedding.weight, std=1.0)
            if self.placing:
                nn.init.normal_(self.layout_hint.weight, std=1.0)
                with torch.no_grad():
                    self.layout_hint.weight[0].zero_()
            # Events come from the front head: the per-cell transition reading goes unused.
            self.outcome_head = self.outcome_before = self.outcome_after = None  # type: ignore[assignment]
            self.outcome_action = None  # type: ignore[assignment]
            self.outcome_unchanged = None  # type: ignore[assignment]
        if self.local:
            # Local decoding reads no memory. Built and initialised above all the same, so that a
            # seed draws the same weights whatever decoder_context; dropped so that no parameter
            # goes without a gradient (DistributedDataParallel requires it).
            self.decoder_memory = None

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ----------------------------------------------------------------- pieces
    def _action_index(self, actions: torch.Tensor) -> torch.Tensor:
        """-1 (no action) -> the learned "no action" index."""
        return torch.where(actions < 0, torch.full_like(actions, self.no_action), actions)

    def on_grid(self, grid_height: int, grid_width: int) -> "DynamicsModel":
        """The same model (the same parameters, not a copy of them) on a full-view grid of another
        size: one model for many envs. On its own grid: the model itself; elsewhere nothing is
        copied at a static position (the cells a room's wall holds differ from grid to grid)."""
        shape = (int(grid_height), int(grid_width))
        if shape == self.grid:
            return self
        if not self.grid_free:
            raise ValueError("only a full-view dynamics model runs on another grid (the egocentric model "
                             "has learned positions and a state head sized for its world)")
        view = copy.copy(self)  # shares the parameters and submodules; own grid, config and buffers
        view._buffers = dict(self._buffers)
        view.config = dataclasses.replace(self.config, grid_height=shape[0], grid_width=shape[1],
                                          state_height=shape[0], state_width=shape[1], static_cells=[])
        view.grid = shape
        view.static_mask = view.dynamic_cells = None
        view._set_state_grid(shape[1], shape[0])
        return view

    def _set_state_grid(self, width: int, height: int) -> None:
        """The state fields' classes for a world of width x height cells."""
        self.state_classes = state_field_classes(width, height)
        self.state_max_classes = max(self.state_classes)
        valid = torch.arange(self.state_max_classes)[None, :] < torch.tensor(self.state_classes)[:, None]
        self.register_buffer("state_valid", valid.to(self.token_embedding.weight.device), persistent=False)  # (S, K)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., h, w) -> features (..., N, d), each frame on its own."""
        lead = tokens.shape[:-2]
        n, d = self.config.num_tokens, self.config.dim
        flat = tokens.reshape(-1, n)
        if not self.encoder and flat.shape[0] > self.config.vocab_size:
            # No encoder blocks: a token's features depend on its value and position alone, so the
            # (V, N, d) table of all of them is cheaper than normalising every token of a big batch.
            if self.position is None:
                return F.embedding(flat, self.encoder_norm(self.token_embedding.weight)).reshape(*lead, n, d)
            table = self.encoder_norm(self.token_embedding.weight[:, None] + self.position)  # (V, N, d)
            index = flat * n + torch.arange(n, device=flat.device)
            return F.embedding(index, table.reshape(-1, d)).reshape(*lead, n, d)
        x = self.token_embedding(flat)
        if self.position is not None:
            x = x + self.position
        for block in self.encoder:
            x = block(x, grid=self.grid)
        return self.encoder_norm(x).reshape(*lead, n, d)

    def _summary(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, d) -> (..., N * summary_channels), or for the full view (..., 2 * d): the mean and
        the max over the cells."""
        if self.summary_in is None:
            return torch.cat([features.mean(dim=-2), features.amax(dim=-2)], dim=-1)
        return self.summary_in(features).flatten(-2)

    def memory_input(self, features: torch.Tensor, previous_actions: torch.Tensor) -> torch.Tensor:
        """features (..., N, d), previous_actions (...) -> GRU input (..., m)."""
        summary = self.summary(F.gelu(self._summary(features)))
        return summary + self.memory_action(self._action_index(previous_actions))

    def memory_sequence(self, features: torch.Tensor, previous_actions: torch.Tensor) -> torch.Tensor:
        """features (B, T, N, d), previous_actions (B, T) (the action into each frame, -1: none) ->
        memory (B, T, m): the GRU over the frames, or (``memory="frame"``) its first step on each frame alone."""
        if self.config.memory == "frame":
            b, t = previous_actions.shape
            alone = self.memory_input(features, torch.full_like(previous_actions, -1)).reshape(b * t, 1, -1)
            return self.memory(alone)[0].view(b, t, -1)
        return self.memory(self.memory_input(features, previous_actions))[0]

    def state_logits(self, features: torch.Tensor, memory: torch.Tensor,
                     place: token_map.MapState | None = None) -> torch.Tensor:
        """features (..., N, d), memory (..., m), place: the map and pose of each frame (``memory="map"``;
        None: the MLP alone) -> state logits (..., S, K) (invalid classes -inf)."""
        k = self.state_max_classes
        logits = self.state_head(torch.cat([self._summary(features), memory], dim=-1))
        if self.cell_state_head is None:
            logits = logits.view(*logits.shape[:-1], -1, k).masked_fill(~self.state_valid, float("-inf"))
            return logits if place is None or not self.placing else self.place_state(logits, place)
        h, w = self.grid
        cells = self.cell_state_head(features)  # (..., N, fields + 1) in token order: row y, column x
        lead = cells.shape[:-2]
        agent = cells[..., -1].reshape(*lead, h, w)  # "the agent stands here"
        # The state array lists cells in (x, y) order: transpose the token grid.
        cell_fields = _pad_fields(cells[..., :-1], CELL_FIELDS, k).view(*lead, h, w, 3, k).transpose(-4, -3)
        position = [F.pad(agent.logsumexp(dim=-2), (0, k - w)), F.pad(agent.logsumexp(dim=-1), (0, k - h))]
        logits = torch.cat([cell_fields.reshape(*lead, -1, k), torch.stack(position, dim=-2),
                            _pad_fields(logits, POOLED_FIELDS, k)], dim=-2)
        return logits.masked_fill(~self.state_valid, float("-inf"))

    def placed(self, maps: torch.Tensor, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """maps (B, M * M + 1) tokens, kept (B,) placements found before -> (placement (B,), agreed
        structure (B, W * H)) (:func:`worldmodel.memory.place`)."""
        return token_map.place(self.tile_structure[maps.clamp_max(self.unknown_token)], self.placement_index,
                               self.layouts, kept)

    def place_state(self, logits: torch.Tensor, place: token_map.MapState) -> torch.Tensor:
        """The MLP's state logits (..., S, K) with the fields the map states set to certainty: where
        the map is placed in the world (:meth:`placed`, or ``place.placement`` where given), the
        agent's absolute pose, every cell the map holds (what its token draws) and every cell that all
        the layouts fitting there make a wall, goal or lava."""
        lead, (s, k) = logits.shape[:-2], logits.shape[-2:]
        maps, poses = place.map.reshape(-1, place.map.shape[-1]), place.pose.reshape(-1, 3)
        if place.placement is None or place.agreed is None:
            which, agreed = self.placed(maps)
        else:
            which, agreed = place.placement.reshape(-1), place.agreed.reshape(maps.shape[0], -1)
        found = which >= 0
        which = which.clamp_min(0)
        cells = self.placement_index.shape[1]
        seen = self.tile_content[maps.gather(1, self.placement_index[which]).clamp_max(self.unknown_token)]  # (B, C, 3)
        fixed = self.structure_content[torch.where(agreed >= 0, agreed, 5)]  # (B, C, 3)
        content = torch.where(seen[..., :1] >= 0, seen, fixed)  # (B, C, 3)
        pose = token_map.world_pose(self.placement_origins[which], poses)  # (B, 3)
        values = torch.cat([content.reshape(-1, cells * 3), pose], dim=1).clamp(0, k - 1)  # (B, C * 3 + 3)
        sure = torch.cat([(content[..., :1] >= 0).expand(-1, -1, 3).reshape(-1, cells * 3),
                          torch.ones_like(pose, dtype=torch.bool)], dim=1) & found[:, None]
        certain = (F.one_hot(values, k).to(logits.dtype) - 1) * 30.0  # the stated class 0, the others -30
        flat = logits.reshape(-1, s, k)
        head = torch.where(sure[..., None], certain, flat[:, :cells * 3 + 3])
        return torch.cat([head, flat[:, cells * 3 + 3:]], dim=1).view(*lead, s, k)

    def decode(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        memory: torch.Tensor | None,
        actions: torch.Tensor,
        next_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict frame t+1 from frame t's tokens, features and memory and the action.

        tokens (M, N) of frame t, features (M, N, d), memory (M, m), actions (M,) (-1 = no action), next_tokens (M, N) with
        ``mask_token`` where unknown (None: all unknown) -> token logits (M, N, V), outcome (M, 3):
        [reward non-zero logit, reward value, termination logit].
        """
        logits, outcome = self._decode_moving(tokens, features, memory, actions, next_tokens)
        if self.dynamic_cells is None:
            return logits, outcome
        # Static positions: their current token, certain (they are copied in a rollout too).
        current = self.token_to_output[tokens].clamp_min(0)
        full = torch.full((*current.shape, self.num_outputs), STATIC_LOGIT, dtype=logits.dtype, device=logits.device)
        full = full.scatter(-1, current[..., None], 0.0)
        return full.index_copy(1, self.dynamic_cells, logits), outcome

    def _decode_moving(self, tokens: torch.Tensor, features: torch.Tensor, memory: torch.Tensor | None,
                       actions: torch.Tensor, next_tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`decode` at the positions that can change only: logits (M, D, K) (D = N without static cells)."""
        condition = self.decoder_action(self._action_index(actions))
        if self.decoder_memory is not None:
            assert memory is not None, "global decoding reads the memory"
            condition = condition + self.decoder_memory(memory)
        elif self.presence is not None:
            # A linear map of each token's embedding: computed once per vocabulary entry, then looked up.
            table = self.presence(self.token_embedding.weight)
            if self.map_memory:  # a map cell never seen holds no tile: it never wins the max
                table = torch.cat([table, table.new_full((1, table.shape[1]), -1e4)])
            condition = condition + F.embedding(tokens, table).amax(dim=1)
        if next_tokens is None:  # nothing of the next frame known: one "mask" embedding for all
            x = features + (condition + self.next_token_embedding.weight[self.mask_token])[:, None]
        else:
            x = features + self.next_token_embedding(next_tokens) + condition[:, None]
        last = len(self.decoder) - 1
        for i, block in enumerate(self.decoder):
            # The last block's per-token part runs on the positions that can change only.
            x = block(x, rows=self.dynamic_cells if i == last else None, grid=self.grid)
        x = self.decoder_norm(x)  # (M, D, d)
        outcome = None if memory is None or self.local else self.outcome_head(torch.cat([x.mean(dim=1), memory], dim=-1))
        logits = self.token_head(x)  # (M, D, K) over the output tokens
        current = self.token_to_output[tokens]  # (M, N); -1 where the current token is no output
        if self.dynamic_cells is not None:
            current = current.index_select(1, self.dynamic_cells)
        bonus = self.copy_bias * (current >= 0)[..., None].to(logits.dtype)  # (M, D, 1)
        return logits.scatter_add(-1, current.clamp_min(0)[..., None], bonus), outcome

    def transition_outcome(self, tokens: torch.Tensor, next_tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``decoder_context="local"``: [reward non-zero logit, reward value, termination logit] (M, 3)
        of the transition tokens (M, N) -> next_tokens (M, N) under actions (M,), read cell by cell
        over the cells that changed: a noisy-or of the cells' logits (:func:`_noisy_or`), the value
        at the most confident cell.
        ``memory="map"``: read off the cell in front and the action (:meth:`front_outcome`)."""
        if self.map_memory:
            return self.front_outcome(tokens, actions)[:, :3]
        action = self.outcome_action(self._action_index(actions))  # (M, d)
        # Only cells that changed can carry an event (the agent entering the goal or lava); a frame
        # where nothing changed has one candidate, the action alone. With a single success in the
        # data, unchanged cells (an open door elsewhere) otherwise took the credit: measured.
        changed = tokens != next_tokens  # (M, N)
        nothing = ~changed.any(dim=1)  # (M,)
        # A step changes a few cells (the agent's and the one it enters): gather those, in position
        # order, instead of reading all N (the same result: the others are masked out anyway).
        k = int(changed.sum(dim=1).max()) if changed.numel() else 0
        order = torch.sort((~changed).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (M, k) changed first
        cells = (self.outcome_before(tokens.gather(1, order)) + self.outcome_after(next_tokens.gather(1, order))
                 + action[:, None])
        cells = torch.cat([cells, (action + self.outcome_unchanged)[:, None]], dim=1)  # (M, k + 1, d)
        candidate = torch.cat([changed.gather(1, order), nothing[:, None]], dim=1)  # (M, k + 1)
        per_cell = self.outcome_head(cells).masked_fill(~candidate[..., None], -1e4)  # (M, k + 1, 3)
        where = per_cell[..., 0].argmax(dim=1)
        value = per_cell[..., 1].gather(1, where[:, None])[:, 0]
        return torch.stack([_noisy_or(per_cell[..., 0]), value, _noisy_or(per_cell[..., 2])], dim=-1)

    # ----------------------------------------------------------------- token map (memory="map")
    def front_outcome(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """tokens (M, N) of frame t, actions (M,) -> (M, 4) logits [reward non-zero, reward value,
        termination, moved] from the token in front of the agent (always visible) and the action."""
        v = self.config.grid_width
        front = tokens[:, (v - 2) * v + v // 2]
        return self.front_head(self.front_token(front) + self.front_action(self._action_index(actions)))

    def encode_prior(self, prior: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        """prior view tokens (M, N) (``unknown_token`` where the map never saw the cell), layout hints
        (M, N) (:meth:`prior_view`; None: none) -> features (M, N, d)."""
        unknown = prior == self.unknown_token
        x = torch.where(unknown[..., None], self.unknown_embedding,
                        self.token_embedding(prior.clamp_max(self.config.vocab_size - 1))) + self.position
        if hint is not None and self.placing:
            x = x + self.layout_hint(hint)
        for block in self.encoder:
            x = block(x, grid=self.grid)
        return self.encoder_norm(x)

    def _agent_cell(self) -> int:
        v = self.config.grid_width
        return (v - 1) * v + v // 2

    def prior_view(self, state: token_map.MapState, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The map read at ``state.pose`` (B, N), the agent's cell from the current frame tokens (B, N)
        (it draws what the agent carries, which only the action in front can change), and the layout
        hints (B, N): where the map is placed (``state.placement``), a never-seen cell's structure
        class + 1 when every fitting layout agrees on it (the room behind a closed door is the
        layout's), else 0. The hint is an input, not a token: whether the cell shows or is hidden
        behind a wall is still the decoder's to work out."""
        v, m = self.config.grid_width, self.config.map_size
        index = token_map.view_cells(state.pose, v, m)  # (B, N) map cells
        prior = state.map.gather(1, index)
        hint = torch.zeros_like(prior)
        if self.placing and state.placement is not None and state.agreed is not None:
            world = self.map_world[state.placement.clamp_min(0)].gather(1, index)  # (B, N) world cells
            agreed = state.agreed.gather(1, world.clamp_min(0))
            use = (prior == self.unknown_token) & (state.placement >= 0)[:, None] & (world >= 0) & (agreed >= 0)
            hint = torch.where(use, agreed + 1, hint)
        agent = self._agent_cell()
        prior[:, agent] = tokens[:, agent]
        hint[:, agent] = 0
        return prior, hint

    def _step_pose(self, pose: torch.Tensor, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The next pose (B, 3) after actions (B,) from frame tokens (B, N): the front head says whether it moved."""
        return token_map.next_pose(pose, actions, self.front_outcome(tokens, actions)[:, 3] > 0)

    def _map_window(self, tokens: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor | None,
                    every: list[token_map.MapState] | None = None) -> tuple[torch.Tensor, torch.Tensor, token_map.MapState]:
        """Write frames (B, T, N) one by one into a fresh map -> prior views (B, T, N) of frames
        1..T (each from the map of frames <= t read at pose t+1), their layout hints (B, T, N) and the
        map state after frame T-1.
        actions (B, T): actions[t] leads from frame t to t+1; poses (B, T, 3): the true poses relative
        to frame 0 (teacher forcing), or None: dead-reckoned with the front head (what a rollout does).
        ``every``: a list that receives the map state after each frame."""
        b, t, _ = tokens.shape
        c = self.config
        state = token_map.empty_map(b, c.map_size, self.unknown_token, tokens.device)
        pose = state.pose if poses is None else poses[:, 0]
        placement = agreed = None
        priors = []
        for i in range(t):
            written = token_map.write_view(token_map.MapState(state.map, pose), tokens[:, i], c.hidden_token,
                                           self.unknown_token)
            if self.placing:  # for the priors' layout hints and the state head
                placement, agreed = self.placed(written, placement)
            state = token_map.MapState(written, pose, placement, agreed)
            if every is not None:
                every.append(state)
            if i == t - 1:
                break
            pose = poses[:, i + 1] if poses is not None else self._step_pose(pose, tokens[:, i], actions[:, i])
            priors.append(self.prior_view(token_map.MapState(state.map, pose, placement, agreed), tokens[:, i]))
        # The last frame's prior (its successor is not in the window) from the dead-reckoned pose.
        priors.append(self.prior_view(token_map.MapState(state.map, self._step_pose(pose, tokens[:, -1], actions[:, -1]),
                                                         placement, agreed), tokens[:, -1]))
        return torch.stack([p for p, _ in priors], dim=1), torch.stack([h for _, h in priors], dim=1), state

    def _map_decode(self, cache: DynamicsCache, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's inputs for the next frame of a cached rollout: prior tokens (B, N), features (B, N, d)."""
        assert cache.map is not None and cache.pose is not None, "memory 'map' needs a cache made by start/observe"
        pose = self._step_pose(cache.pose, cache.tokens, actions)
        prior, hint = self.prior_view(token_map.MapState(cache.map, pose, cache.placement, cache.agreed), cache.tokens)
        return prior, self.encode_prior(prior, hint)

    def true_poses(self, states: torch.Tensor) -> torch.Tensor:
        """states (B, T, S) -> the agent's poses (B, T, 3) relative to frame 0 (:func:`memory.relative_poses`)."""
        grid = 3 * self.config.state_width * self.config.state_height
        return token_map.relative_poses(states[..., grid:grid + 2].long(), states[..., grid + 2].long())

    # ----------------------------------------------------------------- teacher-forced pass
    def forward(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor,
        next_tokens_given: torch.Tensor | None = None,
        memory_actions: torch.Tensor | None = None,
        poses: torch.Tensor | None = None,
    ) -> DynamicsOutput:
        """Teacher-forced predictions over a window.

        tokens (B, T, h, w), actions (B, T) (actions[t] leads from frame t to t+1; -1 = none);
        next_tokens_given (B, T, N): the decoder's view of frame t+1 (``mask_token`` where
        unknown; None: all unknown); memory_actions (B, T): the actions the memory sees (default
        ``actions``; training passes the same dropped actions to both); poses (B, T, 3)
        (``memory="map"``: the true poses relative to frame 0, :meth:`true_poses`; None: dead-reckoned).
        """
        b, t = actions.shape
        memory_actions = actions if memory_actions is None else memory_actions
        features = self.encode(tokens)  # (B, T, N, d)
        previous = torch.cat([torch.full_like(memory_actions[:, :1], -1), memory_actions[:, :-1]], dim=1)
        memory = self.memory_sequence(features, previous)  # (B, T, m)
        given = None if next_tokens_given is None else next_tokens_given.reshape(b * t, -1)
        flat_tokens = tokens.reshape(b * t, -1)
        moved_logit = None
        # The map's placement needs no training: training states the fields by the MLP alone (cheaper).
        places: list[token_map.MapState] | None = [] if self.placing and not self.training else None
        place = None
        if self.map_memory:  # the decoder reads the map under the next pose, not frame t
            priors, hints, _ = self._map_window(tokens.reshape(b, t, -1), actions, poses, places)
            if places:
                place = token_map.MapState(*(torch.stack([getattr(p, key) for p in places], dim=1)
                                             for key in ("map", "pose", "placement", "agreed")))
            prior = priors.reshape(b * t, -1)
            logits, outcome = self.decode(prior, self.encode_prior(prior, hints.reshape(b * t, -1)), None,
                                          actions.reshape(-1), given)
            moved_logit = self.front_outcome(flat_tokens, actions.reshape(-1))[:, 3].view(b, t)
        else:
            logits, outcome = self.decode(flat_tokens, features.flatten(0, 1), memory.flatten(0, 1), actions.reshape(-1),
                                          given)
        if outcome is None:  # local: read off the true transition (the last frame's has none: masked out)
            after = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1).reshape(b * t, -1)
            outcome = self.transition_outcome(flat_tokens, after, actions.reshape(-1))
        outcome = outcome.view(b, t, 3)
        state = self.state_logits(features, memory, place)  # (B, T, S, K)
        return DynamicsOutput(
            token_logits=logits.view(b, t, self.config.num_tokens, -1),
            reward_logit=outcome[..., 0],
            reward_value=outcome[..., 1],
            termination_logit=outcome[..., 2],
            state_logits=state,
            moved_logit=moved_logit,
        )

    # ----------------------------------------------------------------- training objective
    def compute_loss(self, batch: DynamicsBatch, generator: torch.Generator | None = None) -> Losses:
        """Cross-entropy on next-frame tokens (the masked ones), reward (non-zero: BCE, value: MSE),
        termination (BCE) and every state field (CE). Parts: tokens, reward, reward_value,
        termination, state; plus detached accuracies for logging (token_accuracy, frame_exact)."""
        c = self.config
        b, t = batch.actions.shape
        n = c.num_tokens
        device = batch.tokens.device
        # Action dropout: the same "no action" reaches decoder and memory, as in action-free video.
        # In eval mode nothing is dropped or given: the loss then measures what a rollout does.
        dropout, refine_fraction = (c.action_dropout, c.refine_fraction) if self.training else (0.0, 0.0)
        drop = torch.rand(b, t, generator=generator).to(device) < dropout
        actions = torch.where(drop, torch.full_like(batch.actions, -1), batch.actions)
        # A transition t -> t+1 exists where frame t+1 is real (actions may be -1: action-free).
        transition = torch.zeros(b, t, dtype=torch.bool, device=device)
        transition[:, :-1] = batch.mask[:, 1:] & batch.mask[:, :-1]
        next_tokens = torch.zeros(b, t, n, dtype=torch.long, device=device)
        next_tokens[:, :-1] = batch.tokens[:, 1:].reshape(b, t - 1, n)
        # MaskGIT-style inputs: most transitions see no next token; some see a random part of them.
        refine = torch.rand(b, t, 1, generator=generator).to(device) < refine_fraction
        ratio = torch.rand(b, t, 1, generator=generator).to(device)
        hidden = torch.rand(b, t, n, generator=generator).to(device) < ratio
        unknown = ~refine | hidden  # (B, T, N) tokens the decoder must predict
        unknown = unknown | ~unknown.any(dim=-1, keepdim=True)  # at least one token to predict
        given = torch.where(unknown, torch.full_like(next_tokens, self.mask_token), next_tokens)
        poses = self.true_poses(batch.states) if self.map_memory else None
        out = self(batch.tokens, actions, next_tokens_given=given, poses=poses)

        token_mask = unknown & transition[..., None]
        target = self.token_to_output[next_tokens]  # -1: a token the decoder cannot output (ignored)
        token_ce = F.cross_entropy(out.token_logits.reshape(-1, self.num_outputs), target.reshape(-1), reduction="none",
                                   ignore_index=-1)
        # Few tokens change per step (the agent's tile and the one it enters): they carry the
        # dynamics, so they weigh more than the copied background.
        changed = next_tokens != batch.tokens.reshape(b, t, n)
        token_weight = token_mask.float() * (1.0 + c.change_weight * changed.float())
        token_loss = (token_ce.view(b, t, n) * token_weight).sum() / token_weight.sum().clamp_min(1.0)
        nonzero = (batch.rewards != 0).float()
        # Goal steps are ~0.3% of transitions: unweighted, the heads learned to never fire (F1 0 after
        # 1200 steps); weighting positives x20 took a frozen model's heads to F1 0.95 in 150 steps.
        event = torch.tensor(c.event_weight, device=device)
        reward_loss = _masked_mean(F.binary_cross_entropy_with_logits(out.reward_logit, nonzero, pos_weight=event,
                                                                      reduction="none"), transition)
        value_loss = _masked_mean((out.reward_value - batch.rewards) ** 2, transition & (batch.rewards != 0))
        term_loss = _masked_mean(
            F.binary_cross_entropy_with_logits(out.termination_logit, batch.terminated.float(), pos_weight=event,
                                               reduction="none"), transition
        )
        state_ce = F.cross_entropy(
            out.state_logits.reshape(-1, self.state_max_classes), batch.states.reshape(-1).long(), reduction="none"
        ).view(b, t, -1)
        state_loss = _masked_mean(state_ce.mean(-1), batch.mask)
        total = (token_loss + c.reward_weight * (reward_loss + value_loss) + c.termination_weight * term_loss
                 + c.state_weight * state_loss)
        moved_parts = {}
        if out.moved_logit is not None:  # the pose: did the step move the agent (true from the states)
            grid = 3 * c.state_width * c.state_height
            xy = batch.states[..., grid:grid + 2]
            moved = torch.zeros(b, t, device=device)
            moved[:, :-1] = (xy[:, 1:] != xy[:, :-1]).any(-1).float()
            moved_loss = _masked_mean(F.binary_cross_entropy_with_logits(out.moved_logit, moved, reduction="none"),
                                      transition)
            total = total + moved_loss
            with torch.no_grad():
                moved_parts = {"moved": moved_loss.detach(),
                               "moved_accuracy": _masked_mean(((out.moved_logit > 0).float() == moved).float(), transition)}
        with torch.no_grad():
            full = transition & ~refine[..., 0]  # whole-frame predictions (what a rollout does)
            correct = self.tokens_from_logits(out.token_logits) == next_tokens  # (B, T, N)
            token_acc = _masked_mean(correct.float(), token_mask & full[..., None])
            frame_exact = _masked_mean(correct.all(-1).float(), full)
            state_exact = _masked_mean((out.state_logits.argmax(-1) == batch.states).all(-1).float(), batch.mask)
        parts = {
            "tokens": token_loss.detach(), "reward": reward_loss.detach(), "reward_value": value_loss.detach(),
            "termination": term_loss.detach(), "state": state_loss.detach(),
            "token_accuracy": token_acc, "frame_exact": frame_exact, "state_exact": state_exact, **moved_parts,
        }
        return Losses(total=total, parts=parts)

    # ----------------------------------------------------------------- cached rollout
    def start(self, tokens: torch.Tensor, previous_actions: torch.Tensor) -> tuple[DynamicsCache, torch.Tensor]:
        """Read a context from scratch.

        tokens (B, T0, h, w), previous_actions (B, T0 - 1) (the actions between the context frames)
        -> cache of the last frame, state logits (B, S, K) of the last frame.
        """
        b, t0 = tokens.shape[:2]
        if previous_actions.shape != (b, t0 - 1):
            raise ValueError(f"context actions must be (B, T0 - 1) = {(b, t0 - 1)}, got {tuple(previous_actions.shape)}")
        features = self.encode(tokens)  # (B, T0, N, d)
        previous = torch.cat([torch.full_like(previous_actions[:, :1], -1) if t0 > 1 else
                              torch.full((b, 1), -1, dtype=torch.long, device=tokens.device), previous_actions], dim=1)
        memory = self.memory_sequence(features, previous.long())
        last = memory[:, -1]
        cache = DynamicsCache(tokens=tokens[:, -1].reshape(b, -1), features=features[:, -1],
                              memory=None if self.config.memory == "frame" else last)
        if self.map_memory:
            following = torch.cat([previous[:, 1:], torch.full_like(previous[:, :1], -1)], dim=1)
            _, _, state = self._map_window(tokens.reshape(b, t0, -1), following.long(), None)
            cache.map, cache.pose, cache.placement, cache.agreed = state.map, state.pose, state.placement, state.agreed
        return cache, self.cache_state_logits(cache)

    def observe(self, cache: DynamicsCache, tokens: torch.Tensor, actions: torch.Tensor,
                with_state: bool = True) -> tuple[DynamicsCache, torch.Tensor | None]:
        """Advance the cache by one frame: tokens (B, h, w) reached by actions (B,) -> (new cache,
        state logits (B, S, K) of that frame, or None without ``with_state``). One step of work,
        whatever the history length."""
        features = self.encode(tokens)  # (B, N, d)
        if self.config.memory == "frame":
            memory = None  # computed from the features when read: a token-reading rollout never needs it
        else:
            memory = self.memory(self.memory_input(features, actions)[:, None], self.memory_of(cache)[None].contiguous())[1][0]
        new = DynamicsCache(tokens=tokens.reshape(tokens.shape[0], -1), features=features, memory=memory)
        if self.map_memory:  # the pose the action led to, then the new frame written there
            assert cache.map is not None and cache.pose is not None
            new.pose = self._step_pose(cache.pose, cache.tokens, actions)
            new.map = token_map.write_view(token_map.MapState(cache.map, new.pose), new.tokens, self.config.hidden_token,
                                           self.unknown_token)
            if self.placing:
                new.placement, new.agreed = self.placed(new.map, cache.placement)
        return new, self.cache_state_logits(new) if with_state else None

    def cache_state_logits(self, cache: DynamicsCache) -> torch.Tensor:
        """State logits (B, S, K) of a cache's frame: the state head on its features, memory and map."""
        place = cache.place_of() if cache.map is not None and cache.pose is not None else None
        return self.state_logits(cache.features, self.memory_of(cache), place)

    def _decoder_memory(self, cache: DynamicsCache) -> torch.Tensor | None:
        """What the decoder reads of the memory: nothing for local decoding (so a frame memory is never computed)."""
        return None if self.local else self.memory_of(cache)

    def memory_of(self, cache: DynamicsCache) -> torch.Tensor:
        """The cache's memory (B, m), computed from its frame where ``memory="frame"`` left it out."""
        if cache.memory is not None:
            return cache.memory
        no_action = torch.full(cache.features.shape[:1], -1, dtype=torch.long, device=cache.features.device)
        return self.memory_sequence(cache.features[:, None], no_action[:, None])[:, 0]

    def predict_logits(
        self,
        cache: DynamicsCache,
        actions: torch.Tensor,
        next_tokens: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-frame token logits (B, N, V) and outcome (B, 3) from the cache and actions (B,)
        (outcome None for ``decoder_context="local"``: it is read off the sampled frame).

        ``guidance`` != 1: classifier-free action guidance on the token logits,
        ``uncond + guidance * (cond - uncond)`` (the outcome stays action-conditioned).
        """
        # memory="map": the decoder reads the map under the next pose instead of the current frame.
        tokens, features = self._map_decode(cache, actions) if self.map_memory else (cache.tokens, cache.features)
        if guidance == 1.0:
            return self.decode(tokens, features, self._decoder_memory(cache), actions, next_tokens)
        b = actions.shape[0]
        both_actions = torch.cat([actions, torch.full_like(actions, -1)])
        both_tokens = None if next_tokens is None else torch.cat([next_tokens, next_tokens])
        memory = self._decoder_memory(cache)
        logits, outcome = self.decode(tokens.repeat(2, 1), features.repeat(2, 1, 1),
                                      None if memory is None else memory.repeat(2, 1), both_actions, both_tokens)
        cond, uncond = logits[:b], logits[b:]
        return uncond + guidance * (cond - uncond), None if outcome is None else outcome[:b]

    def predict(
        self,
        cache: DynamicsCache,
        actions: torch.Tensor,
        temperature: float = 0.0,
        refine_steps: int = 1,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        order: str = "parallel",
    ) -> StepPrediction:
        """Sample the next frame for actions (B,).

        ``temperature`` 0: the most likely token everywhere (deterministic). Otherwise tokens are
        sampled. ``order="parallel"``: all at once, or with ``refine_steps`` > 1 the most confident
        first (MaskGIT schedule), re-predicting the rest given them. ``order="sequential"``: a draw
        from the joint distribution of the next frame (:meth:`_sample_sequential`): the cells the
        model is sure of are taken at once, the others drawn one at a time, each given those fixed.
        """
        if order not in SAMPLING_ORDERS:
            raise ValueError(f"unknown sampling order '{order}': choose one of {SAMPLING_ORDERS}")
        b = actions.shape[0]
        if temperature <= 0 and guidance == 1.0 and self.dynamic_cells is not None:
            # Greedy: the moving positions' most likely tokens, the static ones copied (no full logits).
            logits, outcome = self._decode_moving(cache.tokens, cache.features, self._decoder_memory(cache), actions, None)
            known = cache.tokens.index_copy(1, self.dynamic_cells, self.tokens_from_logits(logits))
        else:
            if order == "sequential" and temperature > 0:
                known, outcome = self._sample_sequential(cache, actions, temperature, guidance, generator)
            elif order == "objects" and temperature > 0:
                known, outcome = self._sample_objects(cache, actions, temperature, guidance, generator)
            else:
                known, outcome = self._sample_frame(cache, actions, temperature, refine_steps, guidance, generator)
            if self.dynamic_cells is not None:  # static positions keep their token, whatever it is
                known = torch.where(self.static_mask, cache.tokens, known)
        if self.local:  # read off the imagined transition
            outcome = self.transition_outcome(cache.tokens, known, actions)
        assert outcome is not None
        reward_p = torch.sigmoid(outcome[:, 0])
        term_p = torch.sigmoid(outcome[:, 2])
        reward = torch.where(reward_p > 0.5, outcome[:, 1], torch.zeros_like(outcome[:, 1]))
        h, w = self.grid
        return StepPrediction(
            tokens=known.view(b, h, w), reward=reward.float(), terminated=term_p > 0.5,
            reward_probability=reward_p, termination_probability=term_p,
        )

    def _sample_frame(self, cache: DynamicsCache, actions: torch.Tensor, temperature: float, refine_steps: int,
                      guidance: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`'s frame from full logits: (tokens (B, N), outcome (B, 3) or None for local decoding)."""
        b, n = actions.shape[0], self.config.num_tokens
        known = torch.full((b, n), self.mask_token, dtype=torch.long, device=actions.device)
        steps = max(1, int(refine_steps)) if temperature > 0 else 1
        outcome = None
        for step in range(steps):
            logits, step_outcome = self.predict_logits(cache, actions, None if step == 0 else known, guidance)
            if outcome is None:
                outcome = step_outcome  # the outcome depends on the action, not on the sampled frame
            if temperature <= 0:
                known = self.tokens_from_logits(logits)
                break
            probs = torch.softmax(self._unweighted_logits(logits, cache.tokens).float() / temperature, dim=-1)
            drawn = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(b, n)  # output index
            unknown = known == self.mask_token
            sampled = torch.where(unknown, self.output_tokens[drawn], known)
            if step == steps - 1:
                known = sampled
                break
            # Keep the most confident of the still-unknown tokens; cosine schedule of how many stay unknown.
            confidence = torch.gather(probs, -1, drawn[..., None])[..., 0].masked_fill(~unknown, float("inf"))
            remaining = int(math.floor(n * math.cos(math.pi / 2 * (step + 1) / steps)))
            if remaining <= 0:
                known = sampled
                break
            order = confidence.argsort(dim=-1)  # least confident first
            keep_unknown = torch.zeros_like(unknown).scatter(1, order[:, :remaining], True)
            known = torch.where(keep_unknown, torch.full_like(sampled, self.mask_token), sampled)
        return known, outcome

    def _sample_sequential(self, cache: DynamicsCache, actions: torch.Tensor, temperature: float, guidance: float,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`'s frame drawn cell by cell from the model's conditionals: (tokens (B, N), outcome).

        Each pass predicts the unknown cells given the ones fixed so far (the decoder trains with
        random parts of the next frame given: ``refine_fraction``). Cells whose most likely token
        has probability >= :data:`SURE_PROBABILITY` take it; of the others, the least sure is drawn,
        and with it every other one no drawn cell's value can reach through the decoder (conv
        blocks: farther apart than ``decoder_layers`` cells; the model's conditional of each is
        then the same as after the others were drawn). Passes repeat, for the rows with cells
        left only, until every cell is fixed: a deterministic frame costs one pass, a frame with
        k independent random choices about k + 1 (Dynamic-Obstacles: one per ball it moves).
        """
        b, n = actions.shape[0], self.config.num_tokens
        known = torch.full((b, n), self.mask_token, dtype=torch.long, device=actions.device)
        conflict = self._sampling_conflicts(actions.device)  # (N, N): drawing one changes the other's conditional
        rows = torch.arange(b, device=actions.device)  # rows with cells left
        outcome = None
        for step in range(n + 1):
            part = DynamicsCache(tokens=cache.tokens[rows], features=cache.features[rows],
                                 memory=None if cache.memory is None else cache.memory[rows])
            logits, step_outcome = self.predict_logits(part, actions[rows], None if step == 0 else known[rows], guidance)
            logits = self._unweighted_logits(logits, part.tokens)
            if outcome is None:
                outcome = step_outcome  # from the first pass, as in _sample_frame
            current = known[rows]
            unknown = current == self.mask_token  # (R, N)
            probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, N, K)
            top_p, top = probs.max(dim=-1)
            sure = unknown & (top_p >= SURE_PROBABILITY)
            current = torch.where(sure, self.output_tokens[top], current)
            open_cells = unknown & ~sure
            if open_cells.any():
                # The least sure open cell first, then the next that no chosen cell reaches, and so on.
                order = top_p.masked_fill(~open_cells, float("inf")).argsort(dim=-1)  # (R, N)
                chosen = torch.zeros_like(open_cells)
                blocked = ~open_cells
                for rank in range(n):
                    cell = order[:, rank]  # (R,)
                    take = ~blocked.gather(1, cell[:, None])[:, 0]
                    if not take.any():
                        if bool(blocked.all()):
                            break
                        continue
                    chosen[take, cell[take]] = True
                    blocked = blocked | (take[:, None] & conflict[cell])
                drawn = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:2])
                current = torch.where(chosen, self.output_tokens[drawn], current)
            known[rows] = current
            left = (current == self.mask_token).any(dim=1)
            if not left.any():
                break
            rows = rows[left]
        return known, outcome

    def _sample_objects(self, cache: DynamicsCache, actions: torch.Tensor, temperature: float, guidance: float,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`'s frame with moving objects conserved: (tokens (B, N), outcome).

        Needs only the decoder's marginals (one pass): cells it is sure of take their most likely
        token; then each cell whose token leaves it (a source, in position order) puts that token
        on one neighbouring cell (one tile a step, as everything moves in a gridworld) that is not
        fixed yet, drawn in proportion to the marginal of that token there. A second pass, given
        all that, fixes the cells left by their most likely token. An object moved by the env
        appears exactly once, never on another one's cell.
        """
        n, w = self.config.num_tokens, self.config.grid_width
        logits, outcome = self.predict_logits(cache, actions, None, guidance)
        probs = torch.softmax(self._unweighted_logits(logits, cache.tokens).float() / temperature, dim=-1)  # (B, N, K)
        top_p, top = probs.max(dim=-1)
        known = torch.where(top_p >= SURE_PROBABILITY, self.output_tokens[top], torch.full_like(top, self.mask_token))
        current = self.token_to_output[cache.tokens]  # (B, N) output index, -1: none
        stays = probs.gather(-1, current.clamp_min(0)[..., None])[..., 0]
        source = (current >= 0) & (stays < 0.5)  # (B, N): the token here leaves
        position = torch.arange(n, device=actions.device)
        r, c = position // w, position % w
        near = (torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs()) == 1)  # (N, N)
        sure = known.clone()
        for s in range(n):
            rows = source[:, s].nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            token = current[rows, s]  # (R,) output index of the leaving token
            free = known[rows] == self.mask_token  # (R, N)
            already = (sure[rows] == self.output_tokens[token][:, None]) & near[s]  # a sure cell took it (an agent's step)
            weight = probs[rows, :, :].gather(-1, token[:, None, None].expand(-1, n, 1))[..., 0] * (free & near[s])
            # Only a token the marginals expect next door moves (mass >= 0.2, measured against 0.5:
            # ball count right 0.99 vs 0.86): a turning agent's old token or a picked-up key is
            # nowhere near, and a tail of 1e-3 must not draw a second agent.
            place = (weight.sum(dim=1) >= 0.2) & ~already.any(dim=1)
            if not place.any():
                continue
            rows, token, weight = rows[place], token[place], weight[place]
            target = torch.multinomial(weight / weight.sum(dim=1, keepdim=True), 1, generator=generator)[:, 0]
            known[rows, target] = self.output_tokens[token]
        left = known == self.mask_token
        if left.any():
            # The objects that moved are placed: the cells left take their most likely other token.
            moved = torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.bool, device=probs.device)  # (B, K)
            moved.scatter_(1, current.clamp_min(0), source)
            rest, _ = self.predict_logits(cache, actions, known, guidance)
            rest = self._unweighted_logits(rest, cache.tokens).masked_fill(moved[:, None, :], float("-inf"))
            known = torch.where(left, self.tokens_from_logits(rest), known)
        return known, outcome

    def _unweighted_logits(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Token logits (B, N, K) of frame t+1 -> the distribution of the data, for sampling.

        The loss weighs a target that differs from the current token (B, N) by 1 + ``change_weight``:
        its minimiser is the data's distribution times that weight, renormalised (a ball that moves
        to one of 4 cells: 0.79 on each instead of 0.25, with weight 11). Adding log(1 + weight) to
        the current token's logit undoes it. The greedy frame keeps the weighted argmax it trained for."""
        weight = float(self.config.change_weight)
        if weight <= 0:
            return logits
        current = self.token_to_output[tokens]  # (B, N); -1: no output, every output then weighs the same
        bonus = (current >= 0).to(logits.dtype)[..., None] * math.log1p(weight)
        return logits.scatter_add(-1, current.clamp_min(0)[..., None], bonus)

    def _sampling_conflicts(self, device: torch.device) -> torch.Tensor:
        """(N, N) bool: cell j's predicted distribution can depend on the next token given at cell i
        (conv decoder blocks: within ``decoder_layers`` cells, Chebyshev; other blocks: everywhere)."""
        c = self.config
        n = c.num_tokens
        if c.block != "conv":
            return torch.ones(n, n, dtype=torch.bool, device=device)
        position = torch.arange(n, device=device)
        r, col = position // c.grid_width, position % c.grid_width
        distance = torch.maximum((r[:, None] - r[None]).abs(), (col[:, None] - col[None]).abs())
        return distance <= max(1, c.decoder_layers)

    def tokens_from_logits(self, token_logits: torch.Tensor) -> torch.Tensor:
        """(..., K) logits over the output tokens -> (...) int64 token ids of the most likely."""
        return self.output_tokens[token_logits.argmax(-1)]

    @staticmethod
    def state_from_logits(state_logits: torch.Tensor) -> torch.Tensor:
        """(..., S, K) -> (..., S) int64: the most likely value of every field."""
        return state_logits.argmax(-1)


def _noisy_or(logits: torch.Tensor) -> torch.Tensor:
    """(M, C) per-cell event logits -> (M,) the logit of "some cell fires", 1 - prod(1 - p_c).

    The event is read cell by cell without a label of which cell made it. A max over the cells
    passes a success's gradient to one cell only; from a few dozen successes that can be the
    agent's old cell, which then sits at even odds while the goal cell is never learned (measured:
    reward F1 0.0 on DoorKey-5x5 for one initialisation, 1.0 for another). Here every cell of a
    success is pushed up and every cell of a non-event down, so only a cell that fires in
    successes alone keeps a high probability."""
    total = F.softplus(logits).sum(dim=1)  # -log P(no cell fires)
    return torch.log(-torch.expm1(-total.clamp_min(1e-7))) + total


def _pad_fields(logits: torch.Tensor, classes: tuple[int, ...], width: int) -> torch.Tensor:
    """(..., sum(classes)) logits of consecutive fields -> (..., len(classes), width), each padded with zeros."""
    parts = torch.split(logits, list(classes), dim=-1)
    return torch.stack([F.pad(part, (0, width - part.shape[-1])) for part in parts], dim=-2)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "gridworld-dynamics/2"  # 2: the full-view model has no grid-sized parameter


class DynamicsCheckpointError(ArtifactError, ValueError):
    """A dynamics checkpoint that is missing, unreadable, or made for another tokenizer."""


def dynamics_checkpoint(model: DynamicsModel, tokenizer_identity: str, **extra: Any) -> dict[str, Any]:
    """The dict saved as ``dynamics.pt``: format tag, model config, weights, tokenizer identity, extras
    (the training config, the sampling defaults, the step)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer_identity": str(tokenizer_identity),
        **extra,
    }


def load_dynamics(path, tokenizer_identity: str | None = None,
                  device: str | torch.device = "cpu") -> tuple[DynamicsModel, dict[str, Any]]:
    """Load ``dynamics.pt`` -> (model in eval mode, the checkpoint dict). ``tokenizer_identity``:
    the identity of the tokenizer it will be used with; a mismatch raises
    :class:`DynamicsCheckpointError` naming both."""
    from pathlib import Path

    path = Path(path)
    checkpoint = read_checkpoint(path, "dynamics", DynamicsCheckpointError, CHECKPOINT_FORMAT, "run scripts/train_dynamics.py")
    if tokenizer_identity is not None and checkpoint["tokenizer_identity"] != tokenizer_identity:
        raise DynamicsCheckpointError(
            f"dynamics model {path} was trained on tokenizer {checkpoint['tokenizer_identity']}, "
            f"but the tokenizer given is {tokenizer_identity}: retrain the dynamics model for this tokenizer"
        )
    model = DynamicsModel(DynamicsModelConfig.from_dict(checkpoint["model_config"]))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise DynamicsCheckpointError(f"dynamics model {path} weights do not fit its config: {error}") from None
    return model.to(device).eval(), checkpoint
