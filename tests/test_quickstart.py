"""The README's main command: the quickstart runs end to end on the tiny preset and resumes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The tiny preset's dynamics steps are sized for its learning test; here only the plumbing counts.
FAST = ["dynamics.steps=30", "dynamics.checkpoint_every=15"]


@pytest.fixture(scope="module")
def tiny_quickstart(tmp_path_factory):
    """One tiny quickstart run shared by the tests below (it is the slowest thing in the suite)."""
    root = tmp_path_factory.mktemp("quickstart") / "runs"
    result = subprocess.run(
        [sys.executable, "scripts/quickstart.py", "--preset", "tiny", f"run.root={root}", *FAST],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    return root, result


def test_quickstart_runs_every_stage(tiny_quickstart):
    from scripts.quickstart import STAGES, main  # noqa: F401

    root, result = tiny_quickstart
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from common.config import load_config
    from scripts.config import Config

    cfg = load_config(Config, ["--preset", "tiny", f"run.root={root}"], extra_files=("quickstart.yaml",))
    for stage in STAGES:
        assert all(path.exists() for path in stage.outputs(cfg)), f"stage {stage.name} left no artifact"
        assert f"[{stage.name}] done" in result.stdout
    assert f"results: {root / 'quickstart'}" in result.stdout


def test_quickstart_rerun_skips_finished_stages(tiny_quickstart):
    from scripts.quickstart import STAGES

    root, first = tiny_quickstart
    assert first.returncode == 0
    again = subprocess.run(
        [sys.executable, "scripts/quickstart.py", "--preset", "tiny", f"run.root={root}", *FAST],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert f"[{stage.name}] complete" in again.stdout and f"[{stage.name}] done" not in again.stdout


def test_killed_between_stages_resumes_without_redoing(run_root, monkeypatch):
    import scripts.quickstart as quickstart

    if len(quickstart.STAGES) < 2:
        pytest.skip("the quickstart has a single stage so far")
    ran = []
    originals = {stage.name: stage.body for stage in quickstart.STAGES}
    second = quickstart.STAGES[1].name

    def wrap(name):
        def run(cfg, run_dir):
            if name == second and not ran.count(("killed", name)):
                ran.append(("killed", name))
                raise KeyboardInterrupt("killed between stages")
            ran.append(name)
            return originals[name](cfg, run_dir)
        return run

    for stage in quickstart.STAGES:
        monkeypatch.setattr(stage, "body", wrap(stage.name))
    argv = ["--preset", "tiny", f"run.root={run_root}", *FAST]
    with pytest.raises(KeyboardInterrupt):
        quickstart.main(argv)
    assert ran == [quickstart.STAGES[0].name, ("killed", second)]
    quickstart.main(argv)
    assert ran[2:] == [stage.name for stage in quickstart.STAGES[1:]]  # the first stage was not redone


def test_quickstart_report_metrics_and_videos(tiny_quickstart):
    """The evaluation stage's outputs exist and parse: metrics, report table, plots, side-by-side GIFs."""
    import json

    import imageio.v3 as iio

    from agents.policy import PolicyInput, load_policy

    root, result = tiny_quickstart
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = root / "quickstart"
    evaluation = json.loads((run / "metrics.json").read_text())["evaluate"]
    for key in ("normalized_score", "real_return", "imagined_return", "return_gap", "spearman", "kendall"):
        assert key in evaluation
    from agents.metrics import METRICS

    for key in METRICS:  # the field's metrics, each with its bootstrap interval
        assert key in evaluation and len(evaluation[f"{key}_ci"]) == 2, key
        assert f"| {key} |" in (run / "report.md").read_text()
    names = [row["policy"] for row in evaluation["policies"]]
    assert {"dreamer", "random", "oracle", "epsilon_oracle@0.1"} <= set(names) and evaluation["num_policies"] >= 8
    report = (run / "report.md").read_text()
    assert "| dreamer |" in report and "| oracle |" in report and "media/evaluate_scatter.png" in report
    assert f"report: {run / 'report.md'}" in result.stdout and "normalized_score" in result.stdout
    for name in ("evaluate_scatter.png", "evaluate_learning_curve.png"):
        image = iio.imread(run / "media" / name)
        assert image.ndim == 3 and image.shape[0] > 100
    gifs = sorted((run / "media").glob("evaluate_*_real_vs_imagined.gif"))
    assert {g.name for g in gifs} >= {"evaluate_dreamer_real_vs_imagined.gif", "evaluate_oracle_real_vs_imagined.gif"}
    for gif in gifs:
        frames = iio.imread(gif)
        assert frames.ndim == 4 and frames.shape[2] > frames.shape[1]  # real | imagined, side by side
    policy = load_policy(run / "dreamer.pt")  # the saved agent loads through the common interface
    policy.reset(2, seed=0)
    grid = tuple(policy.grid_shape)
    assert policy.act(PolicyInput(tokens=np.zeros((2, *grid), dtype=np.int64))).shape == (2,)


def test_a_three_action_env_runs_through_every_stage(tmp_path):
    """Dynamic-Obstacles has 3 actions (left, right, forward) and pays -1 for a collision: every
    stage takes its action count from the env (card, dynamics, agent, evaluation) and the -1 is
    counted in the returns."""
    import torch

    from scripts import quickstart

    root = tmp_path / "runs"
    out = quickstart.main(["--preset", "tiny", "--env", "dynamic-obstacles-6x6", f"run.root={root}", *FAST])
    run = Path(out["run_dir"])
    card = __import__("json").loads((run / "dataset" / "card.json").read_text())
    assert card["num_actions"] == 3
    assert torch.load(run / "dynamics.pt", weights_only=False)["model_config"]["num_actions"] == 3
    from agents.policy import load_policy

    agent = load_policy(run / "dreamer.pt")
    assert agent.actor.num_actions == 3
    rows = {row["policy"]: row for row in out["evaluate"]["policies"]}
    assert rows["random"]["real_return"] < 0  # random walks into walls and balls: -1, counted
