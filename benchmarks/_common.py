"""Small helpers shared by the benchmark scripts: project path, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    """What the figures were measured on."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_1min": load}


def finish(name: str, result: dict) -> None:
    """Write ``benchmarks/results/<name>.json`` and print the JSON object as the last line."""
    from common.atomic import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", result)
    print(json.dumps(result, sort_keys=True), flush=True)
