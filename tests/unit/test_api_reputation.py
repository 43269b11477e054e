"""The reputation API over a real loopback listener and SQLite store: zones as JSON and CSV (round trip
into an empty store, bad rows by line, nothing half-imported), checks now, results, the account's
`excluded`, warm-up actions. DNS answers come from a scripted resolver (the real server is in the
integration tests)."""

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
from gateway.net.dnsbl import query_name
from gateway.net.policy import NetworkPolicy
from gateway.net.reputation import Reputation
from gateway.store.base import AsyncStore
from gateway.store.sqlite import SQLiteStore

from dnsbl_fakes import ScriptedResolver  # tests/unit/dnsbl_fakes.py

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")

ZONES = [{"host": "bl.test", "name": "Test BL"}, {"host": "clean.test", "name": "Clean, \"quoted\""}]
LISTED = {query_name("127.0.0.3", "bl.test"): (["127.0.0.2"], "listed for the test")}


class Served:
    def __init__(self, url: str, admin: str, sync: SQLiteStore, policy: NetworkPolicy) -> None:
        self.url, self.admin, self.sync, self.policy = url, admin, sync, policy
        from twisted.internet import reactor
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def raw(self, method: str, path: str, data: bytes | None = None, token: str | None = None,
                  content_type: str | None = None) -> tuple[int, Headers, bytes]:
        headers = Headers({"Authorization": [f"Bearer {token or self.admin}"]})
        if content_type:
            headers.addRawHeader("Content-Type", content_type)
        producer = FileBodyProducer(BytesIO(data)) if data is not None else None
        response = await self.agent.request(method.encode(), (self.url + path).encode(), headers, producer)
        return response.code, response.headers, await readBody(response)

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        code, _headers, payload = await self.raw(method, path, data, **kwargs)
        return code, json.loads(payload)


def serve(tmp_path: Path, name: str, reputation: dict[str, Any], network: dict[str, Any] | None = None,
          resolver: Any = None) -> tuple[Served, Any, AsyncStore]:
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / f"{name}.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    admin, _ = sync.create_token(None, ["api"], "admin", None)
    config = load_config(None, {"network": network or {"local_addresses": ["127.0.0.2", "127.0.0.3"],
                                                       "address_strategy": "static"},
                                "reputation": reputation})
    policy = NetworkPolicy(config.network, store, bindable=lambda a: None)
    policy.reputation = Reputation(reactor, config.reputation, store, policy.source_addresses,
                                   resolver=resolver or ScriptedResolver(LISTED))
    port = reactor.listenTCP(0, make_site(store, None, policy), interface="127.0.0.1")
    return Served(f"http://127.0.0.1:{port.getHost().port}", admin, sync, policy), port, store


@pytest.fixture
def api(tmp_path: Path):
    served, port, store = serve(tmp_path, "a", {"zones": ZONES})
    yield served
    pytest_twisted.blockon(port.stopListening())
    store.stop()
    served.sync.close()


@pytest.fixture
def empty(tmp_path: Path):
    """A second gateway with an empty store and no zones in its config."""
    served, port, store = serve(tmp_path, "b", {})
    yield served
    pytest_twisted.blockon(port.stopListening())
    store.stop()
    served.sync.close()


@pytest_twisted.ensureDeferred
async def test_zones_from_config_then_put_and_null_goes_back(api):
    assert await api.call("GET", "/v1/reputation/zones") == (200, {"zones": ZONES})
    status, body = await api.call("PUT", "/v1/reputation/zones", {"zones": [{"host": "Other.Test."}]})
    assert (status, body) == (200, {"zones": [{"host": "other.test", "name": "other.test"}]})
    assert (await api.call("GET", "/v1/reputation/zones"))[1] == body
    assert await api.call("PUT", "/v1/reputation/zones", {"zones": None}) == (200, {"zones": ZONES})


