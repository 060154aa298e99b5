"""Rule probes (worldmodel/probes.py): each probe's construction is checked against the real env,
its judge passes the real answer and fails a wrong one, and a world model runs on them."""

from __future__ import annotations

import numpy as np
import torch

from envs.make import env_from_state
from envs.oracle import BALL, LEFT, plan_to_pose
from envs.state import DOOR, DOOR_LOCKED, DOOR_OPEN, EMPTY, GOAL, KEY, LAVA, WALL, StateCodec
from worldmodel import probes as P

DOORKEY = "MiniGrid-DoorKey-5x5-v0"
SEEDS = range(5000, 5040)
INSTANCES = 3


def _build(env_id: str, view: str, rule: str) -> list[P.Probe]:
    built = P.build_probes(env_id, view, rule, SEEDS, instances=INSTANCES)
    assert len(built) == INSTANCES, (env_id, view, rule)
    return built


def _states(probe: P.Probe):
    codec = StateCodec.for_array_size(len(probe.state))
    return codec.decode(probe.state), codec.decode(probe.next_state)


def _front(state) -> tuple[int, int]:
    dx, dy = ((1, 0), (0, 1), (-1, 0), (0, -1))[state.agent_dir]
    return state.agent_pos[0] + dx, state.agent_pos[1] + dy


def _turned_frame(probe: P.Probe) -> np.ndarray:
    """The frame the real env shows if the agent turns left instead: wrong wherever nothing may change."""
    env = env_from_state(probe.env_id, probe.state, obs=probe.view, seed=probe.seed)
    frame, *_ = env.step(LEFT)
    return frame


def _assert_judges(probe: P.Probe, wrong_frame: np.ndarray | None) -> None:
    real = P.real_prediction(probe)
    assert P.judge(probe, real).obeys, probe.rule
    if wrong_frame is not None:
        verdict = P.judge(probe, P.real_prediction(probe, wrong_frame))
        assert not verdict.frame and not verdict.obeys, probe.rule
    flipped = P.Prediction(real.cells, real.reward, not real.terminated, real.carrying)
    assert not P.judge(probe, flipped).obeys, probe.rule


def test_rules_follow_what_each_env_holds():
    assert P.rules_for(DOORKEY, "full") == ["wall_forward", "turn", "locked_door_without_key", "locked_door_with_key",
                                            "key_pickup", "key_drop", "open_door_walk", "goal"]
    assert P.rules_for(DOORKEY, "partial")[-1] == "permanence"
    assert set(P.rules_for("MiniGrid-LavaGapS7-v0", "full")) == {"wall_forward", "turn", "lava", "goal"}
    assert set(P.rules_for("MiniGrid-Dynamic-Obstacles-6x6-v0", "partial")) == {"wall_forward", "turn", "goal",
                                                                                 "obstacle_contact"}
    assert P.held_out_seeds({"seeds": {"first": 0, "last": 99}}, 5) == range(100, 105)


def test_plan_to_pose_reaches_the_pose_without_touching_anything():
    walk = P._Walk(DOORKEY, "full", 5000, 8)
    start = walk.state
    assert plan_to_pose(start, {(*start.agent_pos, start.agent_dir)}) == []
    target = (*start.agent_pos, (start.agent_dir + 2) % 4)
    plan = plan_to_pose(start, {target})
    assert plan is not None and len(plan) == 2  # two turns
    walled = {(x, y, d) for x in range(5) for y in range(5) for d in range(4) if start.grid[x, y, 0] == WALL}
    assert plan_to_pose(start, walled) is None  # nobody stands in a wall


def test_unchanging_rules_real_answer_obeys_a_moved_agent_breaks():
    for probe in _build(DOORKEY, "full", "wall_forward"):
        state, nxt = _states(probe)
        assert state.grid[_front(state)][0] == WALL and np.array_equal(probe.state, probe.next_state)
        assert np.array_equal(probe.frames[-1], probe.next_frame) and not probe.terminated
        _assert_judges(probe, _turned_frame(probe))
    for probe in _build(DOORKEY, "full", "locked_door_without_key"):
        state, nxt = _states(probe)
        assert tuple(state.grid[_front(state)][[0, 2]]) == (DOOR, DOOR_LOCKED) == tuple(nxt.grid[_front(state)][[0, 2]])
        assert state.carrying[0] == EMPTY
        _assert_judges(probe, _turned_frame(probe))


