"""The README's quickstart command runs end to end with the tiny preset (collection part)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_collect_script_tiny(run_root):
    result = subprocess.run(
        [sys.executable, "scripts/collect.py", "--preset", "tiny", f"run.root={run_root}", "run.name=c"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    card = json.loads((run_root / "c" / "dataset" / "card.json").read_text())
    assert card["episodes"] == 8 and "dataset:" in result.stdout
    for name in ("config.yaml", "versions.json", "commands.log", "metrics.json"):
        assert (run_root / "c" / name).is_file()
