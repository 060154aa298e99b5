"""Typed configs: unknown keys and wrong types fail naming the key, with exit code 2."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from common.config import ConfigError, cli_config, load_config
from scripts.config import Config, validate

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_defaults_files_and_overrides(run_root):
    cfg = load_config(Config, [f"run.root={run_root}", "--env", "doorkey-6x6", "collect.num_episodes=3"])
    assert cfg.env.id == "MiniGrid-DoorKey-6x6-v0"
    assert cfg.collect.num_episodes == 3
    assert cfg.collect.episodes_per_shard == 64  # the dataclass default: no stage file on top
    assert cfg.collect.policy_mix == "random:0.5,epsilon_oracle@0.3:0.3,sticky_random@0.75:0.2"


def test_preset_order_and_quickstart_file(run_root):
    cfg = load_config(Config, [f"run.root={run_root}", "--preset", "tiny"], extra_files=("quickstart.yaml",))
    assert cfg.run.name == "quickstart" and cfg.env.id == "MiniGrid-DoorKey-5x5-v0"
    assert cfg.collect.num_steps == 0 and cfg.collect.num_episodes == 8  # tiny wins over quickstart


@pytest.mark.parametrize("override,key", [
    ("collect.num_episdes=3", "collect.num_episdes"),
    ("colect.num_episodes=3", "colect"),
    ("collect.num_episodes=abc", "collect.num_episodes"),
    ("run.wandb=maybe", "run.wandb"),
])
def test_bad_keys_and_types_name_the_key(override, key, run_root, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
        load_config(Config, [f"run.root={run_root}", override])
    with pytest.raises(SystemExit) as exit_info:
        cli_config(Config, [f"run.root={run_root}", override])
    assert exit_info.value.code == 2
    assert key in capsys.readouterr().err


def test_bad_values_the_types_cannot_catch(run_root, capsys):
    for override, key in [("env.id=DoorKey-7x7", "env.id"), ("collect.policy_mix=foo:1", "collect.policy_mix")]:
        with pytest.raises(SystemExit) as exit_info:
            cli_config(Config, [f"run.root={run_root}", override], validate=validate)
        assert exit_info.value.code == 2
        assert key in capsys.readouterr().err


def test_unknown_preset_and_argument(run_root):
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config(Config, ["--preset", "huge"])
    with pytest.raises(ConfigError, match="unrecognised argument '--fast'"):
        load_config(Config, ["--fast"])


def test_run_folder_config_is_reused(run_root):
    from common.runs import RunDir

    cfg = load_config(Config, [f"run.root={run_root}", "run.name=a", "collect.num_episodes=5"])
    RunDir(cfg, "test", argv=["x"]).record_config(cfg, ["collect"])
    again = load_config(Config, [f"run.root={run_root}", "run.name=a"])
    assert again.collect.num_episodes == 5
    fresh = load_config(Config, [f"run.root={run_root}", "run.name=b"])
    assert fresh.collect.num_episodes == 200
    saved = OmegaConf.load(run_root / "a" / "config.yaml")
    assert saved.collect.num_episodes == 5
    assert "[test] x" in (run_root / "a" / "commands.log").read_text()


def test_script_exit_code_and_help():
    bad = subprocess.run([sys.executable, "scripts/collect.py", "collect.num_episdes=1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "collect.num_episdes" in bad.stderr
    helped = subprocess.run([sys.executable, "scripts/collect.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "collect.policy_mix" in helped.stdout
