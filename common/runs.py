"""Run folders that describe themselves, and the one logging helper.

``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``commands.log`` (every command line
that touched the run), ``versions.json`` (package versions), ``tb/`` (TensorBoard events),
``metrics.json``, ``report.md``, ``media/`` and one artifact per stage. Scalars go to TensorBoard
always and to wandb when ``run.wandb`` is set (offline by default: no account needed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

TRACKED_PACKAGES = (
    "torch", "gymnasium", "minigrid", "numpy", "omegaconf", "tensorboard", "wandb", "imageio",
    "matplotlib",
)


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the results depend on."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_path(cfg: DictConfig) -> Path:
    """The run folder ``<run.root>/<run.name>`` of a config (not created)."""
    return Path(cfg.run.root) / cfg.run.name


class RunDir:
    """A run folder ``<run.root>/<run.name>/``; opening one for a stage logs the command line.

    ``config.yaml`` and ``versions.json`` describe what the folder holds: a stage records the config
    sections it read once its artifact is complete (:meth:`record_config`), so a stage that failed
    (a bad value, a diverged loss) leaves no trace in them and the same command without the bad
    value runs. Writers take the folder's lock (:meth:`lock`); readers need none.
    """

    def __init__(self, cfg: DictConfig, stage: str, argv: Iterable[str] | None = None):
        from common.atomic import ArtifactError

        self.path = run_path(cfg)
        self.stage = stage
        self.stage_identity = ""  # set by common.stage.run_stage for the stage running now
        self._lock = None
        argv = sys.argv if argv is None else list(argv)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / "commands.log", "a", encoding="utf-8") as log:
                log.write(f"{stamp} [{stage}] {shlex.join(argv)}\n")
        except OSError as error:
            raise ArtifactError(f"cannot write the run folder {self.path}: {error.strerror or error} "
                                "(check run.root and free space)") from None

    def lock(self) -> "RunDir":
        """Take the run folder's writer lock (a second writer fails at once, naming this process)."""
        from common.stage import RunLock

        self._lock = RunLock(self.path).acquire()
        return self

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def record_config(self, cfg: DictConfig, sections: Iterable[str]) -> None:
        """Write ``config.yaml`` with ``sections`` taken from ``cfg`` (the rest as saved), and
        ``versions.json``: the config that made the artifacts the folder holds."""
        path = self.path / "config.yaml"
        saved = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
        for section in ("run", *sections):
            if section in cfg:
                saved[section] = cfg[section]
        atomic_write_text(path, OmegaConf.to_yaml(saved, resolve=True))
        atomic_write_json(self.path / "versions.json", package_versions())

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def media(self) -> Path:
        folder = self.path / "media"
        folder.mkdir(exist_ok=True)
        return folder

    def update_metrics(self, section: str, values: Mapping[str, Any]) -> dict:
        """Merge ``values`` under ``section`` into ``metrics.json`` (atomically)."""
        path = self.path / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics[section] = dict(values)
        atomic_write_json(path, metrics)
        return metrics


class Logger:
    """Scalars to TensorBoard (always) and wandb (opt-in); images as PNG summaries and files.

    Tags are ``<prefix>/<name>`` with the stage as prefix, on one step axis per stage.
    """

    def __init__(self, run: RunDir, cfg: DictConfig, prefix: str):
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.prefix = prefix
        self.tb = SummaryWriter(log_dir=str(run.path / "tb" / prefix))
        self.wandb = None
        if cfg.run.wandb and cfg.run.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run.path))
            self.wandb = wandb.init(
                project=cfg.run.wandb_project,
                name=f"{cfg.run.name}-{prefix}",
                mode=cfg.run.wandb_mode,
                dir=str(run.path),
                config=OmegaConf.to_container(cfg, resolve=True),
                reinit=True,
            )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``{name: value}`` at ``step`` under this logger's prefix."""
        tagged = {f"{self.prefix}/{k}": float(v) for k, v in values.items()}
        for tag, value in tagged.items():
            self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(tagged, step=step)

    def image(self, step: int, name: str, image: np.ndarray, save: bool = True) -> Path | None:
        """Log an RGB uint8 image (H, W, 3) and, if ``save``, write ``media/<prefix>_<name>.png``."""
        self.tb.add_image(f"{self.prefix}/{name}", image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"{self.prefix}/{name}": wandb.Image(image)}, step=step)
        if save:
            return write_png(self.run.media / f"{self.prefix}_{name}.png", image)
        return None

    def video(self, step: int, name: str, frames: np.ndarray, fps: int = 4, scale: int = 2) -> Path:
        """Write frames (T, H, W, 3) uint8 as ``media/<prefix>_<name>.gif`` and log the GIF to TensorBoard.

        TensorBoard's ``add_video`` needs an old moviepy; an image summary holding GIF bytes plays
        as an animation in the images dashboard instead.
        """
        from tensorboard.compat.proto.summary_pb2 import Summary

        path = write_gif(self.run.media / f"{self.prefix}_{name}.gif", frames, fps=fps, scale=scale)
        frames = np.asarray(frames)
        image = Summary.Image(height=frames.shape[1] * scale, width=frames.shape[2] * scale, colorspace=3,
                              encoded_image_string=path.read_bytes())
        self.tb._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=f"{self.prefix}/{name}", image=image)]), step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"{self.prefix}/{name}": wandb.Video(str(path), format="gif")}, step=step)
        return path

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG, atomically."""
    import imageio.v3 as iio

    return atomic_write_bytes(path, iio.imwrite("<bytes>", np.asarray(image, dtype=np.uint8), extension=".png"))


def write_gif(path: str | os.PathLike, frames: np.ndarray | list, fps: int = 4, scale: int = 1) -> Path:
    """Write frames (T, H, W, 3) uint8 as a looping GIF, atomically; ``scale`` repeats pixels."""
    import imageio.v3 as iio

    frames = np.asarray(frames, dtype=np.uint8)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    data = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
    return atomic_write_bytes(path, data)
