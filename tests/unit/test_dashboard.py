"""The dashboard's parts without a browser: sign-in sessions on a fake clock, CSRF binding, the policy
header, where a sign-in may lead, the network page's gathering, escaping, and the Secure cookie of an
https public URL over a real loopback listener."""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from gateway.api.app import make_site
from gateway.api.dashboard import pages
from gateway.api.dashboard.network import AddressFacts, _walk
from gateway.api.dashboard.network import page as network_page
from gateway.api.dashboard.pages import Chrome
from gateway.api.dashboard.resource import Dashboard, DashboardOptions
from gateway.api.dashboard.web import csp
from gateway.api.dashboard.signin import Notice, WebSessions
from gateway.auth.secrets import SecretBox
from gateway.store.base import AsyncStore
from gateway.store.sqlite import SQLiteStore

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")
CHROME = Chrome(css="/c.css", js="/j.js", icon="/i.svg", csrf="CSRF", who="admin", admin=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_expires_after_its_ttl_and_is_forgotten() -> None:
    clock = Clock()
    sessions = WebSessions(ttl=60, clock=clock, secure=False)
    value, session = sessions.open("tok1", "127.0.0.1")
    assert sessions.find(value) is session and sessions.find("other") is None and sessions.find(None) is None
    clock.now += 59
    assert sessions.find(value) is session
    clock.now += 1
    assert sessions.find(value) is None and len(sessions) == 0


def test_sessions_are_keyed_by_a_hash_and_die_with_their_token() -> None:
    sessions = WebSessions(ttl=60, clock=Clock(), secure=False)
    first, a = sessions.open("tok1", "127.0.0.1")
    _second, _b = sessions.open("tok1", "127.0.0.2")
    third, c = sessions.open("tok2", "127.0.0.1")
    assert first not in a.key and a.csrf != c.csrf
    assert sessions.close_token("tok1") == 2
    assert sessions.find(first) is None and sessions.find(third) is c


def test_csrf_tokens_must_match_exactly() -> None:
    sessions = WebSessions(ttl=60, clock=Clock(), secure=False)
    _value, session = sessions.open("tok", "127.0.0.1")
    assert sessions.csrf_ok(session, session.csrf)
    for wrong in ("", session.csrf[:-1], session.csrf + "x", "é" * 43):
        assert not sessions.csrf_ok(session, wrong)
    form = sessions.signin_csrf("cookie-one")
    assert sessions.signin_csrf_ok("cookie-one", form)
    assert not sessions.signin_csrf_ok("cookie-two", form) and not sessions.signin_csrf_ok(None, form)
    assert not WebSessions(ttl=60, clock=Clock(), secure=False).signin_csrf_ok("cookie-one", form)  # new key


def test_the_session_lifetime_is_a_positive_number_of_seconds() -> None:
    from gateway.config import ConfigError, load_config

    assert load_config().api.dashboard_session_ttl == 28800
    assert load_config(overrides={"api": {"dashboard_session_ttl": 600}}).api.dashboard_session_ttl == 600
    for bad in (0, -1, "8h"):
        with pytest.raises(ConfigError, match="api.dashboard_session_ttl"):
            load_config(overrides={"api": {"dashboard_session_ttl": bad}})


def test_an_https_gateway_uses_host_prefixed_cookies() -> None:
    assert WebSessions(1, Clock(), secure=True).cookie_name == "__Host-gateway_session"
    assert WebSessions(1, Clock(), secure=False).cookie_name == "gateway_session"


def test_the_policy_lets_forms_reach_only_well_formed_origins() -> None:
    assert "form-action 'self';" in csp()
    policy = csp(["https://accounts.google.com", "http://127.0.0.1:8080", "https://x.example; script-src *",
                  "javascript:alert(1)", ""])
    assert "form-action 'self' http://127.0.0.1:8080 https://accounts.google.com;" in policy
    assert "script-src *" not in policy and "javascript" not in policy


@pytest.mark.parametrize("given, expected", [
    ("/", "/"), ("/dashboard/tokens", "/dashboard/tokens"), ("/dashboard/sessions?x=1", "/dashboard/sessions"),
    ("//evil.example/", "/"), ("https://evil.example/", "/"), ("/v1/accounts", "/"),
    ("/dashboard/../v1/tokens", "/"), ("/dashboard/%2e%2e", "/"), ("", "/"), ("\\\\evil.example", "/")])
def test_after_sign_in_only_a_dashboard_page(given: str, expected: str) -> None:
    assert Dashboard._safe_next(given) == expected


def test_network_facts_are_found_in_the_settings_view() -> None:
    """`warmup` as {address: {started, share}} (GET /v1/settings/network) or {address, warmup} entries,
    and `excluded` lists, wherever they are."""
    facts = AddressFacts(reputation={}, warmup={}, excluded=set())
    _walk({"effective": {"localAddresses": ["192.0.2.1"]},
           "warmup": {"192.0.2.1": {"started": "2026-01-01T00:00:00.000Z", "share": 0.25}, "days": 7},
           "addresses": [{"address": "192.0.2.2", "warmup": {"started": None, "share": 1.0}}],
           "network": {"excluded": ["192.0.2.3"]}}, facts)
    assert facts.warmup == {"192.0.2.1": {"started": "2026-01-01T00:00:00.000Z", "share": 0.25},
                            "192.0.2.2": {"started": None, "share": 1.0}}
    assert facts.excluded == {"192.0.2.3"}


@pytest_twisted.ensureDeferred
async def test_pages_escape_what_they_show() -> None:
    hostile = '<script>alert(1)</script>"\''
    html = (await pages.render(pages.accounts(
        CHROME, [Notice("error", hostile)],
        [{"account": hostile, "email": hostile, "state": hostile,
          "lastError": {"error": hostile, "description": hostile, "time": hostile}}],
        [{"id": hostile, "name": hostile, "provider": "generic", "authorizationUrl": "https://p.example/a"}],
        None))).decode()
    assert "<script>alert" not in html and html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;&quot;\'"' in html  # an attribute cannot be left
    network = (await pages.render(network_page(CHROME, [], {"effective": {"localAddresses": [hostile]}},
                                               AddressFacts({}, {}, set())))).decode()
    assert "<script>alert" not in network


def test_sizes_and_times_read_well() -> None:
    assert pages.size(12) == "12 B" and pages.size(2048) == "2.0 KiB" and pages.size(5 * 1024 ** 3) == "5.0 GiB"
    assert pages.when("2026-12-02T03:00:16.118Z") == "2026-12-02 03:00:16 UTC" and pages.when("") == "-"
    import datetime
    now = datetime.datetime(2026, 12, 2, 4, 1, 20, tzinfo=datetime.timezone.utc).timestamp()
    assert pages.ago("2026-12-02T03:00:16.118Z", now) == "1 h 1 min ago"


@pytest.fixture
def https_site(tmp_path: Path) -> Any:
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    admin, _ = sync.create_token(None, ["api"], "admin", None)
    site = make_site(store, dashboard=DashboardOptions(public_url="https://gw.example", session_ttl=120))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}", admin
    pytest_twisted.blockon(port.stopListening())
    store.stop()
    sync.close()


