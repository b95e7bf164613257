"""Headless Chromium driving the search page as a person would (the tests and ``ui.report``).

Debian's ``chromium`` and ``chromium-driver`` (``make system-deps``), run through Selenium with both paths given,
so Selenium never looks for or downloads a browser or a driver (``SE_OFFLINE`` makes sure).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("AMC_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("AMC_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1280, 1000)


class BrowserMissingError(RuntimeError):
    pass


def chromium(window: tuple[int, int] = WINDOW) -> Any:
    """A headless Chromium session (``selenium.webdriver.Chrome``); the caller quits it."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            raise BrowserMissingError(f"{path} not found: install Debian's {package} (make system-deps)")
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--disable-background-networking",
                f"--window-size={window[0]},{window[1]}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def searches_done(driver: Any) -> int:
    return int(driver.execute_script("return document.body.dataset.searches"))


def wait_for_search(driver: Any, before: int, timeout_s: float = 60) -> dict:
    """Wait until the page finished the search after ``before`` finished ones; its ``window.amcLast``."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.02).until(lambda d: searches_done(d) > before)
    return driver.execute_script("return window.amcLast")


def type_and_search(driver: Any, text: str, timeout_s: float = 60) -> dict:
    """Type ``text`` into the query box (replacing what is there), press Enter, wait for the page to paint the
    answer; returns ``window.amcLast`` (query, ms from Enter to painted, error, results, images, loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "q")
    before = searches_done(driver)
    driver.execute_script("arguments[0].value = ''", box)
    if any(ord(c) > 0xFFFF for c in text):  # ChromeDriver types only the Basic Multilingual Plane (no emoji)
        driver.execute_script("arguments[0].value = arguments[1]", box, text)
    else:
        box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return wait_for_search(driver, before, timeout_s)
