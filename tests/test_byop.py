"""Bring your own policy: MiniGrid's native observation from the symbolic state, outside policies
(``module:attr``, TorchScript, stable-baselines3) in the real env and in imagination, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------
# The native observation
# ---------------------------------------------------------------------------------------------


def _real_states(env_id: str, episodes: int, epsilon: float):
    """(state, MiniGrid's own gen_obs()) pairs along epsilon-oracle episodes: doors get opened, keys
    carried, and walls and closed doors hide cells on the way."""
    import gymnasium as gym
    from minigrid.minigrid_env import MiniGridEnv

    from envs.make import normalize_env_id
    from envs.policies import parse_policy_mix
    from envs.state import StateCodec, state_from_env

    env = gym.make(normalize_env_id(env_id), disable_env_checker=True)
    base = env.unwrapped
    codec = StateCodec(base.width, base.height)
    behaviour = parse_policy_mix(f"epsilon_oracle@{epsilon}")[0].build(7, codec)
    for episode in range(episodes):
        env.reset(seed=episode)
        behaviour.reset(np.random.default_rng(episode))
        done = False
        while not done:
            state = state_from_env(env)
            yield state, MiniGridEnv.gen_obs(base)
            _, _, terminated, truncated, _ = env.step(behaviour.act(codec.encode(state)))
            done = terminated or truncated
    env.close()


@pytest.mark.parametrize("env_id", ["DoorKey-5x5", "DoorKey-6x6"])
def test_native_observation_equals_minigrids_own(env_id):
    from envs.native_obs import native_observation, native_observations
    from envs.state import DOOR, DOOR_OPEN, KEY, StateCodec

    pairs = list(_real_states(env_id, episodes=60, epsilon=0.3))
    seen = {"door_closed_in_view": 0, "door_open_in_view": 0, "carrying_key": 0, "hidden_cells": 0}
    for state, reference in pairs:
        got = native_observation(state)
        assert got["direction"] == reference["direction"]
        np.testing.assert_array_equal(got["image"], reference["image"])
        image = reference["image"]
        doors = image[..., 0] == DOOR
        seen["door_closed_in_view"] += bool((doors & (image[..., 2] != DOOR_OPEN)).any())
        seen["door_open_in_view"] += bool((doors & (image[..., 2] == DOOR_OPEN)).any())
        seen["carrying_key"] += state.carrying[0] == KEY
        seen["hidden_cells"] += bool((image[..., 0] == 0).any())
    # The cases that matter were met, many times: occlusion by walls and closed doors, seeing
    # through an open door, the carried key at the agent's cell.
    assert len(pairs) > 800 and min(seen.values()) > 20, seen
    # The batched builder is the same function.
    codec = StateCodec(pairs[0][0].width, pairs[0][0].height)
    batch = native_observations(np.stack([codec.encode(s) for s, _ in pairs]).astype(np.int64), codec)
    np.testing.assert_array_equal(batch["image"], np.stack([r["image"] for _, r in pairs]))
    np.testing.assert_array_equal(batch["direction"], [r["direction"] for _, r in pairs])


def test_native_observation_survives_impossible_states():
    """The state head may predict an agent off the grid, a direction past 3, unknown objects."""
    from envs.native_obs import native_observations
    from envs.state import StateCodec

    codec = StateCodec(5, 5)
    states = np.random.default_rng(0).integers(0, 256, size=(64, codec.size))
    obs = native_observations(states, codec)
    assert obs["image"].shape == (64, 7, 7, 3) and obs["image"].dtype == np.uint8
    assert obs["direction"].min() >= 0 and obs["direction"].max() <= 3


# ---------------------------------------------------------------------------------------------
# Outside policies on a tiny run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny quickstart run folder, made once for the module."""
    from scripts import quickstart

    root = tmp_path_factory.mktemp("byop_runs")
    quickstart.main(["--preset", "tiny", f"run.root={root}", "dynamics.steps=30", "dynamics.checkpoint_every=15"])
    return root / "quickstart"


@pytest.fixture(scope="module")
def world(run):
    """The run's config and world model."""
    from common.config import load_config
    from scripts.config import Config
    from worldmodel.imagine import load_world_model

    cfg = load_config(Config, [f"run.root={run.parent}", f"run.name={run.name}"])
    return cfg, load_world_model(run_dir=run)


@pytest.fixture
def received():
    from tests import outside_policy

    outside_policy.RECEIVED.clear()
    return outside_policy.RECEIVED


def _scripted_module(tmp_path, name="scripted_states.pt"):
    """A TorchScript policy on states returning logits, declaring its input in __init__."""
    import torch

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inputs = "states"
            self.linear = torch.nn.Linear(3, 7)

        def forward(self, states: torch.Tensor) -> torch.Tensor:
            return self.linear(states[:, -6:-3].float())

    path = tmp_path / name
    torch.jit.save(torch.jit.script(Scripted()), str(path))
    return path


def _evaluate(run, policies, *extra):
    from scripts import evaluate

    return evaluate.main([f"run.root={run.parent}", f"run.name={run.name}", f"evaluate.policies={policies}",
                          "evaluate.gif_policies=oracle", *extra])


def test_outside_policies_evaluate_end_to_end(run, tmp_path, received):
    scripted = _scripted_module(tmp_path)
    metrics = _evaluate(run, f"random,oracle,tests.outside_policy:FramePolicy,{scripted}")
    rows = {row["policy"]: row for row in metrics["policies"]}
    assert set(rows) == {"random", "oracle", "tests.outside_policy:FramePolicy", "scripted_states"}
    for name in ("tests.outside_policy:FramePolicy", "scripted_states"):
        assert 0 < rows[name]["real_length"] and 0 < rows[name]["imagined_length"] <= 30
    assert "tests.outside_policy:FramePolicy" in (run / "report.md").read_text()
    # Frames came in both worlds: the env's, and the tokenizer's decoding in imagination.
    assert received["frames"] and all(f.dtype == np.uint8 and f.ndim == 4 for f in received["frames"])
    assert received["reset"][0][0] == 2 and received["reset"][0][1] is not None  # reset(batch_size, seed)


def test_changed_policy_code_reruns_the_evaluation(run, tmp_path, monkeypatch):
    """The stage's identity holds the hash of the module's source: same code skips, new code reruns."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "my_changing_policy.py"
    module.write_text("import numpy as np\ninputs = 'states'\ndef act(states):\n    return np.zeros(len(states), dtype=int)\n")
    spec = "random,oracle,my_changing_policy:act"
    _evaluate(run, spec)
    manifest = (run / "stages" / "evaluate.json").read_text()
    _evaluate(run, spec)
    assert (run / "stages" / "evaluate.json").read_text() == manifest  # complete: skipped
    module.write_text(module.read_text() + "# a change\n")
    _evaluate(run, spec)
    assert (run / "stages" / "evaluate.json").read_text() != manifest
    assert list(run.glob("report.*.md")), "the old report is kept beside the new one"


def _play_both_worlds(policy, world, seeds=(0, 1), received=None, field=None):
    """A real and an imagined rollout from the same first frames; with ``received``, what the
    policy was given in each: ``(real_inputs, imagined_inputs)``."""
    from agents.evaluate import run_imagined, run_real
    from envs.make import make_env_from_config

    cfg, world_model = world
    real = run_real(policy, cfg.env, list(seeds), world_model.tokenizer, policy_seed=0)
    real_inputs = list(received.pop(field, [])) if received is not None else None
    env = make_env_from_config(cfg.env)
    firsts = [env.reset(seed=s) for s in seeds]
    imagined = run_imagined(policy, world_model, np.stack([f for f, _ in firsts]),
                            np.stack([i["state"] for _, i in firsts]), max_steps=4, policy_seed=0)
    if received is None:
        return real, imagined
    return real_inputs, list(received.pop(field, []))


def _gen_obs(env_id, seed):
    """MiniGrid's own observation at the first frame of the episode of ``seed``."""
    import gymnasium as gym
    from minigrid.minigrid_env import MiniGridEnv

    env = gym.make(env_id, disable_env_checker=True)
    env.reset(seed=seed)
    return MiniGridEnv.gen_obs(env.unwrapped)


@pytest.mark.parametrize("name, field", [("FramePolicy", "frames"), ("StatePolicy", "states"),
                                         ("NativePolicy", "minigrid"), ("TokenPolicy", "tokens"),
                                         ("make_agent", "states")])
def test_each_policy_gets_what_it_declared_in_both_worlds(world, received, name, field):
    from agents.policy import make_policy

    cfg, _ = world
    policy = make_policy(f"tests.outside_policy:{name}")
    assert policy.inputs == (field,)
    real_inputs, imagined_inputs = _play_both_worlds(policy, world, received=received, field=field)
    assert set(received) <= {"reset"}, f"only {field} was computed, got {sorted(received)}"
    assert len(real_inputs) > 0 and len(imagined_inputs) > 0
    for observation in real_inputs + imagined_inputs:
        if field == "minigrid":
            assert set(observation) == {"image", "direction"}
            assert observation["image"].shape == (2, 7, 7, 3) and observation["image"].dtype == np.uint8
            assert observation["direction"].shape == (2,) and observation["direction"].dtype == np.int64
        else:
            shape = {"frames": (2, 40, 40, 3), "states": (2, 5 * 5 * 3 + 6), "tokens": (2, 5, 5)}[field]
            dtype = {"frames": np.uint8, "states": np.uint8, "tokens": np.int64}[field]
            assert observation.shape == shape and observation.dtype == dtype
    if field == "minigrid":
        # Both worlds start from the real first state: MiniGrid's own observation of it.
        for row, seed in enumerate((0, 1)):
            reference = _gen_obs(cfg.env.id, seed)
            for first in (real_inputs[0], imagined_inputs[0]):
                np.testing.assert_array_equal(first["image"][row], reference["image"])
                assert first["direction"][row] == reference["direction"]


def test_the_native_observation_of_a_grid_that_is_not_square(received):
    """KeyCorridorS3R1's grid is 7x3: the real env's observation is built with the env's own width."""
    from agents.evaluate import run_real
    from agents.policy import make_policy
    from common.config import load_config
    from scripts.config import Config

    cfg = load_config(Config, ["--env", "keycorridor-s3r1"])
    run_real(make_policy("tests.outside_policy:NativePolicy"), cfg.env, [0, 1], None, policy_seed=0)
    first = received["minigrid"][0]
    for row, seed in enumerate((0, 1)):
        np.testing.assert_array_equal(first["image"][row], _gen_obs(cfg.env.id, seed)["image"])


def test_plain_callable_and_torchscript_on_the_native_observation(world, tmp_path):
    import torch

    from agents.policy import make_policy

    class OnNative(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inputs = "minigrid"

        def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
            return (obs["direction"] + obs["image"][:, 3, 6, 0].long()) % 3

    path = tmp_path / "native.pt"
    torch.jit.save(torch.jit.script(OnNative()), str(path))
    for spec, field in ((str(path), "minigrid"), (str(_scripted_module(tmp_path)), "states"),
                        ("tests.outside_policy:forward_everywhere", "frames")):
        policy = make_policy(spec)
        assert policy.inputs == (field,)
        real, imagined = _play_both_worlds(policy, world)
        assert real.lengths.min() > 0 and imagined.lengths.min() > 0


# ---------------------------------------------------------------------------------------------
# Errors name the policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("tests.no_such_module:Policy", "no module named 'tests.no_such_module'"),
    ("tests.outside_policy:NoSuchThing", "has no attribute 'NoSuchThing'"),
    ("tests.outside_policy:NOT_A_POLICY", "no act(obs_batch) method and is not callable"),
    ("tests.outside_policy:BadDeclaration", "declares inputs = 'pixels'"),
])
def test_a_bad_policy_path_names_the_policy(spec, message):
    from agents.policy import make_policy

    with pytest.raises(ValueError, match=f"policy '{spec}'.*") as error:
        make_policy(spec)
    assert message in str(error.value)


