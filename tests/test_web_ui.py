"""The web UI in a real browser: headless Debian Chromium driven by Selenium, against a real exporter
process (with --protect-reads and tokens) and a real Alertmanager, all on 127.0.0.1 with free ports.

The exporter is filled with pipelines in every state the overview knows; every test signs in with the token
it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import pytest

from pipemon.service.auth import hash_token
from tests.helpers import iso
from tests.procs import free_port, require_binary, running

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ADMIN, TEAM_A, TEAM_B = "admin-secret-token", "team-a-secret-token", "team-b-secret-token"
HOUR = 3600.0
BROWSER_ZONE = "Asia/Kolkata"  # UTC+5:30, no daylight saving
LONG_NAME = "a_pipeline_with_a_remarkably_long_name_" + "that_keeps_going_" * 8 + "end"
EXPECTED = {  # pipeline -> the state the overview must show
    "ok_pipe": "ok", "failing_pipe": "failing", "stale_pipe": "stale", "stuck_pipe": "stuck",
    "slow_pipe": "slow", "volume_pipe": "volume_low", "throughput_pipe": "throughput_drop",
    "never_pipe": "never_ran", LONG_NAME: "ok",
}
REGISTRY = """
teams: {team-a: {}, team-b: {}}
defaults: {expected_interval: 1h, max_runtime: 30m}
pipelines:
  - {match: never_pipe, team: team-a, expected_interval: 7d}
  - {match: stuck_pipe, team: team-a, max_runtime: 10m}
  - {match: "b_*", team: team-b, tier: gold}
  - {match: "*", team: team-a, expected_interval: 1h}
