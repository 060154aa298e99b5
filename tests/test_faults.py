"""Fault injection: a run folder cannot be poisoned.

One tiny quickstart run is built once; each case copies it, breaks one thing (a bad value, a
corrupt file, a second writer, a kill), and checks: the command fails with the right exit code
(2 for a config value) and a message naming the key or file, every artifact that existed before is
byte-identical (logs aside: ``commands.log`` and ``tb/`` record that a command ran), and after the
fix the same command succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.stage import read_manifest

ROOT = Path(__file__).resolve().parent.parent
FAST = ["dynamics.steps=30", "dynamics.checkpoint_every=15"]
STAGE_NAMES = ("collect", "tokenizer", "dynamics", "dreamer", "evaluate")
LOGS = ("commands.log", "tb", ".lock")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete tiny quickstart run folder (run.name=quickstart)."""
    from scripts import quickstart

    root = tmp_path_factory.mktemp("built") / "runs"
    quickstart.main(["--preset", "tiny", f"run.root={root}", *FAST])
    return root / "quickstart"


@pytest.fixture
def run(built, tmp_path):
    """A fresh copy of the built run: (run folder, argv that names it)."""
    root = tmp_path / "runs"
    shutil.copytree(built, root / "quickstart")
    return root / "quickstart", ["--preset", "tiny", f"run.root={root}", "run.name=quickstart", *FAST]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file of a run folder but its logs."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in LOGS:
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def call(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``scripts/<script>.py``'s main in this process: (exit code, stdout, stderr)."""
    import importlib

    module = importlib.import_module(f"scripts.{script}")
    code = 0
    try:
        module.main(list(argv))
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def contents(folder: Path) -> dict[str, str]:
    """Each stage's recorded content identity (data and weights, not timings)."""
    return {name: (read_manifest(folder, name) or {}).get("content") for name in STAGE_NAMES}


def refused(script: str, argv: list[str], capsys, folder: Path, code: int, *needles: str) -> str:
    before = snapshot(folder)
    got, _, err = call(script, argv, capsys)
    assert got == code, err
    for needle in needles:
        assert needle in err, err
    assert snapshot(folder) == before, "an artifact changed"
    return err


# ---------------------------------------------------------------------------------------------
# 1, 2, 14: bad values are refused before anything is written (exit 2, naming the key)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,override,key", [
    ("collect", "collect.num_episodes=0", "collect.num_episodes"),
    ("collect", "collect.episodes_per_shard=0", "collect.episodes_per_shard"),
    ("collect", "collect.policy_mix=epsilon_oracle@1.5:1", "collect.policy_mix"),
    ("train_tokenizer", "tokenizer.batch_size=0", "tokenizer.batch_size"),
    ("train_tokenizer", "tokenizer.steps=0", "tokenizer.steps"),
    ("train_tokenizer", "tokenizer.log_every=0", "tokenizer.log_every"),
    ("train_dynamics", "dynamics.steps=-1", "dynamics.steps"),
    ("train_dynamics", "dynamics.steps=0", "dynamics.steps"),
    ("train_dynamics", "dynamics.batch_size=0", "dynamics.batch_size"),
    ("train_dreamer", "dreamer.updates=0", "dreamer.updates"),
    ("train_dreamer", "dreamer.horizon=0", "dreamer.horizon"),
    ("train_dreamer", "dreamer.batch_size=0", "dreamer.batch_size"),
    ("evaluate", "evaluate.episodes=0", "evaluate.episodes"),
    ("evaluate", "evaluate.policies=dreamer,random", "evaluate.policies"),
    ("quickstart", "run.name=../../x", "run.name"),
    ("quickstart", "run.name=" + "x" * 300, "run.name"),
])
def test_bad_value_is_refused_before_anything_is_written(run, capsys, script, override, key):
    folder, argv = run
    refused(script, argv + [override], capsys, folder, 2, key)
    assert not (folder.parent.parent / "x").exists()


def test_a_refused_value_leaves_no_trace_in_the_run_config(run, capsys):
    folder, argv = run
    refused("train_tokenizer", argv + ["tokenizer.batch_size=0"], capsys, folder, 2, "tokenizer.batch_size")
    code, out, _ = call("train_tokenizer", argv, capsys)
    assert code == 0 and "[tokenizer] complete" in out


