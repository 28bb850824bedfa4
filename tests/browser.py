"""Headless Chromium driven from pytest, for tests of pages studyq writes or serves (the
report now, a dashboard later).

Debian's ``chromium`` and ``chromium-driver`` packages (``/usr/bin/chromium``,
``/usr/bin/chromedriver``; ``.ci/run`` installs them when missing) are driven through
Selenium. Each :class:`Browser` starts with a fresh profile and flags that keep Chromium
from calling home (no sync, no component updates, no background networking, no QUIC), and
resolves every host name except ``localhost`` to nothing, so a page that reaches for the
internet fails the same way here as offline. What the page did is kept:

* :meth:`Browser.console_errors`: console messages of level SEVERE (script errors, failed
  loads), from the ``goog:loggingPrefs`` browser log;
* :meth:`Browser.requested_urls`: every request the page made (``Network.requestWillBeSent``
  in the performance log), and :func:`outside` picks those that leave 127.0.0.1 or the
  local file.

Use the ``browser`` fixture (import it into the test module: ``from browser import
browser``); it is skipped with the reason when Chromium or Selenium is missing, except in CI
(``CI=true``), where a missing browser fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
)

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def missing_reason() -> str | None:
    """Why no browser test can run here, or None."""
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    if not (Path(CHROMEDRIVER).exists() or shutil.which("chromedriver")):
        return f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def outside(urls: list[str]) -> list[str]:
    """The URLs that leave this machine: anything but ``file:``, ``data:``, ``about:``,
    ``blob:`` and http(s)/ws(s) to 127.0.0.1 or localhost."""
    leaving = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("file", "data", "about", "blob", "chrome-error"):
            continue
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname in _LOCAL_HOSTS:
            continue
        leaving.append(url)
    return leaving


class Browser:
    """One headless Chromium with its own profile folder."""

    def __init__(self, profile: Path, *, width: int = 1100, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = (
            CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium"))
        )
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
        self.driver: Any = webdriver.Chrome(
            service=Service(executable_path=str(driver_path)), options=options
        )
        self._console: list[dict[str, Any]] = []
        self._requests: list[str] = []
        self.driver.get("about:blank")  # the start page's own chrome:// loads are not the test's
        self.driver.get_log("browser")
        self.driver.get_log("performance")

    def open(self, url: str) -> None:
        """Load ``url`` and wait for its load event (Selenium's page load strategy)."""
        self.driver.get(url)
        self._collect()

    def open_file(self, path: Path) -> None:
        """Load a local file as ``file://``."""
        self.open(path.resolve().as_uri())

    def _collect(self) -> None:
        self._console.extend(self.driver.get_log("browser"))
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self._requests.append(message["params"]["request"]["url"])

    def count(self, selector: str) -> int:
        """How many elements match the CSS ``selector``."""
        from selenium.webdriver.common.by import By

        return len(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def script(self, source: str, *args: Any) -> Any:
        """Run JavaScript in the page (for checks only) and return its value."""
        return self.driver.execute_script(source, *args)

    def console_errors(self) -> list[str]:
        """SEVERE console messages so far."""
        self._collect()
        return [entry["message"] for entry in self._console if entry.get("level") == "SEVERE"]

    def requested_urls(self) -> list[str]:
        """Every URL the page requested so far."""
        self._collect()
        return list(self._requests)

    def screenshot(self, path: Path, *, width: int = 1100, height: int | None = None) -> Path:
        """A PNG of the page at ``width``, ``height`` pixels high (default: the whole page)."""
        full = int(self.script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(width, height or full)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """A fresh headless Chromium, quit after the test."""
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(reason)
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.quit()
