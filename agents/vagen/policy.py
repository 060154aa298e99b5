"""The saved VAGEN-style agent behind the common policy interface of :mod:`agents.policy`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from agents.policy import Policy, PolicyInput, register_policy
from agents.vagen.net import VagenModelConfig, VagenNet, generate
from agents.vagen.vocab import FIELDS, ParsedResponse, Vocab, parse_response, template

# The checkpoint layout this code writes and reads. Version 1 is the single-module agent
# (agents/vagen.py), whose network carried options since pruned (a detached critic, optional pointer,
# cell inputs and read-out, an action query); its checkpoints name no layout. Version 2 is the package
# before the action and the critic read the frame through their own encoders (TileGridEncoder).
LAYOUT = 3


@register_policy("vagen")
class VagenAgent(Policy):
    """The trained agent: reads ``frames`` (B, H, W, 3), keeps the last ``history_len`` actions of
    each row, writes a response per row and returns its action (the no-op for a malformed
    response). ``last_responses`` holds the parsed responses of the last call."""

    inputs = ("frames",)

    def __init__(
        self,
        net: VagenNet,
        strategy: str,
        vocab: Vocab,
        free_think_len: int = 12,
        temperature: float = 1.0,
        config: dict | None = None,
        name: str | None = None,
    ):
        super().__init__(name or f"vagen-{strategy}")
        self.net = net.eval()
        self.strategy = strategy
        self.vocab = vocab
        self.free_think_len = free_think_len
        self.length = len(template(strategy, free_think_len))
        self.temperature = temperature
        self.config = dict(config or {})
        self.generator = torch.Generator().manual_seed(0)
        self.no_action = net.config.num_actions  # the history's "no action yet"
        self.history = np.full((0, net.config.history_len), self.no_action, dtype=np.int64)
        self.last_responses: list[ParsedResponse] = []

    def reset(self, batch_size: int, seed: int | None = None) -> None:
        super().reset(batch_size, seed)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        self.history = np.full((batch_size, self.net.config.history_len), self.no_action, dtype=np.int64)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Clear the action history of the rows whose episode restarted."""
        self.history[rows] = self.no_action

    def act(self, inp: PolicyInput) -> np.ndarray:
        frames = inp.require("frames", self.name)
        if len(self.history) != len(frames):
            self.reset(len(frames))
        gen = generate(
            self.net, torch.from_numpy(np.ascontiguousarray(frames)), torch.from_numpy(self.history), self.length,
            self.vocab.first_action, self.generator, self.temperature,
        )
        self.last_responses = [
            parse_response(gen.tokens[b, : int(gen.mask[b].sum())].tolist(), self.strategy, self.vocab, self.free_think_len)
            for b in range(len(frames))
        ]
        actions = np.array([r.action for r in self.last_responses], dtype=np.int64)
        if self.history.shape[1] > 0:
            self.history = np.concatenate([self.history[:, 1:], actions[:, None]], axis=1)
        return actions

    def checkpoint(self) -> dict[str, Any]:
        return {
            "layout": LAYOUT,
            "model_config": asdict(self.net.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "strategy": self.strategy,
            "grid": [self.vocab.width, self.vocab.height],
            "num_actions": self.vocab.num_actions,
            "free_think_len": self.free_think_len,
            "fields": list(FIELDS),
            "temperature": self.temperature,
            "config": self.config,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu") -> "VagenAgent":
        layout = checkpoint.get("layout", 1)
        if layout != LAYOUT:
            why = (
                "the single-module agent (agents/vagen.py), whose network options were pruned when the agent became "
                "the agents/vagen package" if layout == 1 else
                "the package before the action and the critic got their own frame encoders (their weights are missing)"
            )
            raise ValueError(
                f"this VAGEN checkpoint has layout {layout}, this code reads layout {LAYOUT}: it was saved by {why}; "
                "retrain it with scripts/train_vagen.py"
            )
        config = VagenModelConfig(**checkpoint["model_config"])
        slots = len(template(checkpoint["strategy"], int(checkpoint["free_think_len"])))
        if config.max_response_len != slots:
            raise ValueError(
                f"this {checkpoint['strategy']} policy writes {config.max_response_len}-token responses but the template "
                f"has {slots} slots (fields {', '.join(FIELDS)}); retrain it"
            )
        if checkpoint["fields"] != list(FIELDS):
            raise ValueError(
                f"this {checkpoint['strategy']} policy writes its fields in another order ({', '.join(checkpoint['fields'])}) "
                f"than today's template ({', '.join(FIELDS)}): its responses would be misread; retrain it"
            )
        net = VagenNet(config)
        net.load_state_dict(checkpoint["state_dict"])
        width, height = checkpoint["grid"]
        return cls(
            net, checkpoint["strategy"], Vocab(width, height, int(checkpoint["num_actions"])), int(checkpoint["free_think_len"]),
            float(checkpoint["temperature"]), checkpoint.get("config"),
        )
