"""Playing inside the world model: the real env and the dream stepped together with the same actions.

:class:`PlaySession` holds one real MiniGrid env and one :class:`~worldmodel.imagine.WorldModel`
(batch 1). Both start from the same seed (the dream from the real first frame's tokens) and
every :meth:`PlaySession.step` feeds the same action to both; in *dream only* mode the real env
waits and the model runs alone. A session can also start at any frame of the run's dataset: the
real env is reset with that episode's seed and replays its actions up to the frame (MiniGrid is
deterministic), and the dream starts from that frame. :meth:`PlaySession.start_recording` /
:meth:`PlaySession.stop_recording` save what both panes showed as ``<run>/media/play_<n>.gif``.

No HTTP here (``scripts/play.py`` serves this class), so tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.runs import write_gif
from envs.state import StateCodec

# MiniGrid's actions, in action-index order.
ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")


@dataclass
class PaneView:
    """What one pane shows after a reset or step."""

    frame: np.ndarray  # (H, W, 3) uint8
    reward: float  # of the last step (0 after a reset)
    terminated: bool
    truncated: bool  # the real env's step limit (always False in the dream)
    state_text: str  # the symbolic state (real) or the state head's estimate (dream) as text


@dataclass
class PlayView:
    """Both panes after a reset or step; ``real`` is the real env's latest (it waits in dream-only mode)."""

    real: PaneView
    dream: PaneView
    steps: int  # actions since the last reset (dream side)
    real_steps: int  # actions the real env took since the last reset
    last_action: int | None
    dream_only: bool
    recording: bool
    start: str  # where this episode started: "seed 3" or "dataset frame 120 (episode 4, step 7)"


