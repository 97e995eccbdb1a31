"""Headless-Chromium helpers shared by the browser tests, and a script that screenshots the page
after a prediction: `python -m ui.screenshot --ui-url http://127.0.0.1:7860/ --out docs/ui.png`.

Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver) and the
selenium package, which the dev environment has; the UI itself does not import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

# No GPU, no sandbox (containers run as root), and nothing that reaches out to the network.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
)
DONE_MARKERS = ("confidence", "Could not classify")


def chromium(binary: str = "/usr/bin/chromium", driver: str = "/usr/bin/chromedriver") -> WebDriver:
    options = Options()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def upload(browser: WebDriver, ui_url: str, image: Path, timeout_s: float = 30) -> None:
    """Open the page and put `image` into the photo input, as choosing a file in the dialog does."""
    browser.get(ui_url)
    field = WebDriverWait(browser, timeout_s).until(
        lambda b: b.find_element(By.CSS_SELECTOR, "#pet-image input[type=file]")
    )
    field.send_keys(str(image.resolve()))


def wait_for_result(browser: WebDriver, timeout_s: float = 60) -> str:
    """The result panel's text once it shows a prediction or an error."""

    def done(b: WebDriver) -> str | bool:
        text = b.find_element(By.ID, "result").text
        return text if any(marker in text for marker in DONE_MARKERS) else False

    return str(WebDriverWait(browser, timeout_s).until(done))


def page_text(browser: WebDriver) -> str:
    return str(browser.find_element(By.TAG_NAME, "body").text)


def screenshot(ui_url: str, image: Path, out: Path) -> str:
    """Predict `image` through the page and save a screenshot; returns the result text."""
    browser = chromium()
    try:
        upload(browser, ui_url, image)
        text = wait_for_result(browser)
        WebDriverWait(browser, 10).until(lambda b: "%" in b.find_element(By.ID, "top-k").text)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
        return text
    finally:
        browser.quit()


def main(
    ui_url: Annotated[str, typer.Option(help="a running petbreed UI")] = "http://127.0.0.1:7860/",
    image: Annotated[Path | None, typer.Option(help="image to predict; default: the first synthetic example")] = None,
    out: Annotated[Path, typer.Option(help="where the PNG goes")] = Path("docs/ui.png"),
) -> None:
    if image is None:
        from ui.examples import example_images
        from ui.settings import UISettings

        image = example_images(UISettings().cache_dir)[1]
    typer.echo(screenshot(ui_url, image, out))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
