"""The dashboard in a real browser: Debian's headless chromium driven by Selenium against
the smoke run. It loads with the token and draws that run's data, updates live while
rounds are committed, and shows a refusal without the token. Screenshots go to the
test's tmp dir and, where writable, docs/screenshots/."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from fedmoe.server.ops.dashboard import start_dashboard
from fedmoe.server.federation.run_store import RunStore

from test_operator_api import add_round, live_copy  # noqa: E402 (tests/ is on sys.path under pytest)

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--disable-extensions",
         "--window-size=1400,1800"]


pytestmark = pytest.mark.slow  # they read the smoke run (a whole federation) unless FEDMOE_SMOKE_RUN names one


@pytest.fixture(scope="module")
def run_dir(request) -> Path:
    return Path(os.environ["FEDMOE_SMOKE_RUN"]) if os.environ.get("FEDMOE_SMOKE_RUN") else request.getfixturevalue("smoke_run")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian chromium + chromium-driver not installed (scripts/setup.sh installs them as root)")
    profile = tempfile.mkdtemp(prefix="fedmoe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, timeout: float = 30.0, what: str = ""):
    """Poll a JS expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script("try { return " + script + "; } catch (e) { return null; }")
        if value:
            return value
        time.sleep(0.1)
    logs = [entry["message"] for entry in driver.get_log("browser")]
    raise AssertionError(f"timed out waiting for {what or script} (last value {value!r}); browser log: {logs[-5:]}")


def save_screenshot(driver, tmp_path: Path, name: str, min_bytes: int = 50_000) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "screenshot failed"
    assert path.stat().st_size > min_bytes  # a drawn page, not a blank one
    try:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
    except OSError:
        pass  # a read-only checkout keeps the tmp copy only
    print(f"screenshot: {path}")
    return path


def traces(driver, div: str) -> list[dict]:
    return driver.execute_script(
        f"const d = document.getElementById('{div}'); return (d && d.data || []).map("
        "t => ({name: t.meta || t.name, x: Array.from(t.x || []), y: Array.from(t.y || []), z: t.z || null}))")


def severe_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]


def test_refused_without_token(browser, run_dir, tmp_path):
    with start_dashboard(run_dir) as dash:
        browser.get(dash.url)
        assert "401 Unauthorized" in browser.find_element("tag name", "body").text
        browser.get(dash.url + "api/run")
        assert "unauthorized" in browser.find_element("tag name", "body").text
        browser.get(dash.url + "?token=not-the-token")
        assert "401 Unauthorized" in browser.find_element("tag name", "body").text
        save_screenshot(browser, tmp_path, "dashboard-refused.png", min_bytes=2_000)


