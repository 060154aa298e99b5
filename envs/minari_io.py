"""Minari (Farama's offline-RL dataset standard) in and out, for the optional ``minari`` extra.

Minari 0.5 keeps a dataset ``<namespace>/<name>-v<version>`` under its datasets root
(``$MINARI_DATASETS_PATH``, default ``~/.minari/datasets``) as
``<root>/<namespace>/<name>-v0/data/{metadata.json, main_data.hdf5}``; each namespace folder holds
a ``namespace_metadata.json``. ``metadata.json`` holds the dataset id, counts, the serialized
observation and action spaces, ``dataset_size`` (MB) and whatever keys the writer added; no
creation time. ``main_data.hdf5`` holds one group ``episode_<i>`` per episode: ``observations``
(T + 1 entries; a Dict space is a group of one dataset per key), ``actions``, ``rewards``,
``terminations``, ``truncations`` (T entries), and attributes ``seed``, ``total_steps``.

The sandbox's frame-aligned arrays map onto that one to one (an episode of T steps has T + 1
frames): observations are ``{"image": frames (T + 1, H, W, 3) uint8, "state": states (T + 1, S)
uint8}``, actions ``Discrete(num_actions)``. The exporter writes raw arrays (``jpeg_encoding`` off:
Minari's default JPEG-encodes image observations, which is lossy) and adds to ``metadata.json``
the whole dataset card (:data:`CARD_KEY`) and which observation key holds what
(:data:`KEYS_KEY`); each episode's policy index and episode number go to its group's attributes.

Which observation is an RGB frame: with this exporter's metadata, the key it names. Otherwise the
``image`` observation is an RGB frame only if its height and width are multiples of the tile size
(of at least 2 pixels) and larger than the grid: MiniGrid's own ``image`` observation is a 7x7x3
array of object, colour and state indices, one cell per tile, and is refused.

``minari`` is imported only inside the functions that need it, so the core install never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from common.atomic import ArtifactError

METADATA_NAME = "metadata.json"
NAMESPACE_METADATA_NAME = "namespace_metadata.json"
CARD_KEY = "gridworld_sandbox_card"
KEYS_KEY = "gridworld_sandbox_observation_keys"
VOLATILE_METADATA = ("dataset_size",)  # rewritten by Minari after every change; derived from file sizes
EXTRA_HINT = "pip install -e '.[minari]'"
NEEDS = ("the sandbox needs a Dict observation {'image': RGB frames (H, W, 3) uint8, H and W multiples of "
         "the tile size, 'state': the symbolic state (S,) uint8 of envs.state.StateCodec}, as "
         "scripts/export_minari.py writes")


def import_minari():
    """The ``minari`` module, or an :class:`ArtifactError` naming the extra to install."""
    try:
        import minari
        from minari.dataset import minari_storage  # noqa: F401  (imports h5py for the hdf5 format)
    except ImportError as error:
        raise ArtifactError(f"reading or writing a Minari dataset needs the minari extra ({error}): "
                            f"run {EXTRA_HINT}") from None
    return minari


# ---------------------------------------------------------------- layout
def data_folder(path: str | Path) -> Path | None:
    """The folder holding a Minari dataset's ``metadata.json`` (``path/data`` or ``path`` itself),
    or None when ``path`` is not a Minari dataset (a sandbox dataset folder holds a ``card.json``)."""
    path = Path(path)
    if (path / "card.json").exists():
        return None
    for folder in (path / "data", path):
        if (folder / METADATA_NAME).is_file() and any(p.name != METADATA_NAME for p in folder.iterdir()):
            return folder
    return None


def is_minari_dataset(path: str | Path) -> bool:
    return data_folder(path) is not None


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != METADATA_NAME)


def _raw_metadata(folder: Path) -> dict:
    path = folder / METADATA_NAME
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"Minari metadata {path} cannot be read ({error}): re-export the dataset") from None
    if not isinstance(metadata, dict) or "observation_space" not in metadata:
        raise ArtifactError(f"{path} is not a Minari dataset's metadata (no observation_space): re-export it")
    return metadata


# ---------------------------------------------------------------- reading
def read_card(path: str | Path) -> dict:
    """A card like the collect stage's, built from the Minari metadata (no episode is read).

    Refuses (:class:`ArtifactError`) a dataset without RGB frames or symbolic states."""
    folder = data_folder(path)
    if folder is None:
        raise ArtifactError(f"{path} is not a Minari dataset (no data/{METADATA_NAME} beside its data files)")
    metadata = _raw_metadata(folder)
    import_minari()
    from minari.serialization import deserialize_space

    observation_space = deserialize_space(metadata["observation_space"])
    action_space = deserialize_space(metadata["action_space"])
    saved = metadata.get(CARD_KEY) or {}
    keys = metadata.get(KEYS_KEY) or {"frames": "image", "states": "state"}
    env_id, grid_size, tile_size, view = _env_facts(metadata, saved, observation_space, keys["frames"], path)
    frame_shape, state_size = _check_observations(observation_space, keys, grid_size, tile_size, path,
                                                  trusted=bool(saved))
    import gymnasium as gym

    if not isinstance(action_space, gym.spaces.Discrete):
        raise ArtifactError(f"Minari dataset {path} has actions {action_space}: the sandbox needs Discrete actions")
    card = {k: v for k, v in saved.items() if k not in ("shards", "shard_sha256")}
    episodes, steps = int(metadata["total_episodes"]), int(metadata["total_steps"])
    card.update({
        "env_id": env_id, "obs": view, "tile_size": tile_size, "frame_shape": list(frame_shape),
        "grid_size": list(grid_size), "state_size": state_size, "num_actions": int(action_space.n),
        "episodes": episodes, "steps": steps, "frames": steps + episodes,
        "shards": [str(p.relative_to(folder)) for p in _data_files(folder)],
        "minari": {"dataset_id": metadata.get("dataset_id"), "minari_version": metadata.get("minari_version"),
                   "data_format": metadata.get("data_format"), "observation_keys": keys,
                   "jpeg_encoding": bool(metadata.get("jpeg_encoding", True))},
    })
    return card


def _env_facts(metadata: dict, saved: dict, observation_space, frame_key: str, path) -> tuple[str, list, int, str]:
    """(env id, [grid width, height], tile size, view): from this exporter's card, else inferred
    from the env spec and the frame shape (a full view of the whole grid)."""
    if saved:
        return saved["env_id"], list(saved["grid_size"]), int(saved["tile_size"]), str(saved["obs"])
    spec = metadata.get("env_spec")
    if not spec:
        raise ArtifactError(f"Minari dataset {path} names no env (no env_spec, no sandbox card in its metadata): "
                            f"the sandbox needs its env id, grid size and tile size; {NEEDS}")
    import gymnasium as gym

    from envs.make import normalize_env_id

    env_id = normalize_env_id(json.loads(spec)["id"])
    base = gym.make(env_id).unwrapped
    grid_size = [int(base.width), int(base.height)]
    space = getattr(observation_space, "spaces", {}).get(frame_key)
    shape = tuple(getattr(space, "shape", ()))
    tile_size = shape[0] // grid_size[1] if len(shape) == 3 else 0  # 0: no frame; refused below
    return env_id, grid_size, tile_size, "full"


def _check_observations(observation_space, keys: dict, grid_size: list, tile_size: int, path,
                        trusted: bool) -> tuple[tuple[int, ...], int]:
    """(frame shape, state size), or a refusal saying what is missing and what the sandbox needs."""
    import gymnasium as gym

    spaces = observation_space.spaces if isinstance(observation_space, gym.spaces.Dict) else {}
    frame, state = spaces.get(keys["frames"]), spaces.get(keys["states"])
    missing = []
    if not _is_rgb_frame(frame, grid_size, tile_size, trusted):
        what = f"observation '{keys['frames']}' is {_describe(frame)}" if frame is not None else \
            f"no '{keys['frames']}' observation in {_describe(observation_space)}"
        if frame is not None and tuple(frame.shape) == (7, 7, 3):
            what += ": MiniGrid's 7x7 encoding of object, colour and state indices, not a rendered frame"
        missing.append(f"no RGB frames ({what})")
    if not (isinstance(state, gym.spaces.Box) and len(state.shape) == 1 and state.dtype == np.uint8):
        what = f"observation '{keys['states']}' is {_describe(state)}" if state is not None else \
            f"no '{keys['states']}' observation"
        missing.append(f"no symbolic states ({what})")
    if missing:
        raise ArtifactError(f"Minari dataset {path} cannot be used: it holds {' and '.join(missing)}; {NEEDS}")
    return tuple(int(n) for n in frame.shape), int(state.shape[0])


def _is_rgb_frame(space, grid_size: list, tile_size: int, trusted: bool) -> bool:
    import gymnasium as gym

    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and space.shape[2] == 3):
        return False
    if trusted:  # this exporter named the key that holds the rendered frames
        return True
    height, width = int(space.shape[0]), int(space.shape[1])
    return (tile_size >= 2 and height % tile_size == 0 and width % tile_size == 0
            and height > grid_size[1] and width > grid_size[0])


def _describe(space) -> str:
    shape = getattr(space, "shape", None)
    dtype = getattr(space, "dtype", None)
    return f"{type(space).__name__} {tuple(shape)} {dtype}" if shape is not None else str(space)


def content(path: str | Path) -> str:
    """Content identity: a hash of the data files' bytes (by their names inside the dataset) and of
    the metadata without ``dataset_size`` (no paths; Minari 0.5 writes no creation time)."""
    folder = data_folder(path)
    if folder is None:
        raise ArtifactError(f"{path} is not a Minari dataset (no data/{METADATA_NAME} beside its data files)")
    from common.stage import file_sha256

    digest = hashlib.sha256()
    metadata = {k: v for k, v in _raw_metadata(folder).items() if k not in VOLATILE_METADATA}
    digest.update(json.dumps(metadata, sort_keys=True).encode())
    for file in _data_files(folder):
        digest.update(f"{file.relative_to(folder)}:{file_sha256(file)};".encode())
    return digest.hexdigest()[:16]


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The frame-aligned arrays (see :mod:`envs.dataset`) and the card of a Minari dataset."""
    from envs.dataset import Episode, episodes_to_arrays

    card = read_card(path)
    import_minari()
    from minari.dataset.minari_storage import MinariStorage

    folder = data_folder(path)
    keys = card["minari"]["observation_keys"]
    try:
        storage = MinariStorage.read(folder)
        count = storage.total_episodes
        attributes = list(storage.get_episode_metadata(range(count)))
        episodes = []
        for i, (data, attrs) in enumerate(zip(storage.get_episodes(range(count)), attributes)):
            observations = data["observations"]
            episodes.append(Episode(
                frames=np.asarray(observations[keys["frames"]], dtype=np.uint8),
                states=np.asarray(observations[keys["states"]], dtype=np.uint8),
                actions=np.asarray(data["actions"], dtype=np.int64),
                rewards=np.asarray(data["rewards"], dtype=np.float32),
                terminated=np.asarray(data["terminations"], dtype=np.bool_),
                truncated=np.asarray(data["truncations"], dtype=np.bool_),
                seed=int(attrs.get("seed", -1)), policy=int(attrs.get("sandbox_policy", -1)),
                index=int(attrs.get("sandbox_index", i)),
            ))
    except ArtifactError:
        raise
    except Exception as error:  # a truncated hdf5 file, a missing group, a foreign layout
        raise ArtifactError(f"Minari dataset {path} cannot be read ({type(error).__name__}: {error}): "
                            "re-export it") from None
    if not episodes:
        raise ArtifactError(f"Minari dataset {path} holds no episodes")
    for e in episodes:
        if len(e.frames) != e.length + 1 or len(e.states) != e.length + 1:
            raise ArtifactError(f"Minari dataset {path}: episode {e.index} has {len(e.frames)} frames for "
                                f"{e.length} actions (the sandbox needs T + 1 observations for T steps)")
    return episodes_to_arrays(episodes), card


