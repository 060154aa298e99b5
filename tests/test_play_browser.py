"""The play page in headless Chromium: key presses step both panes as the session says."""

import os
import shutil
import threading
import time

import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _missing() -> str:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    return ", ".join(missing)


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"the browser test needs {_missing()} "
                                "(apt-get install chromium chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The play server of a tiny quickstart run, serving on a free localhost port."""
    from scripts import play, quickstart

    root = tmp_path_factory.mktemp("play_browser_runs")
    quickstart.main(["--preset", "tiny", f"run.root={root}", "dynamics.steps=30", "dynamics.checkpoint_every=15",
                     "run.progress=false"])
    server = play.start([str(root / "quickstart"), "--port", "0", "--seed", "1"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, script, timeout=30.0):
    deadline = time.time() + timeout
    while not driver.execute_script(script):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for: {script}")
        time.sleep(0.02)


def canvas(driver, element_id):
    """The canvas's pixels (H, W, 3) as the page drew them."""
    width, height, data = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];",
        element_id)
    return np.asarray(data, dtype=np.uint8).reshape(height, width, 4)[:, :, :3]


def test_key_presses_step_both_panes_as_the_session_says(server, driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    session = server.session
    host, port = server.server_address[:2]
    driver.get(f"http://{host}:{port}/")
    wait_for(driver, "return window.playStats && window.playStats.ready === true")
    first_real, first_dream = session.view.real.frame, session.view.dream.frame
    assert np.array_equal(canvas(driver, "real"), first_real)
    assert np.array_equal(canvas(driver, "dream"), first_dream)
    assert "pixelated" in driver.find_element(By.ID, "real").value_of_css_property("image-rendering")
    assert "pickup" in driver.find_element(By.TAG_NAME, "body").text

    keys = [Keys.ARROW_RIGHT, Keys.ARROW_UP, Keys.ARROW_LEFT, "t", "p"]
    ActionChains(driver).click(driver.find_element(By.TAG_NAME, "h1")).send_keys(*keys).perform()
    wait_for(driver, f"return window.playStats.drawn >= {len(keys)}")
    view = session.view
    assert view.steps == view.real_steps == len(keys) and view.last_action == 3  # p: pickup
    assert np.array_equal(canvas(driver, "real"), view.real.frame)
    assert np.array_equal(canvas(driver, "dream"), view.dream.frame)
    assert not np.array_equal(view.real.frame, first_real)  # a turn and a step moved the agent
    assert driver.find_element(By.ID, "realState").text == view.real.state_text
    assert view.dream.state_text in driver.find_element(By.ID, "dreamState").text
    assert "predicted: reward" in driver.find_element(By.ID, "dreamOutcome").text

    # Dream only (M): the real pane waits while the dream steps.
    ActionChains(driver).send_keys("m").perform()
    wait_for(driver, "return document.getElementById('dreamOnly').checked")
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    wait_for(driver, f"return window.playStats.drawn >= {len(keys) + 1}")
    assert session.view.steps == len(keys) + 1 and session.view.real_steps == len(keys)
    assert np.array_equal(canvas(driver, "real"), view.real.frame)
    assert np.array_equal(canvas(driver, "dream"), session.view.dream.frame)

    screenshot = tmp_path / "play_page.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 0
    if os.environ.get("PLAY_SCREENSHOT"):  # to look at it: PLAY_SCREENSHOT=/some/file.png
        shutil.copy(screenshot, os.environ["PLAY_SCREENSHOT"])