def test_finished_run_shows_its_data(browser, run_dir, tmp_path):
    store = RunStore(run_dir, readonly=True)
    loss, eval_acc = {}, {}
    for m in store.metrics("train_loss"):
        loss.setdefault(m["expert"], []).append((m["round"], m["value"]))
    for m in store.metrics("eval_accuracy"):
        eval_acc.setdefault(m["expert"], []).append((m["round"], m["value"]))
    sites = store.sites()
    rounds = store.last_committed_round()
    store.close()
    report = json.loads((run_dir / "report.json").read_text())

    with start_dashboard(run_dir) as dash:
        browser.get(dash.url_with_token)
        wait_for(browser, "window.fedmoe.refreshes >= 1 && window.fedmoe.live && window.fedmoe.settled", what="first draw, live stream, settled")
        assert "token=" not in browser.current_url  # dropped from the address bar after load
        assert browser.find_element("id", "run-state").text == "finished"
        assert browser.find_element("id", "run-round").text.startswith(f"{rounds} / {rounds}")

        # loss curves: one trace per expert holding exactly the run store's values
        drawn = {t["name"]: list(zip(t["x"], t["y"])) for t in traces(browser, "chart-loss")}
        assert drawn == {e: [tuple(p) for p in pts] for e, pts in loss.items()}

        # accuracy: per round, one curve per expert holding the sites' evaluation from the run
        # store; below it, report.json's final per-domain accuracies
        assert eval_acc and all(len(pts) == rounds for pts in eval_acc.values())
        curves = {t["name"]: list(zip(t["x"], t["y"])) for t in traces(browser, "chart-accuracy")}
        assert curves == {e: [tuple(p) for p in pts] for e, pts in eval_acc.items()}
        assert {e: [(p["round"], p["accuracy"]) for p in c] for e, c in report["curves"].items()} == curves
        acc = {t["name"]: dict(zip(t["x"], t["y"])) for t in traces(browser, "chart-final")}
        for method, v in report["methods"].items():
            assert acc[method]["mixed"] == pytest.approx(v["mixed"])
            for domain, a in v["per_domain"].items():
                assert acc[method][domain] == pytest.approx(a)
        note = browser.find_element("id", "accuracy-note").text
        assert "not recorded" not in note and "per round" in note

        # sites table: one row per site, with its domain, rank and rounds joined
        # read the rendered rows in one script call: live nodes read one by one can be
        # replaced between find_elements and .text (StaleElementReferenceException)
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#sites-table tbody tr')].map(r => r.innerText.replace(/\\s+/g, ' '))")
        assert len(rows) == len(sites)
        for row, site in zip(rows, sites):
            assert row.split()[:3] == [site["site"], site["domain"], str(site["rank"])]
            assert f" {rounds} " in f" {row} "

        # experts: per-layer heatmap (every expert x every layer) and update norm by round
        heat = traces(browser, "chart-layers")[0]
        assert len(heat["z"]) == len(loss) and all(len(row) == len(heat["x"]) and all(v > 0 for v in row) for row in heat["z"])
        assert {t["name"] for t in traces(browser, "chart-norm")} == set(loss)
        assert "not enabled" in browser.find_element("id", "privacy-note").text
        assert not severe_errors(browser)
        save_screenshot(browser, tmp_path, "dashboard.png")


def test_live_run_updates_without_reload(browser, run_dir, tmp_path):
    live = live_copy(run_dir, tmp_path / "live", total_rounds=4)
    done = RunStore(live, readonly=True).last_committed_round()
    with start_dashboard(live, poll_interval=0.2) as dash:
        browser.get(dash.url_with_token)
        wait_for(browser, "window.fedmoe.refreshes >= 1 && window.fedmoe.live", what="first draw and live stream")
        assert browser.find_element("id", "run-state").text == "running"
        marker = browser.execute_script("window.__same_page = true; return window.fedmoe.refreshes")

        add_round(live, done + 1, loss=0.25, reject=True)
        # add_round trains the domain experts only (not the "all" baseline)
        wait_for(browser, f"document.getElementById('chart-loss').data.filter(t => t.meta !== 'all').every(t => t.x.includes({done + 1}))",
                 what=f"round {done + 1} in the loss chart")
        assert all(t["y"][-1] == 0.25 for t in traces(browser, "chart-loss") if t["name"] != "all")
        wait_for(browser, f"document.getElementById('run-round').textContent.startsWith('{done + 1} / 4')", what="round counter")
        wait_for(browser, "document.querySelectorAll('#rejections-table tbody tr').length === 1", what="the rejection")
        assert browser.execute_script("return window.__same_page === true")  # no reload: pushed over SSE
        assert browser.execute_script("return window.fedmoe.refreshes") > marker
        kinds = browser.execute_script("return window.fedmoe.events.map(e => e.kind)")
        assert "round_committed" in kinds and "rejection" in kinds
        assert browser.find_element("id", "run-eta").text not in ("", "—", "done")
        save_screenshot(browser, tmp_path, "dashboard-live.png")

        store = RunStore(live)
        store.finish_run()
        store.close()
        wait_for(browser, "document.getElementById('run-state').textContent === 'finished'", what="finished state")
        assert not severe_errors(browser)
