"""Admin API over a real loopback listener: auth, every path, errors as JSON, no secrets out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from gateway.api.app import ApiResource, make_site
from gateway.auth.secrets import SecretBox
from gateway.auth.tokens import TokenCheck
from gateway.store.base import AsyncStore
from gateway.store.sqlite import SQLiteStore

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")

IMAP_ACCOUNT = {"account": "alice", "email": "alice@example.com",
                "imap": {"host": "imap.example.com", "port": 993, "secure": True,
                         "auth": {"user": "alice", "pass": "imap-pass-s3cret"}}}


class FakeConnections:
    def snapshot(self) -> list[dict[str, Any]]:
        return [{"account": "alice", "protocol": "imap", "peer": "127.0.0.1"},
                {"account": "bob", "protocol": "smtp", "peer": "127.0.0.1"}]


@dataclass
class Api:
    url: str
    store: AsyncStore
    sync: SQLiteStore
    admin: str
    agent: Agent

    async def call(self, method: str, path: str, body: Any = None, token: str | None = "admin",
                   raw: bytes | None = None, chunked: bool = False) -> tuple[int, Any, Headers]:
        headers = Headers()
        if token == "admin":
            token = self.admin
        if token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + token.encode())
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        producer = FileBodyProducer(BytesIO(data)) if data is not None else None
        if producer is not None and chunked:
            producer.length = UNKNOWN_LENGTH  # the agent then sends Transfer-Encoding: chunked
        from twisted.internet import reactor
        # A bounded wait: an answer that never comes is a failure, not a hang.
        response = await self.agent.request(method.encode(), (self.url + path).encode(), headers,
                                            producer).addTimeout(10, reactor)
        payload = await readBody(response).addTimeout(10, reactor)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        parsed = json.loads(payload) if ctype.startswith(b"application/json") else payload
        return response.code, parsed, response.headers


@pytest.fixture
def api(tmp_path: Path):
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    admin, _ = sync.create_token(None, ["api"], "admin", None)
    port = reactor.listenTCP(0, make_site(store, FakeConnections()), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield Api(f"http://127.0.0.1:{port.getHost().port}", store, sync, admin, Agent(reactor, pool=pool))
    pytest_twisted.blockon(port.stopListening())
    store.stop()
    sync.close()


def _app_body(**extra: Any) -> dict[str, Any]:
    return {"name": "Gmail", "provider": "gmail", "clientId": "cid", "clientSecret": "client-s3cret", **extra}


# Authentication

@pytest_twisted.ensureDeferred
async def test_health_needs_no_token(api: Api) -> None:
    assert (await api.call("GET", "/health", token=None))[:2] == (200, {"status": "ok"})


@pytest_twisted.ensureDeferred
async def test_missing_or_bad_token_is_401_json(api: Api) -> None:
    for token in (None, "0" * 64, "garbage"):
        code, body, headers = await api.call("GET", "/v1/accounts", token=token)
        assert code == 401 and body["error"] == "Unauthorized" and body["message"]
        assert headers.getRawHeaders(b"www-authenticate")


@pytest_twisted.ensureDeferred
async def test_token_without_api_scope_is_401(api: Api) -> None:
    api.sync.create_account(IMAP_ACCOUNT)
    imap_token, _ = api.sync.create_token("alice", ["imap-proxy"], "mail", None)
    assert (await api.call("GET", "/v1/accounts", token=imap_token))[0] == 401


@pytest_twisted.ensureDeferred
async def test_revoked_token_is_401(api: Api) -> None:
    secret, _ = api.sync.create_token(None, ["api"], "temp", None)
    assert (await api.call("GET", "/v1/accounts", token=secret))[0] == 200
    api.sync.revoke_token(secret)
    assert (await api.call("GET", "/v1/accounts", token=secret))[0] == 401


@pytest_twisted.ensureDeferred
async def test_token_from_outside_its_cidrs_is_403(api: Api) -> None:
    outside, _ = api.sync.create_token(None, ["api"], "ops", ["10.0.0.0/8"])
    code, body, _ = await api.call("GET", "/v1/accounts", token=outside)
    assert code == 403 and body["error"] == "Forbidden"
    inside, _ = api.sync.create_token(None, ["api"], "local", ["127.0.0.0/8"])
    assert (await api.call("GET", "/v1/accounts", token=inside))[0] == 200


@pytest_twisted.ensureDeferred
async def test_account_bound_api_token_is_limited_to_its_account(api: Api) -> None:
    api.sync.create_account(IMAP_ACCOUNT)
    api.sync.create_account({**IMAP_ACCOUNT, "account": "bob", "email": "bob@example.com"})
    bound, _ = api.sync.create_token("alice", ["api"], "self-service", None)
    assert (await api.call("GET", "/v1/account/alice", token=bound))[0] == 200
    assert (await api.call("GET", "/v1/account/bob", token=bound))[0] == 403
    assert (await api.call("GET", "/v1/accounts", token=bound))[0] == 403
    assert (await api.call("POST", "/v1/token", {"account": "bob", "scopes": ["smtp"], "description": "x"},
                           token=bound))[0] == 403
    code, body, _ = await api.call("GET", "/v1/connections", token=bound)
    assert code == 200 and [c["account"] for c in body["connections"]] == ["alice"]


# OAuth2 apps

@pytest_twisted.ensureDeferred
async def test_oauth2_app_lifecycle_never_returns_client_secret(api: Api) -> None:
    code, body, _ = await api.call("POST", "/v1/oauth2", _app_body())
    assert code == 200 and set(body) == {"id"}
    app_id = body["id"]
    code, app, _ = await api.call("GET", f"/v1/oauth2/{app_id}")
    assert code == 200 and app["tokenUrl"] == "https://oauth2.googleapis.com/token"
    code, listing, _ = await api.call("GET", "/v1/oauth2")
    assert listing["total"] == 1 and listing["apps"][0]["id"] == app_id
    assert "client-s3cret" not in json.dumps([app, listing])
    assert (await api.call("DELETE", f"/v1/oauth2/{app_id}"))[:2] == (200, {"id": app_id, "deleted": True})
    assert (await api.call("GET", f"/v1/oauth2/{app_id}"))[0] == 404
    assert (await api.call("DELETE", f"/v1/oauth2/{app_id}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_oauth2_app_bad_provider_is_400(api: Api) -> None:
    code, body, _ = await api.call("POST", "/v1/oauth2", _app_body(provider="yahoo"))
    assert code == 400 and body["error"] == "BadRequest" and "provider" in body["message"]


# Accounts

@pytest_twisted.ensureDeferred
async def test_account_lifecycle_and_no_secrets_returned(api: Api) -> None:
    _, app, _ = await api.call("POST", "/v1/oauth2", _app_body())
    assert (await api.call("POST", "/v1/account", IMAP_ACCOUNT))[:2] == (200, {"account": "alice", "state": "new"})
    oauth_account = {"account": "bob", "email": "bob@gmail.com",
                     "oauth2": {"provider": app["id"], "auth": {"user": "bob@gmail.com"},
                                "refreshToken": "refresh-s3cret", "accessToken": "access-s3cret",
                                "expires": "2030-01-01T00:00:00Z"}}
    assert (await api.call("POST", "/v1/account", oauth_account))[0] == 200
    responses = [await api.call("GET", "/v1/account/alice"), await api.call("GET", "/v1/account/bob"),
                 await api.call("GET", "/v1/accounts")]
    text = json.dumps([r[1] for r in responses])
    for secret in ("imap-pass-s3cret", "refresh-s3cret", "access-s3cret", "client-s3cret"):
        assert secret not in text
    assert responses[1][1]["oauth2"]["expires"] == "2030-01-01T00:00:00.000Z"
    assert responses[2][1]["total"] == 2
    assert {a["account"] for a in responses[2][1]["accounts"]} == {"alice", "bob"}

    code, body, _ = await api.call("PUT", "/v1/account/alice", {"name": "Alice A."})
    assert (code, body) == (200, {"account": "alice"})
    assert (await api.call("GET", "/v1/account/alice"))[1]["name"] == "Alice A."
    assert (await api.call("DELETE", "/v1/account/alice"))[:2] == (200, {"account": "alice", "deleted": True})
    assert (await api.call("GET", "/v1/account/alice"))[0] == 404
    assert (await api.call("DELETE", "/v1/account/alice"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_duplicate_account_is_409(api: Api) -> None:
    await api.call("POST", "/v1/account", IMAP_ACCOUNT)
    code, body, _ = await api.call("POST", "/v1/account", IMAP_ACCOUNT)
    assert code == 409 and body["error"] == "Conflict"


@pytest_twisted.ensureDeferred
async def test_unknown_account_is_404(api: Api) -> None:
    for method, path, body in (("GET", "/v1/account/ghost", None), ("PUT", "/v1/account/ghost", {"name": "x"}),
                               ("GET", "/v1/tokens/account/ghost", None),
                               ("POST", "/v1/token", {"account": "ghost", "scopes": ["smtp"],
                                                      "description": "x"})):
        code, reply, _ = await api.call(method, path, body)
        assert code == 404 and reply["error"] == "NotFound", (method, path)


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "JSON object"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"account": NaN}', "not valid JSON"),
    (b"[" * 200000 + b"]" * 200000, "not valid JSON"),
])
@pytest_twisted.ensureDeferred
async def test_bad_json_is_400(api: Api, raw: bytes, fragment: str) -> None:
    code, body, _ = await api.call("POST", "/v1/account", raw=raw)
    assert code == 400 and body["error"] == "BadRequest" and fragment in body["message"]


@pytest.mark.parametrize("patch, field", [
    ({"account": 5}, "account"),
    ({"email": ["x"]}, "email"),
    ({"imap": {"host": "h", "port": "993", "auth": {"user": "u", "pass": "p"}}}, "imap.port"),
    ({"imap": {"host": "h", "secure": "true", "auth": {"user": "u", "pass": "p"}}}, "imap.secure"),
    ({"imap": "imap.example.com"}, "imap"),
    ({"oauth2": {"provider": "nope", "refreshToken": "r"}}, "oauth2.provider"),
])
@pytest_twisted.ensureDeferred
async def test_wrong_types_are_400_naming_the_field(api: Api, patch: dict, field: str) -> None:
    code, body, _ = await api.call("POST", "/v1/account", {**IMAP_ACCOUNT, **patch})
    assert code == 400 and field in body["message"]


# Tokens

@pytest_twisted.ensureDeferred
async def test_token_create_list_and_revoke(api: Api) -> None:
    await api.call("POST", "/v1/account", IMAP_ACCOUNT)
    code, body, headers = await api.call("POST", "/v1/token", {
        "account": "alice", "scopes": ["imap-proxy", "smtp"], "description": "Thunderbird",
        "restrictions": {"addresses": ["127.0.0.0/8"]}})
    assert code == 200 and set(body) == {"token"} and len(body["token"]) == 64
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    secret = body["token"]
    assert (await api.store.verify_token(secret, "imap-proxy", "127.0.0.1", "alice"))[0] is TokenCheck.OK

    code, listing, _ = await api.call("GET", "/v1/tokens/account/alice")
    assert code == 200 and len(listing["tokens"]) == 1
    token = listing["tokens"][0]
    assert {"id", "description", "scopes", "created", "restrictions"} <= set(token)
    assert token["id"] != secret and secret not in json.dumps(listing)
    assert token["restrictions"] == {"addresses": ["127.0.0.0/8"]}
    all_tokens = (await api.call("GET", "/v1/tokens"))[1]["tokens"]
    assert {t["id"] for t in all_tokens} >= {token["id"]} and secret not in json.dumps(all_tokens)

    assert (await api.call("DELETE", f"/v1/token/{token['id']}"))[:2] == (200, {"deleted": True})
    assert (await api.call("DELETE", f"/v1/token/{token['id']}"))[0] == 404
    assert (await api.store.verify_token(secret, "imap-proxy", "127.0.0.1"))[0] is TokenCheck.INVALID


@pytest_twisted.ensureDeferred
async def test_token_revoke_by_secret(api: Api) -> None:
    await api.call("POST", "/v1/account", IMAP_ACCOUNT)
    secret = (await api.call("POST", "/v1/token", {"account": "alice", "scopes": ["smtp"],
                                                   "description": "x"}))[1]["token"]
    assert (await api.call("DELETE", f"/v1/token/{secret}"))[:2] == (200, {"deleted": True})
    assert (await api.call("DELETE", "/v1/token/unknown-id"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_admin_token_via_api_and_bad_token_bodies(api: Api) -> None:
    code, body, _ = await api.call("POST", "/v1/token", {"scopes": ["api"], "description": "second admin"})
    assert code == 200 and (await api.call("GET", "/health", token=body["token"]))[0] == 200
    await api.call("POST", "/v1/account", IMAP_ACCOUNT)
    for bad, fragment in (
        ({"scopes": ["imap-proxy"], "description": "x"}, "scope api"),
        ({"account": "alice", "scopes": "smtp", "description": "x"}, "scopes"),
        ({"account": "alice", "scopes": ["root"], "description": "x"}, "scope"),
        ({"account": "alice", "scopes": ["smtp"], "description": 7}, "description"),
        ({"account": "alice", "scopes": ["smtp"], "description": "x",
          "restrictions": {"addresses": ["10.0.0.0/40"]}}, "CIDR"),
        ({"account": "alice", "scopes": ["smtp"], "description": "x", "restrictions": {"ip": "x"}},
         "restrictions.ip"),
        ({"account": ["alice"], "scopes": ["smtp"], "description": "x"}, "account"),
    ):
        code, reply, _ = await api.call("POST", "/v1/token", bad)
        assert code == 400 and fragment in reply["message"], bad


# Operations, routing, limits

@pytest_twisted.ensureDeferred
async def test_connections_metrics_and_routing_errors(api: Api) -> None:
    code, body, _ = await api.call("GET", "/v1/connections")
    assert code == 200 and len(body["connections"]) == 2
    code, text, headers = await api.call("GET", "/metrics")
    assert code == 200 and b"# HELP" in text
    assert headers.getRawHeaders(b"content-type")[0] == prometheus_client.CONTENT_TYPE_LATEST.encode()
    assert (await api.call("GET", "/metrics", token=None))[0] == 401
    code, body, _ = await api.call("GET", "/v1/nothing-here")
    assert code == 404 and body["error"] == "NotFound"
    code, body, headers = await api.call("PATCH", "/v1/account/alice")
    assert code == 405 and body["error"] == "MethodNotAllowed"
    assert b"GET" in headers.getRawHeaders(b"allow")[0]


@pytest_twisted.ensureDeferred
async def test_body_over_one_mebibyte_is_413(api: Api) -> None:
    code, body, _ = await api.call("POST", "/v1/account", raw=b"x" * (1024 * 1024 + 10))
    assert code == 413 and body["error"] == "PayloadTooLarge"


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_one_mebibyte_is_413(api: Api) -> None:
    """Without a Content-Length the limit is counted as chunks arrive."""
    code, body, _ = await api.call("POST", "/v1/account", raw=b"x" * (1024 * 1024 + 10), chunked=True)
    assert code == 413 and body["error"] == "PayloadTooLarge"
    ok = json.dumps(IMAP_ACCOUNT).encode()
    assert (await api.call("POST", "/v1/account", raw=ok, chunked=True))[0] == 200


@pytest_twisted.ensureDeferred
async def test_unexpected_error_is_500_without_traceback(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode() -> None:
        raise RuntimeError("secret internals /etc/passwd")
    monkeypatch.setattr(api.sync, "list_accounts", explode)
    code, body, _ = await api.call("GET", "/v1/accounts")
    assert (code, body) == (500, {"error": "InternalError", "message": "internal error"})


@pytest_twisted.ensureDeferred
async def test_no_connections_registry_gives_empty_list(tmp_path: Path) -> None:
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    admin, _ = sync.create_token(None, ["api"], "admin", None)
    port = reactor.listenTCP(0, make_site(store), interface="127.0.0.1")
    try:
        api = Api(f"http://127.0.0.1:{port.getHost().port}", store, sync, admin,
                  Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        assert (await api.call("GET", "/v1/connections"))[:2] == (200, {"connections": []})
    finally:
        await port.stopListening()
        store.stop()
        sync.close()


def test_client_gone_before_reply_is_not_written_to() -> None:
    """A client that disconnects while the store is busy gets no write and no finish()."""
    pending: defer.Deferred = defer.Deferred()

    class SlowStore:
        def verify_token(self, *args: Any) -> defer.Deferred:
            return pending

    request = DummyRequest([b"v1", b"accounts"])
    request.requestHeaders.addRawHeader(b"Authorization", b"Bearer " + b"a" * 64)
    assert ApiResource(SlowStore()).render(request) is NOT_DONE_YET  # type: ignore[arg-type]
    request.processingFailed(Failure(ConnectionDone()))
    pending.callback((TokenCheck.INVALID, None))
    assert request.written == [] and request.finished == 0


def test_access_log_line_blanks_token_secrets() -> None:
    """DELETE /v1/token/<secret> is logged with the secret replaced; short ids stay."""
    from gateway.api.app import _access_log_line
    secret = "ab" * 32
    request = DummyRequest([b"v1"])
    request.method, request.uri, request.clientproto = b"DELETE", f"/v1/token/{secret}".encode(), b"HTTP/1.1"
    request.code, request.sentLength = 200, 17
    line = _access_log_line("ts", request)  # type: ignore[arg-type]
    assert secret not in line and "/v1/token/<token>" in line
    request.uri = b"/v1/token/0123456789abcdef"
    assert "0123456789abcdef" in _access_log_line("ts", request)  # type: ignore[arg-type]


# Strings that cannot be encoded, and IDs that look like others

@pytest_twisted.ensureDeferred
async def test_lone_surrogates_are_refused_and_listings_keep_answering(api: Api) -> None:
    """{"name": "\\udcff"} (a JSON escape for a lone surrogate) is a 400 wherever it is, and the
    account listing and view keep answering afterwards."""
    api.sync.create_account(IMAP_ACCOUNT)
    bad = b'{"name": "\\udcff"}'
    code, body, _ = await api.call("PUT", "/v1/account/alice", raw=bad)
    assert code == 400 and "surrogate" in body["message"] and "name" in body["message"]
    raw_account = json.dumps({**IMAP_ACCOUNT, "account": "bob"}).encode().replace(b'"bob"', b'"b\\ud800b"')
    assert (await api.call("POST", "/v1/account", raw=raw_account))[0] == 400
    token_body = b'{"account": "alice", "scopes": ["imap-proxy"], "description": "\\udfff"}'
    assert (await api.call("POST", "/v1/token", raw=token_body))[0] == 400
    key_body = b'{"\\ud800": 1}'
    assert (await api.call("PUT", "/v1/account/alice", raw=key_body))[0] == 400
    code, body, _ = await api.call("GET", "/v1/accounts")
    assert code == 200 and [a["account"] for a in body["accounts"]] == ["alice"]
    assert (await api.call("GET", "/v1/account/alice"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_surrogate_already_stored_is_escaped_in_answers(api: Api) -> None:
    """A value stored before the check existed: the listing still answers, with the JSON escape."""
    api.sync.create_account({**IMAP_ACCOUNT, "name": "ok"})
    api.sync._db.execute("UPDATE accounts SET data = replace(data, '\"ok\"', '\"\\udcff\"')")
    api.sync._db.commit()
    code, body, _ = await api.call("GET", "/v1/accounts")
    assert code == 200 and body["accounts"][0]["name"] == "\udcff"


@pytest.mark.parametrize("lookalike", ["ali\u202ece", "al\u200bice", "alice\ufeff", "ali\u0007ce",
                                       "al\u2066ice", "al\u00adice"])
@pytest_twisted.ensureDeferred
async def test_lookalike_account_ids_are_refused(api: Api, lookalike: str) -> None:
    """RTL override, zero-width and other invisible or control characters in an ID: 400, naming it."""
    code, body, _ = await api.call("POST", "/v1/account", {**IMAP_ACCOUNT, "account": lookalike})
    assert code == 400 and ("U+" in body["message"] or "control" in body["message"])
    assert (await api.call("GET", "/v1/accounts"))[1]["accounts"] == []
