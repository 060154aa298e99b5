"""Dataset I/O: episodes in compressed ``.npz`` shards with a ``card.json``, read as windows.

On disk, a dataset folder holds ``shard_00000.npz``, ``shard_00001.npz``, ... (shard k holds
episodes ``k * episodes_per_shard`` onwards, in episode order) and ``card.json``, written last,
which marks the dataset complete. Every file is written atomically.

In memory (and in every shard) the arrays are *frame-aligned*: an episode of T steps has T + 1
frames, and for each frame index f:

- ``frames[f]`` (H, W, 3) uint8, ``states[f]`` (S,) uint8: what the agent saw, the ground truth;
- ``actions[f]`` int64: the action taken at frame f (-1 at the episode's last frame);
- ``rewards[f]`` float32, ``terminated[f]``, ``truncated[f]`` bool: the outcome of that action
  (0 / False at the last frame).

The format is plain NumPy on purpose: Minari (Farama's standard) is an optional extra. Every reader
here (:func:`read_card`, :func:`dataset_content`, :meth:`EpisodeDataset.load`) also takes a Minari
dataset folder (``<root>/<namespace>/<name>-v0``, or its ``data/`` folder), through
:mod:`envs.minari_io`, imported only then; ``scripts/export_minari.py`` writes one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import ArtifactError, atomic_savez
from common.config import ConfigError, param
from common.stage import file_sha256

CARD_NAME = "card.json"
SHARD_GLOB = "shard_*.npz"
FRAME_KEYS = ("frames", "states", "actions", "rewards", "terminated", "truncated")
EPISODE_KEYS = ("episode_lengths", "episode_seeds", "episode_policies", "episode_indices")


@dataclass
class DataConfig:
    """Reading a dataset for training."""

    path: str = param("", "dataset folder to train on (default: <run folder>/dataset)")
    val_fraction: float = param(0.1, "fraction of episodes held out for validation (split by episode)", min=0, below=1)
    mix: list[str] = param(default_factory=list, help="full view: dataset folders of several envs to train one "
                           "tokenizer and one dynamics model on (replaces data.path)")
    labelled_fraction: float = param(1.0, "share of training episodes whose actions training reads (the rest are "
                                     "action-free video; see dynamics.unlabelled)", min=0, max=1)


def collect_folder(cfg) -> Path:
    """Where the collect stage writes: ``collect.path`` or ``<run folder>/dataset``."""
    return Path(cfg.collect.path) if cfg.collect.path else Path(cfg.run.root) / cfg.run.name / "dataset"


def training_folder(cfg) -> Path:
    """Where training stages read: ``data.path``, else the collect stage's folder."""
    return Path(cfg.data.path) if cfg.data.path else collect_folder(cfg)


def training_folders(cfg) -> list[Path]:
    """Every dataset training stages read: the ``data.mix`` folders, else :func:`training_folder`."""
    return [Path(p) for p in cfg.data.mix] if cfg.data.mix else [training_folder(cfg)]


def read_card(folder: str | Path) -> dict:
    """The card of a complete dataset folder, with errors that name the file and what to do. For a
    Minari dataset: a card of the same keys, built from its metadata (see :mod:`envs.minari_io`)."""
    minari_io = _minari_io(folder)
    if minari_io is not None:
        return minari_io.read_card(folder)
    path = Path(folder) / CARD_NAME
    if not Path(folder).is_dir():
        raise ArtifactError(f"dataset folder not found: {folder} (run scripts/collect.py first, or set data.path)")
    if not path.is_file():
        raise ArtifactError(f"dataset {folder} has no {CARD_NAME}: the collection did not finish "
                            "(rerun scripts/collect.py to resume it)")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"dataset card {path} cannot be read ({error}): delete it and rerun "
                            "scripts/collect.py (complete shards are kept)") from None
    if not isinstance(card, dict) or not isinstance(card.get("shards"), list):
        raise ArtifactError(f"dataset card {path} is not a card this sandbox wrote: delete it and rerun scripts/collect.py")
    return card


