#!/usr/bin/env python
"""Benchmark: frames drawn per second when playing inside the world model in headless Chromium.

    python benchmarks/play.py [--envs doorkey-6x6,fourrooms] [--presses 300] [--root /tmp/bench] [key=value ...]

Per env: one quickstart run with a small collection and few training steps (speed, not accuracy,
is measured; model sizes stay at their defaults), then ``scripts/play.py`` in its own process
(one torch thread), then 300 key presses sent back to back to the page (one WebDriver action
chain; the page queues them and sends each as soon as the previous frame is drawn). Frames per
second = presses / (last frame drawn - first key press), timed in the page. Needs
``/usr/bin/chromium``, ``/usr/bin/chromedriver`` and selenium. Prints one JSON object last, also
written to ``benchmarks/results/play.json``::

    {"MiniGrid-DoorKey-6x6-v0": {"frames_per_second": ..., "frames": 300, "seconds": ...}, ...}

Targets: >= 30 frames/s on DoorKey-6x6, >= 15 on FourRooms.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, finish, machine

SMALL = ["collect.num_episodes=8", "tokenizer.steps=300", "dynamics.steps=50", "dreamer.updates=5",
         "evaluate.episodes=1", "run.progress=false"]
ENV_IDS = {"doorkey-6x6": "MiniGrid-DoorKey-6x6-v0", "fourrooms": "MiniGrid-FourRooms-v0"}


def build_run(env: str, root: Path, extra: list[str]) -> Path:
    """A quickstart run folder of ``env`` with the small settings (complete stages are skipped)."""
    from scripts import quickstart

    name = f"play-{env}"
    quickstart.main(["--env", env, f"run.root={root}", f"run.name={name}", *SMALL, *extra])
    return root / name


def serve(run_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start scripts/play.py on a free port; returns the process and the page's URL."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "play.py"), str(run_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(r"http://[\d.]+:\d+/", line)
        if found:
            return process, found.group(0)
    raise RuntimeError(f"scripts/play.py exited ({process.wait()}) before serving")


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def measure(driver, url: str, presses: int, seed: int = 0) -> dict:
    """Send ``presses`` arrow keys (a fixed random mix of turns and forward) and time the frames."""
    import numpy as np
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    deadline = time.time() + 30
    while not driver.execute_script("return window.playStats && window.playStats.ready === true"):
        if time.time() > deadline:
            raise RuntimeError("the page did not load its first view")
        time.sleep(0.05)
    keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_UP, Keys.ARROW_UP]
    chain = ActionChains(driver)
    body = driver.find_element(By.TAG_NAME, "body")
    chain.click(body)
    for index in np.random.default_rng(seed).integers(0, len(keys), presses):
        chain.send_keys(keys[index])
    started = time.perf_counter()
    chain.perform()
    deadline = time.time() + 300
    while driver.execute_script("return window.playStats.drawn") < presses:
        if time.time() > deadline:
            raise RuntimeError("the page did not draw every frame in 300 s")
        time.sleep(0.02)
    wall = time.perf_counter() - started
    stats = driver.execute_script("return window.playStats")
    seconds = (stats["lastDraw"] - stats["firstKey"]) / 1000
    return {"frames_per_second": round(presses / seconds, 1), "frames": presses, "seconds": round(seconds, 3),
            "frames_per_second_python_clock": round(presses / wall, 1), "errors": stats["errors"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="doorkey-6x6,fourrooms", help="env presets (configs/env/NAME.yaml)")
    parser.add_argument("--presses", type=int, default=300, help="key presses per env")
    parser.add_argument("--root", default=str(ROOT / "benchmarks" / "results" / "runs"), help="parent of the run folders")
    args, extra = parser.parse_known_args(argv)
    result: dict = {}
    for env in (e.strip() for e in args.envs.split(",") if e.strip()):
        if env not in ENV_IDS:
            raise SystemExit(f"unknown env preset '{env}': choose from {sorted(ENV_IDS)}")
        started = time.perf_counter()
        run_dir = build_run(env, Path(args.root), extra)
        print(f"[{env}] run folder {run_dir} ready in {time.perf_counter() - started:.0f} s", flush=True)
        process, url = serve(run_dir)
        driver = chromium()
        try:
            figures = measure(driver, url, args.presses)
        finally:
            driver.quit()
            process.terminate()
            process.wait()
        print(f"[{env}] {figures['frames_per_second']} frames/s ({figures['frames']} frames in {figures['seconds']} s)",
              flush=True)
        result[ENV_IDS[env]] = figures | {"load_1min": machine()["load_1min"]}
    finish("play", result)
    return result


if __name__ == "__main__":
    main()