@pytest.mark.parametrize("name, message", [("OutOfRange", "action 7, outside Discrete(7)"),
                                           ("WrongShape", "shape (2, 1), expected (2,)"),
                                           ("FloatActions", "dtype float32, expected integers")])
def test_an_illegal_action_names_the_policy(world, name, message):
    from agents.evaluate import run_real
    from agents.policy import make_policy

    cfg, world_model = world
    spec = f"tests.outside_policy:{name}"
    with pytest.raises(ValueError) as error:
        run_real(make_policy(spec), cfg.env, [0, 1], world_model.tokenizer, policy_seed=0)
    assert f"policy '{spec}'" in str(error.value) and message in str(error.value)


def test_a_bad_policy_spec_is_a_config_error(run, capsys):
    for spec in ("tests.no_such_module:Policy", "tests.outside_policy:NOT_A_POLICY"):
        with pytest.raises(SystemExit) as error:
            _evaluate(run, f"random,oracle,{spec}")
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert "evaluate.policies" in err and spec in err


def test_an_illegal_action_in_the_evaluate_stage_exits_1_naming_the_policy(run, capsys):
    spec = "tests.outside_policy:OutOfRange"
    with pytest.raises(SystemExit) as error:
        _evaluate(run, f"random,oracle,{spec}")
    assert error.value.code == 1
    err = capsys.readouterr().err
    assert f"policy '{spec}' returned action 7, outside Discrete(7)" in err and "Traceback" not in err


