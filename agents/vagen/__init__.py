"""VAGEN-style agent: it says what state it is in, predicts the next state, then acts.

One job per module:

- :mod:`agents.vagen.vocab` — the response language: vocabulary, per-strategy templates, parsing,
  the true fields of a state, and the world-modeling reward of a response;
- :mod:`agents.vagen.net` — the network (a tiny prefix-LM transformer) and decoding;
- :mod:`agents.vagen.credit` — bi-level and turn-level GAE, the world-modeling stream's credit,
  the critic's return normaliser (GAE, whitening and the PPO loss are :mod:`agents.rl`'s);
- :mod:`agents.vagen.pools` — the env pools it trains in, real or dreamt;
- :mod:`agents.vagen.policy` — the saved policy behind the common interface of :mod:`agents.policy`;
- :mod:`agents.vagen.train` — the config and the training loop (imported on its own: it pulls in
  the evaluation).
"""

from agents.vagen.credit import ValueNormalizer, bilevel_gae, turn_level_advantages, world_model_advantages
from agents.vagen.net import Generation, VagenModelConfig, VagenNet, generate, token_logprobs
from agents.vagen.policy import VagenAgent
from agents.vagen.vocab import (
    ACTION_NAMES,
    FIELDS,
    STRATEGIES,
    ParsedResponse,
    Vocab,
    parse_response,
    random_well_formed,
    readout_positions,
    slot_mask,
    state_fields,
    template,
    world_model_reward,
)

__all__ = [
    "ACTION_NAMES", "FIELDS", "STRATEGIES", "Generation", "ParsedResponse", "ValueNormalizer", "VagenAgent", "VagenModelConfig",
    "VagenNet", "Vocab", "bilevel_gae", "generate", "parse_response", "random_well_formed", "readout_positions", "slot_mask",
    "state_fields", "template", "token_logprobs", "turn_level_advantages", "world_model_advantages", "world_model_reward",
]
