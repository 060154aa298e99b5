"""Atomic artifact writes: write to a temporary name in the same folder, then rename.

A crash (or a kill) never leaves a half-written file under the final name, so a later stage or a
resumed run can trust every artifact that exists. Temporary names carry the writer's process id
(``.<name>.<pid>.<random>.tmp``), so :func:`remove_stale_temps` can tell a dead writer's leftovers
from a live one's. Files get the user's umask (0644 normally), not ``mkstemp``'s 0600. A failed
write (a full disk, a read-only folder) raises :class:`ArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


class ArtifactError(RuntimeError):
    """An artifact that cannot be written, read or trusted; the message names the file and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _write_via(path: str | os.PathLike, writer: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as error:
        _discard(tmp)
        raise ArtifactError(f"cannot write {path}: {error.strerror or error} (free space or fix the folder's "
                            "permissions, then rerun: complete artifacts are kept)") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files under ``folder`` whose writer process is gone; return them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp"):
        match = _TEMP.match(path.name)
        if match is None or not _alive(int(match.group(1))) or int(match.group(1)) == os.getpid():
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _write_via(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npz(handle: Any, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """An ``.npz`` archive that ``np.load`` reads, byte-for-byte reproducible.

    ``np.savez`` stamps every member with the current time, so two identical datasets would differ
    in bytes; here every member carries a fixed date.
    """
    import zipfile

    compression = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(handle, mode="w", compression=compression, allowZip64=True) as archive:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def atomic_savez(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> Path:
    """A reproducible (compressed) ``.npz`` of ``arrays`` at ``path``, written atomically."""
    return _write_via(path, lambda handle: write_npz(handle, arrays, compress=compress))


# ---------------------------------------------------------------------------------------------
# Checkpoints: every tensor hashed at save, the hash checked at load, nothing non-finite saved
# ---------------------------------------------------------------------------------------------

DIGEST_KEY = "weights_sha256"


def tensors_of(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every tensor (and NumPy array) inside nested dicts / lists / tuples, with its key path, in a
    stable order."""
    import torch

    found: list[tuple[str, Any]] = []
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        found.append((prefix, obj))
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if prefix == "" and key == DIGEST_KEY:
                continue
            found += tensors_of(obj[key], f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found += tensors_of(value, f"{prefix}{i}.")
    return found


def weights_digest(checkpoint: Any) -> str:
    """sha256 of every tensor of a checkpoint (names, dtypes, shapes, bytes): what the weights are,
    independent of timings, paths or metrics stored beside them."""
    import torch

    digest = hashlib.sha256()
    for name, value in tensors_of(checkpoint):
        array = value.detach().cpu().contiguous().numpy() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def non_finite(checkpoint: Any) -> list[str]:
    """Key paths of the floating tensors that hold NaN or infinity (and non-finite float fields)."""
    import torch

    bad = []
    for name, value in tensors_of(checkpoint):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name.rstrip("."))
        elif np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad.append(name.rstrip("."))
    return bad


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically; a dict gets the hash of its tensors (``weights_sha256``).

    Refuses (:class:`ArtifactError`) a checkpoint with any non-finite tensor: a diverged model is
    never saved, so nothing downstream can train on it.
    """
    import torch

    if isinstance(obj, dict):
        bad = non_finite(obj)
        if bad:
            raise ArtifactError(f"refusing to save {path}: non-finite values in {', '.join(bad[:5])}"
                                f"{' ...' if len(bad) > 5 else ''} (training diverged: lower the learning rate)")
        obj = {**obj, DIGEST_KEY: weights_digest(obj)}
    return _write_via(path, lambda handle: torch.save(obj, handle))


def verify_checkpoint(checkpoint: Any, path: str | os.PathLike, what: str) -> None:
    """Raise :class:`ArtifactError` unless ``checkpoint`` carries the hash of its own tensors."""
    if not isinstance(checkpoint, dict) or DIGEST_KEY not in checkpoint:
        raise ArtifactError(f"{what} checkpoint {path} carries no weights hash (written by an older version, "
                            "or not by this sandbox): retrain it")
    if checkpoint[DIGEST_KEY] != weights_digest(checkpoint):
        raise ArtifactError(f"{what} checkpoint {path} is corrupt: its weights do not match their stored hash")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
