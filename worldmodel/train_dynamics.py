"""Training loop of the dynamics model (and the evaluation the benchmark shares).

Reads the run's dataset and ``tokenizer.pt``, tokenises every frame once, trains on random
windows of tokens, logs losses and open-loop videos (real | imagined) and writes
``<run>/dynamics.pt`` (weights, config, the tokenizer's identity, sampling defaults).
``<run>/dynamics.resume.pt`` is written every ``checkpoint_every`` steps and resumed from.

Runs unchanged under ``torchrun --nproc_per_node=N`` (DistributedDataParallel: gloo on the CPU,
nccl on GPUs): every rank draws its own windows, gradients are averaged, only rank 0 writes.
Window sampling and dropout draw from generators seeded by (seed, rank, step), so a resumed run
repeats the numbers of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from common.atomic import atomic_torch_save
from common.config import param
from common.seeding import derive_seed, seed_everything
from common.stage import check_finite, load_resume
from envs.dataset import EpisodeDataset, WindowBatch
from envs.state import StateCodec
from worldmodel.dynamics import (
    BLOCK_TYPES,
    DECODER_CONTEXTS,
    MEMORY_TYPES,
    SAMPLING_ORDERS,
    DynamicsBatch,
    DynamicsModel,
    DynamicsModelConfig,
    count_parameters,
    dynamics_checkpoint,
)
from worldmodel.imagine import SamplingConfig, WorldModel
from worldmodel.memory import map_size_for

CHECKPOINT_NAME = "dynamics.pt"
RESUME_NAME = "dynamics.resume.pt"
UNLABELLED = ("hidden", "inverse", "drop")


@dataclass
class DynamicsConfig:
    """Dynamics model: architecture, training, evaluation, sampling defaults."""

    # ---- model
    dim: int = param(32, "width of the per-token features", min=1)
    heads: int = param(4, "attention heads (attention blocks) or position-mixing groups (mix blocks)", min=1)
    block: str = param("conv", "how a frame's tokens exchange information: conv (3x3, local), mix (conv + learned "
                       "global position mixing, for the egocentric view), attention", choices=BLOCK_TYPES)
    encoder_layers: int = param(0, "blocks reading the current frame before the memory and the state head", min=0)
    decoder_layers: int = param(-1, "blocks predicting the next frame (each widens a token's view by one tile); -1: "
                                "1 for a frame memory (a full-view move is 3x3), 3 for the map (occlusion is view-wide)",
                                min=-1)
    mlp_ratio: int = param(2, "MLP width / dim in each block", min=1)
    memory_dim: int = param(192, "width of the recurrent memory over frames (the rollout cache)", min=1)
    summary_channels: int = param(8, "egocentric view: channels per token flattened into the frame summary the memory "
                                  "reads (the full view pools all dim channels)", min=1)
    state_hidden: int = param(256, "hidden width of the state and outcome heads", min=1)
    action_dropout: float = param(0.1, "probability an action is replaced by the learned 'no action' in training",
                                  min=0, max=1)
    memory: str = param("auto", "what the model remembers: recurrent (a GRU over all frames so far), frame (the current "
                        "frame alone: Markov), map (egocentric view: a token map written at a dead-reckoned pose), auto "
                        "(frame for the full view, map for the partial view)", choices=("auto", *MEMORY_TYPES))
    decoder_context: str = param("auto", "what the next-frame decoder and reward/termination heads see: global (the "
                                 "memory too, whole-frame pooling), local (a neighbourhood of decoder_layers tiles; "
                                 "events read cell by cell off the transition: generalises from a single success), "
                                 "auto (local with a frame or map memory; global with a recurrent one)",
                                 choices=("auto", *DECODER_CONTEXTS))
    presence: bool = param(True, "local decoding: every cell also sees which tiles the frame holds anywhere "
                           "(max-pooled, position-free: whether the key is carried or on the floor)")
    static_cells: bool = param(True, "copy the positions that hold the same token in every training frame (a room's "
                               "outer wall) instead of predicting them: imagination ~2x faster at the same accuracy")
    refine_fraction: float = param(0.3, "share of transitions trained with part of the next frame given (MaskGIT refinement)",
                                   min=0, max=1)
    change_weight: float = param(10.0, "extra loss weight of tokens that change between frames (they carry the dynamics)",
                                 min=0)
    event_weight: float = param(1.0, "loss weight of the positive reward / termination steps (docs/dynamics.md)",
                                min=0)
    event_fraction: float = param(0.125, "share of each batch's windows drawn around a reward or termination step "
                                  "(random-policy data holds a few dozen; 0: uniform windows only)", min=0, max=1)
    rare_fraction: float = param(0.25, "share of each batch's windows drawn around transitions, each situation (the "
                                 "action, the agent's cell, the cell in front, what it carries) as often as another",
                                 min=0, max=1)
    # ---- labels and initialisation
    unlabelled: str = param("hidden", "episodes beyond data.labelled_fraction: hidden (trained action-free), inverse "
                            "(labelled by <run>/inverse.pt, trained on the labelled ones), drop (left out)",
                            choices=UNLABELLED)
    init: str = param("", "a dynamics.pt to start from (fine-tuning, e.g. after action-free pretraining; '': random)")
    # ---- optimisation
    steps: int = param(3000, "optimizer steps", min=1)
    time_limit_s: float = param(0.0, "if > 0: stop after this many seconds of training, the learning-rate schedule "
                                "following elapsed time (for time-boxed benchmarks; results then depend on machine speed)",
                                min=0)
    batch_size: int = param(32, "windows per step, over all ranks", min=1)
    window: int = param(8, "frames per training window", min=2)
    lr: float = param(4e-3, "peak learning rate (AdamW)", above=0)
    min_lr_fraction: float = param(0.05, "final learning rate as a fraction of the peak (cosine decay)", min=0, max=1)
    warmup_steps: int = param(100, "linear warm-up steps", min=0)
    weight_decay: float = param(0.01, "AdamW weight decay", min=0)
    grad_clip: float = param(1.0, "gradient norm clip (0: off)", min=0)
    # ---- logging, evaluation, checkpoints
    log_every: int = param(50, "steps between loss logs", min=1)
    eval_every: int = param(500, "steps between validation evaluations (0: only at the end)", min=0)
    eval_windows: int = param(256, "validation windows per evaluation", min=1)
    video_every: int = param(1000, "steps between open-loop videos (0: only at the end)", min=0)
    video_length: int = param(32, "imagined steps per open-loop video", min=1)
    video_count: int = param(4, "rollouts side by side in a video", min=1)
    checkpoint_every: int = param(500, "steps between resume checkpoints (0: none)", min=0)
    encode_batch: int = param(4096, "frames per tokenizer call when tokenising the dataset", min=1)
    # ---- sampling defaults saved with the model (imagination reads them)
    temperature: float = param(0.0, "sampling temperature of imagined tokens (0: most likely)", min=0)
    refine_steps: int = param(1, "MaskGIT refinement passes per imagined frame (with temperature > 0)", min=1)
    guidance: float = param(1.0, "classifier-free action guidance scale (1: off)", min=0)
    sampling_order: str = param("parallel", "with temperature > 0: parallel (all tokens at once), sequential (unsure "
                                "cells one at a time, each given those drawn) or objects (moving tokens conserved)",
                                choices=SAMPLING_ORDERS)


MODEL_FIELDS = ("dim", "heads", "block", "encoder_layers", "decoder_layers", "mlp_ratio", "memory_dim", "summary_channels",
                "state_hidden", "action_dropout", "presence", "refine_fraction", "change_weight", "event_weight")


def model_config(section: Any, vocab_size: int, token_shape: tuple[int, int], codec: StateCodec,
                 num_actions: int, output_tokens: list[int] | None = None,
                 static_cells: list[int] | None = None, hidden_token: int = -1,
                 egocentric: bool = False) -> DynamicsModelConfig:
    """The model's shape from the config section and the data it will read (``hidden_token``: the
    token of an occluded view cell, :func:`hidden_token_of`; the map memory needs it, and ``auto``
    falls back to ``recurrent`` without it; ``egocentric``: the frames are the agent's view)."""
    memory = resolve_memory(section.memory, egocentric)
    if memory == "map" and section.memory == "auto" and hidden_token < 0:
        memory = "recurrent"  # no token per tile (a patch that is not one tile): no map to write
    if memory == "map":
        static_cells = []  # a position of the egocentric view is no fixed world cell
    return DynamicsModelConfig(
        vocab_size=int(vocab_size), grid_height=int(token_shape[0]), grid_width=int(token_shape[1]),
        state_width=codec.width, state_height=codec.height, num_actions=int(num_actions),
        output_tokens=[int(v) for v in (output_tokens or [])],
        static_cells=[int(v) for v in (static_cells or [])] if section.static_cells else [],
        memory=memory, egocentric=bool(egocentric),
        decoder_context=resolve_decoder_context(section.decoder_context, memory),
        hidden_token=int(hidden_token) if memory == "map" else -1,
        map_size=map_size_for(codec.width, codec.height, int(token_shape[0])) if memory == "map" else 0,
        **{name: getattr(section, name) for name in MODEL_FIELDS if name != "decoder_layers"},
        decoder_layers=resolve_decoder_layers(int(section.decoder_layers), memory),
    )


