"""Reading a checkpoint with errors that name the problem: missing, unreadable, foreign."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_checkpoint(path: str | Path, what: str, error: type[Exception], expected_format: Any, hint: str) -> dict:
    """``torch.load`` a checkpoint dict whose ``"format"`` field equals ``expected_format``.

    ``what`` names the part ("tokenizer"), ``hint`` says how to make one; any failure raises
    ``error`` with a message naming the file and the reason.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} checkpoint not found: {path} ({hint})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as failure:  # torch raises many types for a corrupt file
        raise error(f"{what} checkpoint {path} cannot be read: {failure}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != expected_format:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise error(f"{path} is not a {what} checkpoint (format {found!r}, want {expected_format!r})")
    return checkpoint
