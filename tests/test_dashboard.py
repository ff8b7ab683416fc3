"""The support dashboard end to end in headless Chromium (Debian's, driven by Playwright):
sign in, watch an alert appear live when a simulated device overheats, acknowledge it, see the
device's charts drawn with data, and see an envelope error next to its field. Screenshots of
each page land in ``test-artifacts/dashboard/``."""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import sync_playwright

from deploy.stack.mosquitto import MosquittoBroker
from services.api.main import create_app
from services.api.settings import ApiSettings
from services.common.signing import load_or_create_key
from tests.agent import AgentProcess
from tests.api import serving
from tests.ingest import Device, IngestWorkers
from tests.rules import RulesWorkers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
LIVE_TIMEOUT_MS = 60_000


@pytest.fixture
def api_url(broker_api_settings: ApiSettings) -> Iterator[str]:
    with serving(create_app(broker_api_settings)) as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def open_page(browser: Any, url: str, errors: list[str]) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/dashboard/")
    return page


def sign_in(page: Any, key: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Fleet overview").wait_for()


def provision(page: Any, device_id: str) -> Device:
    """Provision through the API with the page's key, as an app backend would."""
    answer = page.evaluate(
        """async (id) => {
            const r = await fetch('/v1/devices', {method: 'POST', headers: {
                'Authorization': 'Bearer ' + sessionStorage.getItem('galvani.apiKey'),
                'Content-Type': 'application/json'},
                body: JSON.stringify({device_id: id, model: 'glow-2'})});
            return {status: r.status, body: await r.json()};
        }""",
        device_id,
    )
    assert answer["status"] == 201, answer
    return Device(device_id, answer["body"]["mqtt"]["password"])


def test_support_sees_an_overheating_device_live_acknowledges_it_and_reads_its_charts(
    api_url: str,
    browser: Any,
    keys: dict[str, str],
    broker: MosquittoBroker,
    ingest_workers: IngestWorkers,
    rules_workers: RulesWorkers,
    tmp_path: Path,
    key_dir: Path,
) -> None:
    ingest_workers.start("1")
    rules_workers.start("1")
    errors: list[str] = []
    page = open_page(browser, api_url, errors)
    sign_in(page, keys["admin"])
    page.screenshot(path=ARTIFACTS / "overview.png", full_page=True)
    device = provision(page, "dash-0001")

    page.get_by_role("link", name="Alerts").click()
    page.get_by_role("heading", name="Alerts").wait_for()
    page.get_by_text("No alerts match.").wait_for()
    page.wait_for_selector("body[data-stream='live']", timeout=10_000)
    home = tmp_path / "agent"
    home.mkdir()
    agent = AgentProcess(home, device, broker.config.device_port, load_or_create_key(key_dir))
    agent.start("--session", "LIFT:3:90", "--scenario", "battery-overheat")
    try:
        # No reload: the alert arrives on the stream.
        row = page.locator("#alerts tbody tr[data-alert-id]", has_text="dash-0001").first
        row.wait_for(timeout=LIVE_TIMEOUT_MS)
        assert "critical" in row.inner_text().lower()
        page.screenshot(path=ARTIFACTS / "alerts-live.png", full_page=True)
        alert_id = row.get_attribute("data-alert-id")
        row.get_by_role("button", name="Acknowledge").click()
        page.locator(f"#alert-{alert_id}").wait_for(state="detached")  # leaves the open queue
        page.get_by_label("State").select_option("acknowledged")
        acknowledged = page.locator(f"#alert-{alert_id}")
        acknowledged.wait_for()
        assert "by api-key:" in acknowledged.inner_text()
        assert acknowledged.get_by_role("button", name="Acknowledge").count() == 0
        page.screenshot(path=ARTIFACTS / "alerts-acknowledged.png", full_page=True)

        acknowledged.get_by_role("link", name="dash-0001").click()
        page.get_by_role("heading", name="Device dash-0001").wait_for()
        page.get_by_label("Range", exact=True).select_option("1h")
        for chart in ("current", "impedance", "temperature", "battery"):
            page.wait_for_selector(f"#chart-{chart}[data-points]:not([data-points='0'])")
            assert page.locator(f"#chart-{chart} canvas").count() == 1
        assert page.locator("#sessions .session").count() >= 1
        page.screenshot(path=ARTIFACTS / "device.png", full_page=True)
    finally:
        agent.stop()

    page.get_by_role("link", name="Mode tables").click()
    page.get_by_role("heading", name="New mode table").wait_for()
    page.get_by_label("Name").fill("too strong")
    page.locator("#f-modes-LIFT-i_max_ua").fill("600")
    page.get_by_role("button", name="Create table").click()
    error = page.locator("#f-modes-LIFT-i_max_ua-error")
    error.wait_for()
    page.wait_for_function(
        "document.querySelector('#f-modes-LIFT-i_max_ua-error').textContent.length > 0"
    )
    assert "above the limit 500" in error.inner_text()
    assert page.locator("#f-modes-LIFT-i_max_ua").get_attribute("aria-invalid") == "true"
    page.screenshot(path=ARTIFACTS / "mode-table-error.png", full_page=True)
    page.locator("#f-modes-LIFT-i_max_ua").fill("400")
    page.get_by_role("button", name="Create table").click()
    page.locator("#mode-tables tbody tr", has_text="too strong").wait_for()

    page.get_by_role("link", name="Rollouts").click()
    page.get_by_role("heading", name="Start a rollout").wait_for()
    page.get_by_label("Canary share (%)").fill("0")
    page.get_by_role("button", name="Start rollout").click()
    started = page.locator("#rollouts tbody tr[data-status]").first
    started.wait_for()
    # The agent has stopped: its table waits for it, counted as pushed but offline.
    assert "1 offline" in started.inner_text()
    assert started.get_attribute("data-status") == "running"
    page.screenshot(path=ARTIFACTS / "rollouts.png", full_page=True)
    # The browser logs the refused table's 422 as a failed load; nothing else may fail.
    assert [e for e in errors if "status of 422" not in e] == []


def test_a_viewer_sees_alerts_without_the_buttons_to_act_on_them(
    api_url: str, browser: Any, keys: dict[str, str], database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO devices (id, brand_id, model) VALUES ('view-0001', 'acme', 'glow-2')"
        )
        conn.execute(
            "INSERT INTO alerts (brand_id, device_id, rule, rule_version, severity, first_seen,"
            " last_seen, explanation) VALUES ('acme', 'view-0001', 'no_contact', 1, 'warning',"
            ' now(), now(), \'{"threshold": {}, "observed": {}, "window": {},'
            ' "action": "alert", "text": "Dry electrodes for 10 s."}\')'
        )
    errors: list[str] = []
    page = open_page(browser, api_url, errors)
    sign_in(page, keys["viewer"])
    page.get_by_role("link", name="Alerts").click()
    row = page.locator("#alerts tbody tr[data-alert-id]").first
    row.wait_for()
    assert "Dry electrodes for 10 s." in row.inner_text()
    assert page.get_by_role("button", name="Acknowledge").count() == 0
    assert page.get_by_role("button", name="Resolve").count() == 0
    page.get_by_role("link", name="Mode tables").click()
    page.get_by_role("heading", name="Mode tables").wait_for()
    assert page.get_by_role("heading", name="New mode table").count() == 0
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for()
    assert page.evaluate("sessionStorage.getItem('galvani.apiKey')") is None
    assert errors == []