def placement_tables(data: Any, codec: StateCodec, vocab_size: int) -> dict[str, list]:
    """The egocentric state head's tables (``DynamicsModelConfig.tile_contents``, ``layouts``,
    ``structure_contents``) from the training episodes: what each token draws, the layouts the
    episodes start in, the one content of walls, goals and lava."""
    from worldmodel.metrics import layouts_of, structure_contents_of, tile_contents_of

    starts = np.asarray(data.states)[np.asarray(data.episode_starts)]
    layouts = layouts_of(starts, codec)
    return {"tile_contents": tile_contents_of(np.asarray(data.extras["tokens"]), np.asarray(data.states), codec,
                                              vocab_size).tolist(),
            "layouts": layouts.reshape(len(layouts), -1).tolist(),
            "structure_contents": structure_contents_of(starts, codec).tolist()}


def resolve_decoder_layers(layers: int, memory: str) -> int:
    """-1 -> the depth measured for the memory (docs/dynamics.md): 3 conv blocks for the egocentric
    map, whose decoder must work out which cells the walls hide across the view; 1 otherwise."""
    return (3 if memory == "map" else 1) if layers < 0 else layers


def hidden_token_of(tokenizer: Any, tile_size: int, token_shape: tuple[int, int]) -> int:
    """The token of an occluded cell of the egocentric view (MiniGrid draws it as an empty tile, not
    highlighted), or -1 when the tokenizer does not give all such tiles one token (a patch that is
    not one tile): then there is no cell-by-cell map to write."""
    from minigrid.core.grid import Grid

    tile = np.asarray(Grid.render_tile(None, highlight=False, tile_size=tile_size)).astype(np.uint8)
    frame = np.tile(tile, (token_shape[0], token_shape[1], 1))[None]
    tokens = np.asarray(torch.as_tensor(tokenizer.encode(frame)).cpu()).reshape(-1)
    if frame.shape[1:3] != tuple(int(v) * tile_size for v in token_shape) or len(np.unique(tokens)) != 1:
        return -1
    return int(tokens[0])


