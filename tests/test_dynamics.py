"""Dynamics model, imagination and dream envs: causality, cache, envs, learning, DDP, scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.dynamics import DynamicsCheckpointError, DynamicsModel, DynamicsModelConfig, load_dynamics
from worldmodel.imagine import (
    DatasetStarts,
    DreamEnv,
    DreamVectorEnv,
    EnvStarts,
    SamplingConfig,
    WorldModel,
    imagine_rollout,
)

REPO = Path(__file__).resolve().parent.parent


class TileTokenizer:
    """A test fixture with the tokenizer's interface: one id per distinct 8x8 tile, learned on
    first sight (exact, so learning tests measure the dynamics model alone)."""

    patch_size = 8

    def __init__(self, vocab_size: int = 32):
        self.vocab_size = vocab_size
        self.table: dict[bytes, int] = {}
        self.tiles: list[np.ndarray] = []
        self.identity = "tile-table-test"

    def encode(self, frames) -> torch.Tensor:
        frames = np.asarray(frames)
        lead, (height, width) = frames.shape[:-3], frames.shape[-3:-1]
        p = self.patch_size
        flat = frames.reshape(-1, height // p, p, width // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)
        keys = np.ascontiguousarray(flat).view(np.dtype((np.void, flat.shape[1])))[:, 0]
        unique, inverse = np.unique(keys, return_inverse=True)
        ids = np.array([self._id(u.tobytes()) for u in unique], dtype=np.int64)
        return torch.as_tensor(ids[inverse.reshape(-1)].reshape(*lead, height // p, width // p))

    def _id(self, key: bytes) -> int:
        if key not in self.table:
            if len(self.tiles) >= self.vocab_size:
                raise ValueError("test tokenizer: vocabulary full")
            self.table[key] = len(self.tiles)
            self.tiles.append(np.frombuffer(key, dtype=np.uint8).reshape(self.patch_size, self.patch_size, 3))
        return self.table[key]

    def decode(self, tokens) -> torch.Tensor:
        tokens = np.asarray(tokens)
        lead, (h, w) = tokens.shape[:-2], tokens.shape[-2:]
        p = self.patch_size
        table = np.stack(self.tiles + [np.zeros((p, p, 3), np.uint8)] * (self.vocab_size - len(self.tiles)))
        patches = table[tokens.reshape(-1, h, w)]
        return torch.as_tensor(patches.transpose(0, 1, 3, 2, 4, 5).reshape(*lead, h * p, w * p, 3))


# A small model for unit tests (the stage derives its own from DynamicsConfig: model_config).
SMALL = dict(num_actions=7, dim=32, heads=4, block="conv", encoder_layers=0, decoder_layers=2, mlp_ratio=2,
             memory_dim=48, summary_channels=8, state_hidden=64, action_dropout=0.1, memory="recurrent",
             decoder_context="global", presence=False, refine_fraction=0.3, change_weight=10.0, event_weight=5.0)


def small_config(**overrides) -> DynamicsModelConfig:
    values = dict(vocab_size=32, grid_height=5, grid_width=5, state_width=5, state_height=5, **SMALL)
    values.update(overrides)
    return DynamicsModelConfig(**values)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """8 episodes of DoorKey-5x5 (full view) collected by the real collection code, tokenised."""
    from envs.collect import CollectConfig, collect
    from envs.dataset import EpisodeDataset
    from envs.make import EnvConfig

    folder = tmp_path_factory.mktemp("dyn_data") / "dataset"
    collect(EnvConfig(id="MiniGrid-DoorKey-5x5-v0"), CollectConfig(num_episodes=16, num_envs=2, episodes_per_shard=8,
            policy_mix="random:0.5,epsilon_oracle@0.2:0.5"), folder, progress=False)
    dataset = EpisodeDataset.load(folder)
    tokenizer = TileTokenizer()
    dataset.with_frame_array("tokens", tokenizer.encode(dataset.arrays["frames"]).numpy())
    return dataset, tokenizer, folder


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["conv", "mix", "attention"])
def test_causality_no_prediction_sees_the_future(block):
    torch.manual_seed(0)
    model = DynamicsModel(small_config(block=block, encoder_layers=1)).eval()
    tokens = torch.randint(0, 32, (2, 6, 5, 5))
    actions = torch.randint(0, 7, (2, 6))
    t = 2
    changed_tokens = tokens.clone()
    changed_tokens[:, t + 1 :] = torch.randint(0, 32, changed_tokens[:, t + 1 :].shape)
    changed_actions = actions.clone()
    changed_actions[:, t:] = (actions[:, t:] + 1) % 7
    with torch.no_grad():
        a = model(tokens, actions)
        b = model(changed_tokens, changed_actions)
    # Predictions of frames <= t: next-frame logits and outcomes made at steps < t, states of frames <= t.
    torch.testing.assert_close(a.token_logits[:, :t], b.token_logits[:, :t])
    torch.testing.assert_close(a.reward_logit[:, :t], b.reward_logit[:, :t])
    torch.testing.assert_close(a.termination_logit[:, :t], b.termination_logit[:, :t])
    torch.testing.assert_close(a.state_logits[:, : t + 1], b.state_logits[:, : t + 1])
    # ... and the change does reach the later predictions (so this test can fail).
    assert not torch.allclose(a.token_logits[:, t:], b.token_logits[:, t:])
    assert not torch.allclose(a.state_logits[:, t + 1 :], b.state_logits[:, t + 1 :])


@pytest.mark.parametrize("block,memory", [("conv", "recurrent"), ("attention", "recurrent"), ("conv", "frame")])
def test_cached_rollout_matches_uncached_forward(block, memory):
    torch.manual_seed(1)
    model = DynamicsModel(small_config(block=block, memory=memory)).eval()
    tokens = torch.randint(0, 32, (3, 7, 5, 5))
    actions = torch.randint(0, 7, (3, 7))
    with torch.no_grad():
        full = model(tokens, actions)
        cache, state = model.start(tokens[:, :2], actions[:, :1])
        torch.testing.assert_close(state, full.state_logits[:, 1])
        for t in range(1, 6):
            logits, outcome = model.predict_logits(cache, actions[:, t])
            torch.testing.assert_close(logits, full.token_logits[:, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(outcome[:, 2], full.termination_logit[:, t], atol=1e-4, rtol=1e-4)
            cache, state = model.observe(cache, tokens[:, t + 1], actions[:, t])
            torch.testing.assert_close(state, full.state_logits[:, t + 1], atol=1e-4, rtol=1e-4)


def test_frame_memory_predicts_from_the_current_frame_alone():
    """memory="frame": the predictions made at frame t depend on frame t and action t only (the
    model is Markov in the frame), while the recurrent memory does read the earlier frames."""
    torch.manual_seed(3)
    tokens = torch.randint(0, 32, (2, 5, 5, 5))
    actions = torch.randint(0, 7, (2, 5))
    changed = tokens.clone()
    changed[:, :3] = torch.randint(0, 32, changed[:, :3].shape)
    changed_actions = actions.clone()
    changed_actions[:, :3] = (actions[:, :3] + 1) % 7
    for memory, same in (("frame", True), ("recurrent", False)):
        model = DynamicsModel(small_config(memory=memory)).eval()
        with torch.no_grad():
            a, b = model(tokens, actions), model(changed, changed_actions)
        assert torch.allclose(a.token_logits[:, 3:], b.token_logits[:, 3:]) == same, memory
        assert torch.allclose(a.state_logits[:, 3:], b.state_logits[:, 3:]) == same, memory
        assert torch.allclose(a.reward_logit[:, 3:], b.reward_logit[:, 3:]) == same, memory
    with pytest.raises(ValueError, match="memory"):
        small_config(memory="lstm")


def test_local_decoder_sees_a_neighbourhood_and_reads_events_off_the_transition():
    """decoder_context="local" with one decoder block: a cell's next-token logits depend on its 3x3
    neighbourhood only; reward/termination come from the (before, after, action) cells, so a
    sampled step's outcome is what the teacher-forced pass gives for that same transition."""
    torch.manual_seed(5)
    model = DynamicsModel(small_config(memory="frame", decoder_context="local", decoder_layers=1)).eval()
    tokens = torch.randint(0, 32, (2, 2, 5, 5))
    actions = torch.randint(0, 7, (2, 2))
    far = tokens.clone()
    far[:, 0, 4, 4] = (far[:, 0, 4, 4] + 1) % 32  # a corner cell, more than one tile from (0..2, 0..2)
    with torch.no_grad():
        a = model(tokens, actions).token_logits[:, 0].view(2, 5, 5, -1)
        b = model(far, actions).token_logits[:, 0].view(2, 5, 5, -1)
    torch.testing.assert_close(a[:, :3, :3], b[:, :3, :3])
    assert not torch.allclose(a[:, 3:, 3:], b[:, 3:, 3:])
    with torch.no_grad():
        cache, _ = model.start(tokens[:, :1], actions[:, :0])
        step = model.predict(cache, actions[:, 0])
        out = model(torch.stack([tokens[:, 0], step.tokens], 1), actions)
    torch.testing.assert_close(step.termination_probability, torch.sigmoid(out.termination_logit[:, 0]))
    torch.testing.assert_close(step.reward_probability, torch.sigmoid(out.reward_logit[:, 0]))
    # Events come from changed cells only: with nothing changed, the outcome is the action's alone,
    # whatever the frame; with one changed cell, the other cells do not matter.
    with torch.no_grad():
        frames = torch.randint(0, 32, (2, 25))
        act = torch.tensor([2, 2])
        still = model.transition_outcome(frames, frames, act)
        torch.testing.assert_close(still[0], still[1])
        one = frames.clone()
        one[:, 7] = (frames[:, 7] + 1) % 32
        other = one.clone()
        other[:, 20] = (other[:, 20] + 3) % 32  # unchanged between before and after, but different
        before_other = frames.clone()
        before_other[:, 20] = other[:, 20]
        torch.testing.assert_close(model.transition_outcome(frames, one, act),
                                   model.transition_outcome(before_other, other, act))
    with pytest.raises(ValueError, match="decoder_context"):
        small_config(decoder_context="everywhere")