def test_stable_baselines3_without_the_extra_says_which_extra(tmp_path, monkeypatch):
    import sys
    import zipfile

    from agents.policy import make_policy

    monkeypatch.setitem(sys.modules, "stable_baselines3", None)  # as if the extra were not installed
    path = tmp_path / "ppo_doorkey.zip"
    with zipfile.ZipFile(path, "w") as archive:  # the members an SB3 save has
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", b"")
        archive.writestr("pytorch_variables.pth", b"")
    with pytest.raises(ValueError) as error:
        make_policy(str(path))
    assert f"policy '{path}'" in str(error.value) and "stable_baselines3 is not installed" in str(error.value)
    assert "'sb3' extra" in str(error.value)


def _sb3_model(tmp_path, observation: str):
    """A stable-baselines3 PPO trained a few steps on DoorKey-5x5's native observation: the image
    alone (``ImgObsWrapper``, a (7, 7, 3) box) or a Dict of image and direction; SB3 saves either
    image channels-first."""
    sb3 = pytest.importorskip("stable_baselines3", reason="the 'sb3' extra is not installed")
    import gymnasium as gym
    import torch
    from minigrid.wrappers import ImgObsWrapper
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class ImageAndDirection(gym.ObservationWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.observation_space = gym.spaces.Dict({k: env.observation_space[k] for k in ("image", "direction")})

        def observation(self, obs):
            return {k: obs[k] for k in ("image", "direction")}

    class Flat(BaseFeaturesExtractor):  # SB3's default CNN for a Dict's image wants at least 8x8
        def __init__(self, space):
            super().__init__(space, features_dim=7 * 7 * 3 + 4)

        def forward(self, obs):
            return torch.cat([obs["image"].flatten(1), obs["direction"].flatten(1)], dim=1)

    env = gym.make("MiniGrid-DoorKey-5x5-v0")
    if observation == "image":
        env, kind, kwargs = ImgObsWrapper(env), "MlpPolicy", {}
    else:
        env, kind, kwargs = ImageAndDirection(env), "MultiInputPolicy", {"features_extractor_class": Flat}
    model = sb3.PPO(kind, env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu",
                    policy_kwargs={"normalize_images": False, **kwargs})
    model.learn(32)
    path = tmp_path / f"sb3_{observation}.zip"
    model.save(str(path))
    return model, path


@pytest.mark.parametrize("observation", ["image", "dict"])
def test_a_stable_baselines3_model_acts_on_the_native_observation_in_both_worlds(world, tmp_path, observation):
    from agents.policy import PolicyInput, make_policy

    model, path = _sb3_model(tmp_path, observation)
    policy = make_policy(str(path))
    assert policy.inputs == ("minigrid",) and policy.name == path.stem
    real, imagined = _play_both_worlds(policy, world)
    assert real.lengths.min() > 0 and imagined.lengths.min() > 0
    cfg, _ = world
    obs = _gen_obs(cfg.env.id, 0)
    own = obs["image"] if observation == "image" else {"image": obs["image"], "direction": obs["direction"]}
    batch = PolicyInput(minigrid={"image": obs["image"][None], "direction": np.array([obs["direction"]])})
    assert policy.act(batch)[0] == model.predict(own, deterministic=True)[0]  # acts as SB3 does on MiniGrid's own


def test_a_stable_baselines3_model_of_another_frame_size_names_the_shapes(tmp_path):
    from agents.outside import _laid_out

    frames = np.zeros((2, 40, 40, 3), dtype=np.uint8)
    assert _laid_out(frames, (3, 40, 40), "m.zip").shape == (2, 3, 40, 40)
    assert _laid_out(frames, (40, 40, 3), "m.zip") is frames
    with pytest.raises(ValueError, match=r"policy 'm.zip' reads observations of shape \(3, 48, 48\), and this env serves \(40, 40, 3\)"):
        _laid_out(frames, (3, 48, 48), "m.zip")


# ---------------------------------------------------------------------------------------------
# docs/your_policy.md runs as written
# ---------------------------------------------------------------------------------------------


def _blocks(language):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "your_policy.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", page, flags=re.S)


