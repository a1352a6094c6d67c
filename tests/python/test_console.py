"""The web console, driven in headless Chromium (Debian's chromium and chromedriver, through
Selenium) against the real binary: sign in, create a group, upload and verify a CA, watch a
simulated device register and its telemetry plotted, revoke its certificate and find that in
the audit log, and check that a read-only credential can change nothing.

Screenshots of every page go to target/test-output/console/ (CONSOLE_SCREENSHOTS overrides)."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from conftest import BINARY, ROOT, Server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", ROOT / "target" / "test-output" / "console"))

ALL_RIGHTS = (
    "ServiceConfig,EnrollmentRead,EnrollmentWrite,RegistrationStatusRead,RegistrationStatusWrite,"
    "RegistryRead,RegistryWrite,ServiceConnect"
)
READ_RIGHTS = "EnrollmentRead,RegistrationStatusRead,RegistryRead"


@pytest.fixture(scope="module")
def server():
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: build it with cargo build --bin zerotouch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROTOUCH__")}
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data", env)
        try:
            srv.wait_ready()
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                # The server's certificate is from the instance's own CA, made at start.
                "--ignore-certificate-errors"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def cli(server, *args):
    out = subprocess.run([str(BINARY), *args, "--config", str(server.config), "--data-dir", str(server.data_dir)],
                         check=True, capture_output=True, text=True, env=server.env, timeout=180)
    return out.stdout.strip()


def token(server, rights, subject):
    return cli(server, "token", "create", "--rights", rights, "--subject", subject)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


class Console:
    def __init__(self, driver, server):
        self.driver = driver
        self.base = f"https://{server.ip}:{server.https_port}"
        self.shot = 0

    def open(self, page):
        self.driver.get(f"{self.base}/console#/{page}")

    def wait(self, css, timeout=20):
        return WebDriverWait(self.driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))

    def wait_text(self, css, text, timeout=20):
        WebDriverWait(self.driver, timeout).until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def click(self, css):
        self.wait(css).click()

    def screenshot(self, name):
        self.driver.execute_script("window.scrollTo(0, 0)")
        self.shot += 1
        self.driver.save_screenshot(str(SHOTS / f"{self.shot:02d}-{name}.png"))

    def sign_in(self, credential):
        self.open("signin")
        box = self.wait("#credential")
        box.clear()
        box.send_keys(credential)
        self.click("#sign-in")
        self.wait("#principal")

    def sign_out(self):
        self.click("#sign-out")
        self.wait("#credential")

    def fetch(self, method, path, body=None, csrf=True):
        """A request from the page's own script, as a person at the console could make it."""
        return self.driver.execute_async_script(
            """
            const [method, path, body, csrf, done] = arguments;
            (async () => {
              const s = await (await fetch('/console/session')).json();
              const headers = {'Content-Type': 'application/json'};
              if (csrf) headers['X-CSRF-Token'] = s.csrfToken;
              const r = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
              done({status: r.status, body: await r.text()});
            })().catch((e) => done({status: -1, body: String(e)}));
            """,
            method, path, body, csrf)


