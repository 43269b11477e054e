"""The dashboard in a real headless browser (Debian's chromium and chromium-driver, driven by Selenium)
against a real gateway, Dovecot and the tests' OAuth2 provider: sign in with a token; create a token,
read it once (copy button), revoke it; add an account through the hosted consent flow and log in over
IMAP with a token made on the page; watch a live IMAP session appear and end it (the client reads the
BYE); every page on a phone-sized screen. A screenshot of each page goes to a temporary folder (its path
is printed); with GW_DASHBOARD_PNG=docs/dashboard.png, test_readme_picture writes the README's picture."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .gateway_proc import Gateway, read_to_close, started_gateway
from .test_hosted_oauth2 import make_app
from .test_imap_login import read_until

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extras (scripts/test.sh)")
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

DESKTOP = (1280, 900)
PHONE = (390, 844)


class Browser:
    """One headless Chromium on the gateway's dashboard, with the waits the pages need (no sleeps)."""

    def __init__(self, driver: Any, gw: Gateway, shots: Path) -> None:
        self.driver = driver
        self.gw = gw
        self.base = f"http://127.0.0.1:{gw.api_port}"
        self.shots = shots

    def wait(self, condition: Callable[[Any], Any], seconds: float = 15) -> Any:
        return WebDriverWait(self.driver, seconds, ignored_exceptions=(StaleElementReferenceException,)) \
            .until(condition)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete")

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def notice(self) -> str:
        return str(self.wait(EC.visibility_of_element_located((By.CSS_SELECTOR, ".notice"))).text)

    def submit(self, button: WebElement) -> None:
        """Click a submit button and wait for the next page to have replaced this one."""
        html = self.driver.find_element(By.TAG_NAME, "html")
        button.click()

        def replaced(driver: Any) -> bool:
            try:
                html.is_enabled()
                return False
            except StaleElementReferenceException:
                return True
            except WebDriverException as e:  # Chromium's other word for stale, mid-navigation
                if "does not belong to the document" in str(e):
                    return True
                raise

        self.wait(replaced)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete")

    def sign_in(self, token: str | None = None) -> None:
        self.open("/")
        if self.driver.find_elements(By.CSS_SELECTOR, "form.signout"):
            return
        self.find("#token").send_keys(token or self.gw.admin_token)
        self.submit(self.find("form[action='/dashboard/signin'] button[type=submit]"))

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    yield folder
    print(f"\ndashboard screenshots: {folder}")


