"""The gymnasium/MiniGrid side: env factory, symbolic state, BFS oracle, behaviour policies,
rollout collection and dataset I/O."""

from envs.make import EnvConfig, FrameObservation, make_env, make_env_from_config, normalize_env_id
from envs.state import StateCodec, SymbolicState, state_from_env

__all__ = [
    "EnvConfig", "FrameObservation", "make_env", "make_env_from_config", "normalize_env_id",
    "StateCodec", "SymbolicState", "state_from_env",
]