"""


def _post(url: str, body: object, token: str = ADMIN) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def _history(name: str, runs: int, duration: float = 10.0, records: int = 1000, end: float | None = None,
             status: str = "success") -> list[dict]:
    """Hourly runs ending `end` (default: ten minutes ago), with a little jitter so baselines have spread."""
    end = end if end is not None else time.time() - 600
    events = []
    for i in range(runs):
        finished = end - HOUR * (runs - 1 - i)
        jitter = 1 + 0.04 * ((i * 7) % 5 - 2)
        events.append({"pipeline": name, "run_id": f"{name}-{i}", "status": status, "finished_at": iso(finished),
                       "duration_seconds": round(duration * jitter, 3),
                       "records_processed": int(records * jitter)})
    return events


def _events() -> list[dict]:
    now = time.time()
    events = _history("ok_pipe", 14) + _history(LONG_NAME, 3) + _history("b_secret_pipe", 5)
    events += _history("failing_pipe", 12, end=now - 4 * HOUR)
    events += [{"pipeline": "failing_pipe", "run_id": f"fail-{i}", "status": "failure",
                "finished_at": iso(now - (3 - i) * HOUR + 60), "duration_seconds": 3.0} for i in range(3)]
    events += _history("stale_pipe", 12, end=now - 5 * HOUR)
    events += _history("stuck_pipe", 12, end=now - 2 * HOUR)
    slow = _history("slow_pipe", 16)
    for event in slow[-3:]:
        event["duration_seconds"] = 80.0  # the hourly class needs two; three to be sure
    volume = _history("volume_pipe", 15)
    volume[-1]["records_processed"] = 10
    throughput = _history("throughput_pipe", 15)
    throughput[-1].update(duration_seconds=14.0, records_processed=600)  # neither slow nor few: both at once
    return events + slow + volume + throughput


@pytest.fixture(scope="module")
def stack() -> Iterator[dict]:
    am_bin = require_binary("prometheus-alertmanager")
    for binary in (CHROMIUM, CHROMEDRIVER):
        require_binary(binary)
    tmp = Path(tempfile.mkdtemp(prefix="pipemon-ui-"))
    try:
        (tmp / "pipelines.yaml").write_text(REGISTRY)
        tokens = [{"name": "admin", "sha256": hash_token(ADMIN).hex(), "admin": True},
                  {"name": "team-a-reader", "sha256": hash_token(TEAM_A).hex(), "team": "team-a"},
                  {"name": "team-b-reader", "sha256": hash_token(TEAM_B).hex(), "team": "team-b"}]
        (tmp / "tokens.yaml").write_text(json.dumps({"tokens": tokens}))
        (tmp / "am.yml").write_text("route: {receiver: default}\nreceivers: [{name: default}]\n")
        am_port, port = free_port(), free_port()
        am_url, url = f"http://127.0.0.1:{am_port}", f"http://127.0.0.1:{port}"
        am = [am_bin, f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp / 'am'}",
              f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="]
        exporter = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}",
                    "--registry", str(tmp / "pipelines.yaml"), "--state-dir", str(tmp / "state"),
                    "--tokens", str(tmp / "tokens.yaml"), "--protect-reads", "--alertmanager-url", am_url,
                    "--prometheus-url", "http://127.0.0.1:9/prometheus", "--abandon-after-factor", "100",
                    "--access-log"]
        with (running(am, f"{am_url}/-/ready", tmp / "am.log"),
              running(exporter, f"{url}/-/healthy", tmp / "exporter.log")):
            events = _events()
            result = _post(f"{url}/api/v1/runs", events)
            assert result["rejected"] == 0, result
            _post(f"{url}/api/v1/runs/start", {"pipeline": "stuck_pipe", "run_id": "stuck-run",
                                               "started_at": iso(time.time() - HOUR)})
            now = datetime.now(UTC)
            alert = {"labels": {"alertname": "PipelineConsecutiveFailures", "pipeline": "failing_pipe",
                                "team": "team-a", "severity": "critical"},
                     "startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=10)).isoformat()}
            request = urllib.request.Request(f"{am_url}/api/v2/alerts", data=json.dumps([alert]).encode(),
                                             method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).close()
            yield {"url": url, "am": am_url, "log": tmp / "exporter.log", "tmp": tmp, "events": events}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(stack) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = stack["tmp"] / "chromium-profile"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(arg)
    # a zone that is not the machine's (UTC), to see the page convert times into the browser's own
    service = Service(CHROMEDRIVER, env={**os.environ, "TZ": BROWSER_ZONE})
    driver = webdriver.Chrome(service=service, options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{url}/")
    assert driver.current_url.endswith("/login"), "an unsigned visitor is sent to the sign-in form"
    field = driver.find_element(By.NAME, "token")
    field.send_keys(token)
    field.submit()
    wait_for(lambda: driver.current_url.rstrip("/") == url and driver.find_elements(By.ID, "main"))


def wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def rows(driver) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return {row.get_attribute("data-pipeline"): row.get_attribute("data-state")
            for row in driver.find_elements(By.CSS_SELECTOR, "#pipelines tbody tr")}


def test_overview_shows_every_state_worst_first(stack, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack["url"], ADMIN)
    shown = rows(browser)
    for name, state in EXPECTED.items():
        assert shown.get(name) == state, f"{name}: shown as {shown.get(name)}, expected {state}"
    order = [row.get_attribute("data-pipeline") for row in browser.find_elements(By.CSS_SELECTOR,
                                                                                  "#pipelines tbody tr")]
    assert order[0] == "failing_pipe" and order.index("stale_pipe") < order.index("slow_pipe") < order.index(
        "ok_pipe")
    failing = browser.find_element(By.CSS_SELECTOR, 'tr[data-pipeline="failing_pipe"] .badge')
    assert failing.text == "failing ×3"
    counts = browser.find_element(By.CSS_SELECTOR, 'table.counts tr[data-team="team-a"]').text
    assert counts.split()[:2] == ["team-a", "1"]  # one failing pipeline in team-a
    # keyboard: the first Tab reaches "Skip to content", Enter moves the focus to the page's content
    from selenium.webdriver.common.keys import Keys

    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    skip = browser.switch_to.active_element
    assert skip.text == "Skip to content"
    skip.send_keys(Keys.ENTER)
    assert browser.switch_to.active_element.get_attribute("id") == "main"
    # times are shown relative, in the browser's zone, not as raw UTC
    first_time = browser.find_element(By.CSS_SELECTOR, 'tr[data-pipeline="ok_pipe"] time')
    assert "ago" in first_time.text and first_time.get_attribute("title")


def test_filters_and_search_work_and_stay_in_the_url(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    sign_in(browser, stack["url"], ADMIN)
    Select(browser.find_element(By.NAME, "state")).select_by_value("stale")
    assert "state=stale" not in browser.current_url, "a filter applies with its button, not on change"
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait_for(lambda: "state=stale" in browser.current_url)
    assert rows(browser) == {"stale_pipe": "stale"}
    Select(browser.find_element(By.NAME, "state")).select_by_value("")
    search = browser.find_element(By.NAME, "q")
    search.send_keys("volume", Keys.ENTER)  # keyboard only
    wait_for(lambda: "q=volume" in browser.current_url)
    assert rows(browser) == {"volume_pipe": "volume_low"}
    browser.get(f"{stack['url']}/?team=team-b")
    assert set(rows(browser)) == {"b_secret_pipe"}
    assert Select(browser.find_element(By.NAME, "team")).first_selected_option.text == "team-b"
    browser.get(f"{stack['url']}/?state=nonsense")
    assert "state must be one of" in browser.find_element(By.CSS_SELECTOR, "p.error").text


def test_the_page_refreshes_itself_keeping_its_filters(stack, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack["url"], ADMIN)
    browser.get(f"{stack['url']}/?q=refresh_me&team=team-a")
    assert rows(browser) == {}
    _post(f"{stack['url']}/api/v1/runs", _history("refresh_me_pipe", 1))
    browser.find_element(By.TAG_NAME, "body").click()  # focus off the search box: refreshing is allowed
    browser.execute_script("return window.pipemonRefresh()")  # what the 30 s timer calls
    wait_for(lambda: rows(browser) == {"refresh_me_pipe": "ok"})
    assert browser.current_url.endswith("/?q=refresh_me&team=team-a")
    assert browser.find_element(By.NAME, "q").get_attribute("value") == "refresh_me"


def test_a_click_leads_to_the_pipeline_page_whose_runs_and_charts_match_what_was_sent(stack, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack["url"], ADMIN)
    browser.find_element(By.LINK_TEXT, "slow_pipe").click()
    wait_for(lambda: browser.find_elements(By.ID, "pipeline-name"))
    assert browser.find_element(By.ID, "pipeline-name").text == "slow_pipe"
    assert "slow" in browser.find_element(By.ID, "health").text
    sent = [event for event in stack["events"] if event["pipeline"] == "slow_pipe"]
    table = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert [r.get_attribute("data-run") for r in table] == [e["run_id"] for e in reversed(sent)]
    assert table[0].find_elements(By.TAG_NAME, "td")[4].text == "80.0 s"
    points = browser.find_elements(By.CSS_SELECTOR, "#chart-duration circle")
    assert [(p.get_attribute("data-run"), float(p.get_attribute("data-value"))) for p in points] == [
        (e["run_id"], e["duration_seconds"]) for e in sent]
    records = browser.find_elements(By.CSS_SELECTOR, "#chart-records circle")
    assert [float(p.get_attribute("data-value")) for p in records] == [e["records_processed"] for e in sent]
    # the bands of the baseline the latest run was judged against: median of the runs before it, about 10 s
    median = browser.find_element(By.CSS_SELECTOR, "#chart-duration line.median title")
    assert "baseline median 10.0 s (15 runs)" in median.get_attribute("textContent")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-duration rect.band2")
    strip = browser.find_elements(By.CSS_SELECTOR, "#outcomes rect")
    assert [s.get_attribute("data-status") for s in strip] == ["success"] * 16
    # the runs' times in the browser's zone (UTC+5:30), not the server's
    finished = datetime.fromisoformat(sent[-1]["finished_at"]).astimezone(ZoneInfo(BROWSER_ZONE))
    shown = table[0].find_elements(By.TAG_NAME, "td")[3].text
    assert f"{finished.hour % 12 or 12}:{finished.minute:02d}:{finished.second:02d}" in shown, shown
    sources = {r.get_attribute("data-threshold"): r.find_elements(By.TAG_NAME, "td")[2].text
               for r in browser.find_elements(By.CSS_SELECTOR, "#thresholds tbody tr")}
    assert sources["duration_zscore_medium"] == "rules/config.yaml"


def test_stuck_pipeline_page_lists_its_run_in_progress_with_its_age(stack, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack["url"], ADMIN)
    browser.get(f"{stack['url']}/pipelines/stuck_pipe")
    run = browser.find_element(By.CSS_SELECTOR, '#in-progress tr[data-run="stuck-run"]')
    assert run.find_element(By.CSS_SELECTOR, "td.late").text.endswith("min")


def test_a_firing_alert_shows_and_its_silence_link_opens_alertmanagers_silence_form(stack, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack["url"], ADMIN)
    mark = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-pipeline="failing_pipe"] .a-firing'))
    assert mark[0].get_attribute("title") == "PipelineConsecutiveFailures"
    assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-pipeline="ok_pipe"] .alert')
    browser.get(f"{stack['url']}/pipelines/failing_pipe")
    alert = browser.find_element(By.CSS_SELECTOR, '#alerts tr[data-alert="PipelineConsecutiveFailures"]')
    cells = [td.text for td in alert.find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == ["PipelineConsecutiveFailures", "critical", "firing"] and cells[4] == "default"
    browser.find_element(By.ID, "silence-link-0").click()
    wait_for(lambda: browser.current_url.startswith(stack["am"]))
    # Alertmanager's silence form route, its matcher prefilled. Debian's Alertmanager ships no web UI
    # (it serves a page saying so), so the form itself cannot render here; the route and filter are checked.
    path, _, fragment = browser.current_url.partition("#")
    assert path == f"{stack['am']}/" and "Alertmanager" in browser.title
    assert unquote(fragment) == '/silences/new?filter={pipeline="failing_pipe"}'


def test_team_token_never_shows_another_teams_pipeline(stack, browser):
    from selenium.webdriver.common.by import By

    url = stack["url"]
    sign_in(browser, url, TEAM_A)
    shown = rows(browser)
    assert "b_secret_pipe" not in shown and set(EXPECTED) <= set(shown)
    assert "b_secret_pipe" not in browser.page_source and "team-b" not in browser.page_source
    browser.get(f"{url}/pipelines/b_secret_pipe")
    assert "No such pipeline" in browser.find_element(By.TAG_NAME, "h1").text
    browser.get(f"{url}/?q=b_secret")
    assert rows(browser) == {}
    cookie = browser.get_cookie("pipemon_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TEAM_A not in cookie["value"]
    browser.find_element(By.CSS_SELECTOR, "form.account button").click()
    wait_for(lambda: browser.current_url.endswith("/login"))
    browser.get(f"{url}/pipelines/ok_pipe")
    assert browser.current_url.endswith("/login"), "signed out: no page"

    def get(path: str, token: str | None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    for path in ("/api/v1/pipelines", "/api/v1/pipelines/ok_pipe", "/api/v1/pipelines/ok_pipe/runs", "/metrics"):
        status, body = get(path, None)
        assert status == 401 and "ok_pipe" not in body, path
    status, listing = get("/api/v1/pipelines", TEAM_A)
    names = {p["pipeline"] for p in json.loads(listing)["pipelines"]}
    assert status == 200 and "ok_pipe" in names and "b_secret_pipe" not in names
    for path in ("/api/v1/pipelines/b_secret_pipe", "/api/v1/pipelines/b_secret_pipe/runs"):
        assert get(path, TEAM_A)[0] == 404
    status, metrics = get("/metrics", TEAM_A)
    assert status == 200 and 'pipeline="ok_pipe"' in metrics and "b_secret_pipe" not in metrics
    assert "team-b" not in metrics
    status, metrics = get("/metrics", TEAM_B)
    assert 'pipeline="b_secret_pipe"' in metrics and "ok_pipe" not in metrics
    status, metrics = get("/metrics", ADMIN)
    assert "b_secret_pipe" in metrics and "ok_pipe" in metrics and "pipemon_events_received_total" in metrics
    log = stack["log"].read_text()
    assert all(token not in log for token in (ADMIN, TEAM_A, TEAM_B))


def test_phone_width_long_names_do_not_break_the_layout(stack, browser):
    from selenium.webdriver.common.by import By

    sign_in(browser, stack["url"], ADMIN)
    try:
        browser.set_window_size(390, 844)
        browser.get(f"{stack['url']}/?q=remarkably")
        assert rows(browser) == {LONG_NAME: "ok"}
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page scrolls sideways on a phone: {width}"
        browser.find_element(By.LINK_TEXT, LONG_NAME).click()
        wait_for(lambda: browser.find_elements(By.ID, "pipeline-name"))
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the pipeline page scrolls sideways on a phone: {width}"
    finally:
        browser.set_window_size(1280, 900)
