"""The VAGEN-style agent's network and its decoding: a tiny prefix-LM transformer.

The frame's tiles and the turn history are the prefix; the response is decoded causally, token by
token, with one value (per value stream) before each token. Models and pure functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from agents.dreamer import TokenEncoder


@dataclass
class VagenModelConfig:
    """Shape of :class:`VagenNet` (saved in the checkpoint)."""

    vocab_size: int
    grid_width: int
    grid_height: int
    tile_size: int
    max_response_len: int
    num_actions: int  # the env's action count (the history's "no action yet" id is this)
    first_cell_token: int  # id of c0,0 (cells follow in tile order): where pointer logits score
    readout_tokens: tuple[int, int]  # [first, end) token ids the cell read-out scores (object kinds, door states, directions)
    readout_positions: tuple[int, ...]  # response positions whose logits get the read-out (:func:`~agents.vagen.vocab.readout_positions`)
    history_len: int = 2
    d_model: int = 32
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    value_streams: int = 1  # critic outputs: 1 (the turn reward), or 2 (task reward; world-modeling reward)
    frame_embed: int = 16  # the frame encoders (actor's and critic's): per-tile pixel embedding width,
    frame_channels: int = 32  # conv channels,
    frame_hidden: int = 128  # and summary width (the PPO baseline's encoder shape)


class TileGridEncoder(TokenEncoder):
    """Tile pixels (B, P, pixels) in [0, 1], P tiles in row order -> a frame summary (B, hidden_dim).

    The PPO baseline's frame encoder (:class:`agents.dreamer.TokenEncoder`: two 3x3 convs over the
    grid, flattened, an MLP) on a per-tile MLP of the pixels in place of a tokenizer's token
    embedding, so the agent still needs no trained tokenizer. Flattening keeps where each tile is."""

    def __init__(self, pixels: int, grid_height: int, grid_width: int, embed_dim: int, channels: int, hidden_dim: int):
        super().__init__(1, grid_height, grid_width, embed_dim, channels, hidden_dim)
        self.grid = (int(grid_height), int(grid_width))
        self.embed = nn.Sequential(nn.Linear(pixels, 2 * embed_dim), nn.SiLU(), nn.Linear(2 * embed_dim, embed_dim))
        # Distinct tiles differ in a few dozen pixel values: at the default init their embeddings
        # differed by ~0.04 per channel and the frame summary hardly varied across frames (std
        # 0.0002, 40x under the token encoder's). Scaled so that they differ by ~1 per channel, as
        # the N(0, 1) rows of a token embedding do.
        nn.init.normal_(self.embed[0].weight, std=0.3)
        nn.init.orthogonal_(self.embed[2].weight, 2.0)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.grid_features(self.embed(tiles).view(tiles.shape[0], *self.grid, -1))


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


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
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * d_model, d_model)
        )

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
    """The encoded prefix of a batch: ``kv`` per decoder block (keys, values (B, P + K, d)), the
    tile features ``tiles`` (B, P, d) that pointer logits score against, the tiles' pixel
    embeddings ``content`` (B, P, d) without position (cell inputs) and their ``pixels``
    (B, P, tile_size^2 * 3) in [0, 1] (cell read-out); what the frame adds, once per turn: the direct
    path's action logits ``direct`` (B, num_actions) and the frame's share of the critic's first
    layer ``value_frame`` (B, frame_hidden)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    tiles: torch.Tensor
    content: torch.Tensor
    pixels: torch.Tensor
    direct: torch.Tensor
    value_frame: torch.Tensor


