"""The env suite beyond DoorKey: presets build, collection runs, actions come from each env."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from envs.collect import CollectConfig, collect, random_frames
from envs.dataset import EpisodeDataset
from envs.make import EnvConfig, make_env
from envs.state import StateCodec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "env"
# preset -> (registered id, (grid width, grid height), number of actions)
SUITE = {
    "doorkey-16x16": ("MiniGrid-DoorKey-16x16-v0", (16, 16), 7),
    "keycorridor-s3r1": ("MiniGrid-KeyCorridorS3R1-v0", (7, 3), 7),
    "dynamic-obstacles-6x6": ("MiniGrid-Dynamic-Obstacles-6x6-v0", (6, 6), 3),
}


def preset(name):
    return OmegaConf.merge(OmegaConf.structured(EnvConfig), OmegaConf.load(CONFIG_DIR / f"{name}.yaml").env)


@pytest.mark.parametrize("name", sorted(SUITE))
def test_preset_builds_its_env(name):
    env_id, (width, height), num_actions = SUITE[name]
    cfg = preset(name)
    assert cfg.id == env_id
    env = make_env(cfg.id, obs=cfg.obs, tile_size=cfg.tile_size)
    frame, info = env.reset(seed=0)
    assert (env.unwrapped.width, env.unwrapped.height) == (width, height)
    assert frame.shape == (height * cfg.tile_size, width * cfg.tile_size, 3)
    assert env.action_space.n == num_actions
    assert info["state"].shape == (width * height * 3 + 6,)


@pytest.mark.parametrize("name", sorted(SUITE))
def test_collection_runs_on_the_suite(name, tmp_path):
    env_id, (width, height), num_actions = SUITE[name]
    env_cfg = preset(name)
    env_cfg.max_steps = 40  # a few short episodes: DoorKey-16x16's own limit is 2560 steps
    collect_cfg = OmegaConf.structured(CollectConfig(num_episodes=3, num_envs=2, episodes_per_shard=2,
                                                     policy_mix="random:1"))
    card = collect(env_cfg, collect_cfg, tmp_path / "dataset", progress=False)
    assert card["env_id"] == env_id and card["episodes"] == 3
    assert card["num_actions"] == num_actions and card["grid_size"] == [width, height]
    assert json.loads((tmp_path / "dataset" / "card.json").read_text())["num_actions"] == num_actions
    data = EpisodeDataset.load(tmp_path / "dataset")
    taken = data.arrays["actions"][data.arrays["actions"] >= 0]
    assert taken.min() >= 0 and taken.max() < num_actions
    assert data.arrays["frames"].shape[1:] == (height * 8, width * 8, 3)
    codec = StateCodec.for_card(data.card, state_size=data.arrays["states"].shape[1])  # as dataset readers do
    assert (codec.width, codec.height) == (width, height)
    _, first = make_env(env_id).reset(seed=0)  # episode 0 resets with collect.seed + 0
    assert np.array_equal(codec.encode(codec.decode(data.arrays["states"][0])), first["state"])


def test_random_frames_draw_from_the_env_action_space(monkeypatch):
    seen = []
    real_make_env = make_env

    def recording_make_env(*args, **kwargs):
        env = real_make_env(*args, **kwargs)
        step = env.step

        def recorded(action):
            seen.append(action)
            return step(action)

        env.step = recorded
        return env

    monkeypatch.setattr("envs.collect.make_env", recording_make_env)
    frames = random_frames("MiniGrid-Dynamic-Obstacles-6x6-v0", range(20), steps=10)
    assert frames.shape[1:] == (48, 48, 3)
    assert len(seen) > 40 and set(seen) <= {0, 1, 2} and len(set(seen)) == 3


@pytest.mark.parametrize("name", ["keycorridor-s3r1", "dynamic-obstacles-6x6"])
def test_collection_oracle_plans_each_envs_task(name, tmp_path):
    """collect builds its oracle policies with the env's task (pickup; moving obstacles)."""
    collect_cfg = OmegaConf.structured(CollectConfig(num_episodes=4, num_envs=2, episodes_per_shard=4,
                                                     policy_mix="oracle:1"))
    card = collect(preset(name), collect_cfg, tmp_path / "dataset", progress=False)
    assert card["returns"]["success_rate"] == 1.0 and card["returns"]["return_min"] > 0