@pytest.mark.parametrize("rows", [[6, 7, 8, 11, 12, 13, 16, 17, 18], [0, 4, 12, 24], [3]])
def test_block_on_some_rows_equals_the_whole_block_at_those_rows(rows):
    """A block asked for some positions gives exactly what the whole block gives there (the
    convolution over their bounding box, padded where it touches the frame's edge)."""
    from worldmodel.dynamics import make_block

    torch.manual_seed(6)
    x = torch.randn(3, 25, 32)
    index = torch.tensor(rows)
    for kind in ("conv", "mix", "attention"):
        block = make_block(kind, 32, 4, 2, (5, 5)).eval()
        with torch.no_grad():
            torch.testing.assert_close(block(x, rows=index), block(x)[:, index], atol=1e-5, rtol=1e-5)


def test_static_cells_are_copied_and_the_rest_predicted_as_before():
    """Positions constant in every training frame are copied, in the teacher-forced pass and in a
    rollout alike; the other positions' logits are those of the same weights without static cells."""
    from worldmodel.train_dynamics import constant_cells

    frames = np.random.default_rng(0).integers(0, 32, (10, 5, 5))
    frames[:, 0, :] = 7
    frames[:, :, 0] = 7
    assert constant_cells(frames) == [0, 1, 2, 3, 4, 5, 10, 15, 20]
    assert constant_cells(np.zeros((4, 5, 5), np.int64)) == []  # nothing would be left to predict
    static = constant_cells(frames)
    torch.manual_seed(7)
    base = small_config(memory="frame", decoder_context="local", decoder_layers=1, presence=True)
    plain = DynamicsModel(base).eval()
    copying = DynamicsModel(small_config(memory="frame", decoder_context="local", decoder_layers=1, presence=True,
                                         static_cells=static)).eval()
    copying.load_state_dict(plain.state_dict())
    with torch.no_grad():
        copying.copy_bias.fill_(0.0)  # an untrained model that does not just copy the frame
        plain.copy_bias.fill_(0.0)
    tokens = torch.as_tensor(frames[None, :4])
    actions = torch.randint(0, 7, (1, 4))
    moving = [i for i in range(25) if i not in static]
    with torch.no_grad():
        a, b = plain(tokens, actions), copying(tokens, actions)
        torch.testing.assert_close(b.token_logits[..., moving, :], a.token_logits[..., moving, :], atol=1e-5, rtol=1e-5)
        greedy = copying.tokens_from_logits(b.token_logits)
        assert torch.equal(greedy[..., static], tokens.reshape(1, 4, 25)[..., static])
        cache, _ = copying.start(tokens[:, :1], actions[:, :0])
        step = copying.predict(cache, actions[:, 0])
        assert torch.equal(step.tokens.reshape(1, 25)[:, static], tokens[:, 0].reshape(1, 25)[:, static])
        assert torch.equal(step.tokens.reshape(1, 25)[:, moving], greedy[:, 0, moving])
        assert not torch.equal(step.tokens, tokens[:, 0])  # the model did change the frame
        sampled = copying.predict(cache, actions[:, 0], temperature=1.0, refine_steps=2)
        assert torch.equal(sampled.tokens.reshape(1, 25)[:, static], tokens[:, 0].reshape(1, 25)[:, static])
    with pytest.raises(ValueError, match="static_cells"):
        small_config(static_cells=[25])