def constant_cells(tokens: np.ndarray) -> list[int]:
    """tokens (F, h, w) -> the row-major positions holding the same token in every frame (none if
    that is all of them: a dataset too uniform to tell walls from anything else)."""
    if len(tokens) == 0:
        return []
    same = (tokens == tokens[:1]).all(axis=0).reshape(-1)
    return [] if same.all() else np.flatnonzero(same).tolist()


def resolve_memory(memory: str, egocentric: bool) -> str:
    """``auto`` -> ``frame`` for the full view (the frame shows the whole state but the step count),
    ``map`` for the egocentric view (docs/dynamics.md measures it against ``recurrent``)."""
    if memory == "auto":
        return "map" if egocentric else "frame"
    return memory  # any other value is checked by DynamicsModelConfig


def resolve_decoder_context(context: str, memory: str) -> str:
    """``auto`` -> ``local`` with a frame or map memory (the frame, or the map under the next pose,
    holds what the next frame needs), ``global`` with a recurrent one (the decoder reads the GRU)."""
    if context == "auto":
        return "local" if memory in ("frame", "map") else "global"
    return context  # any other value is checked by DynamicsModelConfig


def sampling_config(section: Any) -> SamplingConfig:
    return SamplingConfig(temperature=float(section.temperature), refine_steps=int(section.refine_steps),
                          guidance=float(section.guidance), order=str(section.sampling_order))


# ---------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------


def state_codec_for(dataset: EpisodeDataset) -> StateCodec:
    """The state codec of a dataset (from its card when it says the grid size)."""
    size = int(dataset.arrays["states"].shape[1])
    return StateCodec.for_card(dataset.card if isinstance(dataset.card, dict) else {}, state_size=size)


def to_batch(windows: WindowBatch, device: torch.device | str = "cpu") -> DynamicsBatch:
    """A dataset WindowBatch with ``extras["tokens"]`` -> tensors for the model."""
    if "tokens" not in windows.extras:
        raise ValueError("windows carry no tokens: attach them with dataset.with_frame_array('tokens', ...)")
    return DynamicsBatch(
        tokens=torch.as_tensor(windows.extras["tokens"]).long(),
        actions=torch.as_tensor(windows.actions).long(),
        rewards=torch.as_tensor(windows.rewards).float(),
        terminated=torch.as_tensor(windows.terminated).bool(),
        states=torch.as_tensor(windows.states).long(),
        mask=torch.as_tensor(windows.mask).bool(),
    ).to(device)


