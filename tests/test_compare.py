"""scripts/compare.py: several evaluated runs in one table and one scatter."""

import json

import imageio.v3 as iio
import pytest

from scripts import compare


def fake_run(folder, env_id, spearman, rows):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"env:\n  id: {env_id}\n  obs: full\n")
    metrics = {"evaluate": {"num_policies": len(rows), "episodes": 20, "normalized_score": 0.5,
                            "spearman": spearman, "spearman_ci": [spearman - 0.1, spearman], "mae": float("nan"),
                            "policies": [{"policy": p, "real_return": r, "imagined_return": i} for p, r, i in rows]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_two_runs_in_one_table_and_one_scatter(tmp_path, capsys):
    a = fake_run(tmp_path / "five", "MiniGrid-DoorKey-5x5-v0", 0.9, [("random", 0.0, 0.1), ("oracle", 0.96, 0.9)])
    b = fake_run(tmp_path / "six", "MiniGrid-DoorKey-6x6-v0", 0.5, [("random", 0.0, 0.0), ("oracle", 0.95, 0.5)])
    out = tmp_path / "scatter.png"
    text = compare.main([str(a), str(b), "--out", str(out)])
    rows = text.splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| five | MiniGrid-DoorKey-5x5-v0 | full | 2 | 20 | 0.500 | 0.900 [0.800, 0.900] |")
    assert "| six | MiniGrid-DoorKey-6x6-v0 |" in rows[1] and "0.500 [0.400, 0.500]" in rows[1]
    assert "| — |" in rows[0]  # an undefined value (NaN) and a metric the run does not have
    assert iio.imread(out).ndim == 3


def test_a_folder_that_was_not_evaluated_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1 and "run scripts/evaluate.py" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