def test_world_model_rollout_is_what_the_forward_pass_predicts():
    """A greedy imagined rollout, re-read teacher-forced, predicts itself at every step."""
    torch.manual_seed(2)
    model = DynamicsModel(small_config())
    with torch.no_grad():
        model.copy_bias.fill_(0.0)  # an untrained model that does not just copy the frame
    wm = WorldModel(TileTokenizer(), model)
    context = torch.randint(0, 32, (4, 3, 5, 5))
    context_actions = torch.randint(0, 7, (4, 2))
    actions = torch.randint(0, 7, (4, 5))
    wm.reset(context, context_actions)
    frames = [context]
    for k in range(5):
        step = wm.step(actions[:, k])
        assert step.tokens.shape == (4, 5, 5) and step.state.shape == (4, model.config.state_size)
        assert step.reward.shape == (4,) and step.terminated.dtype == torch.bool
        frames.append(step.tokens[:, None])
    sequence = torch.cat(frames, 1)  # (4, 8, 5, 5)
    all_actions = torch.cat([context_actions, actions, torch.full((4, 1), -1)], 1)
    with torch.no_grad():
        out = model.eval()(sequence, all_actions)
    greedy = model.tokens_from_logits(out.token_logits).view(4, -1, 5, 5)
    assert torch.equal(greedy[:, 2:7], sequence[:, 3:8])
    assert not torch.equal(sequence[:, 3], sequence[:, 2])  # the model did change the frame