# ---------------------------------------------------------------- writing
@contextlib.contextmanager
def _datasets_root(root: Path):
    """Minari finds its datasets root in ``MINARI_DATASETS_PATH``: point it at ``root`` meanwhile."""
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def export(dataset: str | Path, out: str | Path, dataset_id: str) -> Path:
    """Write the sandbox dataset folder ``dataset`` as the Minari dataset ``dataset_id`` under the
    datasets root ``out``; returns the dataset's folder ``out/<dataset_id>``. Written in a temporary
    root first and moved into place, so a failed export leaves nothing under the final name."""
    from envs.dataset import EpisodeDataset

    minari = import_minari()
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    data = EpisodeDataset.load(dataset)
    card = data.card
    out = Path(out)
    final = out / dataset_id
    if final.exists():
        raise ArtifactError(f"{final} exists: Minari datasets are never overwritten (delete it, or bump the "
                            "id's version, e.g. -v1)")
    observation_space = gym.spaces.Dict({
        "image": gym.spaces.Box(0, 255, tuple(data.frame_shape), np.uint8),
        "state": gym.spaces.Box(0, 255, (int(data.states.shape[1]),), np.uint8),
    })
    buffers = []
    for i in range(data.num_episodes):
        episode = data.episode(i)
        buffers.append(EpisodeBuffer(
            seed=int(data.episode_seeds[i]),
            observations={"image": episode["frames"], "state": episode["states"]},
            actions=episode["actions"][:-1], rewards=episode["rewards"][:-1],
            terminations=episode["terminated"][:-1], truncations=episode["truncated"][:-1],
        ))
    labels = ", ".join(p["label"] + f":{p['weight']:.6g}" for p in card.get("policy_mix", []))
    scratch = out / f".export-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with _datasets_root(scratch), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no env spec / eval env / permalink: said in the description
            written = minari.create_dataset_from_buffers(
                dataset_id, buffers, observation_space=observation_space,
                action_space=gym.spaces.Discrete(int(card["num_actions"])),
                algorithm_name=f"gridworld-sandbox behaviour policy mix ({labels})",
                author="gridworld-sandbox", author_email="none",
                code_permalink="scripts/export_minari.py",
                description=(f"{card['env_id']} ({card['obs']} view, tile size {card['tile_size']}) rendered by "
                             "gridworld-sandbox: 'image' is the RGB frame, 'state' the symbolic state "
                             "(envs.state.StateCodec); the dataset card is under " + CARD_KEY),
                jpeg_encoding=False,  # Minari's default JPEG-encodes frames: lossy
            )
            storage = written.storage
            storage.update_episode_metadata(
                [{"sandbox_policy": int(p), "sandbox_index": int(x)}
                 for p, x in zip(data.episode_policies, data.episode_indices)])
            storage.update_metadata({CARD_KEY: card, KEYS_KEY: {"frames": "image", "states": "state"}})
        _move_into_place(scratch, out, dataset_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _move_into_place(scratch: Path, out: Path, dataset_id: str) -> None:
    """Move ``scratch/<dataset_id>`` to ``out/<dataset_id>``, with the namespace metadata Minari
    wrote for every namespace level that ``out`` lacks."""
    parts = Path(dataset_id).parts
    for depth in range(1, len(parts)):
        level = Path(*parts[:depth])
        (out / level).mkdir(parents=True, exist_ok=True)
        source = scratch / level / NAMESPACE_METADATA_NAME
        if source.is_file() and not (out / level / NAMESPACE_METADATA_NAME).exists():
            shutil.copyfile(source, out / level / NAMESPACE_METADATA_NAME)
    os.replace(scratch / dataset_id, out / dataset_id)

