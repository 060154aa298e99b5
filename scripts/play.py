#!/usr/bin/env python
"""Play inside a run's world model in the browser: the real env and the dream side by side.

    python scripts/play.py RUN_FOLDER [--port 8765] [--host 127.0.0.1] [--seed 0]

Needs the run's world model (``tokenizer.pt``, ``dynamics.pt``); the env comes from the run's
``config.yaml``. Serves http://HOST:PORT/ (localhost only unless ``--host`` says otherwise).
Keys on the page: arrows left / right turn, up forward; P pickup, D drop, T toggle, Enter done.

Server: the standard library's ``ThreadingHTTPServer`` with keep-alive (HTTP/1.1) and small JSON
endpoints. A step is one world-model step, one env step and two raw RGB frames (a 48x48 frame is
7 KB, base64 in the JSON; the page draws it with ``putImageData``), so a request costs far less
than the model step itself and no extra dependency (websockets, a web framework) is needed: in
headless Chromium the page draws 35-57 frames/s on DoorKey-6x6 and 35-46 on FourRooms on one thread
(``python benchmarks/play.py``; 16 on DoorKey-6x6 before the handler turned Nagle's algorithm
off). Endpoints:

- ``GET /``: the page; ``GET /api/view``: the current view
- ``POST /api/step {"action": 0..6}``: step both panes (the dream alone in dream-only mode)
- ``POST /api/reset {"seed": n}`` or ``{"frame": f}``: restart from a seed or a dataset frame
- ``POST /api/mode {"dream_only": bool}``; ``POST /api/record {"on": bool}`` (off saves
  ``<run>/media/play_<n>.gif`` and answers its path in ``"saved"``)

Every answer is a view: ``{"real": pane, "dream": pane, "steps", "real_steps", "last_action",
"dream_only", "recording", "start", "dataset_frames"}`` with pane ``{"frame": base64 RGB,
"width", "height", "reward", "terminated", "truncated", "state"}`` (errors: ``{"error": text}``, 400).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: put the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORLD_MODEL_FILES = {
    "tokenizer.pt": "scripts/train_tokenizer.py",
    "dynamics.pt": "scripts/train_dynamics.py",
}


class RefusedRun(Exception):
    """A run folder that cannot be played: the message names what is missing and what makes it."""


def check_run_folder(run_dir: Path) -> None:
    """Raise :class:`RefusedRun` unless ``run_dir`` holds a world model and its config."""
    if not run_dir.is_dir():
        raise RefusedRun(f"run folder not found: {run_dir}")
    missing = [name for name in WORLD_MODEL_FILES if not (run_dir / name).is_file()]
    if missing:
        makers = ", ".join(f"{name} by {WORLD_MODEL_FILES[name]}" for name in missing)
        raise RefusedRun(
            f"{run_dir} has no world model: missing {', '.join(missing)} (made {makers}; "
            f"scripts/quickstart.py run.name={run_dir.name} makes everything)")
    if not (run_dir / "config.yaml").is_file():
        raise RefusedRun(f"{run_dir} has no config.yaml naming its env (every stage script writes it)")


def build_session(run_dir: str | Path):
    """The :class:`worldmodel.play.PlaySession` of a run folder (its env, world model, dataset)."""
    from common.atomic import ArtifactError
    from common.config import ConfigError, load_config
    from envs.dataset import EpisodeDataset, collect_folder
    from envs.make import make_env_from_config
    from scripts.config import Config
    from worldmodel.imagine import load_world_model
    from worldmodel.play import PlaySession

    run_dir = Path(run_dir).resolve()
    check_run_folder(run_dir)
    try:
        cfg = load_config(Config, [f"run.root={run_dir.parent}", f"run.name={run_dir.name}"])
    except ConfigError as error:
        raise RefusedRun(f"{run_dir / 'config.yaml'}: {error}") from None
    try:
        world_model = load_world_model(run_dir=run_dir)
    except ArtifactError as error:
        raise RefusedRun(str(error)) from None
    env = make_env_from_config(cfg.env)
    try:
        dataset = EpisodeDataset.load(collect_folder(cfg))
    except (ArtifactError, ValueError) as error:
        print(f"play: no dataset frames to start from ({error})", file=sys.stderr)
        dataset = None
    return PlaySession(env, world_model, dataset=dataset, media_dir=run_dir / "media")


# ---------------------------------------------------------------------------------------------
# JSON of a view
# ---------------------------------------------------------------------------------------------


def pane_json(pane) -> dict:
    frame = pane.frame
    return {"frame": base64.b64encode(frame.tobytes()).decode("ascii"), "height": int(frame.shape[0]),
            "width": int(frame.shape[1]), "reward": pane.reward, "terminated": pane.terminated,
            "truncated": pane.truncated, "state": pane.state_text}


def view_json(session) -> dict:
    view = session.view
    return {"real": pane_json(view.real), "dream": pane_json(view.dream), "steps": view.steps,
            "real_steps": view.real_steps, "last_action": view.last_action, "dream_only": view.dream_only,
            "recording": view.recording, "start": view.start, "dataset_frames": session.num_dataset_frames}


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"'{key}' must be true or false")
    return value


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{key}' must be an integer")
    return value


def handle(session, path: str, body: dict) -> dict:
    """Answer one POST endpoint (see the module doc); ValueError for a bad request."""
    if path == "/api/step":
        session.step(_integer(body.get("action"), "action"))
    elif path == "/api/reset":
        if "frame" in body:
            session.reset_from_dataset(_integer(body["frame"], "frame"))
        else:
            session.reset(_integer(body.get("seed", 0), "seed"))
    elif path == "/api/mode":
        session.set_dream_only(_flag(body.get("dream_only"), "dream_only"))
    elif path == "/api/record":
        if _flag(body.get("on"), "on"):
            session.start_recording()
        else:
            saved = session.stop_recording()
            return view_json(session) | {"saved": None if saved is None else str(saved)}
    else:
        raise LookupError(path)
    return view_json(session)


def make_server(session, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server (bound, not yet serving) for ``session``; one lock keeps requests in order."""
    lock = threading.Lock()
    page = PAGE.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection for a whole session of steps
        # Headers and body go out in two writes; with Nagle's algorithm the body waits for the
        # client's delayed ACK (~40 ms a step on Linux), which alone would cap the page near 15 frames/s.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per step would flood the terminal

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif self.path == "/api/view":
                with lock:
                    self._json(200, view_json(session))
            else:
                self._json(404, {"error": f"no such page: {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
                with lock:
                    payload = handle(session, self.path, body)
            except LookupError:
                self._json(404, {"error": f"no such endpoint: {self.path}"})
            except ValueError as error:  # json.JSONDecodeError included
                self._json(400, {"error": str(error)})
            else:
                self._json(200, payload)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="play.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_folder", help="a run folder holding tokenizer.pt, dynamics.pt and config.yaml")
    parser.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default localhost only; 0.0.0.0 exposes the page to the network)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    return parser.parse_args(argv)


