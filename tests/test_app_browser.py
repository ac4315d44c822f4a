"""The web app in a real browser: `python -m piano_gpt_jax.app` on a free localhost port, driven
by headless Chromium through Generate (choose the tiny checkpoint, upload a MIDI prompt, generate:
piano rolls and audio players appear), a composer x seed grid, one blind A/B judgement (written
to the judgements file, tallied on the page) and Runs (a loss plot appears).

Needs Debian's `chromium` and `chromium-driver` (CI installs them); skipped, with the reason
printed, only where they are absent. Screenshots go to the test's tmp dir, and also to
$PIANO_GPT_SCREENSHOT_DIR when set (that is how docs/app-*.png were made).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from piano_gpt_jax.app import testing_support

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 90


def _browser() -> tuple[str, str]:
    """(chromium binary, chromedriver) or a skip that says what to install (selenium itself is in
    the always-installed [app] extra, so its absence is an error, not a skip)."""
    import selenium  # noqa: F401

    binary = next((b for b in map(shutil.which, ("chromium", "chromium-browser",
                                                  "google-chrome")) if b), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        reason = ("no headless browser: install Debian's chromium and chromium-driver "
                  "(apt-get install -y chromium chromium-driver)")
        print(f"SKIP test_app_browser: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return binary, driver


@pytest.fixture
def server(tmp_path, tmp_path_factory):
    runs = testing_support.shared_runs_root(tmp_path_factory)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PIANO_GPT_JAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "piano_gpt_jax.app", "--port", "0", "--runs", str(runs),
         "--out", str(tmp_path / "app-out")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        match = re.search(r"http://localhost:(\d+)", first)
        assert match, f"the launcher printed no URL: {first!r}"
        url = match.group(0)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.3)
        yield {"url": url, "runs": runs, "out": tmp_path / "app-out"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _click(wait, xpath: str) -> None:
    """Click the element at `xpath` once it is there, again if a rerun replaced it meanwhile."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By

    def attempt(browser) -> bool:
        try:
            found = browser.find_elements(By.XPATH, xpath)
            if not found or not found[0].is_enabled():
                return False
            found[0].click()
            return True
        except (StaleElementReferenceException, ElementClickInterceptedException):
            return False

    wait.until(attempt)


def _choose_mode(browser, wait, mode: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//label[.//p[text()='{mode}']]"))).click()
    time.sleep(1.0)  # the rerun of the mode switch


def _shrink(src: Path, dst: Path, width: int = 1000) -> None:
    """A small copy for the README: the empty bottom cut off, narrower, 128 colours."""
    import numpy as np
    from PIL import Image

    image = Image.open(src).convert("RGB")
    rows_HxWx3 = np.asarray(image).astype(np.int16)
    differs_H = (np.abs(rows_HxWx3 - rows_HxWx3[-1:]) > 8).any(axis=(1, 2))
    last = int(np.nonzero(differs_H)[0].max()) if differs_H.any() else image.height - 1
    image = image.crop((0, 0, image.width, min(image.height, last + 40)))
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=128).save(dst, optimize=True)


