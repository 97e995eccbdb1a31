"""The UI end to end: a real browser and gradio_client against the Gradio app, which talks to the
real prediction API (`api_server`, from conftest: petbreed serve with the tiny model and `pets`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from ui.api_client import ApiClient
from ui.cli import launch
from ui.examples import example_images
from ui.screenshot import chromium, page_text, screenshot, upload, wait_for_result
from ui.settings import UISettings

pytestmark = pytest.mark.slow
CONFIDENCE = re.compile(r"confidence \d+(\.\d)?%")


@pytest.fixture(scope="module")
def ui_settings(api_server: str, tmp_path_factory: pytest.TempPathFactory) -> UISettings:
    return UISettings(api_url=api_server, port=0, timeout_s=120, cache_dir=tmp_path_factory.mktemp("ui-cache"))


@pytest.fixture(scope="module")
def ui_server(ui_settings: UISettings) -> Iterator[str]:
    """The Gradio app, launched the way `petbreed ui` does, on a free port in this process."""
    demo, url = launch(ui_settings)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def label_texts(api_server: str) -> set[str]:
    return {label.text for a in ApiClient(api_server, timeout_s=60).models().adapters for label in a.labels}


@pytest.fixture(scope="module")
def examples(ui_settings: UISettings) -> list[Path]:
    return example_images(ui_settings.cache_dir)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.fail("needs Debian's browser: apt-get install -y chromium chromium-driver")
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_shows_breed_and_confidence(browser: WebDriver, ui_server: str, examples: list[Path],
                                           label_texts: set[str]) -> None:
    upload(browser, ui_server, examples[0])
    breed, *rest = wait_for_result(browser).splitlines()
    assert breed in label_texts
    assert CONFIDENCE.search("\n".join(rest))
    assert re.search(r"pets@\d+", "\n".join(rest)) and "latency" in "\n".join(rest)
    assert "%" in browser.find_element("id", "top-k").text  # the top-k bar is drawn


def test_broken_image_shows_the_api_message(browser: WebDriver, ui_server: str, tmp_path: Path) -> None:
    fake = tmp_path / "holiday.png"  # an image name, so the browser lets it through to the API
    fake.write_bytes(b"this is a text file, not a PNG")
    upload(browser, ui_server, fake)
    assert "Could not classify this image" in wait_for_result(browser)
    assert "Traceback" not in page_text(browser)


def test_non_image_file_is_refused_with_a_message(browser: WebDriver, ui_server: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a pet")
    upload(browser, ui_server, notes)
    # Gradio's upload widget refuses it before any request and says so in a toast.
    WebDriverWait(browser, 15).until(lambda b: "Invalid file type: notes.txt" in page_text(b))
    assert "Traceback" not in page_text(browser)


def test_gradio_client_calls_predict(ui_server: str, examples: list[Path], label_texts: set[str]) -> None:
    client = Client(ui_server, verbose=False)
    bar, text = client.predict(handle_file(str(examples[-1])), None, api_name="/predict")
    assert bar["label"] in label_texts
    assert {c["label"] for c in bar["confidences"]} <= label_texts
    assert CONFIDENCE.search(text)
    choices, _ = client.predict(api_name="/load_adapters")
    assert any(ref.startswith("pets@") for ref, _ in choices["choices"])


def test_report_tab_shows_metrics(ui_server: str) -> None:
    client = Client(ui_server, verbose=False)
    update, _ = client.predict(api_name="/load_adapters")
    info, summary, confusion, table = client.predict(update["value"], api_name="/adapter_details")
    assert "breeds:" in info and "Accuracy" in summary and "macro-F1" in summary
    assert Path(confusion).exists() and table["data"]


def test_screenshot_after_prediction(ui_server: str, examples: list[Path], tmp_path: Path) -> None:
    # PETBREED_UI_SCREENSHOT=docs/ui.png refreshes the README's picture from this real run.
    out = Path(os.environ.get("PETBREED_UI_SCREENSHOT") or tmp_path / "ui.png")
    assert CONFIDENCE.search(screenshot(ui_server, examples[1], out))
    assert Image.open(out).size[0] >= 1000


def test_api_down_is_a_message(browser: WebDriver, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the API "is not running"
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    demo, url = launch(UISettings(api_url=dead, port=0, timeout_s=5, cache_dir=tmp_path))
    try:
        upload(browser, url, example_images(tmp_path)[0])
        assert "Cannot reach the prediction API" in wait_for_result(browser)
        assert "Cannot reach" in browser.find_element("id", "api-status").text
        assert "Traceback" not in page_text(browser)
    finally:
        demo.close()
