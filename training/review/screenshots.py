"""Screenshots of the review page in headless Chromium, and the browser helpers the page's test uses.

``python -m pellucid.training.review.screenshots --out docs/review`` serves the shipped bundles
``protopnet_phantom2d`` (on a few training samples: a prototype's source patch and the patch where another one
activates marked forbidden), ``cbm_phantom2d`` (a concept set by an intervention) and ``protopnet_phantom3d`` on a
few test samples of the phantom and saves ``review_<name>.png`` for each (PNG with a 256-colour palette, to stay
small). It needs selenium (the ``dev`` extra) and Debian's ``chromium`` and
``chromium-driver`` (or any Chrome and its matching chromedriver on ``PATH``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)


def browser_paths() -> tuple[str | None, str | None]:
    """``(browser, driver)`` executables found on ``PATH`` (``None`` where missing)."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = next((found for name in DRIVERS if (found := shutil.which(name))), None)
    return browser, driver


def browser_problem() -> str | None:
    """Why a headless browser cannot be started here (``None`` when it can): what is missing and how to install it."""
    missing = []
    try:
        import selenium  # noqa: F401 - only whether it is installed
    except ImportError:
        missing.append("selenium (pip install selenium; part of the dev extra)")
    browser, driver = browser_paths()
    if browser is None:
        missing.append(f"a Chromium browser ({' / '.join(BROWSERS)} on PATH; Debian: apt install chromium)")
    if driver is None:
        missing.append("chromedriver (on PATH; Debian: apt install chromium-driver)")
    return None if not missing else "headless Chromium unavailable: missing " + "; ".join(missing)


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """A selenium Chrome driver on headless Chromium (the local driver: Selenium Manager never downloads one).

    Raises:
        RuntimeError: naming what is missing (see :func:`browser_problem`).
    """
    problem = browser_problem()
    if problem:
        raise RuntimeError(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-extensions", "--no-first-run", "--hide-scrollbars", f"--window-size={width},{height}",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "the page") -> Any:
    """Poll ``condition`` until it returns a true value (returned) or ``timeout`` seconds pass.

    Raises:
        TimeoutError: naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.05)


def page_ready(driver: Any) -> bool:
    """Whether the page has loaded its first sample (``<body data-ready="true">``)."""
    return driver.execute_script("return document.body.dataset.ready === 'true'")


def save_screenshot(driver: Any, path: str | Path, colours: int = 256) -> Path:
    """The whole page as a palette PNG (the window is resized to the page's height first)."""
    from PIL import Image

    driver.execute_script("window.scrollTo(0, 0)")
    width = max(1280, int(driver.execute_script("return document.documentElement.scrollWidth")))
    for _ in range(3):  # the page's height depends on its width: measure, resize, measure again
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.3)  # a frame to lay out
        if int(driver.execute_script("return document.documentElement.scrollHeight")) <= height:
            break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    with Image.open(raw) as image:
        image.convert("RGB").quantize(colours, dither=Image.Dither.NONE).save(path, optimize=True)
    raw.unlink()
    return path


def _prototype_scene(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#sample-table tbody tr")
    wait_for(lambda: rows, what="the sample table")
    labels = [row.find_elements(By.TAG_NAME, "td")[2].text for row in rows]
    target = rows[labels.index("malignant")] if "malignant" in labels else rows[0]
    target.click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#similar .card"), what="the similar prototypes")
    button = driver.find_element(By.CSS_SELECTOR, "#prototype-cards button[data-mark='forbid']:not([disabled])")
    button.click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#prototype-cards .card.forbid"), what="the mark")
    here = driver.find_elements(By.CSS_SELECTOR, "#similar button[data-here][data-mark='forbid']:not([disabled])")
    if here:  # reviewing the training split: the patch where the last shown prototype activates
        here[-1].click()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#similar .peak.forbid"), what="the mark here")


def _concept_scene(driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rows = driver.find_elements(By.CSS_SELECTOR, "#sample-table tbody tr")
    labels = [row.find_elements(By.TAG_NAME, "td")[2].text for row in rows]
    target = rows[labels.index("malignant")] if "malignant" in labels else rows[0]
    target.click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "input[data-concept='spiculated']"), what="the concepts")
    field = driver.find_element(By.CSS_SELECTOR, "input[data-concept='spiculated']")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("0", Keys.TAB)
    wait_for(lambda: driver.find_elements(By.ID, "without-interventions"), what="the intervention")


def _plain_scene(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#sample-table tbody tr")
    labels = [row.find_elements(By.TAG_NAME, "td")[2].text for row in rows]
    (rows[labels.index("malignant")] if "malignant" in labels else rows[0]).click()
    time.sleep(2.0)


# bundle -> (shipped data config, overrides matching the bundle's training data, split reviewed, scene)
SCENES: dict[str, tuple[str, dict[str, Any], str, Callable[[Any], None]]] = {
    "protopnet_phantom2d": ("phantom2d", {}, "train", _prototype_scene),
    "cbm_phantom2d": ("phantom2d", {}, "test", _concept_scene),
    "protopnet_phantom3d": ("phantom3d", {"num_train": 2000}, "test", _plain_scene),
}


def capture(name: str, data: str, overrides: dict[str, Any], split: str, scene: Callable[[Any], None], out: Path,
            limit: int = 15) -> Path:
    """Serve the bundle ``name`` on the first ``limit`` samples of ``split``, play ``scene``, save a screenshot.

    ``data`` is the shipped data config; the file is ``review_<name>.png`` in ``out``.
    """
    from pellucid.training.review.server import ReviewServer
    from pellucid.training.review.session import open_session
    from pellucid.training.shipped_configs import resolve_config

    with tempfile.TemporaryDirectory() as folder:
        session = open_session(name, str(resolve_config(data)), Path(folder) / "corrections.yaml",
                               data_overrides={**overrides, "num_test": limit}, split=split, limit=limit)
        session.data = f"zoo:{data}"  # the page shows the shipped config's name, not this machine's path
        server = ReviewServer(session, 0, quiet=True)
        server.start()
        try:
            with headless_chromium() as driver:
                driver.get(server.url)
                wait_for(lambda: page_ready(driver), timeout=120, what="the first sample")
                scene(driver)
                time.sleep(1.0)  # lazy source patches
                return save_screenshot(driver, out / f"review_{name}.png")
        finally:
            server.shutdown()
            server.server_close()


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write the screenshots (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/review", help="folder of the PNG files")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENES), help="these bundles only")
    args = parser.parse_args(argv)
    written = []
    for name in args.only or SCENES:
        config, overrides, split, scene = SCENES[name]
        written.append(capture(name, config, overrides, split, scene, Path(args.out)))
        print(f"{written[-1]} ({written[-1].stat().st_size // 1024} KB)")
    return written


if __name__ == "__main__":
    main()