def dataset_content(folder: str | Path, env: Any = None, any_env: bool = False) -> str:
    """The content identity of a complete dataset: a hash of its shards' bytes, checked against the
    hashes its card recorded. With ``env`` (the config's env section), the dataset must have been
    collected in that env and view (:class:`common.config.ConfigError` naming the keys if not).
    For a Minari dataset: a hash of its data files' bytes and of its metadata."""
    folder = Path(folder)
    card = read_card(folder)
    if env is not None:
        check_env(card, env, folder, any_env=any_env)
    minari_io = _minari_io(folder)
    if minari_io is not None:
        return minari_io.content(folder)
    digest = hashlib.sha256()
    recorded = card.get("shard_sha256") or {}
    for name in card["shards"]:
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"dataset {folder} lacks {name}, which its card lists: delete the folder's card "
                                "and rerun scripts/collect.py to recollect the missing shards")
        value = file_sha256(path)
        if name in recorded and recorded[name] != value:
            raise ArtifactError(f"dataset shard {path} is corrupt (its bytes differ from those its card recorded): "
                                "delete it and the card, then rerun scripts/collect.py to recollect it")
        digest.update(f"{name}:{value};".encode())
    return digest.hexdigest()[:16]


def check_env(card: dict | str | Path, env: Any, folder: str | Path | None = None, any_env: bool = False) -> None:
    """The dataset's env, view and tile size must be the config's (``any_env``: its view and tile
    size only, for one of the ``data.mix`` datasets). ``card`` is a card, or the path of a dataset
    folder or Minari dataset to read it from."""
    from envs.make import normalize_env_id

    if not isinstance(card, dict):
        folder = card if folder is None else folder
        card = read_card(card)

    wanted = {"obs": str(env.obs), "tile_size": int(env.tile_size)}
    if not any_env:
        wanted["env_id"] = normalize_env_id(env.id)
    keys = {"env_id": "env.id", "obs": "env.obs", "tile_size": "env.tile_size"}
    wrong = [f"{keys[k]}: dataset {card.get(k)!r}, config {v!r}" for k, v in wanted.items() if card.get(k) != v]
    if wrong:
        raise ConfigError(f"dataset {folder} was collected in another env ({'; '.join(wrong)}): set the env to the "
                          "dataset's (e.g. --env), or point data.path at a dataset of this env")


def _minari_io(folder: str | Path):
    """:mod:`envs.minari_io` when ``folder`` is a Minari dataset (told by its files), else None."""
    from envs import minari_io

    return minari_io if minari_io.is_minari_dataset(folder) else None


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


@dataclass
class Episode:
    """One recorded episode: T steps, T + 1 frames."""

    frames: np.ndarray  # (T + 1, H, W, 3) uint8
    states: np.ndarray  # (T + 1, S) uint8
    actions: np.ndarray  # (T,) int
    rewards: np.ndarray  # (T,) float32
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool
    seed: int
    policy: int  # index into the card's policy labels
    index: int  # episode number in the dataset

    @property
    def length(self) -> int:
        return int(len(self.actions))

    @property
    def total_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))


def episodes_to_arrays(episodes: list[Episode]) -> dict[str, np.ndarray]:
    """Concatenate episodes into the frame-aligned flat arrays of a shard."""
    if not episodes:
        raise ValueError("cannot write a shard with no episodes")

    def pad(values: np.ndarray, fill, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(values, dtype=dtype), np.array([fill], dtype=dtype)])

    return {
        "frames": np.concatenate([e.frames for e in episodes]).astype(np.uint8, copy=False),
        "states": np.concatenate([e.states for e in episodes]).astype(np.uint8, copy=False),
        "actions": np.concatenate([pad(e.actions, -1, np.int64) for e in episodes]),
        "rewards": np.concatenate([pad(e.rewards, 0.0, np.float32) for e in episodes]),
        "terminated": np.concatenate([pad(e.terminated, False, np.bool_) for e in episodes]),
        "truncated": np.concatenate([pad(e.truncated, False, np.bool_) for e in episodes]),
        "episode_lengths": np.array([e.length for e in episodes], dtype=np.int64),
        "episode_seeds": np.array([e.seed for e in episodes], dtype=np.int64),
        "episode_policies": np.array([e.policy for e in episodes], dtype=np.int64),
        "episode_indices": np.array([e.index for e in episodes], dtype=np.int64),
    }


