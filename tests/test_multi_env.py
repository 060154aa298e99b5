"""One full-view world model for grids of any size, and one model trained on several envs' data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.state import StateCodec
from worldmodel.dynamics import DynamicsModel, count_parameters
from worldmodel.train_dynamics import DynamicsConfig, model_config


def _model(height: int, width: int, static: list[int] | None = None, egocentric: bool = False,
           seed: int = 0) -> DynamicsModel:
    torch.manual_seed(seed)
    codec = StateCodec(5, 5) if egocentric else StateCodec(width, height)
    return DynamicsModel(model_config(DynamicsConfig(dim=16, memory_dim=32, state_hidden=32), 40, (height, width),
                                      codec, 7, list(range(24)), static or [], hidden_token=3 if egocentric else -1,
                                      egocentric=egocentric)).eval()


def test_full_view_model_has_no_grid_sized_parameter_and_runs_on_any_grid():
    small = _model(5, 5, static=[0, 1, 2])
    counts = {count_parameters(_model(h, w)) for h, w in ((5, 5), (6, 6), (16, 16), (19, 19), (3, 7))}
    assert counts == {count_parameters(small)}
    # On another grid (non-square too), the same weights give what a model built for that grid gives.
    tokens, actions = torch.randint(0, 24, (2, 3, 3, 7)), torch.randint(0, 7, (2, 3))
    built = _model(3, 7, seed=1)
    built.load_state_dict(small.state_dict())
    view = small.on_grid(3, 7)
    mine, theirs = view(tokens, actions), built(tokens, actions)
    assert torch.equal(mine.token_logits, theirs.token_logits)
    assert torch.equal(mine.state_logits, theirs.state_logits)
    assert mine.state_logits.shape[-2] == StateCodec(7, 3).size
    # The view shares the parameters and leaves the trained model as it was (its grid, its static cells).
    assert view.token_head.weight is small.token_head.weight
    assert small.grid == (5, 5) and small.dynamic_cells is not None and view.dynamic_cells is None
    assert small.on_grid(5, 5) is small
    with pytest.raises(ValueError, match="only a full-view dynamics model"):
        _model(7, 7, egocentric=True).on_grid(9, 9)


def test_a_seven_by_seven_egocentric_view_is_not_taken_for_a_full_view():
    """LavaGapS7's world is 7x7, the size of the egocentric view: the view is told, not inferred."""
    model = _model(7, 7, egocentric=True)
    assert model.config.memory == "map" and not model.config.full_view and model.position is not None


def _stage(module, args: list[str]) -> dict:
    return module.main(args)


def test_one_model_trains_on_two_envs_and_imagines_on_a_third_grid(tmp_path):
    """data.mix: one tokenizer and one dynamics model from DoorKey-5x5 and -6x6 data; evaluated per
    env; the world model then imagines from a DoorKey-8x8 frame, a grid it never saw."""
    from envs.make import make_env
    from scripts import collect, train_dynamics, train_tokenizer
    from worldmodel.imagine import load_world_model

    torch.set_num_threads(1)
    folders = []
    for env in ("doorkey-5x5", "doorkey-6x6"):
        _stage(collect, ["--preset", "tiny", "--env", env, f"run.root={tmp_path}", f"run.name={env}"])
        folders.append(str(tmp_path / env / "dataset"))
    mix = ["--preset", "tiny", f"run.root={tmp_path}", "run.name=mix", f"data.mix=[{','.join(folders)}]",
           "dynamics.steps=40", "dynamics.video_length=3"]
    _stage(train_tokenizer, mix)
    metrics = _stage(train_dynamics, mix)
    per_env = metrics["envs"]
    assert set(per_env) == {"MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0"}
    for values in per_env.values():
        assert 0 <= values["frame_exact_1step"] <= 1 and values["transitions"] > 0
    assert metrics["frame_exact_1step"] == pytest.approx(np.mean([v["frame_exact_1step"] for v in per_env.values()]))
    assert (tmp_path / "mix" / "media" / "dynamics_open_loop_MiniGrid-DoorKey-6x6-v0.gif").is_file()

    world_model = load_world_model(tmp_path / "mix")
    frame, _ = make_env("MiniGrid-DoorKey-8x8-v0").reset(seed=0)
    tokens = world_model.reset(world_model.encode(frame[None]))
    step = world_model.step(np.array([2]))
    assert tokens.shape == step.tokens.shape == (1, 8, 8)
    assert world_model.state.shape == (1, StateCodec(8, 8).size)
