"""The egocentric view's token map (memory="map"): geometry against MiniGrid, causality, cache,
object permanence on a hand-built episode, the determined-cell metrics, a tiny run through the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from minigrid.core.grid import Grid

from envs.make import make_env
from worldmodel import memory as token_map
from worldmodel.dynamics import DynamicsModel, DynamicsModelConfig
from worldmodel.metrics import determined, layouts_of, visibility

VIEW = 7
LEFT, RIGHT, FORWARD = 0, 1, 2


class TileIds:
    """One id per distinct 8x8 tile, learned on first sight: an exact one-token-per-tile tokenizer."""

    def __init__(self):
        self.table: dict[bytes, int] = {}

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        tiles = np.asarray(frames).reshape(-1, VIEW, 8, VIEW, 8, 3).transpose(0, 1, 3, 2, 4, 5)
        flat = tiles.reshape(-1, 8 * 8 * 3)
        ids = [self.table.setdefault(row.tobytes(), len(self.table)) for row in flat]
        return np.array(ids, dtype=np.int64).reshape(len(tiles), VIEW * VIEW)

    @property
    def hidden(self) -> int:
        tile = np.asarray(Grid.render_tile(None, highlight=False, tile_size=8)).astype(np.uint8)
        return self(np.tile(tile, (VIEW, VIEW, 1))[None])[0, 0]


def episode(env_id: str, seed: int, actions: list[int]):
    """Frames (T, 56, 56, 3), states (T, S) and the actions of a real egocentric episode."""
    env = make_env(env_id, obs="partial")
    frame, info = env.reset(seed=seed)
    frames, states = [frame], [info["state"]]
    for action in actions:
        frame, _, terminated, truncated, info = env.step(action)
        frames.append(frame)
        states.append(info["state"])
        assert not (terminated or truncated)
    return np.stack(frames), np.stack(states), np.asarray(actions), env


def map_model(vocab: int, hidden: int, seed: int = 0, **overrides) -> DynamicsModel:
    values = dict(vocab_size=vocab, grid_height=VIEW, grid_width=VIEW, state_width=5, state_height=5, num_actions=7,
                  dim=32, heads=4, block="attention", encoder_layers=0, decoder_layers=2, mlp_ratio=2, memory_dim=32,
                  summary_channels=4, state_hidden=32, action_dropout=0.0, memory="map", decoder_context="local",
                  presence=True, refine_fraction=0.3, change_weight=10.0, event_weight=5.0, hidden_token=hidden,
                  map_size=token_map.map_size_for(5, 5, VIEW), egocentric=True)
    values.update(overrides)
    torch.manual_seed(seed)
    return DynamicsModel(DynamicsModelConfig(**values)).eval()


def cached_rollout_matches_sequence_pass(model, tokens, actions):
    """Start on 3 frames, then step the cache frame by frame: every logit and state equals the
    teacher-forced sequence pass's. Returns the last cache."""
    with torch.no_grad():
        full = model(tokens, actions)
        cache, state = model.start(tokens[:, :3], actions[:, :2])
        torch.testing.assert_close(state, full.state_logits[:, 2])
        for t in range(2, tokens.shape[1] - 1):
            logits, _ = model.predict_logits(cache, actions[:, t])
            torch.testing.assert_close(logits, full.token_logits[:, t], atol=1e-5, rtol=1e-5)
            cache, state = model.observe(cache, tokens[:, t + 1], actions[:, t])
            torch.testing.assert_close(state, full.state_logits[:, t + 1], atol=1e-5, rtol=1e-5)
    return cache


def random_walk(seed: int, steps: int, moves=(LEFT, RIGHT, FORWARD)) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(a) for a in rng.choice(moves, size=steps)]


# ---------------------------------------------------------------------------------------------
# Geometry and metrics against MiniGrid itself
# ---------------------------------------------------------------------------------------------


