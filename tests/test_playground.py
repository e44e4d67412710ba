"""The playground at GET /, in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium) against a live server of the shipped models.

The page must load with no console error, show the numbers the API returns for the same
request (each number's exact value is in a data-value attribute), show the service's 422
next to the field at fault, draw the sine-gap sweep, and fit a 375 px wide screen. A
screenshot of each shipped model's view is written to $PLAYGROUND_SCREENSHOTS (docs/ with
`make screenshots`), else to a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.helpers import ROOT, LiveServer, live_server

STATIC = ROOT / "service" / "protocols" / "http" / "static"
SHIPPED = ["concrete", "digits", "sine-gap"]
WAIT_S = 60  # a hang guard for a shared machine, not a speed target


def chromium() -> tuple[str, str]:
    """Chromium and its driver, or a failure naming what to install (never a skip)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail(
            "the playground tests need Chromium and its driver: "
            "apt-get install chromium chromium-driver (make test does this when run as root)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def shipped() -> Iterator[LiveServer]:
    with live_server(Settings(model_dir=ROOT / "models", access_log=False)) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, server: LiveServer, model: str) -> None:
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(f"{server.url}/?model={model}")
    wait_for(driver, ("done",))


def wait_for(driver: Any, states: tuple[str, ...]) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script("return document.body.dataset.state") in states
    )
    return str(driver.execute_script("return document.body.dataset.state"))


def value(driver: Any, testid: str, attribute: str = "data-value") -> float:
    from selenium.webdriver.common.by import By

    found = driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')
    return float(found.get_attribute(attribute))


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def seed_shown(driver: Any) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.ID, "replay-note").get_attribute("data-seed"))


def example(server: LiveServer, model: str) -> list[list[float]]:
    meta = httpx.get(f"{server.url}/v1/models/{model}").json()
    return [meta["example"]]


def screenshot(driver: Any, model: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"playground-{model}.png"
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], height)  # the whole page, no empty margin
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path


# -- served as files, offline ------------------------------------------------------------


def test_the_page_and_its_files_are_served(shipped: LiveServer) -> None:
    page = httpx.get(f"{shipped.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for name, kind in [("playground.js", "javascript"), ("playground.css", "text/css")]:
        r = httpx.get(f"{shipped.url}/playground/{name}")
        assert r.status_code == 200
        assert kind in r.headers["content-type"]
    assert httpx.get(f"{shipped.url}/playground/nope.js").status_code == 404
    assert httpx.get(f"{shipped.url}/playground/../app.py").status_code == 404
    assert "/" not in httpx.get(f"{shipped.url}/openapi.json").json()["paths"]


def test_nothing_is_fetched_from_elsewhere() -> None:
    """No CDN, no web font: every file the page loads is served by the service."""
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path.name
        assert not re.search(r"""fetch\(\s*["'`]https?:""", text), path.name
        assert "@import" not in text, path.name


# -- in the browser ------------------------------------------------------------------------


def test_regression_view_shows_what_the_api_answers(
    browser: Any, shipped: LiveServer, tmp_path: Path
) -> None:
    open_page(browser, shipped, "concrete")
    assert console_errors(browser) == []
    inputs = example(shipped, "concrete")
    ev = httpx.post(f"{shipped.url}/v1/models/concrete/predict", json={"inputs": inputs}).json()
    seed = seed_shown(browser)
    body = {"inputs": inputs, "n_samples": 1000, "seed": seed, "coverage": 0.9}
    mc = httpx.post(f"{shipped.url}/v1/models/concrete/predict/mc", json=body).json()
    assert value(browser, "eval-0-0") == ev["outputs"][0][0]
    assert value(browser, "mean-0-0") == mc["mean"][0][0]
    assert value(browser, "std-0-0") == mc["std"][0][0]
    assert value(browser, "interval-0-0", "data-lower") == mc["interval"]["lower"][0][0]
    assert value(browser, "interval-0-0", "data-upper") == mc["interval"]["upper"][0][0]
    assert value(browser, "ood-0") == mc["ood_score"][0]
    bars = browser.execute_script(
        "return [...document.querySelectorAll('#histogram rect')].map(r => +r.dataset.count)"
    )
    assert sum(bars) == 32  # the single train-mode passes asked for
    assert "seed" in browser.find_element("id", "replay-note").text
    assert "Server compute" in browser.find_element("css selector", "[data-testid=timings]").text
    assert screenshot(browser, "concrete", tmp_path).stat().st_size > 10_000


def test_classifier_view_shows_probabilities_entropy_and_mutual_information(
    browser: Any, shipped: LiveServer, tmp_path: Path
) -> None:
    open_page(browser, shipped, "digits")
    assert console_errors(browser) == []
    body = {"inputs": example(shipped, "digits"), "n_samples": 1000, "coverage": 0.9}
    body["seed"] = seed_shown(browser)
    mc = httpx.post(f"{shipped.url}/v1/models/digits/predict/mc", json=body).json()
    for k, p in enumerate(mc["calibrated_probabilities"][0]):
        assert value(browser, f"prob-0-{k}") == p
    assert value(browser, "entropy-0") == mc["entropy"][0]
    assert value(browser, "mi-0") == mc["mutual_information"][0]
    in_set = browser.execute_script(
        "return [...document.querySelectorAll('.prob.in-set')].map(e => e.dataset.testid)"
    )
    assert in_set == [f"prob-0-{k}" for k in mc["prediction_sets"][0]]
    assert screenshot(browser, "digits", tmp_path).stat().st_size > 10_000


def test_the_sine_gap_sweep_draws_eval_mean_and_band(
    browser: Any, shipped: LiveServer, tmp_path: Path
) -> None:
    open_page(browser, shipped, "sine-gap")
    assert console_errors(browser) == []
    assert browser.find_element("id", "sweep-card").is_displayed()
    series = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#sweep path')]"
        ".map(p => [p.dataset.series, [p.getAttribute('d').length, +p.dataset.points || 0]]))"
    )
    assert set(series) == {"band", "mc-mean", "eval"}
    assert series["mc-mean"][1] == series["eval"][1] == 161
    assert all(length > 1000 for length, _ in series.values())
    assert screenshot(browser, "sine-gap", tmp_path).stat().st_size > 10_000


