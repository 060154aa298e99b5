"""Run folders, the logger, atomic writes and seeding."""

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
from omegaconf import OmegaConf

from common.atomic import atomic_savez, atomic_write_bytes
from common.config import load_config
from common.runs import Logger, RunDir, write_gif, write_png
from common.seeding import derive_seed, seed_everything
from scripts.config import Config


def test_run_dir_describes_itself_and_logger_writes(run_root):
    cfg = load_config(Config, [f"run.root={run_root}", "run.name=r"])
    run = RunDir(cfg, "unit", argv=["prog", "a=1"])
    assert not (run / "config.yaml").exists()  # recorded only once a stage completes
    assert "[unit] prog a=1" in (run / "commands.log").read_text()
    run.record_config(cfg, ["collect"])
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.run.name == "r" and saved.collect.num_episodes == cfg.collect.num_episodes and "dreamer" not in saved
    assert "torch" in json.loads((run / "versions.json").read_text())
    logger = Logger(run, cfg, "unit")
    logger.scalars(0, {"loss": 1.0, "accuracy": 0.5})
    logger.scalars(1, {"loss": 0.5})
    path = logger.image(1, "picture", np.zeros((8, 8, 3), np.uint8))
    clip = np.stack([np.full((8, 8, 3), 60 * t, np.uint8) for t in range(3)])  # distinct frames
    gif = logger.video(1, "clip", clip, scale=2)
    logger.close()
    assert iio.imread(gif).shape == (3, 16, 16, 3)
    events = list((run.path / "tb" / "unit").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert iio.imread(path).shape == (8, 8, 3)
    run.update_metrics("a", {"x": 1})
    run.update_metrics("b", {"y": 2})
    assert json.loads((run / "metrics.json").read_text()) == {"a": {"x": 1}, "b": {"y": 2}}


def test_gif_and_png(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 6, 7, 3), dtype=np.uint8)
    gif = iio.imread(write_gif(tmp_path / "v.gif", frames, scale=2))
    assert gif.shape[0] == 5 and gif.shape[1:3] == (12, 14)
    assert np.array_equal(iio.imread(write_png(tmp_path / "p.png", frames[0])), frames[0])


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "artifact.bin"
    atomic_write_bytes(target, b"old")

    class Exploding:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_savez(tmp_path / "artifact.npz", a=np.zeros(3), b=Exploding())
    assert not (tmp_path / "artifact.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]  # no temporary left behind
    assert target.read_bytes() == b"old"


def test_npz_bytes_are_reproducible(tmp_path):
    atomic_savez(tmp_path / "a.npz", x=np.arange(10))
    os.utime(tmp_path / "a.npz", (0, 0))
    atomic_savez(tmp_path / "b.npz", x=np.arange(10))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as data:
        assert np.array_equal(data["x"], np.arange(10))


def test_seeding():
    import torch

    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(1, 3)