class PlaySession:
    """One real env and one world model, stepped with the same actions from the same start.

    ``env``: an env from :func:`envs.make.make_env` (RGB frames, ``info["state"]``);
    ``world_model``: a :class:`~worldmodel.imagine.WorldModel` of that env; ``dataset``: an
    :class:`~envs.dataset.EpisodeDataset` of that env (optional, for :meth:`reset_from_dataset`);
    ``media_dir``: where recordings go (``<run>/media``).
    """

    def __init__(self, env: Any, world_model: Any, dataset: Any = None, media_dir: str | Path | None = None,
                 gif_fps: int = 8):
        self.env = env
        self.world_model = world_model
        self.dataset = dataset
        self.media_dir = Path(media_dir) if media_dir is not None else None
        self.gif_fps = int(gif_fps)
        base = env.unwrapped
        self.codec = StateCodec(base.width, base.height)
        self.dream_only = False
        self._recording: list[np.ndarray] | None = None
        self._view: PlayView | None = None

    # ---------------------------------------------------------------- properties
    @property
    def view(self) -> PlayView:
        if self._view is None:
            raise RuntimeError("PlaySession: call reset first")
        return self._view

    @property
    def num_dataset_frames(self) -> int:
        return 0 if self.dataset is None else int(self.dataset.num_frames)

    @property
    def recording(self) -> bool:
        return self._recording is not None

    def state_text(self, state: Any) -> str:
        """The text form of a state array (real, or the state head's estimate)."""
        state = np.asarray(state).reshape(-1)
        try:
            return self.codec.decode(state).text()
        except (ValueError, KeyError, IndexError) as error:  # an estimate naming no known object or direction
            return f"(the state head's estimate cannot be read as a state: {error})"

    # ---------------------------------------------------------------- resets
    def reset(self, seed: int = 0) -> PlayView:
        """Reset the real env with ``seed`` and start the dream from its first frame."""
        frame, info = self.env.reset(seed=int(seed))
        return self._start(frame, info["state"], f"seed {int(seed)}")

    def reset_from_dataset(self, frame_index: int) -> PlayView:
        """Start both panes at dataset frame ``frame_index`` (a flat index over all episodes).

        The real env resets with the episode's seed and replays its actions up to the frame; the
        dream starts from that frame's tokens. Raises ValueError for a frame the dataset lacks or
        when the replay does not reach the recorded frame (an env other than the dataset's)."""
        if self.dataset is None:
            raise ValueError("this run folder has no dataset to start from")
        frame_index = int(frame_index)
        if not 0 <= frame_index < self.dataset.num_frames:
            raise ValueError(f"dataset frame {frame_index} does not exist: the dataset has frames 0..{self.dataset.num_frames - 1}")
        episode = int(np.searchsorted(self.dataset.episode_starts, frame_index, side="right") - 1)
        start = int(self.dataset.episode_starts[episode])
        frame, info = self.env.reset(seed=int(self.dataset.episode_seeds[episode]))
        for action in self.dataset.actions[start:frame_index]:
            frame, _, _, _, info = self.env.step(int(action))
        if not np.array_equal(frame, self.dataset.frames[frame_index]):
            raise ValueError(f"replaying episode {episode} did not reach dataset frame {frame_index}: "
                             "the run's env config differs from the dataset's")
        where = f"dataset frame {frame_index} (episode {episode}, step {frame_index - start})"
        return self._start(frame, info["state"], where)

    def _start(self, frame: np.ndarray, state: np.ndarray, where: str) -> PlayView:
        tokens = self.world_model.encode(frame[None])  # (1, h, w)
        self.world_model.reset(tokens[:, None], None)  # context of one frame, no actions
        dream_state = self.world_model.state[0].cpu().numpy()
        dream_frame = self.world_model.decode()[0]
        self._view = PlayView(
            real=PaneView(frame, 0.0, False, False, self.state_text(state)),
            dream=PaneView(dream_frame, 0.0, False, False, self.state_text(dream_state)),
            steps=0, real_steps=0, last_action=None, dream_only=self.dream_only,
            recording=self.recording, start=where,
        )
        self._record()
        return self._view

    # ---------------------------------------------------------------- stepping
    def set_dream_only(self, dream_only: bool) -> PlayView:
        """In dream-only mode steps run the model alone; the real pane keeps its last frame."""
        self.dream_only = bool(dream_only)
        self.view.dream_only = self.dream_only
        return self.view

    def step(self, action: int) -> PlayView:
        """Feed ``action`` (0..6) to the dream and, unless in dream-only mode or its episode is over,
        to the real env."""
        action = int(action)
        if not 0 <= action < len(ACTION_NAMES):
            raise ValueError(f"action {action} is not a MiniGrid action: choose 0..{len(ACTION_NAMES) - 1}")
        view = self.view
        real = view.real
        real_steps = view.real_steps
        if not self.dream_only and not (real.terminated or real.truncated):
            frame, reward, terminated, truncated, info = self.env.step(action)
            real = PaneView(frame, float(reward), bool(terminated), bool(truncated), self.state_text(info["state"]))
            real_steps += 1
        result = self.world_model.step(np.asarray([action]))
        dream = PaneView(self.world_model.decode(result.tokens)[0], float(result.reward[0]),
                         bool(result.terminated[0]), False, self.state_text(result.state[0].cpu().numpy()))
        self._view = PlayView(real=real, dream=dream, steps=view.steps + 1, real_steps=real_steps,
                              last_action=action, dream_only=self.dream_only, recording=self.recording,
                              start=view.start)
        self._record()
        return self._view

    # ---------------------------------------------------------------- recording
    def start_recording(self) -> None:
        """Record every frame from now on (the current one first)."""
        self._recording = []
        if self._view is not None:
            self._view.recording = True
            self._record()

    def stop_recording(self) -> Path | None:
        """Stop recording and write ``<media_dir>/play_<n>.gif`` (the next free n); None if nothing
        was recorded."""
        frames, self._recording = self._recording, None
        if self._view is not None:
            self._view.recording = False
        if not frames:
            return None
        if self.media_dir is None:
            raise ValueError("this session has no media folder to write recordings to")
        self.media_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        while (self.media_dir / f"play_{n}.gif").exists():
            n += 1
        return write_gif(self.media_dir / f"play_{n}.gif", np.stack(frames), fps=self.gif_fps, scale=4)

    def _record(self) -> None:
        if self._recording is None or self._view is None:
            return
        real, dream = self._view.real.frame, self._view.dream.frame
        gap = np.full((real.shape[0], max(2, real.shape[1] // 16), 3), 255, dtype=np.uint8)
        if real.shape[0] != dream.shape[0]:  # never for a model of this env; keep the GIF rectangular
            dream = np.zeros_like(real)
        self._recording.append(np.concatenate([real, gap, dream], axis=1))