def test_map_read_at_the_true_next_pose_is_the_next_view():
    """Written with real frames at the true poses, the map read at pose t+1 shows frame t+1 wherever it
    knows the cell and the cell is not hidden: the view geometry is MiniGrid's (turns and moves only,
    so nothing changes but the agent)."""
    ids = TileIds()
    checked = 0
    for seed in range(3):
        frames, states, actions, env = episode("MiniGrid-DoorKey-6x6-v0", seed, random_walk(seed, 30))
        tokens = torch.as_tensor(ids(frames))
        grid = 3 * env.codec.width * env.codec.height
        poses = token_map.relative_poses(torch.as_tensor(states[None, :, grid:grid + 2]).long(),
                                         torch.as_tensor(states[None, :, grid + 2]).long())[0]
        state = token_map.empty_map(1, token_map.map_size_for(6, 6, VIEW), unknown=-1)
        for t in range(len(frames) - 1):
            state = token_map.MapState(token_map.write_view(token_map.MapState(state.map, poses[t:t + 1]), tokens[t:t + 1],
                                                            ids.hidden, -1), poses[t:t + 1])
            read = token_map.read_view(token_map.MapState(state.map, poses[t + 1:t + 2]), VIEW)[0]
            following = tokens[t + 1]
            known = (read >= 0) & (following != ids.hidden)
            known[VIEW * VIEW - 1 - VIEW // 2] = False  # the agent's cell draws the agent
            assert torch.equal(read[known], following[known]), (seed, t)
            checked += int(known.sum())
            # the pose follows the actions: turns always, forward where the agent really moved
            moved = torch.tensor([not np.array_equal(states[t, grid:grid + 2], states[t + 1, grid:grid + 2])])
            assert torch.equal(token_map.next_pose(poses[t:t + 1], torch.tensor([actions[t]]), moved), poses[t + 1:t + 2])
    assert checked > 600  # about 10 known, visible cells per step


def test_visibility_and_determined_cells_follow_minigrid():
    ids = TileIds()
    frames, states, actions, env = episode("MiniGrid-DoorKey-6x6-v0", 4, random_walk(4, 24, (LEFT, RIGHT, FORWARD, 5)))
    truth = determined(states, actions, np.ones(len(states), bool), env.codec)
    hidden = ids(frames).reshape(-1, VIEW, VIEW) == ids.hidden
    assert np.array_equal(truth.visible, ~hidden)  # MiniGrid's occlusion, reproduced from the state
    assert not truth.cells[0].any() and truth.cells[1:].mean() > 0.8
    # With only the first frame read, what lies behind the agent is not determined after a turn around.
    frames, states, actions, env = episode("MiniGrid-DoorKey-6x6-v0", 4, [LEFT, LEFT])
    first_only = determined(states, actions, np.array([True, False, False]), env.codec)
    assert first_only.cells[2].sum() < first_only.cells[1].sum() <= VIEW * VIEW
    assert np.array_equal(visibility(np.zeros((VIEW, VIEW), bool)), np.ones((VIEW, VIEW), bool))


def test_turning_back_brings_back_returning_cells_and_the_layout_fixes_the_pose():
    frames, states, actions, env = episode("MiniGrid-DoorKey-6x6-v0", 0, [LEFT, LEFT, RIGHT, RIGHT])
    layouts = layouts_of(np.stack([make_env("MiniGrid-DoorKey-6x6-v0", obs="partial").reset(seed=s)[1]["state"]
                                   for s in range(40)]), env.codec)
    truth = determined(states, actions, np.array([True, False, False, False, False]), env.codec, layouts)
    assert truth.returning[4].sum() > 0 and not truth.returning[1].any()
    assert truth.cells[4][truth.visible[0]].all()  # everything the first frame showed is determined again
    carried = slice(env.codec.grid_size + 3, None)
    assert truth.state_fields[0][carried].all()


@pytest.fixture(scope="module")
def placed_walks():
    """Real egocentric DoorKey-6x6 walks (turns, steps, pickups, toggles), their tokens and true poses,
    the env's layouts, and a map model carrying the placement tables made from them."""
    from worldmodel.metrics import structure_contents_of, tile_contents_of

    ids = TileIds()
    env_id = "MiniGrid-DoorKey-6x6-v0"
    walks = [episode(env_id, seed, random_walk(seed, 40, (LEFT, RIGHT, FORWARD, FORWARD, 3, 5))) for seed in range(6)]
    starts = np.stack([make_env(env_id, obs="partial").reset(seed=s)[1]["state"] for s in range(60)])
    codec = walks[0][3].codec
    layouts = layouts_of(starts, codec)
    tokens = [ids(frames) for frames, *_ in walks]
    vocab = len(ids.table) + 4
    tiles = tile_contents_of(np.concatenate(tokens).reshape(-1, VIEW, VIEW), np.concatenate([w[1] for w in walks]),
                             codec, vocab)
    structures = structure_contents_of(starts, codec)
    tables = dict(tile_contents=tiles.tolist(), layouts=layouts.reshape(len(layouts), -1).tolist(),
                  structure_contents=structures.tolist())
    model = map_model(vocab, ids.hidden, state_width=6, state_height=6, map_size=token_map.map_size_for(6, 6, VIEW),
                      **tables)
    poses = [token_map.relative_poses(torch.as_tensor(states[None, :, codec.grid_size:codec.grid_size + 2]).long(),
                                      torch.as_tensor(states[None, :, codec.grid_size + 2]).long())[0]
             for _, states, _, _ in walks]
    return model, walks, tokens, poses, layouts, codec, ids


def written(model, frame_tokens, poses, ids, with_placement=True):
    """The map state after each real frame of a walk, written at the true poses."""
    state = token_map.empty_map(1, model.config.map_size, model.unknown_token)
    placement = None
    out = []
    for t in range(len(frame_tokens)):
        maps = token_map.write_view(token_map.MapState(state.map, poses[t:t + 1]), torch.as_tensor(frame_tokens[t:t + 1]),
                                    ids.hidden, model.unknown_token)
        agreed = None
        if with_placement:
            placement, agreed = model.placed(maps, placement)
        state = token_map.MapState(maps, poses[t:t + 1], placement, agreed)
        out.append(state)
    return out


def test_the_map_placed_in_the_world_states_every_determined_field(placed_walks):
    """The walks written into the map at the true poses: the state head's placement
    (:meth:`DynamicsModel.place_state`) states every field that the frames so far determine, exactly,
    in every frame, whether the placement is found afresh or kept from before; the fields it leaves
    are the MLP's."""
    model, walks, tokens, poses, layouts, codec, ids = placed_walks
    assert model.placing
    placed = 0
    for (_frames, states, actions, _), frame_tokens, walk_poses in zip(walks, tokens, poses):
        truth = determined(states, actions, np.ones(len(states), bool), codec, layouts)
        for kept in (False, True):
            for t, state in enumerate(written(model, frame_tokens, walk_poses, ids, with_placement=kept)):
                mlp = torch.zeros(1, codec.size, model.state_max_classes)
                stated = model.place_state(mlp, state).argmax(-1)[0].numpy()
                fields = truth.state_fields[t].copy()
                fields[codec.grid_size + 3:] = False  # the carried object is the MLP's
                assert (stated[fields] == states[t][fields]).all(), (t, np.flatnonzero(stated[fields] != states[t][fields]))
                placed += int(fields.any())
    assert placed > 200  # most frames fix the placement


def test_cells_never_seen_get_the_layouts_hint_once_placed(placed_walks):
    """Once the map is placed, the prior view hints a never-seen cell's structure where every fitting
    layout agrees on it: where the next real frame shows such a cell, its tile has that structure
    (a wall where the hint says wall, the goal where it says goal). Before the placement, and on
    cells the map has seen, there is no hint."""
    model, walks, tokens, poses, _, _, ids = placed_walks
    hinted = 0
    for frame_tokens, walk_poses in zip(tokens, poses):
        states = written(model, frame_tokens, walk_poses, ids)
        for t in range(len(states) - 1):
            ahead = token_map.MapState(states[t].map, walk_poses[t + 1:t + 2], states[t].placement, states[t].agreed)
            prior, hint = model.prior_view(ahead, torch.as_tensor(frame_tokens[t:t + 1]))
            prior, hint = prior[0], hint[0]
            assert not (hint > 0)[prior != model.unknown_token].any()
            assert int(states[t].placement) >= 0 or not (hint > 0).any()
            following = torch.as_tensor(frame_tokens[t + 1])
            shown = (hint > 0) & (following != ids.hidden)
            assert torch.equal(model.tile_structure[following[shown]], hint[shown] - 1), t
            hinted += int(shown.sum())
    assert hinted > 10  # 17 with these walks


def test_placed_map_memory_cached_rollout_matches_the_sequence_pass(placed_walks):
    """With the placement tables (the prior's layout hints, the state head placed), the cached
    rollout still gives the sequence pass's logits and states, frame by frame. The walks turn, pick
    up and toggle without stepping, so the untrained front head's dead reckoning cannot lose the
    pose and the maps get placed."""
    model, _, _, _, _, _, ids = placed_walks
    walks = [episode("MiniGrid-DoorKey-6x6-v0", seed, random_walk(seed, 12, (LEFT, RIGHT, 3, 5, 6))) for seed in range(6)]
    frames = torch.as_tensor(np.stack([ids(w[0]) for w in walks])).view(6, -1, VIEW, VIEW)
    assert int(frames.max()) < model.config.vocab_size
    actions = torch.as_tensor(np.stack([np.append(w[2], 0) for w in walks]))
    cache = cached_rollout_matches_sequence_pass(model, frames, actions)
    assert (cache.placement >= 0).sum() >= 3


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walk():
    ids = TileIds()
    frames, states, actions, env = episode("MiniGrid-DoorKey-5x5-v0", 1, random_walk(1, 9))
    tokens = torch.as_tensor(ids(frames)).view(1, -1, VIEW, VIEW)
    return tokens, torch.as_tensor(np.append(actions, 0))[None], torch.as_tensor(states)[None].long(), ids


def test_map_memory_is_causal(walk):
    tokens, actions, _, ids = walk
    model = map_model(len(ids.table) + 4, ids.hidden)
    t = 4
    changed_tokens, changed_actions = tokens.clone(), actions.clone()
    changed_tokens[:, t + 1:] = torch.flip(changed_tokens[:, t + 1:], dims=(-1,))
    changed_actions[:, t:] = (actions[:, t:] + 1) % 3
    with torch.no_grad():
        a, b = model(tokens, actions), model(changed_tokens, changed_actions)
    torch.testing.assert_close(a.token_logits[:, :t], b.token_logits[:, :t])
    torch.testing.assert_close(a.reward_logit[:, :t], b.reward_logit[:, :t])
    torch.testing.assert_close(a.state_logits[:, :t + 1], b.state_logits[:, :t + 1])
    assert not torch.allclose(a.token_logits[:, t:], b.token_logits[:, t:])


def test_map_memory_cached_rollout_matches_the_sequence_pass(walk):
    tokens, actions, states, ids = walk
    model = map_model(len(ids.table) + 4, ids.hidden)
    cached_rollout_matches_sequence_pass(model, tokens, actions)
    # Teacher forcing with the true poses trains the same pass (the loss runs and has the pose part).
    model.train()
    from worldmodel.dynamics import DynamicsBatch

    batch = DynamicsBatch(tokens=tokens, actions=actions, rewards=torch.zeros(actions.shape),
                          terminated=torch.zeros(actions.shape, dtype=torch.bool), states=states,
                          mask=torch.ones(actions.shape, dtype=torch.bool))
    losses = model.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses.total) and "moved" in losses.parts