@pytest.mark.slow
def test_generate_and_runs_in_chromium(server, maestro_dir, tmp_path):
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2300", "--mute-audio"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path),
                               options=options)
    wait = WebDriverWait(browser, WAIT_S)
    shots = {}
    t0 = time.perf_counter()
    try:
        browser.get(server["url"])
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Generate"))

        # choose the tiny checkpoint in the picker
        picker = wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, "[data-testid='stSelectbox'] input")))
        picker.click()
        option = wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//*[@role='option'][contains(., '/tiny')]")))
        option.click()
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Loaded "))

        # upload a real performance as the prompt
        midi = sorted(maestro_dir.glob("*.mid"))[2]
        upload = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid='stFileUploader'] input[type='file']")))
        upload.send_keys(str(midi))
        # the default slice is the run's notes_per_record (24); the page says what the model sees
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Prompt: 24 notes"))
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"),
                                                    "The model sees prompt "))

        # two samples side by side, then Generate
        samples = browser.find_element(By.CSS_SELECTOR, "input[aria-label='Samples']")
        samples.send_keys(Keys.CONTROL, "a")
        samples.send_keys("2", Keys.ENTER)
        wait.until(lambda b: b.find_element(
            By.CSS_SELECTOR, "input[aria-label='Samples']").get_attribute("value") == "2")
        button = wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//button[.//p[text()='Generate']]")))
        time.sleep(0.5)  # let the rerun from the number input settle before clicking
        button.click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "audio")) >= 2)
        images = wait.until(lambda b: [
            i for i in b.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")
            if b.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                i)])
        assert len(images) == 4  # per sample: the whole roll and the one zoomed on new notes
        assert browser.execute_script("return arguments[0].naturalWidth", images[0]) >= 1000
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "tokens/s" in body and "Sample 1" in body and "Traceback" not in body
        audio_src = browser.find_element(By.CSS_SELECTOR, "audio").get_attribute("src")
        assert audio_src
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                               browser.find_element(By.XPATH, "//h3[contains(., 'Result')]"))
        time.sleep(0.3)
        shots["generate"] = tmp_path / "app-generate.png"
        browser.save_screenshot(str(shots["generate"]))

        # a grid: the prompt's composer token x seeds 0, 1, 2
        _choose_mode(browser, wait, "Grid")
        time.sleep(0.5)
        _click(wait, "//button[.//p[starts-with(text(), 'Generate the grid')]]")
        wait.until(lambda b: "Grid" in [h.text for h in b.find_elements(By.TAG_NAME, "h3")]
                   and len(b.find_elements(By.CSS_SELECTOR, "audio")) >= 3)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "seed 0" in body and "seed 2" in body and "Traceback" not in body
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                               browser.find_element(By.XPATH, "//h3[contains(., 'Grid')]"))
        time.sleep(0.5)
        shots["grid"] = tmp_path / "app-grid.png"
        browser.save_screenshot(str(shots["grid"]))

        # one blind A/B judgement between the two checkpoints
        _choose_mode(browser, wait, "Blind A/B")
        for name in ("/tiny", "/tiny-b"):
            _click(wait, "//*[@data-testid='stMultiSelect']//input")
            _click(wait, f"//*[@role='option'][substring(., string-length(.) - "
                         f"{len(name) - 1}) = '{name}']")
            time.sleep(1.0)
        upload = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid='stFileUploader'] input[type='file']")))
        upload.send_keys(str(midi))
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "tiny-b: The model "
                                                                           "sees prompt"))
        time.sleep(0.5)
        _click(wait, "//button[.//p[text()='New blind pair']]")
        wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//button[.//p[text()='Sample 1 is better']]")))
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Which do you prefer?" in body and "tiny-b (step" not in body  # blind
        _click(wait, "//button[.//p[text()='Sample 1 is better']]")
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Recorded in"))
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"),
                                                    "Blind judgements so far"))
        shots["ab"] = tmp_path / "app-ab.png"
        browser.save_screenshot(str(shots["ab"]))

        # the Runs page: a loss plot
        browser.find_element(By.CSS_SELECTOR, "a[href$='/runs']").click()
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Runs"))
        wait.until(lambda b: b.find_elements(
            By.CSS_SELECTOR, "[data-testid='stVegaLiteChart'] canvas, "
                             "[data-testid='stVegaLiteChart'] svg"))
        time.sleep(1.0)  # vega draws its lines after the canvas appears
        assert "Loss" in browser.find_element(By.TAG_NAME, "body").text
        shots["runs"] = tmp_path / "app-runs.png"
        browser.save_screenshot(str(shots["runs"]))
    finally:
        browser.quit()
    seconds = time.perf_counter() - t0
    print(f"browser walk-through: {seconds:.1f} s; screenshots {sorted(map(str, shots.values()))}")
    for path in shots.values():
        assert path.stat().st_size > 20_000  # a real page, not a blank one
    assert len(list((server["out"] / "generations").iterdir())) == 1
    assert len(list(next((server["out"] / "grids").iterdir()).iterdir())) == 3
    (judgement,) = (server["out"] / "ab" / "judgements.jsonl").read_text().splitlines()
    assert '"choice": "first"' in judgement
    target = os.environ.get("PIANO_GPT_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for name, path in shots.items():
            _shrink(path, Path(target) / f"app-{name}.png")
