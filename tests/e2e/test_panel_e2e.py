"""The admin panel in a real browser: Debian's headless Chromium driven by
selenium through chromium-driver (tests/services.sh installs both).
Logs in, adds a user (a bad quota shown beside its field first), shows
the user's share link with a QR code that encodes exactly that link,
charts the user's tunnel's traffic (the server's chart and the user's), and
disables the user, whose open tunnel the server then closes.  The
screenshots it takes stay in build/screenshots/ for CI to show."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_POLICY, ServerProcess, _start, run_ctl
from peers import echo
from test_cluster_e2e import alive, login

SCREENSHOTS = ROOT / "build" / "screenshots"
WAIT = 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("Chromium is not installed: run 'bash tests/services.sh' (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                     "--no-proxy-server", "--disable-background-networking", "--disable-sync",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    driver_process = webdriver.Chrome(options=options, service=Service(driver))
    driver_process.set_page_load_timeout(30)
    yield driver_process
    driver_process.quit()


@pytest.fixture
def panel_server(e2e_setup, tmp_path):
    admin_port, tunnel_port = free_port(), free_port()
    config = tmp_path / "mtop.yaml"
    config.write_text(
        "server:\n"
        f'  listen: "127.0.0.1:{tunnel_port}"\n'
        f"  crt: {e2e_setup.dir / 'certs' / 'server.crt'}\n"
        f"  key: {e2e_setup.dir / 'certs' / 'server.key'}\n"
        "  auth_failure_delay: 0\n"
        f"db:\n  driverName: sqlite\n  dsn: {tmp_path / 'panel.db'}\n  cache_ttl: 0\n  recheck_interval: 1\n  flush_interval: 1\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n" + TEST_POLICY
    )
    run_ctl(config, "db", "init")
    run_ctl(config, "admin", "add", "-n", "ops", "--password-stdin", stdin="Ops-panel-pw-1\n")
    generator = _start(ServerProcess("panel", config, tmp_path))
    server = next(generator)
    server.wait_for(rf"Admin API listening on 127\.0\.0\.1:{admin_port}", 10)
    server.admin_port = admin_port
    yield server
    next(generator, None)


def shot(browser, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def wait_until(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.1)


def test_the_panel_adds_links_and_disables_a_user(browser, panel_server, e2e_setup, make_target):
    import segno
    from selenium.webdriver.common.by import By

    def find(selector):
        return browser.find_element(By.CSS_SELECTOR, selector)

    def visible(selector):
        elements = browser.find_elements(By.CSS_SELECTOR, selector)
        return elements and elements[0].is_displayed()

    browser.get(f"http://127.0.0.1:{panel_server.admin_port}/")
    wait_until(lambda: visible("#login-form"), "the login form")
    # A wrong password: said beside the field.
    find("#login-form input[name=name]").send_keys("ops")
    find("#login-form input[name=password]").send_keys("wrong")
    find("#login-form button").click()
    wait_until(lambda: find('#login-form .error[data-field="password"]').text, "the login error")
    assert "wrong admin name or password" in find('#login-form .error[data-field="password"]').text
    find("#login-form input[name=password]").clear()
    find("#login-form input[name=password]").send_keys("Ops-panel-pw-1")
    find("#login-form button").click()
    wait_until(lambda: visible("#main"), "the panel after logging in")
    assert find("#who").text == "ops"
    shot(browser, "1-logged-in")

    # Bad input: the message beside the field, nothing added.
    find("#add-form input[name=username]").send_keys("webuser")
    find("#add-form input[name=password]").send_keys("Web-pw-123")
    find("#add-form input[name=quota_bytes]").send_keys("lots")
    find("#add-form button").click()
    error = wait_until(lambda: find('#add-form .error[data-field="quota_bytes"]').text, "the quota error")
    assert "'lots' is not a size" in error
    assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-user="webuser"]')
    shot(browser, "2-bad-quota")

    quota = find("#add-form input[name=quota_bytes]")
    quota.clear()
    quota.send_keys("1G")
    find("#add-form button").click()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-user="webuser"]'), "the new user's row")
    assert "0 B of 1.0 GiB" in find('tr[data-user="webuser"]').text

    # Its share link and a QR code that encodes exactly it.
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#links-list .link img"), "the QR code")
    link = find("#links-list .link code").text
    assert link == f"mtop://webuser:Web-pw-123@127.0.0.1:{panel_server.port}/tls?proto=mtop", link
    image = find("#links-list .link img")
    wait_until(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image), "the QR image")
    source = image.get_attribute("src")
    assert source.startswith("data:image/svg+xml;base64,")
    expected = io.BytesIO()
    segno.make_qr(link, error="m", boost_error=True).save(expected, kind="svg", scale=4, xmldecl=False)
    assert base64.b64decode(source.split(",", 1)[1]) == expected.getvalue()
    assert image.size["width"] >= 150  # big enough for a phone's camera
    shot(browser, "3-share-link")

    # Edit: a bad rate is said beside it; a good one is saved.
    find('#users tr[data-user="webuser"] .edit-button').click()
    wait_until(lambda: visible("#edit"), "the edit form")
    assert find("#edit-form input[name=quota_bytes]").get_attribute("value") == str(1 << 30)
    rate = find("#edit-form input[name=rate_limit]")
    rate.send_keys("fast")
    find("#edit-form button[type=submit]").click()
    assert "'fast' is not a size" in wait_until(lambda: find('#edit-form .error[data-field="rate_limit"]').text, "the rate error")
    rate.clear()
    rate.send_keys("2M")
    find("#edit-form button[type=submit]").click()
    wait_until(lambda: not visible("#edit"), "the edit form to close")
    panel_server.wait_for(r"admin ops: changed user=webuser rate_limit=2097152\n", 10)

    # An open tunnel of the user, then disable the user in the panel: closed.
    target = make_target(echo)
    tunnel = login("127.0.0.1", panel_server.port, e2e_setup.ca, ("webuser", "Web-pw-123"), target.port)
    assert tunnel is not None and alive(tunnel)
    # The panel lists it among the live tunnels.
    find("#tunnels-refresh").click()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, '#tunnels tr[data-user="webuser"]'), "the live tunnel")
    assert f"127.0.0.1:{target.port}" in find('#tunnels tr[data-user="webuser"]').text
    # Its traffic (4 bytes each way), flushed within a second, in the
    # server's chart, the top users, and the user's own chart.
    def charted():
        find("#traffic-refresh").click()
        time.sleep(0.3)
        chart = find("#traffic-chart")
        return (chart.get_attribute("data-up"), chart.get_attribute("data-down")) == ("4", "4")

    wait_until(charted, "the server's traffic chart with the tunnel's bytes")
    assert find("#traffic-chart svg g.point rect.up")  # a bar drawn
    assert "4 B up, 4 B down" in find("#traffic-chart .caption").text
    assert find('#traffic-top li[data-user="webuser"]').text == "webuser: 8 B"
    find('#users tr[data-user="webuser"] .edit-button').click()
    wait_until(lambda: find("#user-chart").get_attribute("data-up") == "4", "the user's traffic chart")
    assert find("#user-chart").get_attribute("data-down") == "4"
    shot(browser, "5-traffic")
    find("#edit-close").click()
    find('#users tr[data-user="webuser"] input.enabled').click()
    panel_server.wait_for(r"tunnel user-disabled: client=\S+ user=webuser ", 10)
    assert not alive(tunnel)
    tunnel.close()
    panel_server.wait_for(r"admin ops: changed user=webuser enabled=False", 10)
    browser.refresh()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, '#users tr[data-user="webuser"] input.enabled'), "the row again")
    assert not find('#users tr[data-user="webuser"] input.enabled').is_selected()
    assert not browser.find_elements(By.CSS_SELECTOR, '#tunnels tr[data-user="webuser"]')
    shot(browser, "6-disabled")
    # The panel's page never carried the password into the server's log.
    assert "Web-pw-123" not in panel_server.log() and "Ops-panel-pw-1" not in panel_server.log()
    assert "Traceback" not in panel_server.log()
    assert Path(SCREENSHOTS / "6-disabled.png").stat().st_size > 1000

    # On a phone's screen: nothing wider than the screen, the chart drawn to fit.
    browser.set_window_size(390, 844)
    browser.refresh()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#traffic-chart svg"), "the chart on a phone")
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
    assert find("#traffic-chart svg").size["width"] <= 390
    shot(browser, "7-phone")


def test_live_tunnels_are_listed_and_closed(panel_server, e2e_setup, make_target):
    import http.client
    import json

    token = run_ctl(panel_server.config, "admin", "token", "-n", "ops").strip()
    run_ctl(panel_server.config, "user", "add", "-u", "livy", "--password-stdin", stdin="Livy-pw-12\n")
    target = make_target(echo)
    tunnel = login("127.0.0.1", panel_server.port, e2e_setup.ca, ("livy", "Livy-pw-12"), target.port)
    assert tunnel is not None and alive(tunnel)

    def call(method, path):
        conn = http.client.HTTPConnection("127.0.0.1", panel_server.admin_port, timeout=30)
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        data = json.loads(response.read() or b"null")
        conn.close()
        return response.status, data

    status, body = call("GET", "/api/v1/tunnels")
    assert status == 200
    (mine,) = [t for t in body["here"] if t["username"] == "livy"]
    assert mine["target"] == f"127.0.0.1:{target.port}" and mine["bytes_up"] == 4 and mine["bytes_down"] == 4
    assert call("POST", "/api/v1/users/nobody/close-tunnels")[0] == 404
    assert call("POST", "/api/v1/users/livy/close-tunnels") == (200, {"closed": 1})
    panel_server.wait_for(r"tunnel closed-by-admin: client=\S+ user=livy ", 10)
    panel_server.wait_for(r"admin ops: closed the tunnels of user=livy count=1", 10)
    assert not alive(tunnel)
    tunnel.close()
    assert [t for t in call("GET", "/api/v1/tunnels")[1]["here"] if t["username"] == "livy"] == []
