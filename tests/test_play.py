"""Playing inside the world model: the session class (real env + dream stepped together) and its server."""

import base64
import json
import shutil
import threading
import urllib.error
import urllib.request

import imageio.v3 as iio
import numpy as np
import pytest

from envs.dataset import EpisodeDataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny quickstart run folder (dataset, tokenizer, dynamics model), made once for the module."""
    from scripts import quickstart

    root = tmp_path_factory.mktemp("play_runs")
    quickstart.main(["--preset", "tiny", f"run.root={root}", "dynamics.steps=30", "dynamics.checkpoint_every=15",
                     "run.progress=false"])
    return root / "quickstart"


def direct(run):
    """The run's env and world model, built without the session: the reference to compare with."""
    from common.config import load_config
    from envs.make import make_env_from_config
    from scripts.config import Config
    from worldmodel.imagine import load_world_model

    cfg = load_config(Config, [f"run.root={run.parent}", f"run.name={run.name}"])
    return make_env_from_config(cfg.env), load_world_model(run_dir=run)


def test_session_steps_real_and_dream_with_the_same_action(run):
    from scripts.play import build_session

    session = build_session(run)
    env, world_model = direct(run)
    view = session.reset(seed=3)
    frame, info = env.reset(seed=3)
    world_model.reset(world_model.encode(frame[None])[:, None])
    assert np.array_equal(view.real.frame, frame)
    assert np.array_equal(view.dream.frame, world_model.decode()[0])
    assert view.real.state_text == session.codec.decode(info["state"]).text()
    real_frames = [frame]
    for action in [1, 2, 0, 2, 2, 5, 3, 1]:
        view = session.step(action)
        frame, reward, terminated, truncated, info = env.step(action)
        imagined = world_model.step(np.asarray([action]))
        assert np.array_equal(view.real.frame, frame)
        assert (view.real.reward, view.real.terminated, view.real.truncated) == (reward, terminated, truncated)
        assert view.real.state_text == session.codec.decode(info["state"]).text()
        assert np.array_equal(view.dream.frame, world_model.decode(imagined.tokens)[0])
        assert view.dream.reward == float(imagined.reward[0])
        assert view.dream.terminated == bool(imagined.terminated[0])
        assert view.dream.state_text == session.state_text(imagined.state[0].numpy())
        assert view.last_action == action
        real_frames.append(frame)
    assert view.steps == view.real_steps == 8
    assert not np.array_equal(real_frames[0], real_frames[1])  # a turn redraws the agent

    # Dream only: the model steps alone, the real pane keeps its frame.
    session.set_dream_only(True)
    before = view.real.frame
    view = session.step(2)
    imagined = world_model.step(np.asarray([2]))
    assert np.array_equal(view.real.frame, before) and view.real_steps == 8 and view.steps == 9
    assert np.array_equal(view.dream.frame, world_model.decode(imagined.tokens)[0])
    with pytest.raises(ValueError, match="not a MiniGrid action"):
        session.step(7)


def test_reset_from_a_dataset_frame_gives_that_frame(run):
    from scripts.play import build_session

    session = build_session(run)
    dataset = EpisodeDataset.load(run / "dataset")
    episode = 1
    frame_index = int(dataset.episode_starts[episode]) + min(5, int(dataset.episode_lengths[episode]))
    view = session.reset_from_dataset(frame_index)
    assert np.array_equal(view.real.frame, dataset.frames[frame_index])
    assert view.real.state_text == session.codec.decode(dataset.states[frame_index]).text()
    tokens = session.world_model.encode(dataset.frames[frame_index][None])
    assert np.array_equal(view.dream.frame, session.world_model.decode(tokens)[0])
    assert view.start.startswith(f"dataset frame {frame_index} (episode {episode}")
    with pytest.raises(ValueError, match="does not exist"):
        session.reset_from_dataset(dataset.num_frames)


def test_recording_saves_a_gif_of_both_panes(run):
    from scripts.play import build_session

    session = build_session(run)
    session.reset(seed=0)
    session.start_recording()
    for action in [1, 1, 0]:  # turns: every frame differs (a GIF merges repeated frames)
        session.step(action)
    path = session.stop_recording()
    assert path.parent == run / "media" and path.name.startswith("play_") and path.suffix == ".gif"
    frames = iio.imread(path, index=None)
    real, dream = session.view.real.frame, session.view.dream.frame
    assert frames.shape[0] == 4  # the frame at the start, then one per step
    assert frames.shape[1] == real.shape[0] * 4 and frames.shape[2] > (real.shape[1] + dream.shape[1]) * 4
    session.start_recording()
    session.step(1)
    assert session.stop_recording() != path  # the next free number


def test_server_refuses_a_run_folder_without_a_world_model(run, tmp_path, capsys):
    from scripts import play

    folder = tmp_path / "no_model"
    folder.mkdir()
    shutil.copy(run / "config.yaml", folder / "config.yaml")
    shutil.copy(run / "tokenizer.pt", folder / "tokenizer.pt")
    with pytest.raises(SystemExit) as exit_info:
        play.start([str(folder), "--port", "0"])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "missing dynamics.pt (made dynamics.pt by scripts/train_dynamics.py" in message

    with pytest.raises(SystemExit) as exit_info:
        play.start([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1 and "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(run):
    from scripts import play

    server = play.start([str(run), "--port", "0", "--seed", "2"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_server_binds_localhost_by_default(server):
    from scripts import play

    assert server.server_address[0] == "127.0.0.1"
    assert play.parse_args(["some_run"]).host == "127.0.0.1"


def post(server, path, body):
    host, port = server.server_address[:2]
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def pixels(pane):
    return np.frombuffer(base64.b64decode(pane["frame"]), dtype=np.uint8).reshape(pane["height"], pane["width"], 3)


def test_a_step_over_http_returns_both_frames(server):
    session = server.session
    post(server, "/api/reset", {"seed": 2})
    answer = post(server, "/api/step", {"action": 1})
    view = session.view
    assert np.array_equal(pixels(answer["real"]), view.real.frame)
    assert np.array_equal(pixels(answer["dream"]), view.dream.frame)
    assert answer["steps"] == 1 and answer["last_action"] == 1
    assert answer["real"]["state"] == view.real.state_text and answer["dream"]["state"] == view.dream.state_text
    with pytest.raises(urllib.error.HTTPError) as error:
        post(server, "/api/step", {"action": 9})
    assert error.value.code == 400 and "not a MiniGrid action" in json.loads(error.value.read())["error"]
    host, port = server.server_address[:2]
    page = urllib.request.urlopen(f"http://{host}:{port}/", timeout=30).read().decode()
    assert "image-rendering: pixelated" in page and "pickup" in page


def test_reset_mode_and_recording_over_http(server, run):
    dataset = EpisodeDataset.load(run / "dataset")
    answer = post(server, "/api/reset", {"frame": 7})
    assert np.array_equal(pixels(answer["real"]), dataset.frames[7]) and answer["dataset_frames"] == dataset.num_frames
    assert post(server, "/api/mode", {"dream_only": True})["dream_only"] is True
    assert post(server, "/api/record", {"on": True})["recording"] is True
    post(server, "/api/step", {"action": 0})
    answer = post(server, "/api/record", {"on": False})
    assert answer["recording"] is False and answer["saved"].startswith(str(run / "media" / "play_"))
    assert post(server, "/api/mode", {"dream_only": False})["dream_only"] is False
    with pytest.raises(urllib.error.HTTPError) as error:
        post(server, "/api/reset", {"frame": dataset.num_frames})
    assert error.value.code == 400