# ---------------------------------------------------------------------------------------------
# 3: a diverged loss stops training, nothing non-finite is saved, the old artifact stays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,override", [("train_dynamics", "dynamics.lr=1e6"),
                                             ("train_tokenizer", "tokenizer.learning_rate=1e9")])
def test_nan_training_is_refused(run, capsys, script, override):
    folder, argv = run
    err = refused(script, argv + [override], capsys, folder, 1, "training diverged")
    assert "nothing was saved" in err
    code, out, _ = call(script, argv, capsys)  # the same command without the bad value
    assert code == 0 and "complete" in out


# ---------------------------------------------------------------------------------------------
# 4, 12: identities are made of content: a rerun, a copy or a retrain with equal weights is complete
# ---------------------------------------------------------------------------------------------


def test_every_stage_of_a_quickstart_run_is_complete_for_its_own_script(run, capsys):
    folder, argv = run
    before = snapshot(folder)
    for script in ("collect", "train_tokenizer", "train_dynamics", "train_dreamer", "evaluate"):
        code, out, err = call(script, argv, capsys)
        assert code == 0 and "complete" in out and "skipped" in out, err
    assert snapshot(folder) == before


def test_a_retrained_model_with_the_same_weights_keeps_later_stages_complete(run, capsys):
    folder, argv = run
    (folder / "stages" / "dynamics.json").unlink()  # nothing vouches for dynamics.pt: it is retrained
    code, out, err = call("quickstart", argv, capsys)
    assert code == 0, err
    assert "[dynamics] done" in out and "dynamics.unverified.pt" in out
    assert "[dreamer] complete" in out and "[evaluate] complete" in out  # same seed, same weights


# ---------------------------------------------------------------------------------------------
# 5, 6, 7: corrupt inputs are refused naming the file; a stage's own corrupt artifact is rebuilt
# ---------------------------------------------------------------------------------------------