def test_imagined_states_are_computed_on_demand_and_stay_with_their_step():
    """The state head runs only when a state is read; a step read late (after later steps and a row
    restart) still gives the state of its own frame, the one the teacher-forced pass gives."""
    torch.manual_seed(4)
    model = DynamicsModel(small_config()).eval()
    wm = WorldModel(TileTokenizer(), model)
    context = torch.randint(0, 32, (3, 1, 5, 5))
    actions = torch.randint(0, 7, (3, 3))
    calls = []
    original = model.state_logits
    model.state_logits = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    wm.reset(context)
    calls.clear()
    steps = [wm.step(actions[:, k]) for k in range(3)]
    assert calls == []  # nobody read a state: the head never ran
    wm.reset_rows(torch.tensor([1]), torch.randint(0, 32, (1, 1, 5, 5)))  # reading a context: one state pass
    sequence = torch.cat([context] + [s.tokens[:, None] for s in steps], 1)
    with torch.no_grad():
        out = model(sequence, torch.cat([actions, torch.full((3, 1), -1)], 1))
    for k, step in enumerate(steps):
        assert torch.equal(step.state, out.state_logits[:, k + 1].argmax(-1))
    assert len(calls) == 1 + 3 + 1  # the restart, each step's state once, the teacher-forced pass
    assert torch.equal(wm.state[0], steps[-1].state[0]) and wm.state.shape == (3, model.config.state_size)


def test_guidance_one_is_conditional_and_zero_is_action_free():
    torch.manual_seed(3)
    model = DynamicsModel(small_config()).eval()
    tokens = torch.randint(0, 32, (2, 1, 5, 5))
    actions = torch.tensor([2, 5])
    with torch.no_grad():
        cache, _ = model.start(tokens, torch.zeros(2, 0, dtype=torch.long))
        conditional, _ = model.predict_logits(cache, actions)
        unconditional, _ = model.predict_logits(cache, torch.full_like(actions, -1))
        torch.testing.assert_close(model.predict_logits(cache, actions, guidance=1.0)[0], conditional)
        torch.testing.assert_close(model.predict_logits(cache, actions, guidance=0.0)[0], unconditional)
        guided, _ = model.predict_logits(cache, actions, guidance=3.0)
        torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))


