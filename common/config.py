"""Typed configs: dataclass schema first, YAML files on top, ``key=value`` overrides last.

Every default lives in one place, its dataclass field; a YAML file holds only what differs from it.
Merge order (later wins):
  1. the dataclass defaults (``OmegaConf.structured``),
  2. extra files a script names (the quickstart's ``configs/quickstart.yaml``),
  3. the run folder's saved ``config.yaml`` when the run already exists (a run describes itself),
  4. ``--env NAME`` (``configs/env/NAME.yaml``), ``--preset NAME`` (``configs/presets/NAME.yaml``)
     and ``--config FILE``, in the order given,
  5. ``key=value`` overrides.
``--help`` prints every key with the value this merge gives it. A misspelt key or a value of the
wrong type fails with a message naming the key (exit code 2), and so does a value outside the bounds
or choices its field declares (``param(64, "...", min=1)``, checked by :func:`check_values`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config that cannot be built: unknown key, wrong type, a value its field does not allow, missing file."""


def param(
    default: Any = MISSING,
    help: str = "",  # noqa: A002
    default_factory: Any = MISSING,
    *,
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    above: float | None = None,
    below: float | None = None,
    choices: Sequence[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with a one-line description that ``--help`` prints, and the values it allows.

    ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones; ``choices`` lists the
    allowed values; ``check(value)`` returns what is wrong with a value (None when nothing is). On a
    list or dict field they apply to every element. :func:`check_values` enforces them.
    """
    metadata: dict[str, Any] = {"help": help}
    limits = {"min": min, "max": max, "above": above, "below": below, "check": check,
              "choices": None if choices is None else tuple(choices)}
    metadata.update({k: v for k, v in limits.items() if v is not None})
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


MAX_NAME_LENGTH = 100


def plain_name(value: str) -> str | None:
    """What keeps ``value`` from being one plain folder name (None if nothing does)."""
    if not value:
        return "must not be empty"
    if value in (".", ".."):
        return f"must be a folder name, not {value!r}"
    if any(c in value for c in "/\\\0"):
        return f"must be one folder name (no '/', '\\' or NUL), got {value!r}"
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}"
    return None


@dataclasses.dataclass
class RunConfig:
    """Where a run lives and how it is tracked."""

    name: str = param("default", f"run folder name: artifacts go to <root>/<name>/ (one folder, at most {MAX_NAME_LENGTH} characters)",
                      check=plain_name)
    root: str = param("runs", "parent folder of all run folders")
    seed: int = param(0, "master seed: same config and seed give the same numbers on the CPU", min=0)
    device: str = param("cpu", "torch device for training: cpu, cuda, cuda:1, ...")
    threads: int = param(1, "torch intra-op threads per process (0: torch's default; 2 is faster only on an idle machine)", min=0)
    wandb: bool = param(False, "also send scalars to wandb (offline unless wandb_mode says otherwise)")
    wandb_project: str = param("gridworld-sandbox", "wandb project name")
    wandb_mode: str = param("offline", "wandb mode: offline (no account needed), online or disabled",
                            choices=("offline", "online", "disabled"))
    progress: bool = param(True, "show progress bars")


def _apply_merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if key:
        return f"bad config key '{key}': {message}"
    return message


def _load_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml syntax errors come in many types
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{what} {path} must hold a mapping of config sections")
    return loaded


def available(kind: str) -> list[str]:
    """Names of the presets (``kind='presets'``) or env presets (``kind='env'``) in ``configs/``."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def parse_argv(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str], bool]:
    """Split a command line into ordered ``(kind, value)`` file layers, dotlist overrides and help."""
    layers: list[tuple[str, str]] = []
    overrides: list[str] = []
    want_help = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg in ("--preset", "--env", "--config"):
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            layers.append((arg[2:], args[i + 1]))
            i += 1
        elif arg.startswith(("--preset=", "--env=", "--config=")):
            flag, value = arg[2:].split("=", 1)
            layers.append((flag, value))
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(
                f"unrecognised argument '{arg}': use key=value, --preset NAME, --env NAME or --config FILE"
            )
        i += 1
    return layers, overrides, want_help


def load_config(
    schema: type,
    argv: Sequence[str] | None = None,
    extra_files: Sequence[str] = (),
    use_run_config: bool = True,
) -> DictConfig:
    """Build a config of dataclass type ``schema`` from the files and command line (see module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    layers, overrides, want_help = parse_argv(argv)
    cfg = OmegaConf.structured(schema)
    for name in extra_files:
        path = CONFIG_DIR / name
        cfg = _apply_merge(cfg, _load_yaml(path, "config file"), str(path))
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(f"command line: {_describe(error)}") from None
    if use_run_config and "run" in cfg:
        # The run name (and root) may come from any later layer; resolve them first.
        probe = cfg
        for kind, value in layers:
            probe = _apply_merge(probe, _layer(kind, value), f"--{kind} {value}")
        probe = _apply_merge(probe, cli, "command line")
        problem = plain_name(str(probe.run.name))
        if problem:  # before it becomes a path: '../x' would read another folder's config
            raise ConfigError(f"run.name: {problem}")
        saved = Path(probe.run.root) / probe.run.name / "config.yaml"
        try:
            is_run = saved.is_file()
        except OSError as error:  # a root the system cannot even look at (a component too long)
            raise ConfigError(f"run.root: cannot read {saved}: {error.strerror}") from None
        if is_run:
            cfg = _apply_merge(cfg, _load_yaml(saved, "run config"), str(saved))
    for kind, value in layers:
        cfg = _apply_merge(cfg, _layer(kind, value), f"--{kind} {value}")
    cfg = _apply_merge(cfg, cli, "command line")
    if want_help:  # after the merge: the help shows what this command line would run
        print(format_help(schema, cfg))
        raise SystemExit(0)
    return cfg


def _layer(kind: str, value: str) -> DictConfig:
    if kind == "config":
        return _load_yaml(Path(value), "config file")
    folder = "presets" if kind == "preset" else "env"
    path = CONFIG_DIR / folder / f"{value}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} '{value}': choose one of {available(folder)}")
    return _load_yaml(path, f"{kind} '{value}'")


def to_object(cfg: DictConfig) -> Any:
    """The typed dataclass instance behind ``cfg``."""
    return OmegaConf.to_object(cfg)


def format_help(schema: type, cfg: Any = None, prefix: str = "") -> str:
    """Every field of ``schema`` with its type, value, allowed values and description, one per line.

    The value is ``cfg``'s (a merged config) where given, else the dataclass default."""
    lines = [] if prefix else [_usage()]
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            doc = (kind.__doc__ or "").strip().splitlines()[0] if kind.__doc__ else ""
            lines.append(f"\n[{key}]  {doc}")
            lines.append(format_help(kind, None if cfg is None else cfg[f.name], prefix=f"{key}."))
            continue
        if cfg is not None:
            value = cfg[f.name]
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = "???"
        type_name = getattr(kind, "__name__", str(kind).replace("typing.", ""))
        allowed = _allowed(f.metadata)
        allowed = f"  ({allowed})" if allowed else ""
        lines.append(f"  {key}: {type_name} = {value!r}{allowed}    {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _allowed(metadata: Any) -> str:
    """The values a field's ``param`` bounds or choices allow, as text ('' when unbounded)."""
    if "choices" in metadata:
        return "one of " + ", ".join(str(c) for c in metadata["choices"])
    low = ("[", metadata["min"]) if "min" in metadata else ("(", metadata["above"]) if "above" in metadata else None
    high = ("]", metadata["max"]) if "max" in metadata else (")", metadata["below"]) if "below" in metadata else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _problem(value: Any, metadata: Any) -> str | None:
    """What is wrong with one value under a field's ``param`` limits (None if nothing is)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if "check" in metadata:
        problem = metadata["check"](value)
        if problem:
            return problem
    if "choices" in metadata and value not in metadata["choices"]:
        return f"must be {_allowed(metadata)}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        inside = (("min" not in metadata or value >= metadata["min"])
                  and ("max" not in metadata or value <= metadata["max"])
                  and ("above" not in metadata or value > metadata["above"])
                  and ("below" not in metadata or value < metadata["below"]))
        if not inside:
            return f"must be {_allowed(metadata)}, got {value!r}"
    return None


def value_problems(schema: type, cfg: Any, prefix: str = "") -> list[str]:
    """``'key: what is wrong'`` for every value of ``cfg`` outside its field's ``param`` limits
    (bounds, choices, check; and any float that is nan or infinite), walking nested sections."""
    problems = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        value = cfg[f.name] if isinstance(cfg, DictConfig) else getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            problems += value_problems(hints[f.name], value, prefix=f"{key}.")
            continue
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if isinstance(value, dict):
            items = [(f"{key}.{k}", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(key, value)]
        for name, item in items:
            problem = _problem(item, f.metadata)
            if problem:
                problems.append(f"{name}: {problem}")
    return problems


def check_values(schema: type, cfg: Any, prefix: str = "") -> None:
    """Raise a ``ConfigError`` naming every key of ``cfg`` whose value its field does not allow.

    ``prefix`` names a section checked on its own (``check_values(VagenConfig, cfg.vagen, "vagen.")``).
    """
    problems = value_problems(schema, cfg, prefix)
    if problems:
        raise ConfigError("; ".join(problems))


def _usage() -> str:
    return (
        "usage: [--env NAME] [--preset NAME] [--config FILE] [key=value ...]\n"
        f"  env presets: {', '.join(available('env'))}\n"
        f"  presets: {', '.join(available('presets'))}\n"
        "config keys, each with the value this command line runs (dataclass default, then files, then\n"
        "key=value) and, in parentheses, the values it allows:"
    )


def cli_config(
    schema: type,
    argv: Sequence[str] | None = None,
    extra_files: Sequence[str] = (),
    validate: Any = None,
) -> DictConfig:
    """``load_config`` for entry points: a bad config prints its reason and exits with code 2,
    before anything is written.

    Every value is checked against its field's bounds and choices (:func:`check_values`), then
    ``validate(cfg)`` may check what those cannot (an env id, a policy mix, one field against
    another) and raise ``ConfigError`` or ``ValueError`` naming the key.
    """
    try:
        cfg = load_config(schema, argv, extra_files=extra_files)
        check_values(schema, cfg)
        if validate is not None:
            try:
                validate(cfg)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return cfg
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
