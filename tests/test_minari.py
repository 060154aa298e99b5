"""Minari in and out: an exact round trip, the same tokenizer from either format, a clear refusal of a
dataset without RGB frames or symbolic states, and a training stage reading one through data.path."""

import json
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

minari = pytest.importorskip("minari", reason="the minari extra is not installed (pip install -e '.[minari]')")

from common.atomic import ArtifactError  # noqa: E402
from common.config import ConfigError  # noqa: E402
from envs import minari_io  # noqa: E402
from envs.collect import CollectConfig, collect  # noqa: E402
from envs.dataset import EPISODE_KEYS, FRAME_KEYS, EpisodeDataset, check_env, dataset_content, read_card  # noqa: E402
from envs.make import EnvConfig  # noqa: E402

DATASET_ID = "gridworld/doorkey-5x5-v0"
CARD_FIELDS = ("env_id", "obs", "tile_size", "frame_shape", "grid_size", "state_size", "num_actions",
               "episodes", "steps", "frames", "policy_mix", "seeds", "returns")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 5-episode DoorKey-5x5 full-view dataset from the real collection code, exported by the script."""
    from scripts import export_minari

    base = tmp_path_factory.mktemp("minari")
    env = OmegaConf.structured(EnvConfig(id="MiniGrid-DoorKey-5x5-v0"))
    settings = OmegaConf.structured(CollectConfig(num_episodes=5, num_envs=2, episodes_per_shard=2,
                                                  policy_mix="random:0.4,epsilon_oracle@0.2:0.6"))
    card = collect(env, settings, base / "dataset", progress=False)
    folder = export_minari.main(["--dataset", str(base / "dataset"), "--out", str(base / "root"), DATASET_ID])
    return base, card, folder


def test_round_trip_is_exact(exported, monkeypatch):
    base, card, folder = exported
    assert folder == base / "root" / DATASET_ID
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["main_data.hdf5", "metadata.json"]
    original, imported = EpisodeDataset.load(base / "dataset"), EpisodeDataset.load(folder)
    for key in FRAME_KEYS + EPISODE_KEYS:
        assert imported.arrays[key].dtype == original.arrays[key].dtype, key
        assert np.array_equal(imported.arrays[key], original.arrays[key]), key
    minari_card = read_card(folder)
    assert {k: minari_card[k] for k in CARD_FIELDS} == {k: card[k] for k in CARD_FIELDS}
    assert minari_card["shards"] == ["main_data.hdf5"] and minari_card["minari"]["dataset_id"] == DATASET_ID
    # The data folder itself is the same dataset; the whole card is in Minari's metadata.
    assert dataset_content(folder / "data") == dataset_content(folder)
    metadata = json.loads((folder / "data" / "metadata.json").read_text())
    assert metadata[minari_io.CARD_KEY] == json.loads((base / "dataset" / "card.json").read_text())
    # Minari itself loads it, frames and states uncompressed.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(base / "root"))
    episode = next(minari.load_dataset(DATASET_ID).iterate_episodes([1]))
    assert np.array_equal(episode.observations["image"], original.episode(1)["frames"])
    assert np.array_equal(episode.observations["state"], original.episode(1)["states"])
    assert np.array_equal(episode.actions, original.episode(1)["actions"][:-1])


def test_content_is_the_bytes_not_the_place(exported, tmp_path):
    base, _, folder = exported
    again = minari_io.export(base / "dataset", tmp_path / "elsewhere", DATASET_ID)
    assert dataset_content(again) == dataset_content(folder)  # no path, no creation time
    other = minari_io.export(base / "dataset", tmp_path / "other", "gridworld/other-v0")
    assert dataset_content(other) != dataset_content(folder)  # the id is part of the metadata
    env = OmegaConf.structured(EnvConfig(id="MiniGrid-DoorKey-5x5-v0"))
    assert dataset_content(folder, env) == dataset_content(folder)
    check_env(folder, env)  # a path works as well as a card
    with pytest.raises(ConfigError, match="env.id"):
        check_env(read_card(folder), OmegaConf.structured(EnvConfig(id="MiniGrid-DoorKey-6x6-v0")), folder)
    with pytest.raises(ArtifactError, match="never overwritten"):
        minari_io.export(base / "dataset", base / "root", DATASET_ID)


def test_tokenizer_trains_the_same_from_minari(exported):
    from common.config import load_config
    from common.runs import RunDir
    from scripts.config import Config
    from worldmodel import train_tokenizer as loop

    base, _, folder = exported
    identities = []
    for name, path in (("from_npz", base / "dataset"), ("from_minari", folder)):
        argv = ["--preset", "tiny", f"run.root={base / 'runs'}", f"run.name={name}", "run.threads=1",
                "tokenizer.steps=20", "tokenizer.stop_when_exact=false"]
        cfg = load_config(Config, argv, use_run_config=False)
        frames = EpisodeDataset.load(path).frames
        identities.append(loop.train(cfg, RunDir(cfg, "tokenizer", argv), frames, frames[:50])["identity"])
    assert identities[0] == identities[1]


def test_stage_trains_from_a_minari_dataset(exported):
    from scripts import train_tokenizer

    base, _, folder = exported
    argv = ["--preset", "tiny", f"run.root={base / 'runs'}", "run.name=stage", "run.threads=1",
            f"data.path={folder}", "tokenizer.steps=20"]
    metrics = train_tokenizer.main(argv)
    run = base / "runs" / "stage"
    assert (run / "tokenizer.pt").is_file() and metrics["identity"]
    manifest = json.loads((run / "stages" / "tokenizer.json").read_text())
    assert dataset_content(folder) in json.dumps(manifest)  # its identity holds the Minari data's hash
    assert str(folder) not in json.dumps(manifest["identity"])


def encoding_only_dataset(root, monkeypatch):
    """A Minari dataset of MiniGrid's own 7x7x3 ``image`` encoding (object, colour, state indices)
    and direction, written with Minari's API: no RGB frames, no symbolic states."""
    import gymnasium as gym

    env = gym.make("MiniGrid-DoorKey-5x5-v0")
    space = gym.spaces.Dict({"image": env.observation_space["image"], "direction": env.observation_space["direction"]})
    buffers = []
    for seed in (0, 1):
        observation, _ = env.reset(seed=seed)
        images, directions, actions = [observation["image"]], [observation["direction"]], []
        for _ in range(6):
            action = int(env.action_space.sample())
            observation, *_ = env.step(action)
            images.append(observation["image"])
            directions.append(observation["direction"])
            actions.append(action)
        buffers.append(minari.data_collector.EpisodeBuffer(
            seed=seed, observations={"image": np.stack(images), "direction": np.array(directions)},
            actions=np.array(actions), rewards=np.zeros(6), terminations=np.zeros(6, dtype=bool),
            truncations=np.array([False] * 5 + [True])))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers("minigrid/encoding-v0", buffers, env="MiniGrid-DoorKey-5x5-v0",
                                           observation_space=space, algorithm_name="random")
    return root / "minigrid" / "encoding-v0"


def test_a_dataset_without_frames_or_states_is_refused(tmp_path, monkeypatch, capsys):
    from scripts import train_tokenizer

    folder = encoding_only_dataset(tmp_path / "root", monkeypatch)
    assert minari_io.is_minari_dataset(folder)
    for read in (read_card, EpisodeDataset.load, dataset_content):
        with pytest.raises(ArtifactError) as refused:
            read(folder)
        message = str(refused.value)
        assert "no RGB frames" in message and "7x7 encoding" in message and "no symbolic states" in message
        assert "the sandbox needs" in message and "export_minari.py" in message
    with pytest.raises(SystemExit) as exit_code:
        train_tokenizer.main(["--preset", "tiny", f"run.root={tmp_path / 'runs'}", "run.threads=1",
                              f"data.path={folder}", "tokenizer.steps=20"])
    assert exit_code.value.code == 1 and "no RGB frames" in capsys.readouterr().err


def test_missing_extra_names_it(exported, monkeypatch):
    _, _, folder = exported
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari now raises ImportError
    with pytest.raises(ArtifactError, match=r"pip install -e '\.\[minari\]'"):
        read_card(folder)