def test_console_end_to_end(server, browser, tmp_path):
    console = Console(browser, server)
    owner = token(server, ALL_RIGHTS, "alice")
    reader = token(server, READ_RIGHTS, "auditor")
    api = f"{console.base}"
    auth = {"Authorization": f"Bearer {owner}"}
    verify = server.credentials["caBundlePath"]

    # Sign-in: a wrong credential is refused with the API's error, the right one gets a session.
    console.open("overview")
    console.wait("#credential").send_keys("HostName=x;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=bm90IHRoZSBrZXk=")
    console.click("#sign-in")
    assert console.wait("[data-error-code]").get_attribute("data-error-code") == "401002"
    console.screenshot("sign-in-refused")
    console.sign_in(owner)
    assert console.wait("#principal").text == "console:token:alice"
    cookies = {c["name"]: c for c in browser.get_cookies()}
    session_cookie = cookies["zerotouch_console"]
    assert session_cookie["httpOnly"] and session_cookie["secure"] and session_cookie["sameSite"] == "Strict"
    assert owner not in session_cookie["value"], "the cookie is sealed, not the credential in clear"

    # Enrollment groups: create, reveal keys on request, and an edit that lost a race shows it.
    console.open("groups")
    console.wait("#new-id").send_keys("simulate-sk")
    Select(console.wait("#new-type")).select_by_value("symmetricKey")
    console.click("#create")
    console.wait('#groups tr[data-id="simulate-sk"]')
    console.screenshot("enrollment-groups")
    assert "primaryKey" not in console.wait("#groups").text
    console.wait('#groups tr[data-id="simulate-sk"] button').click()  # Reveal keys
    assert "primaryKey" in console.wait_text("#revealed", "primaryKey").text
    console.wait('#groups tr[data-id="simulate-sk"] a').click()
    editor = console.wait("#editor")
    # Someone else changes the group after the editor opened.
    current = requests.get(f"{api}/enrollmentGroups/simulate-sk?api-version=2021-10-01", headers=auth, verify=verify).json()
    current["initialTwin"] = {"tags": {"changedBy": "someone else"}}
    r = requests.put(f"{api}/enrollmentGroups/simulate-sk?api-version=2021-10-01", headers={**auth, "If-Match": current["etag"]},
                     json=current, verify=verify)
    assert r.status_code == 200, r.text
    edited = json.loads(editor.get_attribute("value"))
    edited["provisioningStatus"] = "enabled"
    browser.execute_script("arguments[0].value = arguments[1]", editor, json.dumps(edited))
    console.click("#save")
    assert "Someone changed simulate-sk" in console.wait("#etag-conflict").text
    console.screenshot("enrollment-group-etag-conflict")

    # CA certificate: upload, proof of possession, verified.
    for args in [
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
         "-out", "ca.pem", "-days", "2", "-subj", "/CN=Console Test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    ]:
        openssl(*args, cwd=tmp_path)
    console.open("cas")
    console.wait("#ca-name").send_keys("console-ca")
    browser.execute_script("arguments[0].value = arguments[1]", console.wait("#ca-pem"), (tmp_path / "ca.pem").read_text())
    console.click("#upload")
    console.wait_text('#cas tr[data-id="console-ca"]', "unverified")
    console.wait('#cas tr[data-id="console-ca"] button').click()  # Prove possession
    code = console.wait("#verification-code").text
    assert len(code) == 32, code
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "v.key",
            "-subj", f"/CN={code}", "-out", "v.csr", cwd=tmp_path)
    openssl("x509", "-req", "-in", "v.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-out", "v.pem", cwd=tmp_path)
    browser.execute_script("arguments[0].value = arguments[1]", console.wait("#verification-pem"), (tmp_path / "v.pem").read_text())
    console.screenshot("ca-proof-of-possession")
    console.click("#verify")
    console.wait_text('#cas tr[data-id="console-ca"]', "verified")
    assert "unverified" not in console.wait('#cas tr[data-id="console-ca"]').text
    console.screenshot("ca-certificates")

    # A device registers (with a CSR, so it gets a certificate) and sends telemetry.
    cli(server, "simulate", "--devices", "1", "--duration", "12", "--rate", "2", "--twin-rate", "0",
        "--csr", "--prefix", "web", "--output", "json")
    console.open("registrations?group=simulate-sk")
    row = console.wait_text('#registrations tr[data-id="web-00000"]', "assigned")
    assert server.credentials["hubHostName"] in row.text, row.text
    console.screenshot("registrations")

    console.open("devices")
    console.wait('#devices tr[data-id="web-00000"]')
    console.screenshot("devices")
    query = console.wait("#device-query")
    query.clear()
    query.send_keys("SELECT deviceId FROM devices WHERE deviceId = 'web-00000'")
    console.click("#run-query")
    assert "web-00000" in console.wait_text("#query-result", "web-00000").text

    console.open("device/web-00000")
    line = console.wait('#telemetry-chart polyline[data-series="temperature"]')
    assert int(line.get_attribute("data-points")) >= 10, line.get_attribute("data-points")
    assert len(line.get_attribute("points").split()) == int(line.get_attribute("data-points"))
    console.wait_text("#twin", "web-00000")
    desired = console.wait("#desired")
    browser.execute_script("arguments[0].value = arguments[1]", desired, '{"interval": 30}')
    console.click("#save-desired")
    console.wait_text("#twin", '"interval": 30')
    console.click("#send-c2d")
    assert "queued as" in console.wait("#c2d-result").text
    console.screenshot("device-telemetry-and-twin")

    # Revoke the device's certificate, with a reason; the CRL and the audit log show it.
    console.open("certificates")
    console.wait("#cert-registration").send_keys("web-00000")
    console.click('form.panel button[type="submit"]')
    console.wait_text("#issued tbody", "web-00000")
    Select(console.wait("#issued .revoke-reason")).select_by_value("keyCompromise")
    console.click("#issued button.revoke")
    WebDriverWait(browser, 10).until(EC.alert_is_present()).accept()
    console.wait_text("#issued tbody", "revoked (keyCompromise)")
    console.wait_text("#pki-status", "1 revoked")
    console.screenshot("issued-certificates-revoked")

    console.open("audit")
    Select(console.wait("#audit-action")).select_by_value("revoke")
    console.click('form.panel button[type="submit"]')
    entry = console.wait_text("#audit tbody", "console:token:alice")
    assert "web-00000" in entry.text and "keyCompromise" in entry.text
    console.screenshot("audit-log")

    console.open("hubs")
    console.wait("#hubs tbody tr")
    console.click("#mint-join-token")
    assert len(console.wait("#join-token").text) > 40
    console.screenshot("hubs")

    console.open("enrollments")
    console.wait("#enrollments")
    console.screenshot("enrollments")

    # The live charts: the sampler reads the counters every 10 s, so a registration and the
    # telemetry of the last minute are on them.
    console.open("overview")
    def rate_moved(driver):
        lines = driver.find_elements(By.CSS_SELECTOR, "#telemetry-rate-svg polyline")
        if not lines:
            return False
        heights = {p.split(",")[1] for p in lines[0].get_attribute("points").split()}
        return len(heights) > 1  # the telemetry rate rose (or fell) while the device sent

    try:
        WebDriverWait(browser, 40).until(rate_moved)
    except TimeoutException:
        pytest.fail("the telemetry rate chart shows no change: " + console.wait("main").text)
    console.wait('#registrations-svg polyline[data-series="registrations/s"]')
    console.screenshot("overview-live-rates")

    # A change without the CSRF token is refused even with the session cookie.
    refused = console.fetch("DELETE", "/enrollmentGroups/simulate-sk?api-version=2021-10-01", csrf=False)
    assert refused["status"] == 403 and json.loads(refused["body"])["errorCode"] == 403003, refused

    # Read-only: no write control is shown, and a write made anyway is refused by the API.
    console.sign_out()
    console.sign_in(reader)
    console.open("groups")
    console.wait('#groups tr[data-id="simulate-sk"]')
    assert not console.find("#create-enrollment")
    assert not [b for b in console.find("#groups button") if b.text in ("Delete", "Disable", "Enable")]
    console.screenshot("read-only-groups")
    console.open("certificates")
    console.wait_text("#issued tbody", "web-00000")
    assert not console.find("#issued button.revoke")
    console.open("cas")  # CA certificates need ServiceConfig even to read
    assert console.wait("[data-error-code]").get_attribute("data-error-code") == "403001"
    assert not console.find("#upload-ca")
    attempt = console.fetch("DELETE", "/enrollmentGroups/simulate-sk?api-version=2021-10-01")
    assert attempt["status"] == 403 and json.loads(attempt["body"])["errorCode"] == 403001, attempt
    attempt = console.fetch("POST", "/certificates/issued/00/revoke?api-version=2021-10-01", {"reason": "superseded"})
    assert attempt["status"] == 403, attempt
    still = requests.get(f"{api}/enrollmentGroups/simulate-sk?api-version=2021-10-01", headers=auth, verify=verify)
    assert still.status_code == 200

    # Signing out ends the browser's session.
    console.sign_out()
    after = console.fetch("GET", "/console/session")
    assert after["status"] == 401, after