def write_shard(folder: str | Path, index: int, episodes: list[Episode]) -> Path:
    """Write episodes as shard ``index`` of ``folder``, atomically."""
    return atomic_savez(Path(folder) / shard_name(index), **episodes_to_arrays(episodes))


def read_shard_lengths(path: str | Path) -> np.ndarray:
    """Episode lengths of one shard, without decompressing its frames."""
    with np.load(path) as shard:
        return shard["episode_lengths"]


@dataclass
class WindowBatch:
    """Fixed-length windows of consecutive frames, never crossing an episode end.

    Positions past an episode's last frame (episodes shorter than the window) repeat the last frame
    and have ``mask`` False. ``actions`` is -1 where no action was taken (an episode's last frame).
    """

    frames: np.ndarray  # (B, L, H, W, 3) uint8
    states: np.ndarray  # (B, L, S) uint8
    actions: np.ndarray  # (B, L) int64
    rewards: np.ndarray  # (B, L) float32
    terminated: np.ndarray  # (B, L) bool
    truncated: np.ndarray  # (B, L) bool
    mask: np.ndarray  # (B, L) bool: a real frame of the episode
    episodes: np.ndarray  # (B,) episode number within the dataset
    starts: np.ndarray  # (B,) first frame's position within its episode
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B, L, ...)