def test_turning_away_and_back_the_predicted_view_shows_what_was_there():
    """Hand-built episode: left, left, right, right. The decoder of a map model is made to copy the
    token it is given (its copy bonus far above anything it learned), the front head to say "forward
    moves" never matters (only turns). Its prediction of the last frame is then the first frame
    wherever the first frame showed a cell — read back from the map; a recurrent model copying its
    current frame instead shows the view of two turns before."""
    ids = TileIds()
    frames, _, actions, _ = episode("MiniGrid-DoorKey-5x5-v0", 3, [LEFT, LEFT, RIGHT, RIGHT])
    tokens = torch.as_tensor(ids(frames)).view(1, -1, VIEW, VIEW)
    vocab = len(ids.table) + 4
    model = map_model(vocab, ids.hidden)
    with torch.no_grad():
        model.copy_bias.fill_(1e3)
        cache, _ = model.start(tokens[:, :1], torch.zeros(1, 0, dtype=torch.long))
        for t in range(3):
            cache, _ = model.observe(cache, tokens[:, t + 1], torch.tensor([actions[t]]))
        predicted = model.predict(cache, torch.tensor([actions[3]])).tokens.reshape(-1)
        last, first = tokens[0, 4].reshape(-1), tokens[0, 0].reshape(-1)
        assert torch.equal(last, first)  # the real env: back to the first view
        shown = first != ids.hidden
        assert torch.equal(predicted[shown], first[shown])
        assert not torch.equal(tokens[0, 3].reshape(-1)[shown], first[shown])  # the current frame differs
        recurrent = map_model(vocab, ids.hidden, memory="recurrent", decoder_context="global", hidden_token=-1, map_size=0)
        recurrent.copy_bias.fill_(1e3)
        cache, _ = recurrent.start(tokens[:, :4], torch.as_tensor(actions[None, :3]))
        forgot = recurrent.predict(cache, torch.tensor([actions[3]])).tokens.reshape(-1)
        assert not torch.equal(forgot[shown], first[shown])