def test_refinement_sampling_is_seeded_and_covers_every_token():
    torch.manual_seed(4)
    model = DynamicsModel(small_config()).eval()
    tokens = torch.randint(0, 32, (3, 1, 5, 5))
    with torch.no_grad():
        cache, _ = model.start(tokens, torch.zeros(3, 0, dtype=torch.long))
        draws = [model.predict(cache, torch.tensor([0, 1, 2]), temperature=1.0, refine_steps=4,
                               generator=torch.Generator().manual_seed(7)).tokens for _ in range(2)]
        other = model.predict(cache, torch.tensor([0, 1, 2]), temperature=1.0, refine_steps=4,
                              generator=torch.Generator().manual_seed(8)).tokens
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], other)  # an untrained model is uncertain: samples differ
    assert int(draws[0].min()) >= 0 and int(draws[0].max()) < 32  # no MASK token left


def test_loss_parts_and_action_free_windows():
    torch.manual_seed(5)
    from worldmodel.dynamics import DynamicsBatch

    model = DynamicsModel(small_config())
    batch = DynamicsBatch(
        tokens=torch.randint(0, 32, (2, 4, 5, 5)), actions=torch.full((2, 4), -1),  # action-free video
        rewards=torch.zeros(2, 4), terminated=torch.zeros(2, 4, dtype=torch.bool),
        states=torch.zeros(2, 4, model.config.state_size, dtype=torch.long), mask=torch.ones(2, 4, dtype=torch.bool),
    )
    losses = model.compute_loss(batch)
    assert {"tokens", "reward", "termination", "state"} <= set(losses.parts)
    assert torch.isfinite(losses.total) and losses.total.requires_grad
    losses.total.backward()
    assert model.decoder_action.weight.grad[model.no_action].abs().sum() > 0  # "no action" embedding learns


# ---------------------------------------------------------------------------------------------
# Dream envs
# ---------------------------------------------------------------------------------------------


def _world_model(dataset, tokenizer, temperature: float = 1.0) -> WorldModel:
    torch.manual_seed(6)
    model = DynamicsModel(small_config(vocab_size=tokenizer.vocab_size))
    return WorldModel(tokenizer, model, sampling=SamplingConfig(temperature=temperature, refine_steps=2))


def test_dream_env_passes_check_env_and_is_deterministic(tiny_dataset):
    from gymnasium.utils.env_checker import check_env

    dataset, tokenizer, _ = tiny_dataset
    env = DreamEnv(_world_model(dataset, tokenizer), DatasetStarts(dataset), max_episode_steps=20)
    check_env(env, skip_render_check=False)

    def episode(seed: int) -> list[np.ndarray]:
        obs, info = env.reset(seed=seed)
        seen = [obs, info["state"]]
        for action in [2, 0, 2, 1, 2, 3]:
            obs, reward, terminated, truncated, info = env.step(action)
            seen += [obs, np.array([reward, terminated, truncated]), info["state"]]
        return seen

    first, again, other = episode(11), episode(11), episode(12)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == dataset.frame_shape


def test_dream_env_from_real_env_resets_and_frame_observations(tiny_dataset):
    from envs.make import make_env

    dataset, tokenizer, _ = tiny_dataset
    starts = EnvStarts(lambda: make_env("MiniGrid-DoorKey-5x5-v0"), tokenizer)
    env = DreamEnv(_world_model(dataset, tokenizer), starts, obs_mode="frames")
    obs, info = env.reset(seed=3)
    real, real_info = make_env("MiniGrid-DoorKey-5x5-v0").reset(seed=int(np.random.default_rng(0).integers(1)))
    assert obs.shape == real.shape and obs.dtype == np.uint8
    assert "real_state" in info and info["real_state"].shape == real_info["state"].shape
    assert env.observation_space.contains(env.step(2)[0])


def test_dream_vector_env_autoresets_on_the_next_step(tiny_dataset):
    dataset, tokenizer, _ = tiny_dataset
    wm = _world_model(dataset, tokenizer, temperature=0.0)
    with torch.no_grad():  # make the model predict "episode over" after every step
        wm.dynamics.outcome_head[-1].bias[2] = 100.0
    envs = DreamVectorEnv(wm, DatasetStarts(dataset), num_envs=3, max_episode_steps=5)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (3, 5, 5) and envs.observation_space.contains(obs)
    _, _, terminated, truncated, _ = envs.step(np.array([2, 2, 2]))
    assert terminated.all() and not truncated.any()
    starts = DatasetStarts(dataset)
    obs, reward, terminated, truncated, info = envs.step(np.array([2, 2, 2]))
    assert not terminated.any() and np.all(reward == 0)  # the step after the end is a reset
    assert all(any(np.array_equal(o, s) for s in starts.tokens) for o in obs)  # real first frames
    assert info["state"].shape == (3, dataset.arrays["states"].shape[1])
    assert envs.render().shape == (3, *dataset.frame_shape)


