"""The stage contract: one mechanism that every stage (and the quickstart) goes through.

A stage (collect, tokenizer, dynamics, dreamer, vagen, evaluate, ...) is a :class:`Stage`: a name,
the artifacts it writes, an identity function and a body. :func:`run_stage` does, in order:

1. **identity**: the config fields that matter and the content identities of the input artifacts
   (hashes of data and weights, never absolute paths, run names or timings). Computing it reads the
   inputs, so a missing, corrupt or foreign input fails here, naming the file, before anything runs.
2. **complete?** The run folder's manifest ``stages/<name>.json`` (written last, atomically) records
   the identity and the sha256 of every file of every artifact. Complete means: manifest readable,
   identity equal, every artifact present with the recorded bytes. Then the stage is skipped.
3. **run**: an artifact of another identity (or one whose bytes changed, or one no manifest vouches
   for) is moved aside first, under a name carrying its identity (``dynamics.3fa2c1d0.pt``), saying
   which keys changed; if the body fails, the old artifact is put back where it was.
4. **record**: the manifest, the sections of ``config.yaml`` the stage read, ``versions.json``.

Values are validated before any of this (``common.config.cli_config``: exit 2 naming the key).
Writers hold the run folder's lock (:class:`RunLock`): a second writer fails at once, naming the
holder's process id; the holder removes temporary files that dead writers left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from omegaconf import OmegaConf

from common.atomic import ArtifactError, atomic_write_json, remove_stale_temps
from common.config import ConfigError

MANIFEST_FOLDER = "stages"
LOCK_NAME = ".lock"
IDENTITY_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Identities: config fields and content hashes
# ---------------------------------------------------------------------------------------------


def config_fields(cfg: Any, sections: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``{"section.key": value}`` of the given config sections (nested keys dotted), less ``exclude``
    (full dotted keys of fields that cannot change the artifact: log intervals, progress bars)."""
    excluded = set(exclude)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                walk(f"{prefix}.{key}", value[key])
        elif prefix not in excluded:
            flat[prefix] = value

    for section in sections:
        node = cfg[section] if OmegaConf.is_config(cfg) else getattr(cfg, section)
        values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dataclasses.asdict(node)
        walk(section, values)
    return flat


def identity_hash(identity: Mapping[str, Any]) -> str:
    """A short stable hash of an identity dict."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every (nested) key whose value differs between two dicts."""
    out = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise ArtifactError(f"cannot read {path}: {error.strerror or error}") from None
    return digest.hexdigest()


