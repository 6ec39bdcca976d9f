"""The feature browser and the report in a real headless Chromium (Selenium): the browser's
start page ranked by faithfulness, search, results, feature page, highlighted contexts, concept
and selection searches, a screenshot; the report's first explanation rows sorted by
faithfulness.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and the ``selenium`` package. Without them the test is skipped,
unless ``STEERLEX_REQUIRE_BROWSER=1`` (CI), when it fails instead.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from report_helpers import RunInfo, make_run_dir
from steerlex.models.loading import LoadedModel
from steerlex.report import build_browser, build_report

CHROMIUM = os.environ.get("STEERLEX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("STEERLEX_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT_S = 10


def _missing() -> str | None:
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {what})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install selenium)"
    return None


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("STEERLEX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"STEERLEX_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(f"headless browser test skipped: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try the network
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    drv.set_page_load_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_browser_in_headless_chromium(
    driver: Any, tiny_loaded: LoadedModel, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    run: RunInfo = make_run_dir(tmp_path / "run", tiny_loaded)
    page = build_browser(run.root)
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(page.resolve().as_uri())
    box = wait.until(ec.element_to_be_clickable((By.ID, "search")))
    assert "tiny-run" in driver.title

    # the start page leads with the most faithful features, best first, the AUROC beside each
    faithful = driver.find_elements(By.CSS_SELECTOR, "#faithful .result")
    values = [float(r.get_attribute("data-faithfulness")) for r in faithful]
    assert len(values) == 8 and values == sorted(values, reverse=True)
    assert f"{values[0]:.3f}" in faithful[0].text

    # a word search: MI words of `fired`, LogitLens tokens of `lens` (" Umbrella")
    box.send_keys("umbrella")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result"))
    results = driver.find_elements(By.CSS_SELECTOR, ".result")
    found = {int(r.get_attribute("data-feature")) for r in results}
    assert found == {run.fired, run.lens}
    assert driver.current_url.endswith("#q=umbrella")
    target = next(r for r in results if int(r.get_attribute("data-feature")) == run.fired)
    target.click()

    # the feature page
    title = wait.until(ec.visibility_of_element_located((By.ID, "feature-title")))
    wait.until(lambda d: title.text == f"Feature {run.fired}")
    assert driver.current_url.endswith(f"#feature={run.fired}")
    mi = driver.find_elements(By.CSS_SELECTOR, '.method-words[data-method="mi"] .word .w')
    assert [w.text for w in mi[:3]] == ["umbrella", "rain", "water"]
    for method in ("paper", "mi-input", "logitlens", "topact"):
        assert driver.find_elements(By.CSS_SELECTOR, f'.method-words[data-method="{method}"]')
    marks = driver.find_elements(By.CSS_SELECTOR, ".context mark")
    assert marks, "no highlighted context token"
    focus = driver.find_elements(By.CSS_SELECTOR, ".context mark.focus")
    stats = next(f for f in run.stats["features"] if f["id"] == run.fired)
    assert len(focus) == len(stats["contexts"]) > 0
    top = stats["contexts"][0]
    assert focus[0].text.strip() == top["tokens"][top["focus"]].strip()
    assert "background: rgba(255, 140, 0" in marks[0].get_attribute("style")
    assert driver.find_elements(By.CSS_SELECTOR, "#histogram svg rect")
    selected = driver.find_element(By.ID, "feature-selected").text
    assert "Selected for steering: harm" in selected
    assert f"({stats['count']} of" in driver.find_element(By.ID, "frequency").text
    shot = tmp_path / "feature.png"
    assert driver.save_screenshot(str(shot))
    width, height = png_size(shot)
    assert width >= 800 and height >= 600 and shot.stat().st_size > 10_000

    # a concept search (safety seed word "refuse" in `safety`'s paper words), via the box
    box = driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys("concept:safety")
    wait.until(lambda d: d.find_element(By.ID, "results-view").is_displayed())
    wait.until(lambda d: "seed word" in d.find_element(By.ID, "results-info").text)
    ids = [
        int(r.get_attribute("data-feature"))
        for r in driver.find_elements(By.CSS_SELECTOR, ".result")
    ]
    assert ids == [run.safety]

    # a linkable selection search, by URL
    driver.get(page.resolve().as_uri() + "#q=selected%3Aharm")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result"))
    ids = [
        int(r.get_attribute("data-feature"))
        for r in driver.find_elements(By.CSS_SELECTOR, ".result")
    ]
    assert ids == [run.fired]
    # no script error surfaced while browsing (the console is checked where the driver allows)
    logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
    assert not [e for e in logs if e.get("level") == "SEVERE"], logs


def test_report_in_headless_chromium_leads_with_the_most_faithful_features(
    driver: Any, tiny_loaded: LoadedModel, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    run: RunInfo = make_run_dir(tmp_path / "run", tiny_loaded)
    page = build_report(run.root)
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, WAIT_S).until(
        ec.visibility_of_element_located((By.ID, "explanation-quality"))
    )
    rows = driver.find_elements(By.CSS_SELECTOR, "#explanations table.faithful tbody tr")
    assert len(rows) >= 3
    shown = [float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows]
    assert shown == sorted(shown, reverse=True), shown  # the first rows: most faithful first
    recorded = [float(r.get_attribute("data-faithfulness")) for r in rows]
    assert [round(v, 3) for v in recorded] == shown
    links = [r.find_element(By.CSS_SELECTOR, "a").get_attribute("href") for r in rows]
    assert all("browser.html#feature=" in h for h in links)
    panel = driver.find_element(By.ID, "explanation-quality").text
    assert "random words" in panel and "AUROC" in panel
    assert driver.find_elements(By.CSS_SELECTOR, "#sae svg g.dead")


def test_report_top_screenshot(driver: Any, tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    """The report's top as a reader first sees it (the 1280x900 window). With
    ``STEERLEX_SCREENSHOT_RUN=runs/default STEERLEX_SCREENSHOT_OUT=docs/img/report-top.png``
    it photographs that finished run's report instead of a synthetic one: that is how the
    picture in docs/quickstart.md and the README is made."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    real = os.environ.get("STEERLEX_SCREENSHOT_RUN")
    if real:
        page = Path(real) / "report.html"
        assert page.is_file(), f"STEERLEX_SCREENSHOT_RUN={real}: no report.html there"
    else:
        page = build_report(make_run_dir(tmp_path / "run", tiny_loaded).root)
    out = Path(os.environ.get("STEERLEX_SCREENSHOT_OUT") or tmp_path / "report-top.png")
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, WAIT_S).until(
        ec.visibility_of_element_located((By.ID, "explanation-quality"))
    )
    title = driver.find_element(By.TAG_NAME, "h1")
    assert title.is_displayed() and title.text.startswith("steerlex run report")
    assert driver.save_screenshot(str(out))
    width, height = png_size(out)
    assert width >= 800 and height >= 600 and out.stat().st_size > 10_000