def test_imagine_rollout_with_a_state_reading_policy(tiny_dataset):
    dataset, tokenizer, _ = tiny_dataset
    wm = _world_model(dataset, tokenizer, temperature=0.0)
    starts = DatasetStarts(dataset)
    tokens, _ = starts.sample(np.random.default_rng(0), 4)
    seen_states = []

    def policy(tokens, states):
        seen_states.append(states)
        return torch.full((tokens.shape[0],), 2)

    rollout = imagine_rollout(wm, policy, tokens[:, None], None, horizon=6)
    assert rollout.tokens.shape == (4, 7, 5, 5) and rollout.actions.shape == (4, 6)
    assert rollout.states.shape == (4, 7, dataset.arrays["states"].shape[1])
    assert len(seen_states) == 6 and torch.equal(seen_states[0], rollout.states[:, 0])
    assert (rollout.rewards[~rollout.alive] == 0).all()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _tiny_cfg(tmp_path: Path, name: str, *overrides: str):
    from common.config import load_config
    from scripts.config import Config

    return load_config(Config, ["--preset", "tiny", f"run.root={tmp_path}", f"run.name={name}", *overrides])


# On the held-out quarter of these episodes, copying the current frame is exact for 0.52 of the
# transitions; the tiny preset measured 0.725 (seed 0, 1 thread): the floor asks for dynamics
# clearly learned beyond copying, with margin.
TINY_ONE_STEP_FLOOR = 0.65


def test_tiny_preset_training_learns_the_dynamics(tiny_dataset, tmp_path):
    from worldmodel.train_dynamics import evaluate_one_step, train

    dataset, tokenizer, _ = tiny_dataset
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two oversubscribed ones
    cfg = _tiny_cfg(tmp_path, "learn", "data.val_fraction=0.25")
    train(cfg, None, dataset=dataset, tokenizer=tokenizer, log=lambda *_: None)
    model, checkpoint = load_dynamics(tmp_path / "learn" / "dynamics.pt")
    _, val_set = dataset.split(0.25, seed=cfg.run.seed)
    metrics = evaluate_one_step(model, val_set)  # every held-out transition
    copy = np.mean([np.array_equal(a, b) for a, b, act in zip(
                    val_set.extras["tokens"][:-1], val_set.extras["tokens"][1:], val_set.arrays["actions"][:-1]) if act >= 0])
    assert copy < 0.55  # the baseline the floor is set against
    assert metrics["frame_exact_1step"] >= TINY_ONE_STEP_FLOOR, metrics
    assert checkpoint["tokenizer_identity"] == tokenizer.identity
    with pytest.raises(DynamicsCheckpointError, match="trained on tokenizer"):
        load_dynamics(tmp_path / "learn" / "dynamics.pt", tokenizer_identity="another-tokenizer")


