"""GET/PUT /v1/settings/network and the account's `network` view, over a real loopback listener."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from gateway.api.app import make_site
from gateway.auth.secrets import SecretBox
from gateway.config import load_config
from gateway.net.addresses import rendezvous
from gateway.net.policy import NetworkPolicy
from gateway.store.base import AsyncStore
from gateway.store.sqlite import SQLiteStore

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")

NETWORK = {"local_addresses": ["127.0.0.2", "127.0.0.3"], "address_strategy": "static",
           "domain_pools": {"corp.example": ["127.0.0.4"]}, "proxy": "socks5://u:s3cret@127.0.0.1:1080",
           "no_proxy": ["localhost"]}
ACCOUNT = {"account": "alice", "email": "alice@example.com",
           "imap": {"host": "imap.example.com", "port": 993, "secure": True,
                    "auth": {"user": "alice", "pass": "imap-pass"}}}


def fake_bindable(address: str) -> str | None:
    return "Cannot assign requested address" if address.startswith("192.0.2.") else None


class Api:
    def __init__(self, url: str, agent: Agent, admin: str, sync: SQLiteStore) -> None:
        self.url, self.agent, self.admin, self.sync = url, agent, admin, sync

    async def call(self, method: str, path: str, body: Any = None, token: str | None = "admin",
                   raw: bytes | None = None) -> tuple[int, Any]:
        headers = Headers()
        if token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + (self.admin if token == "admin" else token).encode())
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        producer = FileBodyProducer(BytesIO(data)) if data is not None else None
        response = await self.agent.request(method.encode(), (self.url + path).encode(), headers, producer)
        return response.code, json.loads(await readBody(response))


def _serve(tmp_path: Path, with_network: bool = True):
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    admin, _ = sync.create_token(None, ["api"], "admin", None)
    network = None
    if with_network:
        network = NetworkPolicy(load_config(None, {"network": NETWORK}).network, store, bindable=fake_bindable)
    port = reactor.listenTCP(0, make_site(store, None, network), interface="127.0.0.1")
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    return Api(f"http://127.0.0.1:{port.getHost().port}", agent, admin, sync), port, store, sync


@pytest.fixture
def api(tmp_path: Path):
    served, port, store, sync = _serve(tmp_path)
    yield served
    pytest_twisted.blockon(port.stopListening())
    store.stop()
    sync.close()


@pytest_twisted.ensureDeferred
async def test_get_shows_stored_config_and_effective_values_with_the_proxy_masked(api):
    status, body = await api.call("GET", "/v1/settings/network")
    assert status == 200
    assert body["addressStrategy"] is None and body["localAddresses"] is None
    assert body["effective"] == {"addressStrategy": "static", "localAddresses": ["127.0.0.2", "127.0.0.3"],
                                 "domainPools": {"corp.example": ["127.0.0.4"]}}
    assert body["config"]["proxy"] == "socks5://u:***@127.0.0.1:1080"
    assert "s3cret" not in json.dumps(body)


@pytest_twisted.ensureDeferred
async def test_put_changes_pools_persists_them_and_null_resets(api):
    status, body = await api.call("PUT", "/v1/settings/network", {
        "addressStrategy": "random", "domainPools": {"example.com": ["127.0.0.3"]},
        "accountPools": {"alice": ["127.0.0.2", "::1"]}})
    assert status == 200, body
    assert body["effective"]["addressStrategy"] == "random"
    assert body["effective"]["domainPools"] == {"corp.example": ["127.0.0.4"], "example.com": ["127.0.0.3"]}
    assert api.sync.get_settings("network")["accountPools"] == {"alice": ["127.0.0.2", "::1"]}
    _, again = await api.call("GET", "/v1/settings/network")
    assert again["accountPools"] == {"alice": ["127.0.0.2", "::1"]}
    status, reset = await api.call("PUT", "/v1/settings/network", {"addressStrategy": None, "accountPools": None})
    assert status == 200 and reset["effective"]["addressStrategy"] == "static" and reset["accountPools"] == {}
    assert reset["domainPools"] == {"example.com": ["127.0.0.3"]}


@pytest.mark.parametrize("body, raw, message", [
    (None, b"{not json", "not valid JSON"),
    (None, b"[]", "must be a JSON object"),
    ({"localAddresses": ["192.0.2.9"]}, None, "192.0.2.9 is not configured on this machine"),
    ({"localAddresses": ["banana"]}, None, "not an IPv4 or IPv6 address"),
    ({"ipStrategy": "ipv6_only"}, None, "read-only"),
    ({"addressStrategy": 5}, None, "addressStrategy must be one of"),
    ({"extra": 1}, None, "unknown field extra"),
    ({"accountPools": {"bob": "127.0.0.2"}}, None, "must be a list"),
])
@pytest_twisted.ensureDeferred
async def test_bad_puts_are_400_json_and_change_nothing(api, body, raw, message):
    status, reply = await api.call("PUT", "/v1/settings/network", body, raw=raw)
    assert status == 400 and reply["error"] == "BadRequest" and message in reply["message"], reply
    assert api.sync.get_settings("network") is None


@pytest_twisted.ensureDeferred
async def test_only_admin_tokens(api):
    status, _ = await api.call("GET", "/v1/settings/network", token=None)
    assert status == 401
    api.sync.create_account(ACCOUNT)
    bound, _ = api.sync.create_token("alice", ["api"], "alice's api", None)
    for method, body in (("GET", None), ("PUT", {"addressStrategy": "random"})):
        status, reply = await api.call(method, "/v1/settings/network", body, token=bound)
        assert status == 403 and reply["error"] == "Forbidden"
    imap_only, _ = api.sync.create_token("alice", ["imap-proxy"], "imap", None)
    status, _ = await api.call("GET", "/v1/settings/network", token=imap_only)
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_account_view_shows_its_network_and_can_be_put_back(api):
    api.sync.create_account(ACCOUNT)
    status, view = await api.call("GET", "/v1/account/alice")
    assert status == 200
    assert view["network"] == {"addressStrategy": "static", "pool": ["127.0.0.2", "127.0.0.3"],
                               "poolLevel": "default", "localAddress": rendezvous("alice", ["127.0.0.2", "127.0.0.3"]),
                               "localAddressIPv6": None, "proxy": "socks5://u:***@127.0.0.1:1080",
                               "smtpLocalAddress": rendezvous("alice", ["127.0.0.2", "127.0.0.3"]), "excluded": []}
    await api.call("PUT", "/v1/settings/network", {"accountPools": {"alice": ["127.0.0.3"]}})
    _, view = await api.call("GET", "/v1/account/alice")
    assert view["network"]["pool"] == ["127.0.0.3"] and view["network"]["poolLevel"] == "account"
    assert view["network"]["localAddress"] == "127.0.0.3"
    status, _ = await api.call("PUT", "/v1/account/alice", {**view, "name": "Alice"})  # GET view echoed back
    assert status == 200
    status, reply = await api.call("PUT", "/v1/account/alice", {"localAddress": "not-an-ip"})
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_account_with_its_own_proxy_and_a_no_proxy_host(api):
    api.sync.create_account({**ACCOUNT, "proxy": "http://p:hidden@10.0.0.1:3128"})
    _, view = await api.call("GET", "/v1/account/alice")
    assert view["proxy"] == view["network"]["proxy"] == "http://p:***@10.0.0.1:3128"
    api.sync.update_account("alice", {"imap": {"host": "localhost"}})
    _, view = await api.call("GET", "/v1/account/alice")
    assert view["network"]["proxy"] is None  # no_proxy: localhost


@pytest_twisted.ensureDeferred
async def test_bad_account_proxy_urls_are_refused(api):
    status, reply = await api.call("POST", "/v1/account", {**ACCOUNT, "proxy": "socks4://u:p@h:1080"})
    assert status == 400 and "SOCKS4" in reply["message"]


@pytest_twisted.ensureDeferred
async def test_without_a_network_policy_the_path_is_a_json_404(tmp_path):
    served, port, store, sync = _serve(tmp_path, with_network=False)
    try:
        status, reply = await served.call("GET", "/v1/settings/network")
        assert status == 404 and reply["error"] == "NotFound"
    finally:
        await port.stopListening()
        store.stop()
        sync.close()