class EpisodeDataset:
    """Episodes in memory as frame-aligned flat arrays (see module doc) with episode offsets."""

    def __init__(self, arrays: dict[str, np.ndarray], card: dict | None = None,
                 extras: dict[str, np.ndarray] | None = None):
        missing = [k for k in FRAME_KEYS + EPISODE_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"dataset arrays lack {missing}")
        self.arrays = arrays
        self.card = card or {}
        self.episode_lengths = arrays["episode_lengths"]
        frames_per_episode = self.episode_lengths + 1
        self.episode_starts = np.concatenate([[0], np.cumsum(frames_per_episode)[:-1]]).astype(np.int64)
        if int(frames_per_episode.sum()) != len(arrays["frames"]):
            raise ValueError("dataset is inconsistent: episode lengths do not add up to the frame count")
        self.extras: dict[str, np.ndarray] = dict(extras or {})

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, require_card: bool = True) -> "EpisodeDataset":
        """Load every shard of the dataset folder ``path`` (complete datasets only by default), or
        every episode of a Minari dataset."""
        folder = Path(path)
        minari_io = _minari_io(folder)
        if minari_io is not None:
            return cls(*minari_io.load_arrays(folder))
        if require_card:
            card = read_card(folder)
            shards = [folder / name for name in card["shards"]]
        else:
            if not folder.is_dir():
                raise ArtifactError(f"dataset folder not found: {folder} (run scripts/collect.py first)")
            card, shards = None, sorted(folder.glob(SHARD_GLOB))
        if not shards:
            raise ArtifactError(f"dataset {folder} is empty: no {SHARD_GLOB} files (rerun scripts/collect.py)")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in FRAME_KEYS + EPISODE_KEYS}
        for shard in shards:
            try:
                with np.load(shard) as data:
                    for key in parts:
                        parts[key].append(data[key])
            except Exception as error:  # BadZipFile, bad CRC, a pickled or truncated member, a missing file
                raise ArtifactError(f"dataset shard {shard} cannot be read ({type(error).__name__}: {error}): "
                                    "delete it and the folder's card.json, then rerun scripts/collect.py "
                                    "to recollect it") from None
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        arrays["actions"] = arrays["actions"].astype(np.int64)
        if len(arrays["episode_lengths"]) == 0:
            raise ValueError(f"dataset {folder} holds no episodes")
        return cls(arrays, card)

    # ---------------------------------------------------------------- views
    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def num_episodes(self) -> int:
        return int(len(self.episode_lengths))

    @property
    def num_steps(self) -> int:
        return int(self.episode_lengths.sum())

    @property
    def num_frames(self) -> int:
        return int(len(self.arrays["frames"]))

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.arrays["frames"].shape[1:])

    def episode_returns(self) -> np.ndarray:
        """(E,) float64 return of every episode."""
        return np.add.reduceat(self.arrays["rewards"].astype(np.float64), self.episode_starts)

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Frame-aligned arrays of episode ``i`` (T + 1 entries each), extras included."""
        start = self.episode_starts[i]
        stop = start + self.episode_lengths[i] + 1
        out = {k: self.arrays[k][start:stop] for k in FRAME_KEYS}
        out.update({k: v[start:stop] for k, v in self.extras.items()})
        return out

    def select(self, episode_ids: np.ndarray | list[int]) -> "EpisodeDataset":
        """A new dataset holding the given episodes (in the given order)."""
        episode_ids = np.asarray(episode_ids, dtype=np.int64)
        if len(episode_ids) == 0:
            raise ValueError("cannot select an empty set of episodes")
        frame_index = np.concatenate(
            [np.arange(self.episode_starts[i], self.episode_starts[i] + self.episode_lengths[i] + 1)
             for i in episode_ids]
        )
        arrays = {k: self.arrays[k][frame_index] for k in FRAME_KEYS}
        arrays.update({k: self.arrays[k][episode_ids] for k in EPISODE_KEYS})
        extras = {k: v[frame_index] for k, v in self.extras.items()}
        return EpisodeDataset(arrays, self.card, extras)

    def split(self, val_fraction: float, seed: int = 0) -> tuple["EpisodeDataset", "EpisodeDataset | None"]:
        """Split by episode into (train, validation); validation is None when ``val_fraction`` is 0.

        Stratified by outcome: episodes with a reward or termination event (in MiniGrid, the
        successes) go to validation in proportion, but training always keeps at least one. Random
        data holds a handful (1 to 4 successes in 10k DoorKey-5x5 frames): a plain split once put
        the only success in validation, and the model trained never saw the goal reached.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = self.num_episodes
        num_val = int(round(val_fraction * n))
        if val_fraction > 0 and n >= 2:
            num_val = min(max(num_val, 1), n - 1)
        if num_val == 0:
            return self, None
        order = np.random.default_rng(seed).permutation(n)
        a = self.arrays
        has_event = np.add.reduceat(((a["rewards"] != 0) | a["terminated"]).astype(np.int64), self.episode_starts) > 0
        with_event, without = order[has_event[order]], order[~has_event[order]]
        num_event = min(int(round(val_fraction * len(with_event))), max(len(with_event) - 1, 0))
        num_other = min(num_val - num_event, len(without))
        if num_event + num_other == 0:  # every episode has an event, too few for a proportional share
            num_event = min(num_val, max(len(with_event) - 1, 0))
        val = np.concatenate([with_event[:num_event], without[:num_other]])
        train = np.setdiff1d(order, val)
        return self.select(np.sort(train)), self.select(np.sort(val))

    def labelled_episodes(self, fraction: float, seed: int = 0) -> np.ndarray:
        """(E,) bool: the episodes whose actions count as labelled, ``round(fraction * E)`` of them
        (at least one when ``fraction`` > 0) drawn by a seeded permutation; the same for every stage."""
        count = int(round(fraction * self.num_episodes))
        count = max(count, 1) if fraction > 0 else 0
        chosen = np.zeros(self.num_episodes, dtype=bool)
        chosen[np.random.default_rng([seed, 1]).permutation(self.num_episodes)[:count]] = True
        return chosen

    def with_actions(self, actions: np.ndarray) -> "EpisodeDataset":
        """The same episodes with other per-frame actions (-1: none known, action-free video)."""
        if actions.shape != self.arrays["actions"].shape:
            raise ValueError(f"actions must be {self.arrays['actions'].shape}, got {actions.shape}")
        return EpisodeDataset({**self.arrays, "actions": np.asarray(actions, dtype=np.int64)}, self.card, self.extras)

    def frame_episodes(self) -> np.ndarray:
        """(F,) the episode of every frame."""
        return np.repeat(np.arange(self.num_episodes), self.episode_lengths + 1)

    def with_frame_array(self, name: str, array: np.ndarray) -> "EpisodeDataset":
        """Attach a per-frame array (e.g. tokens, (N_frames, h, w)); windows then carry it in extras."""
        if len(array) != self.num_frames:
            raise ValueError(f"frame array '{name}' has {len(array)} rows, the dataset {self.num_frames} frames")
        self.extras[name] = array
        return self

    # ---------------------------------------------------------------- windows
    def window_index(self, episodes: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat frame indices (B, L) and validity mask (B, L) of the windows given by episode and start."""
        offsets = np.arange(length)
        frames_in_episode = self.episode_lengths[episodes] + 1  # (B,)
        position = starts[:, None] + offsets[None, :]  # (B, L)
        mask = position < frames_in_episode[:, None]
        position = np.minimum(position, frames_in_episode[:, None] - 1)
        return self.episode_starts[episodes][:, None] + position, mask

    def windows_at(self, episodes: np.ndarray, starts: np.ndarray, length: int) -> WindowBatch:
        """The windows of ``length`` frames starting at frame ``starts`` of ``episodes``."""
        episodes = np.asarray(episodes, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        index, mask = self.window_index(episodes, starts, length)
        a = self.arrays
        actions = np.where(mask, a["actions"][index], -1)
        return WindowBatch(
            frames=a["frames"][index],
            states=a["states"][index],
            actions=actions,
            rewards=np.where(mask, a["rewards"][index], 0.0).astype(np.float32),
            terminated=a["terminated"][index] & mask,
            truncated=a["truncated"][index] & mask,
            mask=mask,
            episodes=episodes,
            starts=starts,
            extras={k: v[index] for k, v in self.extras.items()},
        )

    def sample_windows(self, rng: np.random.Generator, batch_size: int, length: int) -> WindowBatch:
        """``batch_size`` windows of ``length`` frames, uniform over all windows of the dataset."""
        return self.windows_at(*self.sample_window_starts(rng, batch_size, length), length)

    def sample_window_starts(self, rng: np.random.Generator, batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(episodes, starts) of ``batch_size`` windows drawn uniformly over all windows of ``length`` frames."""
        if length < 1:
            raise ValueError(f"window length must be at least 1, got {length}")
        num_starts = np.maximum(self.episode_lengths + 1 - length + 1, 1)
        episodes = rng.choice(self.num_episodes, size=batch_size, p=num_starts / num_starts.sum())
        starts = (rng.random(batch_size) * num_starts[episodes]).astype(np.int64)
        return episodes, starts

    def event_steps(self) -> np.ndarray:
        """Flat frame indices t whose transition t -> t+1 had a non-zero reward or ended the episode
        (the rare steps a model of rewards and terminations has to learn from)."""
        a = self.arrays
        return np.flatnonzero((a["rewards"] != 0) | a["terminated"])

    def sample_windows_around(self, rng: np.random.Generator, batch_size: int, length: int,
                              steps: np.ndarray) -> WindowBatch:
        """``batch_size`` windows of ``length`` frames, each holding a transition drawn uniformly from
        ``steps`` (flat frame indices t of transitions t -> t+1, e.g. :meth:`event_steps`), at a
        uniform position inside the window. Oversampling rare events this way lets the reward and
        termination heads see them every step instead of a few times per epoch."""
        return self.windows_at(*self.window_starts_around(rng, batch_size, length, steps), length)

    def window_starts_around(self, rng: np.random.Generator, batch_size: int, length: int,
                             steps: np.ndarray, p: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(episodes, starts) of the windows :meth:`sample_windows_around` reads (``p``: the steps'
        probabilities; None: uniform)."""
        steps = np.asarray(steps, dtype=np.int64)
        if len(steps) == 0:
            raise ValueError("sample_windows_around: no steps to sample around")
        if length < 2:
            raise ValueError(f"a window around a transition needs at least 2 frames, got {length}")
        chosen = steps[rng.integers(0, len(steps), size=batch_size) if p is None else
                       rng.choice(len(steps), size=batch_size, p=p)]
        episodes = np.searchsorted(self.episode_starts, chosen, side="right") - 1
        position = chosen - self.episode_starts[episodes]  # t within its episode; t + 1 exists
        if np.any(position >= self.episode_lengths[episodes]):
            raise ValueError("sample_windows_around: a step is an episode's last frame (no transition follows)")
        # The window [s, s + length) holds frames t and t + 1: s in [t + 2 - length, t], within the episode.
        latest = np.minimum(position, np.maximum(self.episode_lengths[episodes] + 1 - length, 0))
        earliest = np.maximum(position + 2 - length, 0)
        earliest = np.minimum(earliest, latest)
        starts = earliest + (rng.random(batch_size) * (latest - earliest + 1)).astype(np.int64)
        return episodes, starts