def test_the_pages_example_evaluates_as_written(run, tmp_path, monkeypatch):
    import shlex

    from agents.policy import make_policy

    example = _blocks("python")[0]
    assert len(example.strip().splitlines()) <= 16  # the ten-line contract, give or take blank lines
    (tmp_path / "my_agent.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    command = shlex.split(_blocks("bash")[0].strip())
    assert command[:2] == ["python", "scripts/evaluate.py"]
    metrics = _evaluate(run, command[-1].partition("=")[2])
    row = {r["policy"]: r for r in metrics["policies"]}["my_agent:make_agent"]
    assert row["real_length"] > 0 and row["imagined_length"] > 0
    assert make_policy("my_agent:make_agent").inputs == ("minigrid",)


def test_the_pages_torchscript_example_evaluates(world, tmp_path, monkeypatch):
    import runpy

    from agents.policy import make_policy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "make_mine.py").write_text(next(b for b in _blocks("python") if "torch.jit.save" in b))  # jit reads the source
    runpy.run_path(str(tmp_path / "make_mine.py"), run_name="make_mine")
    policy = make_policy(str(tmp_path / "mine.pt"))
    assert policy.inputs == ("states",)
    real, imagined = _play_both_worlds(policy, world)
    assert real.lengths.min() > 0 and imagined.lengths.min() > 0


def test_the_pages_stable_baselines3_example_evaluates(world, tmp_path, monkeypatch):
    """The page's SB3 block as written, with a 256-step budget for its 100k."""
    pytest.importorskip("stable_baselines3", reason="the 'sb3' extra is not installed")
    import runpy

    from agents.policy import make_policy

    block = next(b for b in _blocks("python") if "stable_baselines3" in b)
    assert ".learn(100_000)" in block
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_sb3.py").write_text(block.replace(".learn(100_000)", ".learn(256)"))
    runpy.run_path(str(tmp_path / "train_sb3.py"), run_name="train_sb3")
    policy = make_policy(str(tmp_path / "sb3_doorkey.zip"))
    assert policy.inputs == ("minigrid",)
    real, imagined = _play_both_worlds(policy, world)
    assert real.lengths.min() > 0 and imagined.lengths.min() > 0
