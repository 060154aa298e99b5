"""Dataset: exact write/read round trip, windows inside episodes, resume, determinism, clear errors."""

import filecmp
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

import envs.collect as collect_module
from common.atomic import ArtifactError
from envs.collect import CollectConfig, collect
from envs.dataset import EpisodeDataset, shard_name
from envs.make import EnvConfig, make_env


def configs(**collect_overrides):
    env = OmegaConf.structured(EnvConfig(id="MiniGrid-DoorKey-5x5-v0"))
    settings = dict(num_episodes=10, num_envs=3, episodes_per_shard=4,
                    policy_mix="random:0.5,epsilon_oracle@0.2:0.3,sticky_random:0.2")
    settings.update(collect_overrides)
    return env, OmegaConf.structured(CollectConfig(**settings))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "dataset"
    env, settings = configs()
    card = collect(env, settings, folder, progress=False)
    return folder, card


def test_round_trip_is_exact(small_dataset):
    folder, card = small_dataset
    data = EpisodeDataset.load(folder)
    assert data.num_episodes == card["episodes"] == 10
    assert data.num_steps == card["steps"] and data.num_frames == card["frames"]
    assert sorted(p.name for p in folder.glob("shard_*.npz")) == [shard_name(i) for i in range(3)]
    # Replay every episode in the real env with the recorded seed and actions: identical frames,
    # states, rewards and ends.
    env = make_env("DoorKey-5x5")
    for i in range(data.num_episodes):
        episode = data.episode(i)
        frame, info = env.reset(seed=int(data.episode_seeds[i]))
        assert np.array_equal(frame, episode["frames"][0]) and np.array_equal(info["state"], episode["states"][0])
        for t, action in enumerate(episode["actions"][:-1]):
            frame, reward, terminated, truncated, info = env.step(int(action))
            assert np.array_equal(frame, episode["frames"][t + 1])
            assert np.array_equal(info["state"], episode["states"][t + 1])
            assert np.float32(reward) == episode["rewards"][t]
            assert terminated == episode["terminated"][t] and truncated == episode["truncated"][t]
        assert episode["actions"][-1] == -1 and (terminated or truncated)
    assert data.rewards.dtype == np.float32
    assert np.isclose(np.mean(data.episode_returns()), card["returns"]["return_mean"])


def test_windows_never_mix_episodes(small_dataset):
    data = EpisodeDataset.load(small_dataset[0])
    rng = np.random.default_rng(0)
    tokens = np.arange(data.num_frames)  # a per-frame array: its value is the flat frame index
    data.with_frame_array("frame_id", tokens)
    for length in (1, 8, 64, 400):  # 400 is longer than most episodes: padded and masked
        batch = data.sample_windows(rng, 32, length)
        assert batch.frames.shape == (32, length, 40, 40, 3) and batch.mask.shape == (32, length)
        for b in range(32):
            episode = data.episode(batch.episodes[b])
            n = min(length, len(episode["actions"]) - batch.starts[b])
            assert batch.mask[b, :n].all() and not batch.mask[b, n:].any()
            window = slice(batch.starts[b], batch.starts[b] + n)
            assert np.array_equal(batch.frames[b, :n], episode["frames"][window])
            assert np.array_equal(batch.actions[b, :n], episode["actions"][window])
            assert np.array_equal(batch.extras["frame_id"][b, :n], episode["frame_id"][window])
            assert (batch.actions[b, n:] == -1).all() and not batch.terminated[b, n:].any()


def test_windows_around_rare_events_hold_them(small_dataset):
    data = EpisodeDataset.load(small_dataset[0])
    events = data.event_steps()
    ends = data.episode_starts + data.episode_lengths - 1  # each episode's last transition
    assert len(events) and set(events) <= set(ends.tolist())  # in MiniGrid only the last step pays or ends
    assert all(data.rewards[t] != 0 or data.terminated[t] for t in events)
    rng = np.random.default_rng(1)
    for length in (2, 5, 16, 400):
        batch = data.sample_windows_around(rng, 64, length, events)
        held = (batch.rewards != 0) | batch.terminated  # (B, L): the event, as seen inside the window
        assert held[:, :-1].any(axis=1).all(), length  # every window holds its event with the frame after it
        assert batch.mask[np.arange(64), held.argmax(axis=1) + 1].all()
    positions = data.window_starts_around(rng, 2000, 8, events)[1]
    assert len(np.unique(positions)) > 4  # the event is not always at the same place in the window
    with pytest.raises(ValueError, match="no steps"):
        data.sample_windows_around(rng, 4, 8, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="last frame"):
        data.sample_windows_around(rng, 4, 8, data.episode_starts[1:2] - 1)