class VagenNet(nn.Module):
    """A tiny transformer decoder reading [frame tiles | action history], writing the response.

    The prefix is one token per grid tile (a small MLP on the tile's pixels plus a position
    embedding: the same granularity as the tokenizer's one token per tile) and one token per
    remembered action. The decoder attends causally over the response and across to the prefix.
    Logits and value at response input position i (``<bos>`` is position 0) are for response
    token i: the value is the estimate before that token is written, a head on the actor's
    features that trains them too. Three paths tie cell tokens to tiles:

    - pointer logits: a cell token's logit also scores the decoder state against that tile's
      features, so "where is the key" is answered by finding the tile that looks like one;
    - cell inputs: a cell token, once written, enters the decoder with that tile's pixel embedding;
    - cell read-out: the token after a cell gets a linear read-out of that tile's pixels on the
      attribute tokens (zero at the start), at the slots that accept attributes.

    The action and the critic read the frame directly: a PPO-style encoder (:class:`TileGridEncoder`)
    summarises the whole grid, and at the action slot (the response's last) the action tokens'
    logits are an MLP of that summary and the decoder state (its last layer starts near zero, so
    the first rollouts are near uniform); the critic is an MLP of the decoder state and a summary
    of its own encoder. Through cross-attention alone the frame barely moved the action: a single
    query averages 25 tiles that mostly look alike, and the policy learned a marginal over actions.
    """

    def __init__(self, config: VagenModelConfig):
        super().__init__()
        self.config = c = config
        pixels = c.tile_size * c.tile_size * 3
        self.tile_embed = nn.Sequential(nn.Linear(pixels, c.d_model), nn.GELU(approximate="tanh"), nn.Linear(c.d_model, c.d_model))
        self.tile_pos = nn.Parameter(torch.zeros(c.grid_width * c.grid_height, c.d_model))
        self.history_embed = nn.Embedding(c.num_actions + 1, c.d_model)  # + "no action yet"
        self.history_pos = nn.Parameter(torch.zeros(max(c.history_len, 1), c.d_model))
        self.memory_norm = nn.LayerNorm(c.d_model)
        self.token_embed = nn.Embedding(c.vocab_size, c.d_model)
        self.token_pos = nn.Parameter(torch.zeros(c.max_response_len, c.d_model))
        self.blocks = nn.ModuleList([_DecoderBlock(c.d_model, c.heads, c.mlp_ratio) for _ in range(c.layers)])
        self.norm = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size)
        grid = (c.grid_height, c.grid_width, c.frame_embed, c.frame_channels, c.frame_hidden)
        self.frame_encoder = TileGridEncoder(pixels, *grid)
        self.action_head = nn.Sequential(
            nn.Linear(c.frame_hidden, c.frame_hidden), nn.SiLU(), _orthogonal(nn.Linear(c.frame_hidden, c.num_actions), 0.01)
        )
        self.value_encoder = TileGridEncoder(pixels, *grid)
        self.value_head = nn.Sequential(
            nn.Linear(c.frame_hidden + c.d_model, c.frame_hidden), nn.Tanh(), nn.Linear(c.frame_hidden, c.value_streams)
        )
        self.first_action = c.vocab_size - c.num_actions  # the vocabulary ends with the actions
        action_gate = torch.zeros(c.max_response_len, 1)
        action_gate[-1] = True  # every template ends with the action
        self.register_buffer("action_gate", action_gate, persistent=False)
        self.pointer = nn.Linear(c.d_model, c.d_model, bias=False)
        self.cell_input = nn.Linear(c.d_model, c.d_model)
        lo, hi = c.readout_tokens
        if not 0 <= lo < hi <= c.vocab_size:
            raise ValueError(f"readout_tokens {c.readout_tokens} is not a token range of a {c.vocab_size}-token vocabulary")
        self.cell_readout = nn.Linear(pixels, hi - lo, bias=False)
        nn.init.zeros_(self.cell_readout.weight)
        # Where the read-out acts: applied at every position it also pushed attribute tokens into
        # slots that cannot take them (the next agent position, the action) and broke the format.
        gate = torch.zeros(c.max_response_len, 1)
        for i in c.readout_positions:
            if not 0 <= i < c.max_response_len:
                raise ValueError(f"readout position {i} is outside a {c.max_response_len}-token response")
            gate[i] = 1.0
        self.register_buffer("readout_gate", gate, persistent=False)
        for p in (self.tile_pos, self.history_pos, self.token_pos):
            nn.init.normal_(p, std=0.5)  # large enough that slots and tiles are told apart from the start
        nn.init.zeros_(self.value_head[-1].weight)
        nn.init.zeros_(self.value_head[-1].bias)

    def encode(self, frames: torch.Tensor, history: torch.Tensor) -> Memory:
        """frames (B, H, W, 3) uint8, history (B, K) int64 in [0, num_actions] (num_actions: none) -> the prefix."""
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
        memory = self.memory_norm(torch.cat(parts, dim=1))
        kv = [block.memory_kv(memory) for block in self.blocks]
        first = self.value_head[0]  # on [frame summary, decoder state]: the summary's share, with the bias
        value_frame = nn.functional.linear(self.value_encoder(tiles), first.weight[:, : c.frame_hidden], first.bias)
        return Memory(kv, memory[:, : gh * gw], content, tiles, self.action_head(self.frame_encoder(tiles)), value_frame)

    def decode(self, memory: Memory, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, L) response input ids starting with ``<bos>`` -> logits (B, L, V), values (B, L)
        ((B, L, S) with S > 1 value streams)."""
        x, named = self._embed(memory, inputs)
        x = x + self.token_pos[: inputs.shape[1]]
        for block, kv in zip(self.blocks, memory.kv):
            x = block(x, kv)
        L = inputs.shape[1]
        return self._heads(memory, x, named, self.readout_gate[:L], self.action_gate[:L])

    def _embed(self, memory: Memory, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, L) token ids -> (B, L, d): the token embedding, plus for cell tokens a
        projection of the named tile's pixel embedding; and that tile's pixels (B, L, P'), zero
        where the input is not a cell (the read-out's input)."""
        x = self.token_embed(inputs)
        cell = inputs - self.config.first_cell_token
        is_cell = (cell >= 0) & (cell < memory.content.shape[1])
        index = cell.clamp(0, memory.content.shape[1] - 1).unsqueeze(-1)
        keep = is_cell.unsqueeze(-1).to(memory.content.dtype)

        def named(per_tile: torch.Tensor) -> torch.Tensor:  # (B, P, C) -> the named tile's row (B, L, C), 0 off cells
            return per_tile.gather(1, index.expand(-1, -1, per_tile.shape[-1])) * keep

        return x + self.cell_input(named(memory.content)) * keep, named(memory.pixels)

    def _heads(
        self, memory: Memory, x: torch.Tensor, named: torch.Tensor, gate: torch.Tensor, action_gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values from decoder features x (B, L, d); ``gate`` (L, 1): where the read-out
        acts; ``action_gate`` (L, 1) bool: where the action head sets the action tokens' logits."""
        h = self.norm(x)
        logits = self.lm_head(h)
        logits = _add_to_tokens(logits, self.first_action, memory.direct.unsqueeze(1) * action_gate)  # 0 off the action slot
        logits = _add_to_tokens(logits, self.config.readout_tokens[0], self.cell_readout(named) * gate)
        scores = self.pointer(h) @ memory.tiles.transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, L, P)
        logits = _add_to_tokens(logits, self.config.first_cell_token, scores)
        # The critic reads the decoder state detached: it has its own encoder, and its gradient
        # through the shared trunk moved the non-action logits at the action slot (format broke).
        first = self.value_head[0]
        hidden = memory.value_frame.unsqueeze(1) + nn.functional.linear(h.detach(), first.weight[:, self.config.frame_hidden :])
        values = self.value_head[2](self.value_head[1](hidden))  # (B, L, streams)
        return logits, values.squeeze(-1) if self.config.value_streams == 1 else values

    def new_cache(self, batch_size: int, length: int) -> list[torch.Tensor]:
        """Empty self-attention key/value caches for :meth:`decode_step`, one (B, L, 2d) per block."""
        return [torch.zeros(batch_size, length, 2 * self.config.d_model) for _ in self.blocks]

    def decode_step(self, memory: Memory, token: torch.Tensor, i: int, cache: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``token`` (B,) is response input position ``i`` (``<bos>`` at 0) ->
        logits (B, V) and value (B,) for response token i. Positions < i must have been fed, in
        order, through the same ``cache`` (:meth:`new_cache`). Equals :meth:`decode` at position i."""
        x, named = self._embed(memory, token.unsqueeze(1))
        x = x + self.token_pos[i]
        for block, kv, block_cache in zip(self.blocks, memory.kv, cache):
            x = block.step(x, kv, block_cache, i)
        logits, values = self._heads(memory, x, named, self.readout_gate[i : i + 1], self.action_gate[i : i + 1])
        return logits[:, 0], values[:, 0]

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced pass over response tokens (B, L): log-probs (B, L), entropies (B, L) and
    values (B, L, the value before each token) at every position (mask them outside).

    With ``entropy_mask`` (L, V) bool (:func:`~agents.vagen.vocab.slot_mask`), a position's entropy
    is that of its distribution renormalised over the tokens its slot accepts: an entropy bonus then
    spreads probability over well-formed choices, where over the whole vocabulary it also rewards
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