@pytest.mark.parametrize("body, message", [
    ({}, "zones is required"),
    ({"zones": [{"host": "bl.test"}], "extra": 1}, "unknown field extra"),
    ({"zones": [{"host": "not a zone"}]}, "zones[0].host"),
    ({"zones": [{"host": "a.test"}, {"host": "A.test"}]}, "zones[1].host: a.test is listed twice"),
    ({"zones": [{"host": "a.test", "name": 5}]}, "zones[0].name"),
    ({"zones": "bl.test"}, "expected a list"),
    ({"zones": [{"host": f"z{i}.test"} for i in range(101)]}, "at most 100"),
])
@pytest_twisted.ensureDeferred
async def test_bad_zone_input_is_a_400_with_error_and_message(api, body, message):
    status, reply = await api.call("PUT", "/v1/reputation/zones", body)
    assert status == 400 and reply["error"] == "BadRequest" and message in reply["message"], reply
    assert (await api.call("GET", "/v1/reputation/zones"))[1] == {"zones": ZONES}


@pytest_twisted.ensureDeferred
async def test_csv_round_trip_into_an_empty_store_gives_identical_zones(api, empty):
    status, headers, exported = await api.raw("GET", "/v1/reputation/zones.csv")
    assert status == 200 and headers.getRawHeaders("content-type") == ["text/csv; charset=utf-8"]
    assert exported == b'rbl_hostname,rbl_name\r\nbl.test,Test BL\r\nclean.test,"Clean, ""quoted"""\r\n'
    assert (await empty.call("GET", "/v1/reputation/zones"))[1] == {"zones": []}
    status, reply = await _import(empty, exported)
    assert status == 200 and reply == {"imported": 2, "zones": ZONES}
    assert (await empty.call("GET", "/v1/reputation/zones"))[1] == {"zones": ZONES}
    assert (await empty.raw("GET", "/v1/reputation/zones.csv"))[2] == exported


async def _import(served: Served, data: bytes, query: str = "",
                  content_type: str | None = "text/csv") -> tuple[int, Any]:
    status, _headers, body = await served.raw("POST", "/v1/reputation/zones.csv" + query, data,
                                              content_type=content_type)
    return status, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_csv_bad_rows_are_named_by_line_and_nothing_is_imported(api):
    data = b"rbl_hostname,rbl_name\nnew.test,New\nbad zone!,X\nbl.test,A,B\n\nok.test\n"
    status, reply = await _import(api, data)
    assert status == 400 and reply["error"] == "BadRequest"
    assert reply["message"].startswith("2 bad rows, nothing imported: line 3: ")
    assert "line 4: expected 2 columns" in reply["message"]
    assert (await api.call("GET", "/v1/reputation/zones"))[1] == {"zones": ZONES}
    for bad in (b"", b"rbl_hostname,rbl_name\n", b"\xff\xfe,x\n"):
        status, reply = await _import(api, bad)
        assert status == 400 and "line 1" in reply["message"], reply


@pytest_twisted.ensureDeferred
async def test_csv_import_merges_by_host_or_replaces_and_needs_no_content_type(api):
    status, reply = await _import(api, b"bl.test,Renamed\nnew.test,New\n", content_type=None)
    assert status == 200 and reply["imported"] == 2
    assert reply["zones"] == [{"host": "bl.test", "name": "Renamed"}, ZONES[1], {"host": "new.test", "name": "New"}]
    status, reply = await _import(api, b"only.test,Only\n", "?replace=true",
                                  content_type="application/x-www-form-urlencoded")  # curl's default
    assert status == 200 and reply == {"imported": 1, "zones": [{"host": "only.test", "name": "Only"}]}
    status, reply = await _import(api, b"x.test\n", "?replace=maybe")
    assert status == 400 and "replace" in reply["message"]


@pytest_twisted.ensureDeferred
async def test_check_now_and_results(api):
    status, reply = await api.call("POST", "/v1/reputation/check", {"address": "127.0.0.3", "zone": "bl.test"})
    assert status == 200
    [result] = reply["results"]
    assert {k: result[k] for k in ("address", "zone", "listed", "code", "reason")} == {
        "address": "127.0.0.3", "zone": "bl.test", "listed": True, "code": "127.0.0.2",
        "reason": "listed for the test"}
    status, _h, raw = await api.raw("POST", "/v1/reputation/check")  # no body: all x all
    everything = json.loads(raw)["results"]
    assert status == 200 and [(r["address"], r["zone"], r["listed"]) for r in everything] == [
        ("127.0.0.2", "bl.test", False), ("127.0.0.2", "clean.test", False),
        ("127.0.0.3", "bl.test", True), ("127.0.0.3", "clean.test", False)]
    assert (await api.call("GET", "/v1/reputation"))[1] == {"results": everything}
    api.sync.create_account({"account": "alice", "email": "alice@example.com",
                             "imap": {"host": "imap.example.com", "auth": {"user": "a", "pass": "p"}}})
    _, view = await api.call("GET", "/v1/account/alice")
    assert view["network"]["excluded"] == ["127.0.0.3"]
    assert view["network"]["smtpLocalAddress"] == "127.0.0.2"