def test_resume_repeats_the_uninterrupted_run(tiny_dataset, tmp_path):
    from worldmodel.train_dynamics import RESUME_NAME, train

    dataset, tokenizer, _ = tiny_dataset
    torch.set_num_threads(1)
    common = ["dynamics.steps=6", "dynamics.checkpoint_every=3", "dynamics.log_every=1", "dynamics.eval_every=0",
              "dynamics.video_length=2", "dynamics.eval_windows=4"]
    train(_tiny_cfg(tmp_path, "straight", *common), None, dataset=dataset, tokenizer=tokenizer, log=lambda *_: None)

    class Stop(Exception):
        pass

    def stop_after_checkpoint(message: str) -> None:
        if "step 4/" in message:
            raise Stop

    with pytest.raises(Stop):
        train(_tiny_cfg(tmp_path, "killed", *common), None, dataset=dataset, tokenizer=tokenizer, log=stop_after_checkpoint)
    assert (tmp_path / "killed" / RESUME_NAME).is_file()
    train(_tiny_cfg(tmp_path, "killed", *common), None, dataset=dataset, tokenizer=tokenizer, log=lambda *_: None)
    assert not (tmp_path / "killed" / RESUME_NAME).is_file()
    straight, _ = load_dynamics(tmp_path / "straight" / "dynamics.pt")
    resumed, _ = load_dynamics(tmp_path / "killed" / "dynamics.pt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def _write_tokenizer(run: Path, dataset_frames: np.ndarray) -> None:
    """A tokenizer checkpoint in the run folder (untrained: this test is about plumbing)."""
    from common.atomic import atomic_torch_save
    from worldmodel.tokenizer import Tokenizer, tokenizer_checkpoint
    from worldmodel.train_tokenizer import TokenizerStageConfig, model_config

    torch.manual_seed(0)
    atomic_torch_save(run / "tokenizer.pt", tokenizer_checkpoint(Tokenizer(model_config(TokenizerStageConfig(), 8))))


def test_script_end_to_end_then_load_world_model(tiny_dataset, tmp_path):
    from worldmodel.imagine import load_world_model

    dataset, _, folder = tiny_dataset
    run = tmp_path / "e2e"
    run.mkdir()
    _write_tokenizer(run, dataset.arrays["frames"])
    args = ["--preset", "tiny", f"run.root={tmp_path}", "run.name=e2e", f"data.path={folder}", "dynamics.steps=4",
            "dynamics.video_length=3"]
    from scripts.train_dynamics import main

    metrics = main(args)
    assert (run / "dynamics.pt").is_file() and (run / "media" / "dynamics_open_loop.gif").is_file()
    assert "frame_exact_1step" in metrics and any((run / "tb" / "dynamics").iterdir())
    wm = load_world_model(run)
    tokens = wm.reset(wm.encode(dataset.arrays["frames"][:2]))
    assert wm.step(np.array([0, 2])).tokens.shape == tokens.shape


def test_ddp_two_processes_end_with_identical_parameters(tiny_dataset, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): both ranks train, then dump their own weights."""
    dataset, _, folder = tiny_dataset
    run = tmp_path / "ddp"
    run.mkdir()
    _write_tokenizer(run, dataset.arrays["frames"])
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        torch.set_num_threads(1)
        import worldmodel.train_dynamics as td
        captured = {{}}
        original = td.DynamicsModel
        class Capturing(original):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                captured["model"] = self
        td.DynamicsModel = Capturing
        from scripts.train_dynamics import main
        main(sys.argv[1:])
        rank = int(os.environ["RANK"])
        torch.save(captured["model"].state_dict(), {str(tmp_path)!r} + f"/rank{{rank}}.pt")
    """))
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(worker),
               "--preset", "tiny", f"run.root={tmp_path}", "run.name=ddp", f"data.path={folder}", "dynamics.steps=5",
               "dynamics.eval_every=0", "dynamics.video_length=2", "dynamics.batch_size=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    initial = DynamicsModel(load_dynamics(run / "dynamics.pt")[0].config).state_dict()
    moved = False
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
        moved = moved or not torch.equal(value, initial[name])
    assert moved  # they trained (from the same start), not just stayed equal at initialisation
    assert (run / "dynamics.pt").is_file()


def test_situation_weights_draw_every_situation_as_often(tiny_dataset):
    """Each situation (action, object under the agent, object and state in front, object carried),
    read here through the symbolic state, gets the same share of the rare windows."""
    from minigrid.core.constants import DIR_TO_VEC

    from worldmodel.train_dynamics import situation_weights, state_codec_for

    dataset, _, _ = tiny_dataset
    codec = state_codec_for(dataset)
    steps, p = situation_weights(dataset, codec)
    assert len(steps) == int((dataset.arrays["actions"] >= 0).sum()) and p.sum() == pytest.approx(1.0)
    share: dict[tuple, float] = {}
    for t, weight in zip(steps, p):
        state = codec.decode(dataset.arrays["states"][t])
        (x, y), (dx, dy) = state.agent_pos, DIR_TO_VEC[state.agent_dir]
        front = state.grid[min(max(x + dx, 0), codec.width - 1), min(max(y + dy, 0), codec.height - 1)]
        key = (int(dataset.arrays["actions"][t]), int(state.grid[x, y, 0]), int(front[0]), int(front[2]),
               int(state.carrying[0]))
        share[key] = share.get(key, 0.0) + float(weight)
    assert len(share) > 5
    assert np.allclose(list(share.values()), 1 / len(share))