def test_changing_rules_real_answer_obeys_the_unchanged_frame_breaks():
    for probe in _build(DOORKEY, "full", "turn"):
        state, nxt = _states(probe)
        assert (nxt.agent_dir - state.agent_dir) % 4 in (1, 3) and nxt.agent_pos == state.agent_pos
        assert np.array_equal(state.grid, nxt.grid)
        _assert_judges(probe, probe.frames[-1])
    for probe in _build(DOORKEY, "full", "locked_door_with_key"):
        state, nxt = _states(probe)
        front = _front(state)
        assert state.carrying[0] == KEY and state.grid[front][2] == DOOR_LOCKED and nxt.grid[front][2] == DOOR_OPEN
        _assert_judges(probe, probe.frames[-1])
    for probe in _build(DOORKEY, "full", "open_door_walk"):
        state, nxt = _states(probe)
        assert tuple(state.grid[_front(state)][[0, 2]]) == (DOOR, DOOR_OPEN) and nxt.agent_pos == _front(state)
        _assert_judges(probe, probe.frames[-1])


def test_key_rules_check_the_floor_and_the_hands():
    for rule in ("key_pickup", "key_drop"):
        for probe in _build(DOORKEY, "full", rule):
            state, nxt = _states(probe)
            front = _front(state)
            if rule == "key_pickup":
                assert state.grid[front][0] == KEY and nxt.grid[front][0] == EMPTY and nxt.carrying[0] == KEY
            else:
                assert state.grid[front][0] == EMPTY and nxt.grid[front][0] == KEY and nxt.carrying[0] == EMPTY
            _assert_judges(probe, probe.frames[-1])
            real = P.real_prediction(probe)
            empty_handed = P.Prediction(real.cells, real.reward, real.terminated, P.carried(probe.state))
            assert P.judge(probe, empty_handed).carrying is False  # still holding (or not) what it held


def test_episode_ending_rules_check_reward_and_termination():
    cases = [(DOORKEY, "goal", GOAL, 1, 0.0), ("MiniGrid-LavaGapS7-v0", "lava", LAVA, 0, 0.8),
             ("MiniGrid-Dynamic-Obstacles-6x6-v0", "obstacle_contact", BALL, -1, 0.0),
             ("MiniGrid-Dynamic-Obstacles-6x6-v0", "wall_forward", WALL, -1, 0.0)]
    for env_id, rule, kind, sign, wrong_reward in cases:
        for probe in _build(env_id, "full", rule):
            state, _ = _states(probe)
            assert state.grid[_front(state)][0] == kind and probe.terminated and np.sign(probe.reward) == sign
            _assert_judges(probe, None)
            real = P.real_prediction(probe)
            assert not P.judge(probe, P.Prediction(real.cells, wrong_reward, True, real.carrying)).outcome
            if "Dynamic" in env_id:  # the balls' next cells are not judged, the agent's are
                assert not probe.judged.all() and probe.judged[state.agent_pos[1], state.agent_pos[0]]


def test_egocentric_permanence_turns_away_and_back():
    for probe in _build(DOORKEY, "partial", "permanence"):
        assert np.array_equal(probe.next_frame, probe.frames[-4])  # the first view, back again
        assert len(set(probe.actions[-3:].tolist()) | {probe.action}) == 1  # four turns the same way
        assert probe.judged.sum() >= 2 and not np.array_equal(probe.frames[-1], probe.next_frame)
        _assert_judges(probe, probe.frames[-1])
    for probe in _build(DOORKEY, "partial", "turn"):  # egocentric: only tiles seen before are judged
        assert 0 < probe.judged.sum() < probe.judged.size