def situation_weights(dataset: EpisodeDataset, codec: StateCodec) -> tuple[np.ndarray, np.ndarray]:
    """(steps, p): every transition t -> t+1 (flat frame index) and a probability that draws each
    situation as often as another: the action, the object under the agent and the object and state
    of the cell in front (from the true state of frame t), and the object carried.

    A random policy seldom picks up in front of a closed door while carrying the key, or walks from
    a doorway into the wall; the model then imagines the door opening or the agent moving (the
    first-wrong steps of DoorKey-6x6's failed 32-step rollouts). Uniform windows show each such
    situation a few times per thousand steps."""
    a = dataset.arrays
    t = np.flatnonzero(a["actions"] >= 0)
    if len(t) == 0:
        return t, np.zeros(0)
    states = a["states"][t].astype(np.int64)
    grid = states[:, : codec.grid_size].reshape(len(t), codec.width, codec.height, 3)
    x, y, direction = (states[:, codec.grid_size + k] for k in range(3))
    dx, dy = np.array([1, 0, -1, 0])[direction % 4], np.array([0, 1, 0, -1])[direction % 4]
    fx, fy = np.clip(x + dx, 0, codec.width - 1), np.clip(y + dy, 0, codec.height - 1)
    rows = np.arange(len(t))
    keys = np.stack([a["actions"][t], grid[rows, x, y, 0], grid[rows, fx, fy, 0], grid[rows, fx, fy, 2],
                     states[:, codec.grid_size + 3]], axis=1)
    _, kind, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[kind.reshape(-1)]
    return t, weights / weights.sum()


def sample_training_windows(dataset: EpisodeDataset, rng: np.random.Generator, batch_size: int, length: int,
                            event_fraction: float, events: np.ndarray, rare_fraction: float = 0.0,
                            situations: tuple[np.ndarray, np.ndarray] | None = None) -> WindowBatch:
    """A training batch: ``round(event_fraction * batch_size)`` windows around the given event steps
    (when there are any), ``round(rare_fraction * batch_size)`` around transitions drawn by
    :func:`situation_weights`, the rest uniform over the dataset."""
    num_events = int(round(event_fraction * batch_size)) if len(events) and length >= 2 else 0
    has_situations = situations is not None and len(situations[0]) > 0 and length >= 2
    num_rare = min(int(round(rare_fraction * batch_size)), batch_size - num_events) if has_situations else 0
    episodes, starts = dataset.sample_window_starts(rng, batch_size - num_events - num_rare, length)
    parts = [(episodes, starts)]
    if num_events:
        parts.append(dataset.window_starts_around(rng, num_events, length, events))
    if num_rare:
        parts.append(dataset.window_starts_around(rng, num_rare, length, *situations))  # type: ignore[misc]
    return dataset.windows_at(np.concatenate([e for e, _ in parts]), np.concatenate([s for _, s in parts]), length)


def apply_labels(cfg: Any, train_set: EpisodeDataset, run_path: Path, device: Any) -> EpisodeDataset:
    """The training episodes as ``data.labelled_fraction`` and ``dynamics.unlabelled`` say: the
    labelled ones (:meth:`EpisodeDataset.labelled_episodes`, the inverse stage picks the same) keep
    their actions; the others lose them (``hidden``: -1, the model's "no action"), get the inverse
    model's labels (``inverse``), or are left out (``drop``)."""
    fraction = float(cfg.data.labelled_fraction)
    if fraction >= 1:
        return train_set
    labelled = train_set.labelled_episodes(fraction, int(cfg.run.seed))
    mode = str(cfg.dynamics.unlabelled)
    if mode == "drop":
        if not labelled.any():
            raise ValueError("data.labelled_fraction=0 with dynamics.unlabelled=drop leaves no episode to train on")
        return train_set.select(np.flatnonzero(labelled))
    actions = train_set.arrays["actions"].copy()
    hidden = ~labelled[train_set.frame_episodes()] & (actions >= 0)
    if mode == "inverse":
        from worldmodel.inverse import label_actions, load_inverse

        inverse, _ = load_inverse(run_path / "inverse.pt", device=device)
        labels, _ = label_actions(inverse, train_set.arrays["frames"], actions >= 0)
        actions[hidden] = labels[hidden]
    else:
        actions[hidden] = -1
    return train_set.with_actions(actions)


def initial_weights(path: str, model: DynamicsModel, tokenizer: Any) -> None:
    """Load ``dynamics.init`` into ``model``; a model of another shape is refused, naming the fields."""
    from worldmodel.dynamics import load_dynamics

    start, _ = load_dynamics(path, tokenizer_identity=tokenizer.identity)
    mine, theirs = model.config.to_dict(), start.config.to_dict()
    differ = sorted(k for k in mine if mine[k] != theirs.get(k))
    if differ:
        raise ValueError(f"dynamics.init: {path} is a model of another shape ({', '.join(differ)} differ): "
                         "start from a model trained on the same dataset with the same dynamics settings")
    model.load_state_dict(start.state_dict())


# ---------------------------------------------------------------------------------------------
# Evaluation (shared with benchmarks/dynamics.py)
# ---------------------------------------------------------------------------------------------


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
    tp = float(np.sum(predicted & actual))
    fp = float(np.sum(predicted & ~actual))
    fn = float(np.sum(~predicted & actual))
    if tp + fn == 0:
        # No event in the evaluated data: F1 says nothing (a head that never fires would score 1).
        return float("nan")
    return 2 * tp / (2 * tp + fp + fn)