@pytest.mark.parametrize("body, status, message", [
    ({"address": "127.0.0.9"}, 404, "127.0.0.9 is not a source address"),
    ({"address": "nope"}, 400, "address:"),
    ({"zone": "other.test"}, 404, "zone other.test is not configured"),
    ({"zone": "not a zone"}, 400, "zone:"),
    ({"zones": "bl.test"}, 400, "unknown field zones"),
])
@pytest_twisted.ensureDeferred
async def test_bad_checks(api, body, status, message):
    got, reply = await api.call("POST", "/v1/reputation/check", body)
    assert got == status and message in reply["message"], reply


@pytest_twisted.ensureDeferred
async def test_account_localaddress_is_a_source_address_too(api):
    api.sync.create_account({"account": "bob", "email": "bob@example.com", "localAddress": "127.0.0.7",
                             "imap": {"host": "imap.example.com", "auth": {"user": "b", "pass": "p"}}})
    status, reply = await api.call("POST", "/v1/reputation/check", {"address": "127.0.0.7"})
    assert status == 200 and len(reply["results"]) == 2


@pytest_twisted.ensureDeferred
async def test_only_admin_tokens(api):
    bound, _ = api.sync.create_token(None, ["api"], "other", None)
    api.sync.create_account({"account": "carol", "email": "carol@example.com",
                             "imap": {"host": "imap.example.com", "auth": {"user": "c", "pass": "p"}}})
    bound, _ = api.sync.create_token("carol", ["api"], "carol's", None)
    for method, path in (("GET", "/v1/reputation"), ("POST", "/v1/reputation/check"),
                         ("GET", "/v1/reputation/zones"), ("GET", "/v1/reputation/zones.csv"),
                         ("POST", "/v1/settings/network/warmup")):
        status, _h, body = await api.raw(method, path, b"{}", token=bound)
        assert status == 403 and json.loads(body)["error"] == "Forbidden", (method, path)


@pytest_twisted.ensureDeferred
async def test_warmup_in_the_network_settings_and_its_actions(api, tmp_path):
    _, view = await api.call("GET", "/v1/settings/network")
    assert view["warmup"] == {"127.0.0.2": {"started": None, "share": 1.0},
                              "127.0.0.3": {"started": None, "share": 1.0}}
    status, reply = await api.call("POST", "/v1/settings/network/warmup", {"address": "127.0.0.2",
                                                                           "action": "restart"})
    assert status == 400 and "warm-up is off" in reply["message"]
    served, port, store = serve(tmp_path, "w", {}, {"local_addresses": ["127.0.0.2"], "warmup": {"days": 4}})
    try:
        await served.call("PUT", "/v1/settings/network", {"localAddresses": ["127.0.0.2", "127.0.0.3"]})
        _, view = await served.call("GET", "/v1/settings/network")
        assert view["warmup"]["127.0.0.2"]["share"] == 1.0
        assert view["warmup"]["127.0.0.3"]["started"] is not None
        assert view["warmup"]["127.0.0.3"]["share"] == pytest.approx(0.25, abs=1e-3)
        status, reply = await served.call("POST", "/v1/settings/network/warmup",
                                          {"address": "127.0.0.3", "action": "skip"})
        assert (status, reply) == (200, {"address": "127.0.0.3", "started": None, "share": 1.0})
        status, reply = await served.call("POST", "/v1/settings/network/warmup",
                                          {"address": "127.0.0.9", "action": "skip"})
        assert status == 404
    finally:
        await port.stopListening()
        store.stop()
        served.sync.close()
