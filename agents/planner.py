"""Planning to a goal frame in the world model, and acting on the plan (model-predictive control).

Given the current frame and a goal frame (say a later frame of another episode: an agent pose, the
doors, the key where it lies or carried), :class:`GoalPlanner` searches action sequences *in the
model*: breadth-first over imagined frames, every frontier frame stepped with every action in one
batched model call per depth, frames seen before dropped, frames where the model ends the episode
not expanded. The first imagined frame equal to the goal ends the search, so the plan is a shortest
one in the model. With a discrete action set and an exact model this beats sampling searches
(CEM, MPPI): they score sequences by closeness to the goal, and in a gridworld a frame one step
from the goal can be many steps away in actions (docs/planning.md has the measurements).

:func:`reach_goal` closes the loop of imagine, act, verify: act the plan's first action in the
real env, compare the real next frame with the one the model imagined, keep the rest of the plan
when they agree and re-plan from the real frame when they do not (each such re-plan is counted).
A mismatch is also remembered (:attr:`GoalPlanner.corrections`: that frame and action lead to
what the env showed), and later searches take the remembered outcome over the model's: without
it a model that walks through a closed door re-plans the same walk forever.

The search reads the model as Markov (the next frame a function of the frame and the action), so
it needs a model with ``memory="frame"``: the full view. An egocentric model's next frame depends
on what it has seen before, and is refused with a message saying so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worldmodel.dynamics import DynamicsCache


@dataclass
class Plan:
    actions: list[int]
    frames: list[torch.Tensor]  # the imagined token grid after each action
    expanded: int  # frames the search stepped
    reaches: bool = True  # False: the goal was not found; the plan leads to the imagined frame nearest it


@dataclass
class Episode:
    """One :func:`reach_goal` run."""

    success: bool
    steps: int
    replans: int  # re-plans because the real frame differed from the imagined one
    plans: int
    plan_seconds: float
    actions: list[int] = field(default_factory=list)


class GoalPlanner:
    """Breadth-first search to a goal frame in a Markov world model (``worldmodel.imagine.WorldModel``)."""

    def __init__(self, world_model: Any, max_depth: int = 64, max_frames: int = 20000):
        memory = world_model.config.memory
        if memory != "frame":
            raise ValueError(f"planning to a goal frame needs a Markov model (dynamics.memory=frame, the full view); "
                             f"this model's memory is '{memory}', whose next frame depends on the frames before")
        self.world_model = world_model
        self.max_depth = int(max_depth)
        self.max_frames = int(max_frames)
        # (frame bytes, action) -> (the real next token grid, whether the env ended there)
        self.corrections: dict[tuple[bytes, int], tuple[torch.Tensor, bool]] = {}

    def correct(self, tokens: torch.Tensor, action: int, next_tokens: torch.Tensor, ended: bool) -> None:
        """Remember that ``action`` from token grid ``tokens`` really led to ``next_tokens``."""
        self.corrections[(tokens.cpu().numpy().tobytes(), int(action))] = (next_tokens.to(self.world_model.device), ended)

    # ---------------------------------------------------------------- goals
    def goal_tokens(self, goal_frame: Any, frame: Any) -> torch.Tensor:
        """The goal frame (H, W, 3) uint8 as a token grid, checked against the current ``frame``:
        the same shape, a frame the tokenizer represents exactly, and the same fixed cells (the
        outer wall), else a ValueError saying which."""
        wm = self.world_model
        goal, now = np.asarray(goal_frame), np.asarray(frame)
        if goal.shape != now.shape or goal.ndim != 3 or goal.shape[-1] != 3:
            raise ValueError(f"goal frame has shape {goal.shape}, the env's frames {now.shape}: give an (H, W, 3) "
                             "frame of the same env and view")
        tokens = wm.encode(goal[None])[0]
        if not np.array_equal(wm.decode(tokens[None])[0], goal.astype(np.uint8)):
            raise ValueError("goal frame is not one this world model's tokenizer represents exactly: "
                             "a frame of another env, view or tile size?")
        static = torch.as_tensor(wm.config.static_cells, dtype=torch.long, device=wm.device)
        if len(static):
            here = wm.encode(now[None])[0].flatten()
            if not torch.equal(here[static], tokens.flatten()[static]):
                raise ValueError("goal frame's fixed cells (the outer wall) differ from the current frame's: "
                                 "a frame of another env layout")
        return tokens

    # ---------------------------------------------------------------- search
    @torch.no_grad()
    def search(self, tokens: torch.Tensor, goal: torch.Tensor) -> Plan:
        """A shortest action list (in the model) from token grid ``tokens`` (h, w) to ``goal``, with
        the frames it imagines. When the goal is not found within ``max_depth`` steps and
        ``max_frames`` distinct frames, the plan leads to the frame found nearest it (fewest cells
        differing; ``reaches`` False): acting on it shows where the model is wrong."""
        dynamics = self.world_model.dynamics
        device = self.world_model.device
        num_actions = self.world_model.num_actions
        tokens = tokens.to(device).long()
        goal_flat = goal.to(device).long().flatten()
        if torch.equal(tokens.flatten(), goal_flat):
            return Plan([], [], 0)
        frames = [tokens]  # every distinct frame found, by id
        parent, action_to = [-1], [-1]
        distance = [int((tokens.flatten() != goal_flat).sum())]
        seen = {tokens.cpu().numpy().tobytes()}
        frontier = [0]
        expanded = 0

        def path_to(node: int, last: tuple[int, torch.Tensor] | None, expanded: int, reaches: bool) -> Plan:
            steps, frame_list = ([last[0]], [last[1]]) if last else ([], [])
            while parent[node] >= 0:
                steps.append(action_to[node])
                frame_list.append(frames[node])
                node = parent[node]
            return Plan(steps[::-1], frame_list[::-1], expanded, reaches)

        for _ in range(self.max_depth):
            batch = torch.stack([frames[i] for i in frontier])  # (F, h, w)
            features = dynamics.encode(batch)
            cache = DynamicsCache(tokens=batch.flatten(1).repeat_interleave(num_actions, 0),
                                  features=features.repeat_interleave(num_actions, 0), memory=None)
            actions = torch.arange(num_actions, device=device).repeat(len(frontier))
            prediction = dynamics.predict(cache, actions)
            expanded += len(frontier)
            next_tokens, ended_t = prediction.tokens, prediction.terminated
            if self.corrections:
                next_tokens, ended_t = next_tokens.clone(), ended_t.clone()
                keys = [frames[i].cpu().numpy().tobytes() for i in frontier]
                for row in range(len(actions)):
                    known = self.corrections.get((keys[row // num_actions], row % num_actions))
                    if known is not None:
                        next_tokens[row], ended_t[row] = known[0], known[1]
            children = next_tokens.reshape(len(actions), -1)
            hit = (children == goal_flat).all(-1).nonzero()
            if len(hit):
                row = int(hit[0, 0])
                return path_to(frontier[row // num_actions], (int(actions[row]), next_tokens[row]), expanded, True)
            ended = ended_t.cpu().numpy()
            keys_np = children.cpu().numpy()
            differ = (children != goal_flat).sum(-1).cpu().numpy()
            frontier_next = []
            for row in range(len(actions)):
                if ended[row]:
                    continue
                key = keys_np[row].tobytes()
                if key in seen:
                    continue
                seen.add(key)
                frames.append(next_tokens[row])
                parent.append(frontier[row // num_actions])
                action_to.append(int(actions[row]))
                distance.append(int(differ[row]))
                frontier_next.append(len(frames) - 1)
            frontier = frontier_next
            if not frontier or len(frames) > self.max_frames:
                break
        nearest = int(np.argmin(distance))  # the first (shallowest) of the nearest
        return path_to(nearest, None, expanded, False)


def reach_goal(env: Any, planner: GoalPlanner, goal_frame: Any, frame: Any, max_steps: int = 100) -> Episode:
    """Act in the real ``env`` (whose current frame is ``frame``) until its frame equals
    ``goal_frame``: plan in the model, take the plan's next action, and re-plan from the real frame
    whenever it differs from the imagined one. When the model finds no way to the goal, it acts
    towards the imagined frame nearest it and re-plans from what it learns on the way. Fails when
    nothing imagined comes nearer, the env ends the episode elsewhere, or ``max_steps`` pass."""
    wm = planner.world_model
    goal = planner.goal_tokens(goal_frame, frame)
    goal_np = np.asarray(goal_frame)
    plan_seconds, plans, replans, taken = 0.0, 0, 0, []

    def make_plan(tokens: torch.Tensor) -> Plan:
        nonlocal plan_seconds, plans
        started = time.perf_counter()
        found = planner.search(tokens, goal)
        plan_seconds += time.perf_counter() - started
        plans += 1
        return found

    if np.array_equal(np.asarray(frame), goal_np):
        return Episode(True, 0, 0, 0, 0.0)
    current = wm.encode(np.asarray(frame)[None])[0]
    plan = make_plan(current)
    for step in range(max_steps):
        if not plan.actions and not plan.reaches:  # at the nearest frame the model knew: look again from here
            plan = make_plan(current)
        if not plan.actions:
            break  # nothing the model imagines comes nearer the goal
        action, expected = plan.actions.pop(0), plan.frames.pop(0)
        before = current
        frame, _, terminated, truncated, _ = env.step(action)
        taken.append(action)
        if np.array_equal(np.asarray(frame), goal_np):
            return Episode(True, step + 1, replans, plans, plan_seconds, taken)
        if terminated or truncated:
            break
        current = wm.encode(np.asarray(frame)[None])[0]
        if not torch.equal(current, expected.to(wm.device)):
            # The world did not do what the model imagined: remember what it did, plan again from there.
            planner.correct(before, action, current, bool(terminated))
            replans += 1
            plan = make_plan(current)
    return Episode(False, len(taken), replans, plans, plan_seconds, taken)
