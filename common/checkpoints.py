"""Reading a checkpoint with errors that name the problem: missing, unreadable, foreign, corrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.atomic import ArtifactError, verify_checkpoint


def load_checked(path: str | Path, what: str, hint: str, error: type[Exception] = ArtifactError,
                 expected_format: Any = None, require: str | None = None) -> dict:
    """``torch.load`` a checkpoint dict, check its ``"format"`` field (when ``expected_format`` is
    given), that it has the field ``require`` (when given), and the hash of its tensors.

    ``what`` names the part ("tokenizer"), ``hint`` says how to make one; any failure raises
    ``error`` (an :class:`ArtifactError`) with a message naming the file and what to do.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} checkpoint not found: {path} ({hint})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as failure:  # torch raises many types for a corrupt or truncated file
        raise error(f"{what} checkpoint {path} cannot be read ({type(failure).__name__}: "
                    f"{str(failure).splitlines()[0] if str(failure) else ''}): it is damaged or not a checkpoint; "
                    f"{hint}") from None
    if not isinstance(checkpoint, dict):
        raise error(f"{path} is not a {what} checkpoint (it holds a {type(checkpoint).__name__}): {hint}")
    if expected_format is not None and checkpoint.get("format") != expected_format:
        raise error(f"{path} is not a {what} checkpoint (format {checkpoint.get('format')!r}, want {expected_format!r})")
    if require is not None and require not in checkpoint:
        raise error(f"{path} is not a {what} checkpoint (no {require!r} field): {hint}")
    try:
        verify_checkpoint(checkpoint, path, what)
    except ArtifactError as failure:
        raise error(f"{failure}; {hint}") from None
    return checkpoint


def read_checkpoint(path: str | Path, what: str, error: type[Exception], expected_format: Any, hint: str) -> dict:
    """:func:`load_checked` of a checkpoint whose ``"format"`` field must equal ``expected_format``."""
    return load_checked(path, what, hint, error, expected_format)
