"""Config values: each field's bounds and choices, the cross-field checks, run names, one source of
defaults, and a --help that prints the values a command line would run."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import CONFIG_DIR, ConfigError, check_values, cli_config, load_config, param, value_problems
from scripts.config import Config, validate

ROOT = Path(__file__).resolve().parent.parent


def _exit_code_and_error(argv, capsys, extra_files=()):
    with pytest.raises(SystemExit) as exit_info:
        cli_config(Config, argv, extra_files=extra_files, validate=validate)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override,key", [
    # counts, steps, sizes, intervals that break the code (or save an untrained artifact) at 0
    ("collect.num_episodes=0", "collect.num_episodes"),
    ("collect.episodes_per_shard=0", "collect.episodes_per_shard"),
    ("collect.num_envs=0", "collect.num_envs"),
    ("dynamics.steps=-1", "dynamics.steps"),
    ("dynamics.steps=0", "dynamics.steps"),
    ("tokenizer.steps=0", "tokenizer.steps"),
    ("dreamer.updates=0", "dreamer.updates"),
    ("tokenizer.batch_size=0", "tokenizer.batch_size"),
    ("dynamics.batch_size=0", "dynamics.batch_size"),
    ("dreamer.batch_size=0", "dreamer.batch_size"),
    ("dreamer.horizon=0", "dreamer.horizon"),
    ("tokenizer.log_every=0", "tokenizer.log_every"),
    ("dreamer.checkpoint_every=0", "dreamer.checkpoint_every"),
    ("evaluate.episodes=0", "evaluate.episodes"),
    ("evaluate.bootstrap=10", "evaluate.bootstrap"),
    ("vagen.minibatch_turns=0", "vagen.minibatch_turns"),
    ("dynamics.window=1", "dynamics.window"),
    ("run.seed=-1", "run.seed"),
    # probabilities, fractions, rates
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("dreamer.discount=1.5", "dreamer.discount"),
    ("dreamer.near_reward_starts=-0.1", "dreamer.near_reward_starts"),
    ("dynamics.lr=0", "dynamics.lr"),
    ("dynamics.lr=nan", "dynamics.lr"),
    ("vagen.turn_lambda=2", "vagen.turn_lambda"),
    # choices
    ("env.obs=ego", "env.obs"),
    ("tokenizer.quantizer=kmeans", "tokenizer.quantizer"),
    ("dynamics.block=rnn", "dynamics.block"),
    ("dynamics.memory=lstm", "dynamics.memory"),
    ("vagen.strategy=Thinking", "vagen.strategy"),
    ("run.wandb_mode=loud", "run.wandb_mode"),
    # list and dict elements are named one by one
    ("tokenizer.fsq_levels=[8,1]", "tokenizer.fsq_levels[1]"),
    ("vagen.field_weights.door=-1", "vagen.field_weights.door"),
    # parsed values and checks across fields (scripts.config.validate)
    ("collect.policy_mix=epsilon_oracle@1.5:1", "collect.policy_mix"),
    ("collect.policy_mix=sticky_random@1:1", "collect.policy_mix"),
    ("collect.policy_mix=random:0", "collect.policy_mix"),
    ("dynamics.heads=3", "dynamics.dim"),
    ("vagen.heads=3", "vagen.d_model"),
    ("vagen.lr_final=0.1", "vagen.lr_final"),
    ("vagen.field_weights.nose=1", "vagen.field_weights"),
    ("evaluate.policies=dreamer,random", "evaluate.policies"),
])
def test_a_bad_value_exits_2_naming_the_key(override, key, run_root, capsys):
    code, err = _exit_code_and_error([f"run.root={run_root}", override], capsys)
    assert code == 2
    assert f"config error: {key}" in err
    assert not run_root.exists()


def test_the_message_names_key_bound_and_value(run_root, capsys):
    _, err = _exit_code_and_error([f"run.root={run_root}", "tokenizer.batch_size=0"], capsys)
    assert "tokenizer.batch_size: must be >= 1, got 0" in err
    _, err = _exit_code_and_error([f"run.root={run_root}", "data.val_fraction=1"], capsys)
    assert "data.val_fraction: must be in [0, 1), got 1.0" in err
    _, err = _exit_code_and_error([f"run.root={run_root}", "dreamer.actor_lr=0"], capsys)
    assert "dreamer.actor_lr: must be > 0, got 0.0" in err
    _, err = _exit_code_and_error([f"run.root={run_root}", "dynamics.block=rnn"], capsys)
    assert "dynamics.block: must be one of conv, mix, attention, got 'rnn'" in err


def test_every_bad_value_is_reported_at_once(run_root, capsys):
    _, err = _exit_code_and_error([f"run.root={run_root}", "tokenizer.steps=0", "dreamer.horizon=0"], capsys)
    assert "tokenizer.steps" in err and "dreamer.horizon" in err


@pytest.mark.parametrize("override", [
    "collect.num_steps=0", "env.max_steps=0", "run.threads=0", "dynamics.eval_every=0", "dynamics.video_every=0",
    "dynamics.checkpoint_every=0", "dynamics.grad_clip=0", "dynamics.time_limit_s=0", "dynamics.event_fraction=0",
    "dreamer.bc_steps=0", "evaluate.max_steps=0", "vagen.target_kl=0", "vagen.checkpoint_every=0",
    "vagen.format_warmup_steps=0", "vagen.eval_temperature=0", "vagen.value_huber_delta=0",
    "tokenizer.encoder_lr_scale=0", "data.val_fraction=0", "dreamer.discount=1",
])
def test_zero_stays_allowed_where_it_means_off(override, run_root):
    cli_config(Config, [f"run.root={run_root}", override], validate=validate)


@pytest.mark.parametrize("argv,extra_files", [
    ([], ()), (["--preset", "tiny"], ()), ([], ("quickstart.yaml",)), (["--preset", "tiny"], ("quickstart.yaml",)),
] + [(["--env", name], ()) for name in sorted(p.stem for p in (CONFIG_DIR / "env").glob("*.yaml"))])
def test_shipped_configs_pass_every_check(argv, extra_files, run_root):
    cfg = cli_config(Config, [f"run.root={run_root}", *argv], extra_files=extra_files, validate=validate)
    assert value_problems(Config, cfg) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", "''", "x" * 101])  # '': the empty string
def test_run_name_is_one_plain_folder_name(name, run_root, capsys):
    code, err = _exit_code_and_error([f"run.root={run_root}", f"run.name={name}"], capsys)
    assert code == 2 and "config error: run.name: must" in err
    assert not run_root.exists()


def test_run_name_with_a_nul_is_refused(run_root):
    cfg = load_config(Config, [f"run.root={run_root}"])
    cfg.run.name = "a\0b"
    with pytest.raises(ConfigError, match="run.name: must be one folder name"):
        check_values(Config, cfg)


def test_a_plain_name_of_100_characters_is_fine(run_root):
    cli_config(Config, [f"run.root={run_root}", f"run.name={'x' * 100}"], validate=validate)


def test_collect_script_refuses_before_writing(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()  # an existing root: a 300-character name once ended in a raw OSError reading it
    for override, key in [("collect.num_episodes=0", "collect.num_episodes"), (f"run.name={'n' * 300}", "run.name")]:
        result = subprocess.run([sys.executable, "scripts/collect.py", f"run.root={root}", override], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert f"config error: {key}" in result.stderr and "Traceback" not in result.stderr
        assert not any(root.iterdir())


def test_tokenizer_script_runs_the_common_checks(run_root, capsys):
    """scripts/train_tokenizer.py validates every section as the other scripts do (env.id included)."""
    from scripts.train_tokenizer import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"run.root={run_root}", "env.id=DoorKey-7x7"])
    assert exit_info.value.code == 2 and "env.id" in capsys.readouterr().err
    assert not run_root.exists()


def test_vagen_check_config_checks_the_section_for_direct_callers():
    from agents.vagen.train import VagenConfig, check_config

    with pytest.raises(ValueError, match="vagen.advantage: must be one of bilevel, turn"):
        check_config(OmegaConf.structured(VagenConfig(advantage="gae")))
    check_config(OmegaConf.structured(VagenConfig()))


# ---------------------------------------------------------------------------------------------
# One source of defaults
# ---------------------------------------------------------------------------------------------


def test_no_stage_defaults_file_repeats_the_dataclasses():
    """Defaults live in the dataclasses; configs/ holds only the deliberate overrides."""
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == ["quickstart.yaml"]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_override_file_key_is_in_the_schema(path):
    loaded = OmegaConf.load(path)
    schema = OmegaConf.structured(Config)
    for section, values in loaded.items():
        assert section in schema, f"{path}: unknown section {section}"
        for key in values:
            assert key in schema[section], f"{path}: unknown key {section}.{key}"


def test_help_shows_the_merged_values(tmp_path):
    """What --help prints is what the same command line runs: the preset's, not the dataclass's."""
    result = subprocess.run([sys.executable, "scripts/collect.py", "--preset", "tiny", "--help", f"run.root={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "collect.num_episodes: int = 8  (>= 1)" in result.stdout
    assert "dynamics.window: int = 4" in result.stdout  # the preset's; the default is 8
    assert not any(tmp_path.iterdir())


def test_help_of_the_quickstart_and_of_overrides(run_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(Config, [f"run.root={run_root}", "--help", "collect.seed=7"], extra_files=("quickstart.yaml",))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "run.name: str = 'quickstart'" in out and "dreamer.updates: int = 600" in out
    assert "collect.policy_mix: str = 'random:1'" in out and "collect.seed: int = 7" in out
    with pytest.raises(SystemExit):
        load_config(Config, [f"run.root={run_root}", "--help"])
    out = capsys.readouterr().out
    assert "dynamics.window: int = 8" in out  # what ran from the old configs/dynamics.yaml, not the 16 help printed
    assert "collect.policy_mix: str = 'random:0.5,epsilon_oracle@0.3:0.3,sticky_random@0.75:0.2'" in out


# Numeric fields any real value suits: everything else declares its bounds beside the field.
UNBOUNDED = {"tokenizer.sampling_power", "vagen.format_penalty"}


def _numeric_fields(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _numeric_fields(kind, f"{prefix}{f.name}.")
        elif kind in (int, float) or typing.get_args(kind)[-1:] in ((int,), (float,)):
            yield f"{prefix}{f.name}", f.metadata


def test_every_numeric_field_declares_its_bounds():
    unbounded = {key for key, meta in _numeric_fields(Config) if not {"min", "max", "above", "below"} & set(meta)}
    assert unbounded == UNBOUNDED


def test_param_limits_apply_to_each_element():
    @dataclasses.dataclass
    class Section:
        sizes: list[int] = param(default_factory=lambda: [1, 2], help="sizes", min=1)
        rate: float = param(0.5, "rate", above=0, below=1)
        mode: str = param("a", "mode", choices=("a", "b"))

    assert value_problems(Section, Section()) == []
    problems = value_problems(Section, Section(sizes=[1, 0], rate=1.0, mode="c"), prefix="s.")
    assert problems == ["s.sizes[1]: must be >= 1, got 0", "s.rate: must be in (0, 1), got 1.0",
                        "s.mode: must be one of a, b, got 'c'"]
    assert value_problems(Section, Section(rate=float("inf"))) == ["rate: must be a finite number, got inf"]
