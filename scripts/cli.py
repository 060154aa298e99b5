"""The ``sandbox`` command: one entry point per script, equivalent to ``python scripts/<name>.py``.

    sandbox quickstart --preset tiny run.name=first
    sandbox collect --env doorkey-6x6 collect.num_episodes=500
    sandbox train-dynamics --help

Installed by ``pip install -e .`` (``[project.scripts]`` in pyproject.toml). Each command takes the
same arguments as its script; ``sandbox COMMAND --help`` lists its config keys.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module under scripts/, one line of what it does)
COMMANDS = {
    "quickstart": ("quickstart", "every stage in order in one run folder (the main job)"),
    "collect": ("collect", "roll the behaviour-policy mix and write the offline dataset"),
    "train-tokenizer": ("train_tokenizer", "train the frame tokenizer on the dataset"),
    "train-dynamics": ("train_dynamics", "train the dynamics model (world model) on the tokenised dataset"),
    "train-inverse": ("train_inverse", "train the inverse dynamics model (frame pair -> actions) on the dataset"),
    "train-dreamer": ("train_dreamer", "train the Dreamer-style agent in imagination only"),
    "train-ppo": ("train_ppo", "train the model-free PPO baseline on the real env"),
    "train-vagen": ("train_vagen", "train the VAGEN-style agent"),
    "evaluate": ("evaluate", "evaluate policies in the real env and in the world model"),
    "compare": ("compare", "several evaluated runs in one table and one scatter"),
    "export-minari": ("export_minari", "write a dataset folder as a Minari dataset (the minari extra)"),
    "play": ("play", "play inside a run's world model in the browser, beside the real env"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: sandbox COMMAND [--env NAME] [--preset NAME] [--config FILE] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "sandbox COMMAND --help lists the command's config keys with the values that would run."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> object:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"sandbox: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"scripts.{COMMANDS[command][0]}")
    return module.main(rest)


if __name__ == "__main__":
    main()