class _CopyModel:
    """A world model that predicts nothing happens: the current frame, no reward, no end, empty hands."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, frames):
        return self.tokenizer.encode(frames)

    def decode(self, tokens):
        return self.tokenizer.decode(tokens)

    def reset(self, tokens, actions):
        self._last = torch.as_tensor(tokens)[:, -1]

    def step(self, actions):
        b = len(actions)
        state = torch.zeros(b, 5 * 5 * 3 + 6, dtype=torch.long)
        state[:, -3] = EMPTY

        class Step:
            tokens, reward, terminated = self._last, torch.zeros(b), torch.zeros(b, dtype=torch.bool)
        Step.state = state
        return Step


def test_evaluate_counts_a_model_that_predicts_no_change():
    from tests.test_dynamics import TileTokenizer

    model = _CopyModel(TileTokenizer())
    unchanged = P.evaluate(model, _build(DOORKEY, "full", "wall_forward"))
    assert unchanged["rate"] == 1.0 and unchanged["instances"] == INSTANCES and unchanged["tokenizer_exact"] == 1.0
    assert unchanged["no_change_baseline"] == 1.0
    for rule in ("turn", "key_pickup", "goal"):
        figures = P.evaluate(model, _build(DOORKEY, "full", rule))
        assert figures["rate"] == 0.0 and figures["frame"] == 0.0 and figures["no_change_baseline"] == 0.0, (rule, figures)
    assert P.evaluate(model, []) == {"rate": None, "instances": 0}


def test_probes_run_on_a_tiny_preset_world_model(tmp_path):
    from common.config import load_config
    from common.runs import RunDir
    from scripts import collect, train_dynamics, train_tokenizer
    from scripts.config import Config
    from worldmodel.imagine import load_world_model

    torch.set_num_threads(1)
    cfg = load_config(Config, ["--preset", "tiny", f"run.root={tmp_path}", "run.name=rules", "tokenizer.steps=20",
                               "dynamics.steps=20", "run.threads=1", "collect.num_envs=1",
                               "collect.num_episodes=4", "collect.policy_mix=epsilon_oracle@0.2:1"])
    for stage in (collect, train_tokenizer, train_dynamics):
        run_dir = RunDir(cfg, "test", []).lock()
        try:
            stage.run(cfg, run_dir)
        finally:
            run_dir.unlock()
    world_model = load_world_model(tmp_path / "rules")
    card_seeds = P.held_out_seeds({"seeds": {"first": 0, "last": cfg.collect.num_episodes - 1}}, 40)
    for rule in ("wall_forward", "key_pickup"):
        built = P.build_probes(DOORKEY, "full", rule, card_seeds, instances=INSTANCES)
        figures = P.evaluate(world_model, built)
        assert figures["instances"] == INSTANCES
        for key in ("rate", "frame", "outcome", "carrying", "tokenizer_exact"):
            assert 0.0 <= figures[key] <= 1.0, (rule, key, figures)
        assert figures["rate"] <= min(figures["frame"], figures["outcome"], figures["carrying"])


def test_a_second_code_for_a_known_tile_is_made_canonical():
    from types import SimpleNamespace

    from tests.test_dynamics import TileTokenizer

    probes = _build(DOORKEY, "full", "key_pickup")
    tokenizer = TileTokenizer()
    tokens = tokenizer.encode(np.concatenate([p.frames for p in probes])).numpy()
    seen = sorted(np.unique(tokens).tolist())
    key_token = int(tokens[-1][_front(_states(probes[-1])[0])[::-1]])  # the key's tile, in front of the agent
    tokenizer.tiles.append(tokenizer.tiles[key_token])  # one more code decoding to the very same tile
    duplicate = len(tokenizer.tiles) - 1

    class TwoCodes(_CopyModel):
        def encode(self, frames):
            ids = self.tokenizer.encode(frames)
            return torch.where(ids == key_token, duplicate, ids)

    model = TwoCodes(tokenizer)
    model.dynamics = SimpleNamespace(output_tokens=torch.tensor(seen))
    histories, references, remapped = P.tokenize(model, probes)
    assert remapped == 1.0 and all(key_token in h for h in histories) and duplicate not in np.concatenate(histories)
    model.dynamics = SimpleNamespace(output_tokens=torch.tensor(seen + [duplicate]))  # a code the model knows stays
    histories, _, remapped = P.tokenize(model, probes)
    assert remapped == 0.0 and all(duplicate in h for h in histories)