def chromium(javascript: bool = True) -> Any:
    """Debian's Chromium, headless, through its chromium-driver (nothing is downloaded)."""
    binary, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or chromedriver is None:
        pytest.fail("chromium and chromium-driver are not installed: run the test command from README.md, "
                    "which installs them (apt-get install -y chromium chromium-driver).", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--lang=en-US"):
        options.add_argument(argument)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(options=options, service=Service(chromedriver))


@pytest.fixture(scope="module")
def browser(gateway: Gateway, screenshots: Path) -> Iterator[Browser]:
    driver = chromium()
    try:
        base = f"http://127.0.0.1:{gateway.api_port}"
        driver.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        yield Browser(driver, gateway, screenshots)
    finally:
        driver.quit()


def _account(gw: Gateway, new_email: Any, prefix: str) -> str:
    email = new_email(prefix)
    account = email.split("@")[0]
    gw.add_oauth_account(account, email)
    return account


def _make_token(b: Browser, account: str, description: str, cidr: str = "") -> str:
    """Create an imap-proxy token for ``account`` on the tokens page; the secret shown once."""
    b.open("/dashboard/tokens")
    Select(b.find("select[name=account]")).select_by_value(account)
    if cidr:
        b.find("textarea[name=cidrs]").send_keys(cidr)
    b.find("input[name=description]").send_keys(description)
    b.submit(b.driver.find_element(By.XPATH, "//button[normalize-space()='Create token']"))
    return str(b.find("#once-value").get_attribute("value"))


def _row(b: Browser, text: str) -> WebElement:
    return b.driver.find_element(By.XPATH, f"//tr[.//*[normalize-space()='{text}']]")


def test_sign_in_with_a_token(browser: Browser) -> None:
    """The sign-in page, a wrong token refused with a reason, then the admin token: the accounts page,
    signed in as that token."""
    b = browser
    b.driver.delete_all_cookies()
    b.open("/")
    assert b.driver.title == "Sign in · Gateway"
    b.shot("signin")
    b.find("#token").send_keys("0" * 64)
    b.submit(b.find("form[action='/dashboard/signin'] button[type=submit]"))
    assert "Invalid token" in b.notice()
    b.sign_in()
    assert b.driver.title == "Accounts · Gateway"
    assert "admin token “tests”" in b.find("header").text


def test_create_a_token_read_it_once_and_revoke_it(browser: Browser, new_email) -> None:
    """A token made on the tokens page (account, scope, CIDR, description) is shown once, copies to the
    clipboard with its button, logs in over IMAP, is gone from the page after a reload, and once
    revoked on the page no longer logs in."""
    b = browser
    b.sign_in()
    account = _account(b.gw, new_email, "browsertoken")
    secret = _make_token(b, account, "made in the browser", cidr="127.0.0.0/8")
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    assert "Shown once" in b.find("#once").text
    b.shot("tokens-new")
    copy = b.find("button[data-copy]")
    copy.click()
    b.wait(lambda d: copy.text == "Copied")
    clipboard = b.driver.execute_async_script(
        "var done = arguments[0]; navigator.clipboard.readText().then(done, function (e) { done(String(e)); });")
    assert clipboard == secret
    conn = b.gw.imap()
    assert conn.login(account, secret)[0] == "OK"
    conn.logout()

    b.open("/dashboard/tokens")
    assert not b.driver.find_elements(By.ID, "once-value") and secret not in b.driver.page_source
    row = _row(b, "made in the browser")
    assert "127.0.0.0/8" in row.text and "imap-proxy" in row.text and account in row.text
    token_id = str(row.get_attribute("id")).removeprefix("token-")
    row.find_element(By.TAG_NAME, "summary").click()
    b.submit(row.find_element(By.XPATH, ".//button[normalize-space()='Revoke']"))
    assert f"Token {token_id} revoked" in b.notice()
    assert not b.driver.find_elements(By.ID, f"token-{token_id}")
    conn = b.gw.imap()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        conn.login(account, secret)
    conn.shutdown()


def test_add_an_account_through_the_hosted_flow_then_log_in_over_imap(browser: Browser, oauth2_provider,
                                                                      new_email) -> None:
    """"Add other account" on the accounts page starts the hosted OAuth2 flow: the browser goes through
    the gateway's one-time link to the provider's consent page (approved by the tests' provider) and back;
    the dashboard says the account is connected, and a token made on the page logs in over IMAP."""
    b = browser
    b.sign_in()
    app = make_app(b.gw, oauth2_provider, name="Test provider")
    email = new_email("browserhosted")
    account = email.split("@")[0]
    b.open("/")
    form = b.find(f"form[action='/dashboard/accounts/authorize'] input[name=oauth2App][value='{app}']") \
        .find_element(By.XPATH, "./ancestor::form")
    assert "Add other account (Test provider)" in form.text
    form.find_element(By.NAME, "account").send_keys(account)
    form.find_element(By.NAME, "email").send_keys(email)
    before = len(oauth2_provider.authorizations)
    b.submit(form.find_element(By.CSS_SELECTOR, "button[value=go]"))
    assert f"Account {account} is connected" in b.notice()
    assert b.driver.current_url.startswith(b.base + "/?account=")
    assert len(oauth2_provider.authorizations) == before + 1
    assert oauth2_provider.authorizations[-1]["login_hint"] == email
    row = _row(b, account)
    assert email in row.text and "Test provider" in row.text
    b.shot("accounts")

    secret = _make_token(b, account, "hosted account's laptop")
    conn = b.gw.imap()
    assert conn.login(account, secret)[0] == "OK"
    assert conn.select("INBOX")[0] == "OK"
    conn.logout()
    b.open("/")
    assert "connected" in _row(b, account).text


def test_a_one_time_link_to_send_and_re_authorize(browser: Browser, oauth2_provider, new_email) -> None:
    """"Make a link to send" shows the one-time link once (copy button); opened, it connects the account.
    Re-authorize on the account's row runs the same flow for the existing account."""
    b = browser
    b.sign_in()
    app = make_app(b.gw, oauth2_provider, name="Link provider")
    email = new_email("browserlink")
    account = email.split("@")[0]
    b.open("/")
    form = b.find(f"input[name=oauth2App][value='{app}']").find_element(By.XPATH, "./ancestor::form")
    form.find_element(By.NAME, "account").send_keys(account)
    form.find_element(By.NAME, "email").send_keys(email)
    b.submit(form.find_element(By.CSS_SELECTOR, "button[value=link]"))
    link = str(b.find("#once-value").get_attribute("value"))
    assert link.startswith(b.base + "/oauth/authorize/") and f"One-time link for {account}" in b.find("#once").text
    b.shot("accounts-link")
    b.open("/")
    assert not b.driver.find_elements(By.ID, "once-value")
    b.driver.get(link)  # as the mailbox owner would: the gateway's own "Account connected" page
    b.wait(lambda d: "Account connected" in d.page_source)
    assert b.gw.api("GET", f"/v1/account/{account}")[1]["email"] == email

    b.open("/")
    row = _row(b, account)
    row.find_element(By.XPATH, ".//summary[normalize-space()='Re-authorize…']").click()
    before = len(oauth2_provider.authorizations)
    b.submit(row.find_element(By.CSS_SELECTOR, "button[value=go]"))
    assert f"Account {account} is connected" in b.notice()
    assert len(oauth2_provider.authorizations) == before + 1


def test_end_a_live_imap_session_from_the_page(browser: Browser, new_email) -> None:
    """The live-sessions page picks up a new IMAP session by itself (its script refreshes it), shows who,
    from where, the upstream, source address, proxy, bytes and since when; "End" ends it and the
    client reads `* BYE Session ended by administrator`."""
    b = browser
    b.sign_in()
    account = _account(b.gw, new_email, "browserkill")
    token = b.gw.token(account)
    b.open("/dashboard/sessions")
    assert not b.driver.find_elements(By.XPATH, f"//tr[.//*[normalize-space()='{account}']]")
    sock = b.gw.raw()
    try:
        sock.sendall(b"a1 LOGIN " + account.encode() + b" " + token.encode() + b"\r\na2 NOOP\r\n")
        assert b"a2 OK" in read_until(sock, b"a2 ")
        row = b.wait(lambda d: _row(b, account))  # no reload: the page refreshes its table itself
        cells = {str(td.get_attribute("data-label")): td.text for td in row.find_elements(By.TAG_NAME, "td")}
        assert cells["Protocol"] == "IMAP" and cells["From"] == "127.0.0.1" and cells["Proxy"] == "none"
        assert cells["Upstream"] == f"localhost:{b.gw.dovecot.imaps_port}" and cells["Source address"] == "127.0.0.1"
        assert re.fullmatch(r"\d+ B / \d+ B", cells["Bytes up / down"]) and "ago" in cells["Since"], cells
        b.shot("sessions")

        def end(driver: Any) -> bool:
            button = _row(b, account).find_element(By.XPATH, ".//button[normalize-space()='End']")
            b.submit(button)
            return True

        b.wait(end)
        assert "ended" in b.notice()
        assert read_to_close(sock) == b"* BYE Session ended by administrator\r\n"
        assert not b.driver.find_elements(By.XPATH, f"//tr[.//*[normalize-space()='{account}']]")
    finally:
        sock.close()


def test_network_page_and_sign_out(browser: Browser) -> None:
    """The network page shows the strategy and the pools; signing out leads back to the sign-in page and
    the pages are closed again."""
    b = browser
    b.sign_in()
    b.open("/dashboard/network")
    assert "Address strategy" in b.text() and "Source-address pools" in b.text()
    b.shot("network")
    b.open("/dashboard/tokens")
    b.shot("tokens")
    b.submit(b.find("form.signout button"))
    assert b.driver.title == "Sign in · Gateway"
    b.open("/dashboard/tokens")
    assert b.driver.title == "Sign in · Gateway"


def test_every_page_fits_a_phone(browser: Browser, new_email) -> None:
    """At 390 px wide every page lays out in one column without sideways scrolling (tables become cards),
    with the viewport meta tag in place."""
    b = browser
    _account(b.gw, new_email, "phone")
    b.driver.set_window_size(*PHONE)
    try:
        b.sign_in()
        for name, path in (("accounts", "/"), ("tokens", "/dashboard/tokens"), ("sessions", "/dashboard/sessions"),
                           ("network", "/dashboard/network")):
            b.open(path)
            assert b.driver.find_element(By.CSS_SELECTOR, "meta[name=viewport]")
            wide, view = b.driver.execute_script(
                "return [document.documentElement.scrollWidth, window.innerWidth]")
            assert wide <= view, (name, wide, view)
            b.shot(f"phone-{name}")
    finally:
        b.driver.set_window_size(*DESKTOP)


def test_everything_works_without_javascript(gateway: Gateway, screenshots: Path, new_email) -> None:
    """With JavaScript off: sign in, create a token (shown once; the copy button, which needs the script,
    stays hidden), revoke it, and the live-sessions page is still a plain table."""
    driver = chromium(javascript=False)
    try:
        b = Browser(driver, gateway, screenshots)
        b.sign_in()
        account = _account(gateway, new_email, "nojs")
        secret = _make_token(b, account, "no javascript")
        assert re.fullmatch(r"[0-9a-f]{64}", secret)
        assert not b.find("button[data-copy]").is_displayed()
        b.shot("nojs-tokens-new")
        row = _row(b, "no javascript")
        row.find_element(By.TAG_NAME, "summary").click()
        b.submit(row.find_element(By.XPATH, ".//button[normalize-space()='Revoke']"))
        assert "revoked" in b.notice()
        b.open("/dashboard/sessions")
        assert b.find("#live").get_attribute("data-refresh") == "5"
    finally:
        driver.quit()


@pytest.mark.skipif(not os.environ.get("GW_DASHBOARD_PNG"),
                    reason="set GW_DASHBOARD_PNG=docs/dashboard.png to refresh the README's picture")
def test_readme_picture(browser: Browser, dovecot, oauth2_provider) -> None:
    """The README's picture, from a gateway of its own: Gmail and Microsoft 365 apps beside the tests'
    provider; a connected account, a new one, and one whose grant was revoked at the provider (state
    authentication error, with its last error)."""
    with started_gateway(dovecot, oauth2_provider, "gw-dash-picture-") as gw:
        for body in ({"name": "Gmail", "provider": "gmail", "clientId": "example", "clientSecret": "example"},
                     {"name": "Microsoft 365", "provider": "outlook", "clientId": "example",
                      "clientSecret": "example"}):
            assert gw.api("POST", "/v1/oauth2", body)[0] == 200
        gw.add_oauth_account("alice", "alice@example.com")
        conn = gw.imap()
        conn.login("alice", gw.token("alice"))
        conn.logout()
        oauth2_provider.revoke_refresh(gw.add_oauth_account("bob", "bob@example.com"))
        conn = gw.imap()
        with pytest.raises(imaplib.IMAP4.error):
            conn.login("bob", gw.token("bob"))
        conn.shutdown()
        gw.add_oauth_account("carol", "carol@example.com")
        picture = Browser(browser.driver, gw, browser.shots)
        picture.sign_in()
        size = picture.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = picture.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        Path(os.environ["GW_DASHBOARD_PNG"]).write_bytes(base64.b64decode(shot["data"]))