def start(argv: Sequence[str] | None = None) -> ThreadingHTTPServer:
    """Load the run, reset the session and bind the server (exit 1 on a run that cannot be played)."""
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)  # one model step at batch 1: more threads only add overhead
    try:
        session = build_session(args.run_folder)
    except RefusedRun as error:
        print(f"play: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    session.reset(args.seed)
    server = make_server(session, args.host, args.port)
    server.session = session  # type: ignore[attr-defined]
    server.run_dir = Path(args.run_folder).resolve()  # type: ignore[attr-defined]
    return server


def main(argv: Sequence[str] | None = None) -> None:
    server = start(argv)
    host, port = server.server_address[:2]
    print(f"play: {server.session.view.start} of {server.run_dir} on http://{host}:{port}/ (Ctrl-C stops)",  # type: ignore[attr-defined]
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Play inside the world model</title>
<style>
body { font-family: sans-serif; margin: 16px; background: #fafafa; }
.panes { display: flex; gap: 24px; align-items: flex-start; }
.pane { background: #fff; border: 1px solid #ccc; padding: 8px; }
.pane h2 { margin: 0 0 6px 0; font-size: 16px; }
canvas { width: 320px; image-rendering: pixelated; display: block; background: #000; }
pre { font-size: 12px; margin: 6px 0 0 0; min-height: 12em; }
.outcome { font-size: 14px; margin-top: 4px; }
.paused canvas { opacity: 0.45; }
table.keys td { padding: 1px 8px 1px 0; font-size: 13px; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 4px; background: #eee; }
#status { margin: 8px 0; font-size: 14px; }
.controls { margin: 8px 0; }
</style></head>
<body>
<h1 style="font-size:20px">Play inside the world model</h1>
<div class="controls">
 seed <input id="seed" type="number" value="0" style="width:5em"> <button id="resetSeed">reset from seed</button>
 &nbsp; dataset frame <input id="frame" type="number" value="0" style="width:6em"> <button id="resetFrame">reset from frame</button>
 <span id="frames"></span>
 &nbsp; <label><input id="dreamOnly" type="checkbox"> dream only</label>
 &nbsp; <button id="record">start recording</button>
</div>
<div id="status"></div>
<div class="panes">
 <div class="pane" id="realPane"><h2>real env</h2><canvas id="real"></canvas>
  <div class="outcome" id="realOutcome"></div><pre id="realState"></pre></div>
 <div class="pane" id="dreamPane"><h2>dream (world model)</h2><canvas id="dream"></canvas>
  <div class="outcome" id="dreamOutcome"></div><pre id="dreamState"></pre></div>
 <div class="pane"><h2>keys</h2><table class="keys">
  <tr><td><kbd>&larr;</kbd></td><td>turn left (0)</td></tr>
  <tr><td><kbd>&rarr;</kbd></td><td>turn right (1)</td></tr>
  <tr><td><kbd>&uarr;</kbd></td><td>forward (2)</td></tr>
  <tr><td><kbd>P</kbd></td><td>pickup (3)</td></tr>
  <tr><td><kbd>D</kbd></td><td>drop (4)</td></tr>
  <tr><td><kbd>T</kbd></td><td>toggle (5)</td></tr>
  <tr><td><kbd>Enter</kbd></td><td>done (6)</td></tr>
  <tr><td><kbd>R</kbd></td><td>reset from the seed</td></tr>
  <tr><td><kbd>M</kbd></td><td>dream only on / off</td></tr>
 </table>
 <p style="font-size:12px;max-width:16em">The dream starts from the real first frame and gets the same actions.
 Its reward, termination and state are the model's predictions (the state head's estimate).</p></div>
</div>
<script>
const KEYS = {ArrowLeft: 0, ArrowRight: 1, ArrowUp: 2, p: 3, P: 3, d: 4, D: 4, t: 5, T: 5, Enter: 6};
const NAMES = ["left", "right", "forward", "pickup", "drop", "toggle", "done"];
// Frames drawn and when: the benchmark and the browser test read these.
window.playStats = {drawn: 0, firstKey: null, lastDraw: null, queued: 0, errors: 0};
const queue = [];
let busy = false;

function draw(id, pane) {
  const canvas = document.getElementById(id);
  if (canvas.width !== pane.width || canvas.height !== pane.height) {
    canvas.width = pane.width; canvas.height = pane.height;
  }
  const raw = atob(pane.frame), n = pane.width * pane.height;
  const image = new ImageData(pane.width, pane.height), px = image.data;
  for (let i = 0, j = 0; i < n; i++, j += 3) {
    px[4 * i] = raw.charCodeAt(j); px[4 * i + 1] = raw.charCodeAt(j + 1);
    px[4 * i + 2] = raw.charCodeAt(j + 2); px[4 * i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function outcome(pane) {
  let text = "reward " + pane.reward.toFixed(3) + (pane.terminated ? ", terminated" : "");
  if (pane.truncated) text += ", truncated (step limit)";
  return text;
}

function show(view) {
  draw("real", view.real); draw("dream", view.dream);
  document.getElementById("realOutcome").textContent = "real: " + outcome(view.real);
  document.getElementById("dreamOutcome").textContent = "predicted: " + outcome(view.dream);
  document.getElementById("realState").textContent = view.real.state;
  document.getElementById("dreamState").textContent = "state head's estimate:\\n" + view.dream.state;
  document.getElementById("realPane").className = view.dream_only ? "pane paused" : "pane";
  document.getElementById("dreamOnly").checked = view.dream_only;
  document.getElementById("record").textContent = view.recording ? "stop recording" : "start recording";
  document.getElementById("frames").textContent = view.dataset_frames ? "(0.." + (view.dataset_frames - 1) + ")" : "(no dataset)";
  let status = "start: " + view.start + " | steps " + view.steps + " (real " + view.real_steps + ")";
  if (view.last_action !== null) status += " | last action " + NAMES[view.last_action];
  if (view.dream_only) status += " | dream only: the real env waits";
  if (view.real.terminated || view.real.truncated) status += " | real episode over: reset to play on";
  document.getElementById("status").textContent = status;
  window.playStats.lastView = {steps: view.steps, real_steps: view.real_steps, real: view.real.frame, dream: view.dream.frame};
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const payload = await response.json();
  if (!response.ok) { window.playStats.errors++; document.getElementById("status").textContent = "error: " + payload.error; return null; }
  return payload;
}

// One request in flight; the next key press goes out as soon as the previous frame is drawn.
async function pump() {
  if (busy) return;
  busy = true;
  while (queue.length) {
    const view = await post("/api/step", {action: queue.shift()});
    if (view) { show(view); window.playStats.drawn++; window.playStats.lastDraw = performance.now(); }
  }
  busy = false;
}

async function command(path, body) {
  while (busy) await new Promise(resolve => setTimeout(resolve, 5));
  queue.length = 0;
  const view = await post(path, body);
  if (view) {
    show(view);
    if (view.saved) document.getElementById("status").textContent += " | saved " + view.saved;
  }
  return view;
}

document.addEventListener("keydown", event => {
  if (event.target.tagName === "INPUT" && event.target.type === "number") return;
  if (event.key in KEYS) {
    event.preventDefault();
    if (window.playStats.firstKey === null) window.playStats.firstKey = performance.now();
    window.playStats.queued++;
    queue.push(KEYS[event.key]);
    pump();
  } else if (event.key === "r" || event.key === "R") {
    command("/api/reset", {seed: parseInt(document.getElementById("seed").value || "0")});
  } else if (event.key === "m" || event.key === "M") {
    command("/api/mode", {dream_only: !document.getElementById("dreamOnly").checked});
  }
});
document.getElementById("resetSeed").onclick = () => command("/api/reset", {seed: parseInt(document.getElementById("seed").value || "0")});
document.getElementById("resetFrame").onclick = () => command("/api/reset", {frame: parseInt(document.getElementById("frame").value || "0")});
document.getElementById("dreamOnly").onchange = event => command("/api/mode", {dream_only: event.target.checked});
document.getElementById("record").onclick = () => command("/api/record", {on: document.getElementById("record").textContent.startsWith("start")});
fetch("/api/view").then(r => r.json()).then(view => { show(view); window.playStats.ready = true; });
</script>
</body></html>
"""


if __name__ == "__main__":
    main()