@torch.no_grad()
def evaluate_one_step(model: DynamicsModel, dataset: EpisodeDataset, max_frames: int = 0,
                      window: int = 32, batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced metrics over whole episodes (read in consecutive windows of ``window`` frames,
    the memory restarting at each window): next frame exactly right, reward (non-zero) and
    termination F1, all state fields right. ``max_frames`` > 0 limits the frames read."""
    model.eval()
    device = next(model.parameters()).device
    episodes, starts = [], []
    for e, length in enumerate(dataset.episode_lengths):
        for s in range(0, int(length) + 1, window):
            episodes.append(e)
            starts.append(s)
    episodes_a, starts_a = np.asarray(episodes), np.asarray(starts)
    if max_frames > 0:
        keep = max(1, max_frames // window)
        pick = np.random.default_rng(0).permutation(len(episodes_a))[:keep]
        episodes_a, starts_a = episodes_a[np.sort(pick)], starts_a[np.sort(pick)]
    exact, tok_correct, tok_total = [], 0, 0
    reward_pred, reward_true, term_pred, term_true, state_ok = [], [], [], [], []
    for i in range(0, len(episodes_a), batch_size):
        windows = dataset.windows_at(episodes_a[i : i + batch_size], starts_a[i : i + batch_size], window)
        batch = to_batch(windows, device)
        out = model(batch.tokens, batch.actions)
        b, t = batch.actions.shape
        transition = torch.zeros(b, t, dtype=torch.bool, device=device)
        transition[:, :-1] = batch.mask[:, 1:] & batch.mask[:, :-1] & (batch.actions[:, :-1] >= 0)
        correct = model.tokens_from_logits(out.token_logits)[:, :-1] == batch.tokens[:, 1:].flatten(2)  # (B, T-1, N)
        valid = transition[:, :-1]
        exact.append(correct.all(-1)[valid].cpu().numpy())
        tok_correct += int(correct[valid].sum())
        tok_total += int(correct[valid].numel())
        reward_pred.append((out.reward_logit > 0)[transition].cpu().numpy())
        reward_true.append((batch.rewards != 0)[transition].cpu().numpy())
        term_pred.append((out.termination_logit > 0)[transition].cpu().numpy())
        term_true.append(batch.terminated[transition].cpu().numpy())
        state_ok.append((out.state_logits.argmax(-1) == batch.states).all(-1)[batch.mask].cpu().numpy())
    exact_a = np.concatenate(exact)
    return {
        "frame_exact_1step": float(exact_a.mean()) if len(exact_a) else float("nan"),
        "token_accuracy": tok_correct / max(tok_total, 1),
        "reward_f1": _f1(np.concatenate(reward_pred), np.concatenate(reward_true)),
        "termination_f1": _f1(np.concatenate(term_pred), np.concatenate(term_true)),
        "reward_events": int(np.concatenate(reward_true).sum()),
        "termination_events": int(np.concatenate(term_true).sum()),
        "state_head_accuracy": float(np.concatenate(state_ok).mean()),
        "transitions": int(len(exact_a)),
    }


@torch.no_grad()
def open_loop(world_model: WorldModel, dataset: EpisodeDataset, horizon: int, num_rollouts: int,
              seed: int = 0, context: int = 1, with_windows: bool = False) -> dict[str, Any]:
    """Open-loop rollouts with the true actions from real contexts of ``context`` frames.

    Picks ``num_rollouts`` windows of ``context + horizon`` frames that lie wholly inside episodes
    (episodes too short are skipped). Returns ``real`` and ``imagined`` tokens (R, horizon, h, w),
    ``exact`` (R, horizon) bool (the imagined frame equals the real one), ``states_real`` and
    ``states_imagined`` (R, horizon, S); with ``with_windows`` also ``windows`` (the WindowBatch read).
    """
    length = context + horizon
    lengths = dataset.episode_lengths + 1
    eligible = np.nonzero(lengths >= length)[0]
    if len(eligible) == 0:
        raise ValueError(f"no episode has {length} frames for an open-loop rollout of {horizon} steps")
    rng = np.random.default_rng(seed)
    episodes = rng.choice(eligible, size=num_rollouts, replace=len(eligible) < num_rollouts)
    starts = (rng.random(num_rollouts) * (lengths[episodes] - length + 1)).astype(np.int64)
    windows = dataset.windows_at(episodes, starts, length)
    tokens = torch.as_tensor(windows.extras["tokens"], device=world_model.device).long()
    actions = torch.as_tensor(windows.actions, device=world_model.device).long()
    world_model.reset(tokens[:, :context], actions[:, : context - 1])
    imagined, states = [], []
    for k in range(horizon):
        step = world_model.step(actions[:, context - 1 + k])
        imagined.append(step.tokens)
        states.append(step.state)
    imagined_t = torch.stack(imagined, 1)
    real = tokens[:, context:]
    return {
        **({"windows": windows} if with_windows else {}),
        "real": real.cpu().numpy(), "imagined": imagined_t.cpu().numpy(),
        "exact": (imagined_t == real).flatten(2).all(-1).cpu().numpy(),
        "states_real": windows.states[:, context:].astype(np.int64),
        "states_imagined": torch.stack(states, 1).cpu().numpy(),
    }


def side_by_side_video(world_model: WorldModel, real: np.ndarray, imagined: np.ndarray) -> np.ndarray:
    """real, imagined tokens (R, T, h, w) -> frames (T, R*H, 2*W + 2, 3): real | imagined per row."""
    real_f = world_model.decode(torch.as_tensor(real))  # (R, T, H, W, 3)
    imag_f = world_model.decode(torch.as_tensor(imagined))
    r, t, h, w, _ = real_f.shape
    gap = np.full((r, t, h, 2, 3), 255, dtype=np.uint8)
    rows = np.concatenate([real_f, gap, imag_f], axis=3)  # (R, T, H, 2W+2, 3)
    return rows.transpose(1, 0, 2, 3, 4).reshape(t, r * h, 2 * w + 2, 3)


# ---------------------------------------------------------------------------------------------
# Distributed plumbing
# ---------------------------------------------------------------------------------------------


def distributed_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU) -> (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = distributed_rank()
    device = torch.device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def start_training(cfg: Any, batch_key: str | None = None) -> tuple[int, int, torch.device, Path]:
    """What every training loop does first: join the process group torchrun describes, set the
    thread count and the seeds, and check that the batch ``batch_key`` names (``"dynamics.batch_size"``)
    divides among the ranks -> (rank, world size, device, run folder)."""
    rank, world, device = setup_distributed(str(cfg.run.device))
    if cfg.run.threads > 0:
        torch.set_num_threads(int(cfg.run.threads))
    seed_everything(cfg.run.seed)
    if batch_key is not None:
        section, name = batch_key.split(".")
        batch = int(getattr(getattr(cfg, section), name))
        if batch % world:
            raise ValueError(f"{batch_key} ({batch}) must divide among {world} ranks")
    return rank, world, device, Path(cfg.run.root) / cfg.run.name


def resume_state(resume_path: Path, run_dir: Any, stage: str, rank: int, world: int, device: torch.device,
                 log: Any = print) -> dict[str, Any] | None:
    """The resume checkpoint every rank starts from: rank 0 decides (:func:`common.stage.load_resume`:
    of this stage identity, else None) and the others follow, reading the same file."""
    state = load_resume(resume_path, run_dir, stage, log) if rank == 0 else None
    if world > 1:
        holder = [state is not None]
        dist.broadcast_object_list(holder, src=0)
        if holder[0] and state is None:
            state = torch.load(resume_path, map_location=device, weights_only=False)
    return state


class _LossWrapper(nn.Module):
    """Routes compute_loss through ``forward`` so DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: DynamicsModel):
        super().__init__()
        self.model = model

    def forward(self, batch: DynamicsBatch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = on_grid_of(self.model, batch.tokens).compute_loss(batch, generator=generator)
        return losses.total, losses.parts


def on_grid_of(model: DynamicsModel, tokens: torch.Tensor | np.ndarray) -> DynamicsModel:
    """The model on the grid of ``tokens`` (..., h, w) (a full-view model runs on any grid)."""
    shape = tuple(int(v) for v in tokens.shape[-2:])
    return model if shape == model.grid else model.on_grid(*shape)


@dataclass
class EnvData:
    """One env's share of the training data: its splits, state codec and reward/termination steps."""

    name: str
    train: EpisodeDataset
    val: EpisodeDataset
    codec: StateCodec
    events: np.ndarray
    situations: tuple[np.ndarray, np.ndarray]  # situation_weights of the training split

    @property
    def token_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.train.extras["tokens"].shape[1:])  # type: ignore[return-value]


