"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): it asks
for the API key, then makes a voice from an uploaded clip, takes text, plays, and streamed audio arrives and plays.

The test saves a screenshot of the page after playing into its tmp folder; with CSM_JAX_DOCS_IMAGES=1 also into
docs/images/playground.png, the picture in docs/guides/serving.md."""

import os
import shutil
import time

import pytest

from tests.helpers import HANG_SECONDS, KEY, ROOT, espeak_wav

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# the page's progress record without its AudioContext (which does not serialise)
STATE = "(({chunks, bytes, started, done, error}) => ({chunks, bytes, started, done, error}))(window.playground)"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: bash .ci/setup.sh --dev")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(HANG_SECONDS)
    yield driver
    driver.quit()


def wait_for(driver, script: str, seconds: float = HANG_SECONDS):
    """Polls a JS expression until it is truthy (a bound on waiting, not a timing claim)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.2)
    state = driver.execute_script(f"return [{STATE}, document.getElementById('status').textContent];")
    raise AssertionError(f"{script} stayed false; page state: {state}")


def test_playground_makes_a_voice_and_streams_audio_that_plays(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    assert "CSM speech playground" in browser.title
    # the server needs a key: the page asks for it first, instead of failing to list the voices without one
    wait_for(browser, "document.getElementById('status').textContent.includes('needs an API key')")
    assert browser.execute_script("return [document.getElementById('status').className, "
                                  "document.activeElement.id]") == ["", "key"]
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait_for(browser, "document.querySelector('#voice option[value=narrator]') !== null")

    clip = espeak_wav(tmp_path / "mine.wav", "my own reference words")
    browser.find_element(By.ID, "voice_name").send_keys("mine")
    browser.find_element(By.ID, "voice_file").send_keys(clip)
    browser.find_element(By.ID, "voice_text").send_keys("my own reference words")
    browser.find_element(By.ID, "make_voice").click()
    wait_for(browser, "document.getElementById('voice').value === 'mine'")
    assert "mine" in [v.name for v in server.app.state.service.voices.list()]

    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Hello from a browser.")
    Select(browser.find_element(By.ID, "voice")).select_by_value("mine")
    max_ms = browser.find_element(By.ID, "max_ms")
    max_ms.clear()
    max_ms.send_keys("2400")
    browser.find_element(By.ID, "play").click()

    wait_for(browser, "window.playground.started")  # the first chunk was scheduled for playback
    start = browser.execute_script("return window.playground.context.currentTime")
    wait_for(browser, "window.playground.done")
    state = browser.execute_script(f"return {STATE}")
    assert state["error"] is None and state["chunks"] > 1
    assert state["bytes"] == 30 * 1920 * 2  # 2400 ms: 30 frames of 16-bit samples
    wait_for(browser, f"window.playground.context.currentTime > {start}")  # the audio clock runs: it plays
    assert browser.execute_script("return window.playground.context.state") == "running"
    href = browser.find_element(By.ID, "download").get_attribute("href")
    assert href.startswith("blob:")
    duration = wait_for(browser, "document.getElementById('player').duration")
    assert abs(duration - 2.4) < 0.01
    screenshot(browser, tmp_path / "playground.png")


def screenshot(driver, path):
    """The whole page as a PNG at `path`, and at docs/images/playground.png when CSM_JAX_DOCS_IMAGES=1."""
    page = "return [document.documentElement.scrollHeight, window.innerHeight]"
    height, _ = driver.execute_script(page)
    driver.set_window_size(900, height)
    height, inner = driver.execute_script(page)
    driver.set_window_size(900, 2 * height - inner)  # the window's own bars are not page
    driver.execute_script("window.scrollTo(0, 0)")
    png = driver.get_screenshot_as_png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    path.write_bytes(png)
    if os.environ.get("CSM_JAX_DOCS_IMAGES") == "1":
        docs = ROOT / "docs" / "images" / "playground.png"
        partial = docs.with_name(docs.name + ".partial")
        partial.write_bytes(png)
        partial.replace(docs)