def tree_sha256(path: Path) -> dict[str, str]:
    """``{relative name: sha256}`` of a file, or of every file under a folder (temp files aside)."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {str(p.relative_to(path.parent)): file_sha256(p) for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")}


def checkpoint_content(path: Path, what: str, hint: str) -> str:
    """The content identity of a checkpoint: the (verified) hash of its tensors."""
    from common.atomic import DIGEST_KEY
    from common.checkpoints import load_checked

    return str(load_checked(path, what, hint)[DIGEST_KEY])[:16]


# ---------------------------------------------------------------------------------------------
# The run folder lock
# ---------------------------------------------------------------------------------------------

_HELD: dict[str, int] = {}


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` for this process (re-entrant: the quickstart's stages
    share it). The kernel drops it when the process dies, so a killed run never leaves it held."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key = str(self.folder.resolve())

    def acquire(self) -> "RunLock":
        import fcntl

        if self.key in _HELD:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ArtifactError(f"run folder {self.folder} is in use by process {holder} (a second writer would "
                                "leave it inconsistent): wait for that process or use another run.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[self.key] = fd
        removed = remove_stale_temps(self.folder)
        if removed:
            print(f"[run] removed {len(removed)} temporary file(s) left by a dead process in {self.folder}")
        return self

    def release(self) -> None:
        fd = _HELD.pop(self.key, None)
        if fd is not None:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    """One stage of the pipeline.

    ``outputs(cfg)``: the artifacts (files or folders) that together are the stage's result, the
    first the main one. ``identity(cfg)``: ``{"config": {...}, "inputs": {...}}`` (see module doc).
    ``body(cfg, run_dir)``: does the work and returns its metrics. ``sections``: the config sections
    its identity reads, recorded in ``config.yaml`` once it completes. ``resumable``: the body
    resumes a partial main artifact itself (collection's shards), so one that no manifest vouches
    for is left in place. ``content(cfg)``: the identity later stages hash for this one's result.
    """

    name: str
    outputs: Callable[[Any], list[Path]]
    identity: Callable[[Any], dict[str, Any]]
    body: Callable[[Any, Any], Any]
    sections: Sequence[str]
    content: Callable[[Any], str] | None = None
    resumable: bool = False


def manifest_path(run_path: Path, name: str) -> Path:
    return Path(run_path) / MANIFEST_FOLDER / f"{name}.json"


def read_manifest(run_path: Path, name: str) -> dict | None:
    path = manifest_path(run_path, name)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: the stage is not vouched for, and reruns
    return manifest if isinstance(manifest, dict) else None


def status(stage: Stage, cfg: Any, run_path: Path, identity: dict) -> tuple[str, str]:
    """(``complete`` | ``missing`` | ``stale`` | ``broken`` | ``unverified``, why)."""
    outputs = stage.outputs(cfg)
    present = [p for p in outputs if p.exists()]
    manifest = read_manifest(run_path, stage.name)
    if manifest is None:
        return ("unverified", "no manifest vouches for it") if present else ("missing", "")
    if manifest.get("identity") != identity:
        changes = changed_keys(manifest.get("identity") or {}, identity)
        return "stale", "; ".join(changes) or "identity changed"
    if len(present) < len(outputs):
        return "missing", f"{', '.join(str(p) for p in outputs if not p.exists())} absent"
    recorded = manifest.get("files") or []
    for i, path in enumerate(outputs):
        if i >= len(recorded) or tree_sha256(path) != recorded[i]:
            return "broken", f"{path} differs from what was written (corrupt or changed by hand)"
    return "complete", ""


def move_aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to ``<stem>.<tag><suffix>`` beside it (``-2``, ``-3``, ... if taken)."""
    stem, suffix = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    target, n = path.with_name(f"{stem}.{tag}{suffix}"), 2
    while target.exists():
        target, n = path.with_name(f"{stem}.{tag}-{n}{suffix}"), n + 1
    os.replace(path, target)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_stage(stage: Stage, cfg: Any, run_dir: Any, log: Callable[[str], None] = print) -> Any:
    """The contract (module doc): skip a complete stage, else move an old artifact aside, run, record.
    Returns the body's metrics (the recorded ones when skipped)."""
    run_path = Path(run_dir.path)
    identity = stage.identity(cfg)
    state, why = status(stage, cfg, run_path, identity)
    outputs = stage.outputs(cfg)
    if state == "complete":
        log(f"[{stage.name}] complete ({outputs[0]}), skipped")
        return (read_manifest(run_path, stage.name) or {}).get("metrics", {})
    old = read_manifest(run_path, stage.name) or {}
    tag = {"stale": (old.get("identity_hash") or "old")[:8], "broken": "broken",
           "unverified": "unverified"}.get(state)
    moved: list[tuple[Path, Path]] = []
    if tag is not None and not (state == "unverified" and stage.resumable):
        for path in outputs:
            if path.exists():
                moved.append((path, move_aside(path, tag)))
        reason = {"stale": f"config or inputs changed ({why})", "broken": why, "unverified": why}[state]
        kept = f"; the old artifact is kept as {', '.join(str(aside) for _, aside in moved)}" if moved else ""
        log(f"[{stage.name}] {reason}: rerunning{kept}")
    run_dir.stage_identity = identity_hash(identity)
    log(f"[{stage.name}] running")
    started = time.perf_counter()
    try:
        metrics = stage.body(cfg, run_dir)
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise ArtifactError(f"stage {stage.name} finished without writing {', '.join(missing)}")
    except BaseException:
        for path, aside in moved:  # a failed rerun leaves the old artifact (and its manifest) as they were
            _remove(path)
            os.replace(aside, path)
        raise
    record = {
        "stage": stage.name, "identity": identity, "identity_hash": identity_hash(identity),
        "content": stage.content(cfg) if stage.content else None,
        "files": [tree_sha256(p) for p in outputs],  # in the order of outputs(cfg)
        "metrics": metrics if isinstance(metrics, dict) else {},
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(manifest_path(run_path, stage.name), record)
    run_dir.record_config(cfg, stage.sections)
    log(f"[{stage.name}] done in {record['seconds']:.1f} s")
    return metrics


def stage_main(stage: Stage, cfg_builder: Callable[[], Any], run_dir_factory: Callable[[Any], Any],
               after: Callable[[Any, Any], None] | None = None) -> Any:
    """A stage's command line: build and validate the config (exit 2 on a bad value), take the run
    folder's lock, run the contract; a file that cannot be read, written or trusted ends with its
    message and exit 1, not a traceback."""
    cfg = cfg_builder()
    with guarded():
        run_dir = run_dir_factory(cfg)
        run_dir.lock()
        try:
            metrics = run_stage(stage, cfg, run_dir)
            if after is not None:
                after(cfg, metrics)
            return metrics
        finally:
            run_dir.unlock()


class guarded:
    """Context: :class:`ArtifactError` (and a training error) -> its message on stderr, exit 1;
    :class:`ConfigError` raised late (a dataset of another env) -> exit 2."""

    def __enter__(self) -> "guarded":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, ConfigError):
            print(f"config error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        if isinstance(error, (ArtifactError, TrainingError)):
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        return False


class TrainingError(RuntimeError):
    """Training that cannot go on (a non-finite loss); the message names the stage, step and key."""


def check_finite(value: Any, stage: str, step: int, hint: str) -> None:
    """Raise :class:`TrainingError` when a loss is NaN or infinite (nothing is saved after it)."""
    import math

    number = float(value.detach()) if hasattr(value, "detach") else float(value)
    if not math.isfinite(number):
        raise TrainingError(f"{stage}: loss is {number} at step {step}: training diverged, nothing was saved "
                            f"({hint})")


def load_resume(path: Path, run_dir: Any, stage: str, log: Callable[[str], None] = print) -> dict | None:
    """The resume checkpoint at ``path`` if it was written for the identity now running (its
    ``stage_identity`` field); one of another config, or damaged, is deleted (with a line saying
    why), so a changed ``lr`` or ``batch_size`` is never mixed into a resumed run."""
    from common.checkpoints import load_checked

    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = load_checked(path, f"{stage} resume", "it is deleted and training starts over")
    except ArtifactError as error:
        log(f"[{stage}] {error}")
        path.unlink()
        return None
    wanted = getattr(run_dir, "stage_identity", "")
    if state.get("stage_identity") != wanted:
        log(f"[{stage}] {path} was written for another config or inputs: deleted, starting over")
        path.unlink()
        return None
    return state