def flip_bytes(path: Path, at: float = 0.6, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = os.urandom(count)
    path.write_bytes(bytes(data))


def test_corrupt_dynamics_weights_are_refused_by_the_stages_that_read_them(run, capsys):
    folder, argv = run
    flip_bytes(folder / "dynamics.pt")
    refused("train_dreamer", argv + ["dreamer.updates=30"], capsys, folder, 1, "dynamics.pt")
    refused("evaluate", argv, capsys, folder, 1, "dynamics.pt")


def test_corrupt_agent_is_refused_by_evaluate_and_rebuilt_by_its_stage(run, capsys):
    folder, argv = run
    original = contents(folder)["dreamer"]
    flip_bytes(folder / "dreamer.pt")
    refused("evaluate", argv, capsys, folder, 1, "dreamer.pt")
    code, out, err = call("train_dreamer", argv, capsys)
    assert code == 0 and "dreamer.broken.pt" in out, err
    assert contents(folder)["dreamer"] == original  # rebuilt to the same weights
    assert (folder / "dreamer.broken.pt").is_file()


def test_truncated_files_name_themselves(run, capsys):
    folder, argv = run
    for name in ("dreamer.pt", "tokenizer.pt"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    refused("evaluate", argv, capsys, folder, 1, "tokenizer.pt")
    code, out, err = call("train_tokenizer", argv, capsys)  # its own stage: rebuilt, the broken one kept
    assert code == 0 and "tokenizer.broken.pt" in out, err


def test_a_policy_that_is_not_a_checkpoint_is_named(run, capsys, tmp_path):
    folder, argv = run
    bogus = tmp_path / "policy.json"
    bogus.write_text("{}")
    refused("evaluate", argv + [f"evaluate.policies=random,oracle,{bogus}"], capsys, folder, 1, str(bogus))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_collect_checks_its_shards(run, capsys, damage):
    folder, argv = run
    original = contents(folder)["collect"]
    shard = folder / "dataset" / "shard_00001.npz"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    # Stages that read the dataset refuse it, naming the shard.
    refused("train_tokenizer", argv + ["tokenizer.steps=50"], capsys, folder, 1, "shard_00001.npz")
    code, out, err = call("collect", argv, capsys)  # its own stage recollects; the damaged folder is kept
    assert code == 0 and "dataset.broken" in out, err
    assert contents(folder)["collect"] == original


def test_corrupt_card_and_shard_name_the_file(run, capsys):
    folder, argv = run
    external = folder.parent / "elsewhere"
    shutil.copytree(folder / "dataset", external)
    (folder / "dataset" / "card.json").write_text("{not json")
    refused("train_dynamics", argv + ["dynamics.steps=31"], capsys, folder, 1, "card.json")
    # A dataset elsewhere (data.path), whose shard's bytes were damaged after its card was written.
    flip_bytes(external / "shard_00000.npz", at=0.5, count=16)
    refused("train_tokenizer", argv + ["run.name=ext", f"data.path={external}"], capsys, folder, 1,
            "shard_00000.npz", "corrupt")


# ---------------------------------------------------------------------------------------------
# 8: a dataset of another env
# ---------------------------------------------------------------------------------------------


def test_a_dataset_of_another_env_is_refused(run, capsys):
    folder, argv = run
    other = argv + ["run.name=six", f"data.path={folder / 'dataset'}", "--env", "doorkey-6x6"]
    code, _, err = call("train_tokenizer", other, capsys)
    assert code == 2 and "env.id" in err and "MiniGrid-DoorKey-5x5-v0" in err
    assert not (folder.parent / "six" / "tokenizer.pt").exists()


# ---------------------------------------------------------------------------------------------
# 9, 10: a changed config reruns exactly the stages it touches; a resume of another config is dropped
# ---------------------------------------------------------------------------------------------


def test_a_changed_config_reruns_only_what_it_touches_and_keeps_the_old(run, capsys):
    folder, argv = run
    before = snapshot(folder)
    code, out, err = call("quickstart", argv + ["dreamer.hidden_dim=64"], capsys)
    assert code == 0, err
    assert "[collect] complete" in out and "[tokenizer] complete" in out and "[dynamics] complete" in out
    assert "dreamer.hidden_dim: 32 -> 64" in out and "[dreamer] done" in out and "[evaluate] done" in out
    kept = [p for p in folder.glob("dreamer.*.pt") if p.name != "dreamer.pt"]
    assert len(kept) == 1 and hashlib.sha256(kept[0].read_bytes()).hexdigest() == before["dreamer.pt"]
    from omegaconf import OmegaConf

    assert OmegaConf.load(folder / "config.yaml").dreamer.hidden_dim == 64  # it describes the checkpoints


def test_a_resume_checkpoint_of_another_config_is_not_mixed_in(run, capsys, monkeypatch):
    import worldmodel.train_dynamics as loop

    folder, argv = run
    changed = argv + ["dynamics.lr=0.001"]
    calls = {"n": 0}
    original = loop._LossWrapper.forward

    def dies_at_step_20(self, batch, generator):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch, generator)

    monkeypatch.setattr(loop._LossWrapper, "forward", dies_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        call("train_dynamics", changed, capsys)
    monkeypatch.setattr(loop._LossWrapper, "forward", original)
    assert (folder / "dynamics.resume.pt").is_file()
    assert not list(folder.glob("dynamics.*.pt")) or (folder / "dynamics.pt").is_file()  # the old one was put back
    code, out, err = call("train_dynamics", argv + ["dynamics.lr=0.002"], capsys)
    assert code == 0, err
    assert "written for another config or inputs: deleted, starting over" in out
    assert "resuming" not in out


# ---------------------------------------------------------------------------------------------
# 11, 12, 13: temp files of dead writers, the lock, file modes, a full disk
# ---------------------------------------------------------------------------------------------


def test_stale_temp_files_are_removed_and_live_ones_kept(run, capsys):
    folder, argv = run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [folder / f".dreamer.resume.pt.{dead.stdout.strip()}.abc.tmp",
             folder / "dreamer_checkpoints" / ".step_000010.pt.k2j3.tmp"]  # the name before pids were in it
    for path in stale:
        path.write_bytes(b"half")
    code, out, _ = call("train_dreamer", argv, capsys)
    assert code == 0 and "removed 2 temporary file(s)" in out
    assert not any(path.exists() for path in stale)


def test_a_second_writer_fails_at_once_naming_the_holder(run, capsys):
    folder, argv = run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from common.stage import RunLock; "
         "RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)", str(ROOT), str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        refused("quickstart", argv, capsys, folder, 1, f"in use by process {holder.pid}")
        assert time.perf_counter() - started < 10
    finally:
        holder.kill()
        holder.wait()
    code, _, err = call("evaluate", argv, capsys)  # once it is gone the folder is free
    assert code == 0, err


def test_artifacts_get_the_users_umask(built):
    for name in ("tokenizer.pt", "dynamics.pt", "dreamer.pt", "config.yaml", "report.md", "dataset/card.json",
                 "stages/dreamer.json"):
        assert (built / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_full_disk_is_named_and_keeps_what_is_complete(run, capsys, monkeypatch):
    import errno

    import common.atomic as atomic

    folder, argv = run
    real_fdopen = os.fdopen

    def full(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return handle

    monkeypatch.setattr(atomic.os, "fdopen", full)
    err = refused("train_dreamer", argv + ["dreamer.updates=30"], capsys, folder, 1, "No space left on device")
    assert "dreamer" in err and not list(folder.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# kill -9 at any point, then rerun: the same data and weights as an uninterrupted run
# ---------------------------------------------------------------------------------------------


def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_result(built, tmp_path):
    root = tmp_path / "runs"
    folder = root / "quickstart"
    command = [sys.executable, "scripts/quickstart.py", "--preset", "tiny", f"run.root={root}", *FAST]
    # Killed while the dynamics model trains (its resume checkpoint exists), then while the agent trains.
    for marker in (folder / "dynamics.resume.pt", folder / "dreamer_checkpoints" / "step_000010.pt"):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert contents(folder) == contents(built)
    assert all(contents(folder)[name] for name in STAGE_NAMES if name != "evaluate")
    assert not list(folder.rglob("*.tmp"))
    assert json.loads((folder / "metrics.json").read_text())["evaluate"]["num_policies"] >= 8


def test_a_model_that_pays_what_the_real_env_does_not_is_flagged(run, capsys):
    """The exploitation flag: a world model that pays a success on every first step (the real env
    pays nothing so early) must put "do not trust" in the report's headline, the metrics and the
    printed summary; on the honest model of the same run the agent's figures are not flagged."""
    from agents.evaluate import evaluate
    from common.config import cli_config
    from common.runs import RunDir
    from scripts.config import Config
    from scripts.evaluate import warnings
    from worldmodel.imagine import ImagineStep, load_world_model

    folder, argv = run
    cfg = cli_config(Config, [*argv, "evaluate.episodes=4", "evaluate.bootstrap=100", "evaluate.gif_policies=dreamer",
                              "evaluate.policies=dreamer,random,oracle"])
    honest = load_world_model(run_dir=folder)

    class Lying:
        """The run's world model, except that every step succeeds: reward 1, episode over."""

        def __getattr__(self, name):
            return getattr(honest, name)

        def step(self, actions, sampling=None):
            real = honest.step(actions, sampling)
            return ImagineStep(tokens=real.tokens, reward=torch.ones_like(real.reward),
                               terminated=torch.ones_like(real.terminated), state_fn=lambda: real.state)

    import torch

    run_dir = RunDir(cfg, "evaluate", argv)
    metrics = evaluate(cfg, run_dir, world_model=Lying())
    assert metrics["trusted"] is False
    assert any(flag.startswith("dreamer imagines more than the real env pays") for flag in metrics["flags"])
    assert "Do not trust this run's imagined figures" in (folder / "report.md").read_text()
    assert "WARNING: dreamer imagines more than the real env pays" in warnings(metrics)
    honest_metrics = evaluate(cfg, run_dir, world_model=load_world_model(run_dir=folder))
    gaps = {row["policy"]: abs(row["return_gap"]) for row in honest_metrics["policies"]}
    flagged = {flag.split(" ")[0] for flag in honest_metrics["flags"]}
    assert all(gaps[name] > 0.1 for name in flagged)  # only gaps beyond evaluate.trust_gap are flagged
    assert honest_metrics["trusted"] == (not flagged & {"dreamer", "dreamer@10", "dreamer@20"})