def test_a_bad_value_shows_the_services_error_next_to_its_field(
    browser: Any, shipped: LiveServer
) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, shipped, "concrete")

    def enter(element_id: str, text: str) -> None:
        field = browser.find_element(By.ID, element_id)
        browser.execute_script(
            "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('change'));",
            field,
            text,
        )

    enter("in-0-0", "1e39")  # beyond float32: the service's 422 names row 0
    assert wait_for(browser, ("error",)) == "error"
    assert "within float32 range" in browser.find_element(By.ID, "row-0-error").text
    assert browser.find_element(By.ID, "in-0-0").get_attribute("aria-invalid") == "true"
    enter("in-0-0", "540")
    wait_for(browser, ("done",))
    assert browser.find_element(By.ID, "row-0-error").text == ""
    enter("n_samples", "1")
    assert wait_for(browser, ("error",)) == "error"
    assert "greater than or equal to 2" in browser.find_element(By.ID, "n_samples-error").text
    assert browser.find_element(By.ID, "n_samples").get_attribute("aria-invalid") == "true"
    assert console_errors(browser) == [] or all(
        "422" in e["message"] for e in console_errors(browser)
    )  # Chromium logs a failed fetch's status; nothing else may fail


def test_fits_a_375_pixel_screen(browser: Any, shipped: LiveServer) -> None:
    browser.set_window_size(375, 900)
    try:
        for model in SHIPPED:
            open_page(browser, shipped, model)
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= 375, (model, width)
    finally:
        browser.set_window_size(1280, 1800)


def test_every_input_has_a_label(browser: Any, shipped: LiveServer) -> None:
    for model in SHIPPED:
        open_page(browser, shipped, model)
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('input, select')]"
            ".filter(i => !document.querySelector(`label[for='${i.id}']`)).map(i => i.id)"
        )
        assert unlabelled == [], model


def test_shipped_models_name_their_features_and_give_an_example(shipped: LiveServer) -> None:
    for model in SHIPPED:
        meta = httpx.get(f"{shipped.url}/v1/models/{model}").json()
        assert len(meta["feature_names"]) == len(meta["example"]) == meta["input_dim"], model
        r = httpx.post(
            f"{shipped.url}/v1/models/{model}/predict", json={"inputs": [meta["example"]]}
        )
        assert r.status_code == 200, model


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("feature_names", ["a"], "feature_names needs input_dim (2) entries"),
        ("example", [1.0, 2.0, 3.0], "example needs input_dim (2) entries"),
        ("example", [1.0, float("nan")], "finite"),
        ("feature_names", ["a", ""], "at least 1 character"),
    ],
)
def test_a_config_refuses_features_or_an_example_that_do_not_fit(
    field: str, value: list[Any], says: str
) -> None:
    from pydantic import ValidationError

    from tests.helpers import tiny_regression_config

    with pytest.raises(ValidationError, match=re.escape(says)):
        tiny_regression_config(**{field: value})
