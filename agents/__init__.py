"""Agents: the common policy interface, the Dreamer-style imagination-trained actor-critic, the
VAGEN-style agent and the evaluation of policies in the real env and in the dream."""