def _val_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Validation metrics as log scalars: ``val_<key>``, and ``val_<env>/<key>`` for each env of a mix."""
    scalars = {f"val_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, values in metrics.get("envs", {}).items():
        scalars.update({f"val_{name}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))})
    return scalars


def _format(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _learning_rate(cfg: Any, step: int, elapsed: float = 0.0) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    progress = min(1.0, step / max(1, cfg.steps))
    if cfg.time_limit_s > 0:
        progress = max(progress, min(1.0, elapsed / cfg.time_limit_s))
    cosine = cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + np.cos(np.pi * progress))
    return float(cfg.lr * warm * cosine)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(cfg: Any, run_dir: Any, dataset: EpisodeDataset | None = None, tokenizer: Any = None,
          log: Any = print) -> dict[str, Any]:
    """Train the dynamics model of run ``run_dir`` (a :class:`common.runs.RunDir`; None on ranks > 0).

    ``dataset`` / ``tokenizer`` default to the run's ``dataset/`` and ``tokenizer.pt``. Returns the
    final validation metrics (rank 0; {} elsewhere).
    """
    from common.runs import Logger
    from envs.dataset import training_folders
    from worldmodel.tokenizer import encode_frames, load_tokenizer

    section = cfg.dynamics
    rank, world, device, run_path = start_training(cfg, "dynamics.batch_size")
    is_main = rank == 0

    # ---- data: the dataset (data.mix: one per env), tokenised once by the run's tokenizer -----
    datasets = [dataset] if dataset is not None else [EpisodeDataset.load(f) for f in training_folders(cfg)]
    if tokenizer is None:
        tokenizer = load_tokenizer(run_path / "tokenizer.pt", tile_size=cfg.env.tile_size,
                                   frame_shape=datasets[0].frame_shape, device=device)
    envs: list[EnvData] = []
    for data in datasets:
        if "tokens" not in data.extras:
            data.with_frame_array("tokens", encode_frames(tokenizer, data.arrays["frames"], section.encode_batch))
        train_set, val_set = data.split(cfg.data.val_fraction, seed=cfg.run.seed)
        train_set = apply_labels(cfg, train_set, run_path, device)
        card = data.card if isinstance(data.card, dict) else {}
        codec = state_codec_for(data)
        envs.append(EnvData(str(card.get("env_id", "dataset")), train_set, val_set or train_set, codec,
                            train_set.event_steps(), situation_weights(train_set, codec)))
    train_set, val_set, codec = envs[0].train, envs[0].val, envs[0].codec
    token_shape = envs[0].token_shape
    num_actions = max(int(d.card.get("num_actions", 7)) if isinstance(d.card, dict) else 7 for d in datasets)

    # ---- model, optimizer, resume ------------------------------------------------------------
    # The decoder outputs the tokens the training frames use (a tile never seen cannot be learned).
    output_tokens = np.unique(np.concatenate([np.unique(e.train.extras["tokens"]) for e in envs])).tolist()
    # Positions no training frame ever changes (the outer wall) are copied, not predicted (one
    # env only: the walls of several grids are at different places).
    static = constant_cells(train_set.extras["tokens"]) if len(envs) == 1 else []
    hidden = -1
    egocentric = str(cfg.env.obs) == "partial"
    if resolve_memory(section.memory, egocentric) == "map":
        hidden = hidden_token_of(tokenizer, int(cfg.env.tile_size), token_shape)  # type: ignore[arg-type]
        if hidden < 0 and section.memory == "map":
            raise ValueError("dynamics.memory=map needs a tokenizer with one token per tile (patch size = env.tile_size)")
    model_cfg = model_config(section, tokenizer.vocab_size, token_shape, codec, num_actions, output_tokens,  # type: ignore[arg-type]
                             static, hidden_token=hidden, egocentric=egocentric)
    if model_cfg.memory == "map":
        model_cfg = dataclasses.replace(model_cfg, **placement_tables(train_set, codec, tokenizer.vocab_size))
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = DynamicsModel(model_cfg).to(device)
    if section.init:
        initial_weights(section.init, model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    start_step = 0
    resume_path = run_path / RESUME_NAME
    # The resume checkpoint must be of this stage identity (config and inputs), not just this shape.
    state = resume_state(resume_path, run_dir, "dynamics", rank, world, device, log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if is_main:
            log(f"[dynamics] resuming from {resume_path} at step {start_step}")
    wrapped: nn.Module = _LossWrapper(model)
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[device] if device.type == "cuda" else None)
    logger = Logger(run_dir, cfg, "dynamics") if is_main and run_dir is not None else None
    world_model = WorldModel(tokenizer, model, sampling_config(section), device=device)
    if is_main:
        if len(envs) == 1:
            log(f"[dynamics] {count_parameters(model):,} parameters, tokens {token_shape} of {tokenizer.vocab_size}, "
                f"{train_set.num_frames} train / {val_set.num_frames} val frames, {world} rank(s)")
        else:
            for e in envs:
                log(f"[dynamics] {e.name}: tokens {e.token_shape} of {tokenizer.vocab_size}, "
                    f"{e.train.num_frames} train / {e.val.num_frames} val frames")
            log(f"[dynamics] {count_parameters(model):,} parameters, {world} rank(s)")

    def evaluate_env(e: EnvData, step: int, video: bool) -> dict[str, float]:
        metrics = evaluate_one_step(on_grid_of(model, e.val.extras["tokens"]), e.val,
                                    max_frames=section.eval_windows * section.window, window=section.window)
        if video and logger is not None:
            horizon = int(min(section.video_length, int(e.val.episode_lengths.max())))
            if horizon >= 1:
                rollout = open_loop(world_model, e.val, horizon, section.video_count, seed=cfg.run.seed)
                metrics["frame_exact_open_loop_last"] = float(rollout["exact"][:, -1].mean())
                tag = "open_loop" if len(envs) == 1 else f"open_loop_{e.name}"
                logger.video(step, tag, side_by_side_video(world_model, rollout["real"], rollout["imagined"]))
        model.train()
        return metrics

    def evaluate(step: int, video: bool) -> dict[str, Any]:
        """One env: its validation metrics. Several: each env's under ``envs``, and their means."""
        if len(envs) == 1:
            return evaluate_env(envs[0], step, video)
        per_env = {e.name: evaluate_env(e, step, video) for e in envs}
        keys = [k for k in next(iter(per_env.values())) if all(k in m for m in per_env.values())]
        return {**{k: float(np.nanmean([m[k] for m in per_env.values()])) for k in keys}, "envs": per_env}

    # ---- loop ------------------------------------------------------------------------------
    per_rank = section.batch_size // world
    if is_main:
        for e in envs:
            log(f"[dynamics] {e.name + ': ' if len(envs) > 1 else ''}{len(e.events)} reward/termination steps in the training episodes"
                + (f", {section.event_fraction:.0%} of windows drawn around them"
                   if len(e.events) and section.event_fraction > 0 else ""))
    model.train()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    final_step = section.steps
    for step in range(start_step, section.steps):
        elapsed = time.perf_counter() - started
        if section.time_limit_s > 0:
            # Rank 0's clock decides for every rank, so all ranks stop at the same step.
            stop = torch.tensor([float(elapsed >= section.time_limit_s)])
            if world > 1:
                dist.broadcast(stop, src=0)
            if stop.item() > 0:
                final_step = step
                break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(section, step, elapsed)
        rng = np.random.default_rng([cfg.run.seed, rank, step])
        generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, rank, step))
        # Several envs: each step's windows come from one of them (grids of one size), in turn at random.
        e = envs[int(rng.integers(len(envs)))] if len(envs) > 1 else envs[0]
        batch = to_batch(sample_training_windows(e.train, rng, per_rank, section.window, section.event_fraction,
                                                 e.events, section.rare_fraction, e.situations), device)
        total, parts = wrapped(batch, generator)
        check_finite(total, "dynamics", step + 1, "lower dynamics.lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if section.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
        optimizer.step()
        done = step + 1
        # ---- logging, evaluation, checkpoints (rank 0 only) ---------------------------------
        if is_main and (done % section.log_every == 0 or done == section.steps):
            scalars = {k: float(v) for k, v in parts.items()}
            scalars.update(loss=float(total.detach()), lr=optimizer.param_groups[0]["lr"],
                           steps_per_second=(done - start_step) / (time.perf_counter() - started))
            if logger is not None:
                logger.scalars(done, scalars)
            log(f"[dynamics] step {done}/{section.steps} loss {float(total.detach()):.4f} "
                f"frame_exact {scalars['frame_exact']:.3f} state_exact {scalars['state_exact']:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
        if is_main and section.eval_every > 0 and done % section.eval_every == 0 and done < section.steps:
            metrics = evaluate(done, video=section.video_every > 0 and done % section.video_every == 0)
            if logger is not None:
                logger.scalars(done, _val_scalars(metrics))
            log(f"[dynamics] val step {done}: " + _format(metrics))
        if is_main and section.checkpoint_every > 0 and done % section.checkpoint_every == 0 and done < section.steps:
            atomic_torch_save(resume_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                "stage_identity": getattr(run_dir, "stage_identity", ""),
            })
    train_seconds = time.perf_counter() - started

    # ---- final evaluation and checkpoint (rank 0) -------------------------------------------
    if is_main:
        metrics = evaluate(final_step, video=True)
        metrics["train_seconds"] = round(train_seconds, 2)
        metrics["train_steps"] = final_step
        if logger is not None:
            logger.scalars(section.steps, _val_scalars(metrics))
            logger.close()
        from omegaconf import OmegaConf

        atomic_torch_save(run_path / CHECKPOINT_NAME, dynamics_checkpoint(
            model, tokenizer.identity,
            config=OmegaConf.to_container(cfg, resolve=True) if not dataclasses.is_dataclass(cfg) else dataclasses.asdict(cfg),
            sampling=dataclasses.asdict(sampling_config(section)), step=final_step, metrics=metrics,
        ))
        if resume_path.is_file():
            resume_path.unlink()
        if run_dir is not None:
            run_dir.update_metrics("dynamics", metrics)
        log("[dynamics] val: " + _format(metrics))
        for name, values in metrics.get("envs", {}).items():
            log(f"[dynamics] val {name}: " + _format(values))
        log(f"[dynamics] wrote {run_path / CHECKPOINT_NAME}")
    if world > 1:
        dist.barrier()
    return metrics if is_main else {}
