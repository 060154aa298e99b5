"""Inverse dynamics and planning to a goal frame: exact consistent sets from the env, the inverse
model on hand-built frame pairs, the planner reaching a goal frame in the real env through a
world model trained here, and clear refusals of goals it cannot use."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from envs.make import env_from_state, make_env
from envs.oracle import plan_to_state

EMPTY = "MiniGrid-Empty-5x5-v0"
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)


@pytest.fixture(scope="module")
def empty_run(tmp_path_factory):
    """A world model and an inverse model of Empty-5x5, trained from 800 random steps (~25 s)."""
    from scripts import collect, train_dynamics, train_inverse, train_tokenizer

    root = tmp_path_factory.mktemp("planner")
    args = ["--env", "empty-5x5", "--preset", "tiny", f"run.root={root}", "run.name=empty", "run.threads=1",
            "collect.num_steps=800", "collect.policy_mix=random:1", "dynamics.steps=250", "dynamics.dim=32",
            "dynamics.memory_dim=32", "dynamics.state_hidden=64", "inverse.steps=300", "inverse.batch_size=128"]
    for stage in (collect, train_tokenizer, train_dynamics, train_inverse):
        stage.main(args)
    return root / "empty"


def _state_after(env_id: str, actions: list[int], seed: int = 0):
    env = make_env(env_id)
    frame, info = env.reset(seed=seed)
    for action in actions:
        frame, _, _, _, info = env.step(action)
    return env, frame, info["state"]


def test_consistent_sets_are_exact_for_every_action():
    """From a DoorKey state facing the key, each action's outcome frame, compared with every action's."""
    from envs.oracle import Oracle, task_for_env
    from worldmodel.inverse import consistent_actions

    env = make_env("MiniGrid-DoorKey-5x5-v0")
    frame, info = env.reset(seed=3)
    oracle = Oracle(env.codec, task_for_env(env))
    while True:  # walk the oracle's plan until it is about to pick up the key
        action = oracle.action(info["state"])
        if action == PICKUP:
            break
        frame, _, _, _, info = env.step(action)
    state = info["state"]
    probe = make_env("MiniGrid-DoorKey-5x5-v0")
    probe.reset(seed=0)
    outcomes = {a: env_from_state("MiniGrid-DoorKey-5x5-v0", state, seed=3).step(a)[0] for a in range(7)}
    for action in range(7):
        sets = consistent_actions(probe, state[None], outcomes[action][None], np.array([action]), 7)[0]
        if action in (LEFT, RIGHT, PICKUP):  # each changes the frame its own way
            assert sets.tolist() == [a == action for a in range(7)], action
        else:  # facing the key: forward is blocked, nothing to drop or toggle, done does nothing
            assert set(np.flatnonzero(sets)) == {FORWARD, DROP, TOGGLE, DONE}, action


def test_inverse_model_names_each_moving_action_and_the_noop_set(empty_run):
    from worldmodel.inverse import load_inverse

    model, checkpoint = load_inverse(empty_run / "inverse.pt")
    assert checkpoint["metrics"]["accuracy_identifiable"] >= 0.99
    # Hand-built: the agent starts at (1, 1) facing east with a free cell ahead.
    env, frame, _ = _state_after(EMPTY, [])
    for action in (LEFT, RIGHT, FORWARD):
        after = env_from_state(EMPTY, env.codec.encode(env.symbolic_state())).step(action)[0]
        out = model.infer(frame[None], after[None])
        assert bool(out.identifiable[0]) and int(out.action[0]) == action
    # Facing the wall (turn left: north): forward, pickup, drop, toggle and done all leave the frame as it is.
    env, frame, _ = _state_after(EMPTY, [LEFT])
    out = model.infer(frame[None], frame[None])
    assert not bool(out.identifiable[0])
    assert set(np.flatnonzero(out.possible[0].numpy())) == {FORWARD, PICKUP, DROP, TOGGLE, DONE}


def test_planner_reaches_goal_frames_in_the_real_env(empty_run):
    from agents.planner import GoalPlanner, reach_goal
    from worldmodel.imagine import load_world_model

    planner = GoalPlanner(load_world_model(empty_run))
    goals = [[FORWARD, FORWARD, RIGHT], [RIGHT, FORWARD, FORWARD, LEFT], [LEFT, LEFT], [RIGHT, FORWARD, LEFT, FORWARD]]
    for walk in goals:
        start_env, start_frame, start_state = _state_after(EMPTY, [])
        _, goal_frame, goal_state = _state_after(EMPTY, walk)
        shortest = plan_to_state(start_env.codec.decode(start_state), start_env.codec.decode(goal_state))
        episode = reach_goal(start_env, planner, goal_frame, start_frame, max_steps=20)
        assert episode.success and episode.steps == len(shortest), (walk, episode)
        assert np.array_equal(start_env.render(), goal_frame)


def test_goal_frames_it_cannot_use_fail_clearly(empty_run):
    from agents.planner import GoalPlanner
    from worldmodel.imagine import load_world_model

    planner = GoalPlanner(load_world_model(empty_run))
    _, frame, _ = _state_after(EMPTY, [])
    with pytest.raises(ValueError, match="shape"):
        planner.goal_tokens(np.zeros((48, 48, 3), np.uint8), frame)
    _, other, _ = _state_after("MiniGrid-DoorKey-5x5-v0", [])  # the same 40x40 pixels, other tiles
    with pytest.raises(ValueError, match="another env"):
        planner.goal_tokens(other, frame)
    with pytest.raises(ValueError, match="Markov"):
        GoalPlanner(SimpleNamespace(config=SimpleNamespace(memory="map")))
    from worldmodel.inverse import load_inverse

    inverse, _ = load_inverse(empty_run / "inverse.pt")
    with pytest.raises(ValueError, match="another env"):
        inverse.infer(np.zeros((1, 48, 48, 3), np.uint8), np.zeros((1, 48, 48, 3), np.uint8))


def test_plan_to_state_is_the_shortest_path():
    env, _, start = _state_after("MiniGrid-DoorKey-5x5-v0", [], seed=1)
    walk = [LEFT, FORWARD, RIGHT, FORWARD]
    _, _, goal = _state_after("MiniGrid-DoorKey-5x5-v0", walk, seed=1)
    path = plan_to_state(env.codec.decode(start), env.codec.decode(goal))
    assert path is not None and len(path) <= len(walk)
    real = env_from_state("MiniGrid-DoorKey-5x5-v0", start)
    for action in path:
        real.step(action)
    assert np.array_equal(real.unwrapped.agent_pos, env_from_state("MiniGrid-DoorKey-5x5-v0", goal).unwrapped.agent_pos)
    assert torch.equal(torch.as_tensor(real.render()), torch.as_tensor(env_from_state("MiniGrid-DoorKey-5x5-v0", goal).render()))


def test_few_label_fine_tune_runs_end_to_end(empty_run, tmp_path):
    """Action-free pretraining, an inverse model on half the episodes, then a fine-tune whose other
    half is labelled by it; a start model of another shape is refused by name."""
    import shutil

    from common.config import cli_config
    from envs.dataset import EpisodeDataset
    from scripts import train_dynamics, train_inverse
    from scripts.config import Config
    from worldmodel.dynamics import load_dynamics
    from worldmodel.train_dynamics import apply_labels

    run = tmp_path / "few"
    run.mkdir()
    shutil.copy(empty_run / "tokenizer.pt", run / "tokenizer.pt")
    base = ["--env", "empty-5x5", "--preset", "tiny", f"run.root={tmp_path}", "run.name=few", "run.threads=1",
            f"data.path={empty_run / 'dataset'}", "dynamics.steps=20", "dynamics.dim=32", "dynamics.memory_dim=32",
            "dynamics.state_hidden=64", "inverse.steps=30", "inverse.batch_size=64"]
    train_dynamics.main([*base, "data.labelled_fraction=0"])  # action-free pretraining
    shutil.move(run / "dynamics.pt", tmp_path / "pretrained.pt")
    train_inverse.main([*base, "data.labelled_fraction=0.5"])
    tuned = [*base, "data.labelled_fraction=0.5", "dynamics.unlabelled=inverse", f"dynamics.init={tmp_path / 'pretrained.pt'}"]
    metrics = train_dynamics.main(tuned)
    assert 0 <= metrics["frame_exact_1step"] <= 1
    model, checkpoint = load_dynamics(run / "dynamics.pt")
    assert checkpoint["config"]["dynamics"]["unlabelled"] == "inverse"
    pretrained, _ = load_dynamics(tmp_path / "pretrained.pt")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), pretrained.state_dict().values()))

    cfg = cli_config(Config, [*base, "data.labelled_fraction=0.5", "dynamics.unlabelled=hidden"])
    dataset = EpisodeDataset.load(empty_run / "dataset")
    labelled = dataset.labelled_episodes(0.5, 0)
    hidden = apply_labels(cfg, dataset, run, "cpu")  # unlabelled=hidden: their actions become -1
    steps = dataset.arrays["actions"] >= 0
    assert np.array_equal(hidden.arrays["actions"] < 0, ~steps | ~labelled[dataset.frame_episodes()])
    with pytest.raises(SystemExit) as failure:
        train_dynamics.main([*tuned, "dynamics.dim=16", "run.name=few2"])
    assert failure.value.code != 0
