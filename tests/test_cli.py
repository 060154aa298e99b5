"""The ``sandbox`` console command dispatches to the scripts, and the set-up chooses the torch build."""

import subprocess
import sys
from pathlib import Path

import pytest

from scripts import cli

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_is_a_script_with_main_and_the_entry_point_is_declared():
    import importlib

    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(f"scripts.{module}").main)
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project needs 3.10)
    assert '[project.scripts]\nsandbox = "scripts.cli:main"' in pyproject


def test_usage_unknown_command_and_a_command_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "train-dynamics" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code == 2 and "unknown command 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["collect", "--preset", "tiny", "--help"])
    assert exit_info.value.code == 0 and "collect.num_episodes: int = 8" in capsys.readouterr().out


def test_same_exit_code_as_the_script_for_a_bad_value(run_root):
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "collect", f"run.root={run_root}",
                             "collect.num_episodes=0"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "collect.num_episodes" in result.stderr and not run_root.exists()


def test_setup_refuses_an_unknown_torch_build():
    result = subprocess.run(["bash", "-c", "source scripts/_venv.sh"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "SANDBOX_TORCH": "bogus", "SANDBOX_VENV": "/nonexistent/venv"})
    assert result.returncode == 2 and "SANDBOX_TORCH='bogus'" in result.stderr  # before anything is created