def test_split_by_episode(small_dataset):
    data = EpisodeDataset.load(small_dataset[0])
    train, val = data.split(0.3, seed=0)
    assert train.num_episodes + val.num_episodes == data.num_episodes and val.num_episodes == 3
    assert not set(train.episode_seeds) & set(val.episode_seeds)
    again_train, _ = data.split(0.3, seed=0)
    assert np.array_equal(again_train.episode_seeds, train.episode_seeds)
    assert data.split(0.0)[1] is None


def _with_events(data: EpisodeDataset, episodes: list[int]) -> EpisodeDataset:
    """A copy of ``data`` where only ``episodes`` end with a reward (and termination)."""
    arrays = {k: v.copy() for k, v in data.arrays.items()}
    arrays["rewards"][:] = 0.0
    arrays["terminated"][:] = False
    for e in episodes:
        last = data.episode_starts[e] + data.episode_lengths[e] - 1
        arrays["rewards"][last], arrays["terminated"][last] = 0.9, True
    return EpisodeDataset(arrays, data.card)


def test_split_keeps_rare_successes_in_training(small_dataset):
    data = EpisodeDataset.load(small_dataset[0])
    one = _with_events(data, [4])
    for seed in range(20):  # whatever the seed, the only success stays in training
        train, val = one.split(0.3, seed=seed)
        assert len(train.event_steps()) == 1 and len(val.event_steps()) == 0 and val.num_episodes == 3
    # With more successes, validation gets its share of them (3 of 9 at 30%), training the rest.
    many = _with_events(data, [0, 1, 2, 3, 4, 5, 6, 7, 8])
    train, val = many.split(0.3, seed=0)
    assert (len(train.event_steps()), len(val.event_steps())) == (6, 3)
    assert train.num_episodes + val.num_episodes == data.num_episodes
    assert not set(train.episode_seeds) & set(val.episode_seeds)


def test_same_config_same_bytes_whatever_the_parallelism(small_dataset, tmp_path):
    folder, _ = small_dataset
    env, settings = configs(num_envs=1)
    collect(env, settings, tmp_path / "serial", progress=False)
    for path in folder.iterdir():
        assert filecmp.cmp(path, tmp_path / "serial" / path.name, shallow=False), path.name


def test_killed_collection_resumes(small_dataset, tmp_path, monkeypatch):
    folder, _ = small_dataset
    env, settings = configs()
    real_write = collect_module.write_shard
    calls = []

    def dying_write(target, index, episodes):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(index)
        return real_write(target, index, episodes)

    monkeypatch.setattr(collect_module, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        collect(env, settings, tmp_path / "resumed", progress=False)
    written = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert written == ["collect_config.json", shard_name(0), shard_name(1)]  # no partial file, no card
    with pytest.raises(ArtifactError, match="did not finish"):
        EpisodeDataset.load(tmp_path / "resumed")
    monkeypatch.setattr(collect_module, "write_shard", lambda target, index, episodes: (
        calls.append(("resume", index)), real_write(target, index, episodes))[1])
    collect(env, settings, tmp_path / "resumed", progress=False)
    assert calls[-1] == ("resume", 2) and ("resume", 0) not in calls  # only the missing shard
    for path in folder.iterdir():
        assert filecmp.cmp(path, tmp_path / "resumed" / path.name, shallow=False), path.name


def test_step_budget(tmp_path):
    env, settings = configs(num_steps=300, num_episodes=0, policy_mix="random:1")
    card = collect(env, settings, tmp_path / "budget", progress=False)
    lengths = EpisodeDataset.load(tmp_path / "budget").episode_lengths
    assert card["steps"] >= 300 and lengths[:-1].sum() < 300  # stops at the episode that crosses


def test_mismatched_config_and_bad_folders(small_dataset, tmp_path):
    folder, _ = small_dataset
    env, settings = configs(policy_mix="random:1")
    with pytest.raises(ArtifactError, match="another config.*policy_mix"):
        collect(env, settings, folder, progress=False)
    with pytest.raises(ArtifactError, match="not found"):
        EpisodeDataset.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "card.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ArtifactError, match="is empty"):
        EpisodeDataset.load(tmp_path / "empty")
