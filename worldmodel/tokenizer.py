"""The frame tokenizer: uint8 RGB frames ⇄ one discrete token per grid tile.

A MiniGrid frame is a grid of tiles rendered independently of each other (each ``tile_size`` ×
``tile_size`` pixel block depends only on that cell's content and, in the egocentric view, on its
visibility). So the tokenizer is *per-patch* with patch = tile: the encoder maps one tile's pixels
through a small MLP (a patch-strided convolution followed by 1×1 convolutions, written as linear
layers), the decoder maps one token back to one tile. Nothing mixes neighbouring tiles, which is what makes one
checkpoint work on any grid size whose tiles the training frames covered (DoorKey-6x6 → 8x8).

Bottlenecks (``TokenizerConfig.quantizer``):

- ``fsq``: finite scalar quantisation (Mentzer et al. 2023): each latent channel is bounded and
  rounded to one of ``levels[i]`` values; the token is the mixed-radix number of the rounded
  values. No codebook, so no dead codes and no auxiliary losses.
- ``vq``: vector quantisation with codebook care: nearest code (straight-through), codebook and
  commitment losses, codes initialised from encoder outputs and dead codes restarted from them.

Decoding is per token, so :meth:`Tokenizer.decode` looks decoded patches up in a table computed
once from the decoder for every code (rebuilt whenever a weight changes): decoding costs a gather.

Shapes: frames ``(..., H, W, 3)`` uint8, tokens ``(..., H / p, W / p)`` int64, p = patch size;
inside, tiles are ``(B, h, w, p, p, 3)`` and latents channel-last ``(B, h, w, C)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import ArtifactError
from common.checkpoints import read_checkpoint

CHECKPOINT_FORMAT = "gridworld-sandbox/tokenizer/1"
QUANTIZERS = ("fsq", "vq")
DECODER_OUTPUTS = ("categorical", "regression")


class TokenizerCheckpointError(ArtifactError, ValueError):
    """A tokenizer checkpoint that is missing, unreadable, or made for other frames or vocabulary."""


@dataclass
class TokenizerConfig:
    """The model's shape: everything needed to rebuild it before loading weights. No defaults:
    ``worldmodel.train_tokenizer.model_config`` derives it from the stage config."""

    patch_size: int  # pixels per patch side; equals the env tile size (one token per tile)
    hidden_dim: int  # width of the per-patch encoder and decoder
    num_layers: int  # hidden 1×1 layers in encoder and in decoder
    quantizer: str  # vq | fsq
    fsq_levels: list[int]  # fsq: values per latent channel
    codebook_size: int  # vq: number of codes
    code_dim: int  # vq: code vector width
    commitment_weight: float  # vq: pulls encoder outputs towards their codes
    dead_code_threshold: float  # vq: restart a code whose usage EMA falls under this many hits per step
    decoder_output: str  # categorical (256-way logits per pixel channel) | regression (MSE)
    intensity_dim: int  # categorical: per-pixel-channel feature width fed to the shared 256-way head

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"tokenizer.quantizer must be one of {QUANTIZERS}, got '{self.quantizer}'")
        if self.patch_size < 1 or self.hidden_dim < 1 or self.num_layers < 0:
            raise ValueError("tokenizer patch_size and hidden_dim must be positive, num_layers non-negative")
        if self.quantizer == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 2):
            raise ValueError(f"tokenizer fsq_levels need at least one channel of >= 2 levels, got {self.fsq_levels}")
        if self.decoder_output not in DECODER_OUTPUTS:
            raise ValueError(f"tokenizer.decoder_output must be one of {DECODER_OUTPUTS}, got '{self.decoder_output}'")
        if self.quantizer == "vq" and (self.codebook_size < 2 or self.code_dim < 1):
            raise ValueError("tokenizer codebook_size must be >= 2 and code_dim >= 1")

    @property
    def vocab_size(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.code_dim

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TokenizerCheckpointError(f"tokenizer config has unknown fields {unknown}")
        values = dict(values)
        if "fsq_levels" in values:
            values["fsq_levels"] = [int(v) for v in values["fsq_levels"]]
        return cls(**values)


@dataclass
class Losses:
    """A total to minimise and its named parts (the parts become log keys)."""

    total: torch.Tensor  # scalar
    parts: dict[str, torch.Tensor]  # name -> scalar (detached)


# ---------------------------------------------------------------------------------------------
# Bottlenecks
# ---------------------------------------------------------------------------------------------


class FiniteScalarQuantizer(nn.Module):
    """FSQ: channel i is squashed to ``levels[i]`` evenly spaced values in [-1, 1] and rounded.

    ``forward(z (..., C)) -> (quantized (..., C), tokens (...), aux_loss scalar)``; gradients
    pass the rounding straight through.
    """

    def __init__(self, levels: list[int]):
        super().__init__()
        levels_t = torch.tensor(levels, dtype=torch.int64)
        self.register_buffer("levels", levels_t, persistent=False)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels_t[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.vocab_size = int(math.prod(levels))

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # Squash to (-half_l, half_l), shifted for even level counts so that rounding yields exactly
        # ``levels`` integer values (the FSQ paper's construction).
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bounded = self._bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        half_width = (self.levels // 2).to(z.dtype)
        digits = (torch.round(bounded).detach() + half_width).long()  # (..., C) in [0, levels)
        tokens = (digits * self.basis).sum(-1)
        return rounded / half_width, tokens, z.new_zeros(())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 -> quantized latents (..., C)."""
        digits = (tokens.unsqueeze(-1) // self.basis) % self.levels
        half_width = self.levels // 2
        return (digits - half_width).float() / half_width.float()


class VectorQuantizer(nn.Module):
    """VQ with codebook care, for a vocabulary of a few dozen tiles:

    - latents and codes are L2-normalised (cosine similarity), so neither can drift off in scale
      (plain VQ latents grew without bound here and collapsed onto one code);
    - at the first training batch the codebook is seeded by farthest-point sampling of the encoder
      outputs: every distinct tile in the batch gets its own code from step one;
    - a code unused for a while (usage EMA under ``dead_code_threshold`` hits per batch) is re-seeded
      at the worst-served encoder output, but only while some output is poorly served: restarting
      onto a well-served output would steal its tile's code;
    - codebook and commitment losses, straight-through gradients.

    ``forward(z (..., D)) -> (quantized (..., D), tokens (...), aux_loss scalar)``.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float, dead_code_threshold: float):
        super().__init__()
        self.vocab_size = int(codebook_size)
        self.commitment_weight = float(commitment_weight)
        self.dead_code_threshold = float(dead_code_threshold)
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebook_size, code_dim), dim=1))
        self.register_buffer("usage", torch.ones(codebook_size))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        return (flat @ self._codes().t()).argmax(1)

    @torch.no_grad()
    def _care(self, flat: torch.Tensor) -> None:
        if not bool(self.initialised):
            chosen = [0]
            distance = (flat - flat[0]).pow(2).sum(1)
            for _ in range(self.vocab_size - 1):
                chosen.append(int(distance.argmax()))
                distance = torch.minimum(distance, (flat - flat[chosen[-1]]).pow(2).sum(1))
            self.codebook.copy_(flat[chosen])
            self.initialised.fill_(True)
            return
        tokens = self._nearest(flat)
        self.usage.mul_(0.99).add_(torch.bincount(tokens, minlength=self.vocab_size).float(), alpha=0.01)
        error = (flat - self._codes()[tokens]).pow(2).sum(1)
        dead = torch.nonzero(self.usage < self.dead_code_threshold).flatten()
        poorly_served = torch.nonzero(error > 1e-3).flatten()
        if len(dead) and len(poorly_served):
            worst = poorly_served[error[poorly_served].argsort(descending=True)][: len(dead)]
            self.codebook[dead[: len(worst)]] = flat[worst]
            self.usage[dead[: len(worst)]] = 1.0

    def forward(self, z: torch.Tensor):
        flat = F.normalize(z.reshape(-1, z.shape[-1]), dim=1)
        if self.training:
            self._care(flat.detach())
        tokens = self._nearest(flat)
        codes = self._codes()[tokens]
        aux = F.mse_loss(codes, flat.detach()) + self.commitment_weight * F.mse_loss(flat, codes.detach())
        quantized = flat + (codes - flat).detach()
        return quantized.view(z.shape), tokens.view(z.shape[:-1]), aux

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 -> code vectors (..., D)."""
        return self._codes()[tokens]


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def _per_patch_stack(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    # Linear layers on channel-last (..., C) tensors: per tile by construction, and a plain GEMM,
    # several times cheaper on the CPU than the equivalent 1x1 convolutions at these sizes.
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(num_layers):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


class Tokenizer(nn.Module):
    """Per-patch encoder → discrete bottleneck → per-patch decoder (see the module doc).

    ``encode(frames (..., H, W, 3) uint8) -> tokens (..., H/p, W/p) int64`` and
    ``decode(tokens) -> frames uint8`` are deterministic and batched; ``compute_loss`` trains it.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        p = config.patch_size
        # Encoder: a linear map of one tile's p*p*3 pixels (a patch-sized, patch-strided convolution),
        # then per-tile layers: nothing ever mixes two tiles.
        self.patchify = nn.Linear(p * p * 3, config.hidden_dim)
        self.encoder = _per_patch_stack(config.hidden_dim, config.hidden_dim, config.latent_dim, config.num_layers)
        # Categorical output (default): each pixel channel gets ``intensity_dim`` features and one
        # head shared by all pixels scores the 256 intensities, so exactness = the right argmax; it
        # reached exactness in 150 steps where regression (3 values per pixel, rounded) took 700
        # (docs/tokenizer.md).
        out_per_channel = config.intensity_dim if config.decoder_output == "categorical" else 1
        # Data-dependent init of the latents (ActNorm, Glow): at the first training batch, scale and
        # shift make every latent channel zero-mean, unit-variance over the tiles. Without it the
        # encoder maps all tiles (mostly black pixels) to nearly the same latent, which FSQ rounds
        # and VQ assigns to one or two codes (measured: 2 codes for 14 distinct tiles at step 0),
        # and training never separates them again. Afterwards it is a plain per-channel affine.
        self.latent_scale = nn.Parameter(torch.ones(config.latent_dim))
        self.latent_shift = nn.Parameter(torch.zeros(config.latent_dim))
        self.register_buffer("latent_norm_initialised", torch.zeros((), dtype=torch.bool))
        self.decoder = _per_patch_stack(config.latent_dim, config.hidden_dim, 3 * out_per_channel * p * p,
                                        config.num_layers)
        self.intensity_head = nn.Linear(config.intensity_dim, 256) if config.decoder_output == "categorical" else None
        if config.quantizer == "fsq":
            self.quantizer: nn.Module = FiniteScalarQuantizer(config.fsq_levels)
        else:
            self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.commitment_weight,
                                             config.dead_code_threshold)
        # He init (zero biases): torch's default init shrinks every layer, and the tiles' latents
        # came out of a 3-layer encoder differing by 0.1% of their size (measured), too little for any
        # bottleneck to tell the tiles apart.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self._table: torch.Tensor | None = None  # (V, p, p, 3) uint8 decoded patch of every token
        self._table_key: tuple | None = None

    # ---------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def identity(self) -> str:
        """A stable hash of config and weights: equal identities decode tokens identically."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"tokenizer-{digest.hexdigest()[:16]}"

    # ---------------------------------------------------------------- differentiable parts
    def _check_frames(self, frames: torch.Tensor) -> None:
        p = self.patch_size
        if frames.dim() < 3 or frames.shape[-1] != 3:
            raise ValueError(f"tokenizer expects frames (..., H, W, 3), got shape {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"tokenizer expects uint8 frames, got {frames.dtype}")
        h, w = frames.shape[-3], frames.shape[-2]
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"frame size {h}x{w} is not a positive multiple of the tokenizer's patch size {p} "
                f"(the env tile size it was trained for)"
            )

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's weights (patchify, 1x1 stack, latent affine): trained at a separate rate."""
        return [*self.patchify.parameters(), *self.encoder.parameters(), self.latent_scale, self.latent_shift]

    def patches(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, H, W, 3) uint8 -> tiles (B, H/p, W/p, p, p, 3) uint8 (a view when possible)."""
        b, height, width, _ = frames.shape
        p = self.patch_size
        return frames.reshape(b, height // p, p, width // p, p, 3).transpose(2, 3)

    def encode_latents(self, patches: torch.Tensor) -> torch.Tensor:
        """tiles (B, h, w, p, p, 3) uint8 -> continuous latents (B, h, w, C)."""
        pixels = patches.reshape(*patches.shape[:3], -1).float() / 255.0 - 0.5
        latents = self.encoder(F.gelu(self.patchify(pixels)))
        if self.training and not bool(self.latent_norm_initialised):
            with torch.no_grad():
                flat = latents.reshape(-1, latents.shape[-1])
                mean = flat.mean(0)
                std = flat.std(0).clamp_min(1e-6)
                self.latent_scale.copy_(1.0 / std)
                self.latent_shift.copy_(-mean / std)
                self.latent_norm_initialised.fill_(True)
        return latents * self.latent_scale + self.latent_shift

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """quantized latents (B, h, w, C) -> decoder output per tile pixel: categorical: logits
        (B, h, w, p, p, 3, 256); regression: values (B, h, w, p, p, 3), ~[0, 1]."""
        p = self.patch_size
        out = self.decoder(latents).view(*latents.shape[:3], p, p, 3, -1)  # (B, h, w, p, p, 3, e)
        if self.intensity_head is None:
            return out.squeeze(-1)
        return self.intensity_head(out)

    def output_to_uint8(self, output: torch.Tensor) -> torch.Tensor:
        """decoder output (see :meth:`decode_latents`) -> tiles (B, h, w, p, p, 3) uint8."""
        if self.intensity_head is None:
            return to_uint8(output)
        return output.argmax(-1).to(torch.uint8)

    def compute_loss(self, frames: torch.Tensor) -> Losses:
        """frames (B, H, W, 3) uint8 (single tiles are frames too: (B, p, p, 3)) -> Losses.

        ``reconstruction``: cross-entropy of the pixel intensities (categorical decoder) or mean
        squared error on [0, 1] pixels (regression decoder); ``quantizer``: the VQ codebook and
        commitment terms (zero for FSQ).
        """
        self._check_frames(frames)
        patches = self.patches(frames)
        quantized, _, aux = self.quantizer(self.encode_latents(patches))
        output = self.decode_latents(quantized)
        if self.intensity_head is None:
            reconstruction = F.mse_loss(output, patches.float() / 255.0)
        else:
            reconstruction = F.cross_entropy(output.reshape(-1, 256), patches.reshape(-1).long())
        total = reconstruction + aux
        return Losses(total, {"reconstruction": reconstruction.detach(), "quantizer": aux.detach()})

    # ---------------------------------------------------------------- the discrete interface
    def _flatten(self, frames: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, tuple[int, ...]]:
        tensor = torch.as_tensor(frames)
        self._check_frames(tensor)
        lead = tuple(tensor.shape[:-3])
        return tensor.reshape(-1, *tensor.shape[-3:]), lead

    @torch.no_grad()
    def encode(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """frames (..., H, W, 3) uint8 -> tokens (..., H/p, W/p) int64 (on the model's device).

        A token depends on its tile alone, and a batch of gridworld frames holds a few dozen
        distinct tiles among thousands, so the network runs once per distinct tile and the tokens
        are scattered back: the same tokens as running it on every tile, ~10x faster.

        The distinct tiles go through the network in blocks of exactly ``ENCODE_BLOCK`` rows (the
        last one padded): a matrix product's rounding depends on its shape, and a latent near a
        quantisation boundary gave one tile two codes, one when encoded alone and another inside a
        4096-frame batch. With one shape for every block a tile's code is its own.
        """
        flat, lead = self._flatten(frames)
        device = next(self.parameters()).device
        tiles = self.patches(flat.to(device))  # (N, h, w, p, p, 3)
        n, h, w = tiles.shape[:3]
        rows = tiles.reshape(n * h * w, -1)  # (M, p*p*3) uint8
        representatives, inverse = _distinct_rows(rows)
        count = len(representatives)
        padded = torch.zeros((-(-count // ENCODE_BLOCK) * ENCODE_BLOCK, rows.shape[1]), dtype=rows.dtype, device=device)
        padded[:count] = representatives
        was_training = self.training
        self.eval()
        try:
            codes = [self.quantizer(self.encode_latents(block.view(1, 1, ENCODE_BLOCK, *tiles.shape[3:])))[1].reshape(-1)
                     for block in padded.split(ENCODE_BLOCK)]
        finally:
            self.train(was_training)
        tokens = torch.cat(codes)[:count]
        return tokens.index_select(0, inverse).reshape(*lead, h, w)

    def _weights_key(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter, so
        # the table is rebuilt exactly when some weight changed.
        return tuple((id(t), t._version) for t in self.state_dict(keep_vars=True).values())

    @torch.no_grad()
    def decode_table(self) -> torch.Tensor:
        """(V, p, p, 3) uint8: the decoded patch of every token."""
        key = self._weights_key()
        if self._table is None or self._table_key != key:
            tokens = torch.arange(self.vocab_size, device=next(self.parameters()).device).view(-1, 1, 1)
            tiles = self.output_to_uint8(self.decode_latents(self.quantizer.embed(tokens)))  # (V, 1, 1, p, p, 3)
            self._table = tiles[:, 0, 0].contiguous()
            self._table_key = key
        return self._table

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """tokens (..., h, w) int64 -> frames (..., h*p, w*p, 3) uint8 (on the model's device)."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() < 2:
            raise ValueError(f"tokenizer decode expects tokens (..., h, w), got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokenizer decode expects integer tokens, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        table = self.decode_table()
        p = self.patch_size
        lead, (h, w) = tuple(tokens.shape[:-2]), tuple(tokens.shape[-2:])
        # index_select on the flattened table: an order of magnitude faster than fancy indexing.
        flat_tokens = tokens.to(table.device).long().reshape(-1)
        patches = table.view(len(table), -1).index_select(0, flat_tokens).view(-1, h, w, p, p, 3)
        frames = patches.transpose(2, 3).reshape(-1, h * p, w * p, 3)
        return frames.reshape(*lead, h * p, w * p, 3)

    @torch.no_grad()
    def decode_network(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`decode` but through the decoder network (no table): for checking."""
        tokens = torch.as_tensor(tokens)
        lead, (h, w) = tuple(tokens.shape[:-2]), tuple(tokens.shape[-2:])
        p = self.patch_size
        tiles = self.output_to_uint8(self.decode_latents(self.quantizer.embed(tokens.reshape(-1, h, w))))
        return tiles.transpose(2, 3).reshape(*lead, h * p, w * p, 3)


ENCODE_BLOCK = 64  # distinct tiles per encoder pass (Tokenizer.encode): one shape, one rounding
_HASH_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _row_keys(rows: torch.Tensor) -> torch.Tensor:
    """rows (M, D) uint8 -> (M,) int64 keys, equal for equal rows (different rows may collide)."""
    width = rows.shape[1]
    words = width // 8 if width % 8 == 0 and rows.is_contiguous() else 0
    key = (words or width, str(rows.device))
    if key not in _HASH_WEIGHTS:
        generator = torch.Generator().manual_seed(width)
        _HASH_WEIGHTS[key] = torch.randint(1, 2**62, (words or width,), generator=generator).to(rows.device) | 1
    if words:  # 8 pixels bytes per int64 word: 8x fewer operations than per byte
        return (rows.view(torch.int64) * _HASH_WEIGHTS[key]).sum(1)  # wraps around: a hash
    return (rows.long() * _HASH_WEIGHTS[key]).sum(1)


def _distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (M, D) uint8 -> (distinct rows (U, D), inverse (M,) int64 with rows == distinct[inverse]).

    Rows are grouped by a hash key and the grouping is verified row by row; on a key collision it
    falls back to ``torch.unique(dim=0)``, so the result is exact in every case.
    """
    rows = rows.contiguous()
    _, inverse = torch.unique(_row_keys(rows), return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.int64, device=rows.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(rows), device=rows.device), reduce="amin")
    distinct = rows.index_select(0, first)
    if not torch.equal(distinct.index_select(0, inverse), rows):  # a key collision
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return distinct, inverse


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images ~[0, 1] -> uint8 [0, 255], rounded to nearest."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def frames_to_patches(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """frames (N, H, W, 3) uint8 -> patches (N * H/p * W/p, p, p, 3), row-major tile order."""
    n, h, w, c = frames.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {p}")
    tiles = frames.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return tiles.reshape(-1, p, p, c)


def reconstruction_stats(real: np.ndarray | torch.Tensor, reconstructed: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Exactness measures of uint8 frames (N, H, W, 3) against their reconstructions.

    ``exact_frame_rate``: fraction of frames equal in every pixel; ``pixel_accuracy``: fraction of
    pixels (all 3 channels) equal; ``psnr``: dB over the whole set (inf when exact); ``mse``.
    """
    real_t = torch.as_tensor(real)
    recon_t = torch.as_tensor(reconstructed).to(real_t.device)
    if real_t.shape != recon_t.shape:
        raise ValueError(f"shapes differ: {tuple(real_t.shape)} vs {tuple(recon_t.shape)}")
    equal_pixels = (real_t == recon_t).all(-1)  # (N, H, W)
    mse = float(((real_t.float() - recon_t.float()) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return {
        "exact_frame_rate": float(equal_pixels.flatten(1).all(1).float().mean()),
        "pixel_accuracy": float(equal_pixels.float().mean()),
        "psnr": psnr,
        "mse": mse,
    }


def difference_panel(real: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
    """One image of rows ``real | reconstructed | difference`` for frames (N, H, W, 3) uint8.

    The difference is shown bright (any wrong pixel is white), since exactness is the goal.
    """
    real = np.asarray(real, dtype=np.uint8)
    reconstructed = np.asarray(reconstructed, dtype=np.uint8)
    diff = np.abs(real.astype(np.int16) - reconstructed.astype(np.int16))
    diff = np.where(diff.max(-1, keepdims=True) > 0, 255, 0).astype(np.uint8).repeat(3, -1)
    gap = np.full((real.shape[1], 2, 3), 128, dtype=np.uint8)
    rows = [np.concatenate([r, gap, c, gap, d], axis=1) for r, c, d in zip(real, reconstructed, diff)]
    spacer = np.full((2, rows[0].shape[1], 3), 128, dtype=np.uint8)
    out: list[np.ndarray] = []
    for row in rows:
        out += [row, spacer]
    return np.concatenate(out[:-1], axis=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_frames(tokenizer: Any, frames: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """frames (N, H, W, 3) uint8 -> tokens (N, h, w) int64 (NumPy), in chunks of ``batch_size``
    frames (bounded memory): the one way every stage tokenises a dataset or a batch of frames."""
    parts = [torch.as_tensor(tokenizer.encode(frames[i:i + batch_size])).cpu().numpy()
             for i in range(0, len(frames), batch_size)]
    return np.concatenate(parts).astype(np.int64)


def tokenizer_checkpoint(tokenizer: Tokenizer, **extra: Any) -> dict[str, Any]:
    """The dict saved as ``tokenizer.pt``: format tag, model config, weights, identity, extras."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": tokenizer.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()},
        "identity": tokenizer.identity,
        **extra,
    }


def load_tokenizer(
    path: str | Path,
    tile_size: int | None = None,
    vocab_size: int | None = None,
    frame_shape: tuple[int, ...] | None = None,
    identity: str | None = None,
    device: str | torch.device = "cpu",
) -> Tokenizer:
    """Load a tokenizer checkpoint, checking it fits what the caller will feed it.

    ``tile_size``: the env tile size (must equal the patch size); ``vocab_size``: the vocabulary a
    downstream model was built for; ``frame_shape`` (H, W, 3): frames must tile into patches;
    ``identity``: the exact tokenizer a dynamics checkpoint recorded. Any mismatch raises
    :class:`TokenizerCheckpointError` naming both values.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, "tokenizer", TokenizerCheckpointError, CHECKPOINT_FORMAT, "run scripts/train_tokenizer.py")
    config = TokenizerConfig.from_dict(checkpoint["model_config"])
    if tile_size is not None and int(tile_size) != config.patch_size:
        raise TokenizerCheckpointError(
            f"tokenizer {path} was trained for tile size {config.patch_size} px, but frames use tile size {tile_size}"
        )
    if vocab_size is not None and int(vocab_size) != config.vocab_size:
        raise TokenizerCheckpointError(
            f"tokenizer {path} has vocabulary size {config.vocab_size}, but {vocab_size} was expected"
        )
    if frame_shape is not None:
        h, w = int(frame_shape[0]), int(frame_shape[1])
        if h % config.patch_size or w % config.patch_size or (len(frame_shape) > 2 and frame_shape[2] != 3):
            raise TokenizerCheckpointError(
                f"tokenizer {path} (patch size {config.patch_size}) cannot tokenize frames of shape "
                f"{tuple(frame_shape)}: height and width must be multiples of {config.patch_size}, 3 channels"
            )
    tokenizer = Tokenizer(config)
    try:
        tokenizer.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise TokenizerCheckpointError(f"tokenizer {path} weights do not fit its config: {error}") from None
    tokenizer.eval().to(device)
    if identity is not None and tokenizer.identity != identity:
        raise TokenizerCheckpointError(
            f"tokenizer {path} is {tokenizer.identity}, but {identity} was expected (it was retrained?)"
        )
    return tokenizer