async def _fetch(agent: Agent, method: bytes, url: str, cookies: dict[str, str], body: bytes | None = None
                 ) -> tuple[int, Headers, str]:
    from twisted.internet import reactor
    headers = Headers({b"Cookie": ["; ".join(f"{k}={v}" for k, v in cookies.items()).encode()]})
    if body is not None:
        headers.addRawHeader(b"Content-Type", b"application/x-www-form-urlencoded")
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    response = await agent.request(method, url.encode(), headers, producer).addTimeout(10, reactor)
    return response.code, response.headers, (await readBody(response).addTimeout(10, reactor)).decode()


@pytest_twisted.ensureDeferred
async def test_an_https_public_url_makes_the_cookie_secure(https_site: Any) -> None:
    """With api.public_url https://..., the sign-in cookies are __Host- prefixed and Secure (and HttpOnly,
    SameSite=Strict, Max-Age = api.dashboard_session_ttl)."""
    from urllib.parse import quote
    from twisted.internet import reactor
    url, admin = https_site
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    code, headers, html = await _fetch(agent, b"GET", url + "/", {})
    signin_cookie = headers.getRawHeaders(b"set-cookie")[0].decode()
    assert code == 200 and signin_cookie.startswith("__Host-gateway_signin=") and "Secure" in signin_cookie
    name, value = signin_cookie.split(";")[0].split("=", 1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    code, headers, _ = await _fetch(agent, b"POST", url + "/dashboard/signin", {name: value},
                                    f"csrf={csrf}&token={quote(admin)}".encode())
    assert code == 303
    cookie = [c.decode() for c in headers.getRawHeaders(b"set-cookie") if c.startswith(b"__Host-gateway_session=")][0]
    for flag in ("Path=/", "Max-Age=120", "Secure", "HttpOnly", "SameSite=strict"):
        assert flag in cookie, cookie


class FakeReputationApi:
    """The documented shapes of GET /v1/reputation, GET /v1/reputation/zones and POST /v1/reputation/check."""

    def __init__(self, results: list[dict[str, Any]], zones: list[dict[str, Any]]) -> None:
        self.results, self.zones = results, zones

    def routes(self) -> list[tuple[str, str, Any, bool]]:
        from gateway.api.resources import Reply

        async def results(call: Any) -> Reply:
            return Reply({"results": self.results})

        async def zones(call: Any) -> Reply:
            return Reply({"zones": self.zones})

        async def check(call: Any) -> Reply:
            return Reply({"results": []})

        return [("GET", "/v1/reputation", results, True), ("GET", "/v1/reputation/zones", zones, True),
                ("POST", "/v1/reputation/check", check, True)]


VIEW = {"addressStrategy": None, "accountPools": {"alice": ["192.0.2.3"]},
        "effective": {"addressStrategy": "random", "localAddresses": ["192.0.2.1", "192.0.2.2"], "domainPools": {}},
        "config": {"ipStrategy": "ipv4_only", "proxy": None, "noProxy": []},
        "warmup": {"192.0.2.1": {"started": None, "share": 1.0},
                   "192.0.2.2": {"started": "2026-12-01T00:00:00.000Z", "share": 0.25}}}


@pytest_twisted.ensureDeferred
async def test_the_network_page_shows_reputation_and_warm_up_when_the_api_has_them() -> None:
    from gateway.api.dashboard.network import address_facts

    results = [{"address": "192.0.2.1", "zone": "zen.example", "listed": True, "code": "127.0.0.2",
                "reason": "spam", "checked": "2026-12-02T00:00:00.000Z"},
               {"address": "192.0.2.2", "zone": "zen.example", "listed": False, "code": None, "reason": None,
                "checked": "2026-12-02T00:00:00.000Z"},
               {"address": "192.0.2.3", "zone": "zen.example", "listed": None, "code": None, "reason": "timeout",
                "checked": "2026-12-02T00:00:00.000Z"}]
    facts = await address_facts(FakeReputationApi(results, [{"host": "zen.example", "name": "Zen"}]),
                                lambda: None, VIEW)
    assert facts.can_check and set(facts.warmup) == {"192.0.2.2"}
    html = (await pages.render(network_page(CHROME, [], VIEW, facts))).decode()
    for shown in ("listed: zen.example", "not listed", "reputation unknown", "warming up: 25 %", "Check all now",
                  "Zen (zen.example)", "random", "ipv4_only", "alice"):
        assert shown in html, shown

    bare = await address_facts(FakeReputationApi([], []), lambda: None, VIEW)
    html = (await pages.render(network_page(CHROME, [], VIEW, bare))).decode()
    assert "No DNSBL zone is configured" in html and "Check all now" not in html


@pytest_twisted.ensureDeferred
async def test_the_network_page_without_reputation_shows_pools_alone() -> None:
    from gateway.api.dashboard.network import address_facts

    class NoReputation:
        def routes(self) -> list[Any]:
            return []

    facts = await address_facts(NoReputation(), lambda: None, VIEW)
    html = (await pages.render(network_page(CHROME, [], VIEW, facts))).decode()
    assert "192.0.2.1" in html and "Reputation" not in html and "Check all now" not in html