def test_map_config_is_checked():
    with pytest.raises(ValueError, match="hidden_token"):
        map_model(16, -1)
    with pytest.raises(ValueError, match="map_size"):
        map_model(16, 0, map_size=5)
    with pytest.raises(ValueError, match="decodes locally"):
        map_model(16, 0, decoder_context="global")


# ---------------------------------------------------------------------------------------------
# Through the stages
# ---------------------------------------------------------------------------------------------


def test_tiny_egocentric_run_through_the_stages(run_root):
    """collect -> tokenizer -> dynamics on the tiny preset with the egocentric view: ``auto`` picks
    the map, the checkpoint says so, and the world model imagines from it."""
    from scripts.collect import main as collect_main
    from scripts.train_dynamics import main as dynamics_main
    from scripts.train_tokenizer import main as tokenizer_main
    from worldmodel.imagine import load_world_model

    common = ["--preset", "tiny", f"run.root={run_root}", "run.name=ego", "env.obs=partial", "run.threads=1"]
    collect_main(common)
    tokenizer_main(common)
    metrics = dynamics_main([*common, "dynamics.steps=30", "dynamics.video_length=4"])
    assert "frame_exact_1step" in metrics
    world_model = load_world_model(run_root / "ego")
    assert world_model.config.memory == "map" and world_model.config.hidden_token >= 0 and world_model.dynamics.placing
    from envs.dataset import EpisodeDataset

    dataset = EpisodeDataset.load(run_root / "ego" / "dataset")
    tokens = world_model.reset(world_model.encode(dataset.arrays["frames"][:3][:, None]))
    step = world_model.step(np.array([LEFT, RIGHT, FORWARD]))
    assert step.tokens.shape == tokens.shape and step.state.shape[0] == 3
    world_model.reset_rows([1], world_model.encode(dataset.arrays["frames"][5:6][:, None]))
    assert world_model.step(np.array([LEFT, LEFT, LEFT])).tokens.shape == tokens.shape
