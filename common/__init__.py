"""Shared plumbing at the bottom of the dependency graph: configs, run folders, logging, seeding,
atomic writes. Every other package may import it; it imports none of them."""
