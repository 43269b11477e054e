"""GET /openapi.json: a valid OpenAPI 3.1 document whose paths and methods are exactly the router's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from openapi_spec_validator import validate
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from gateway.api.app import ApiResource, make_site
from gateway.api.openapi import build, document_bytes
from gateway.auth.secrets import SecretBox
from gateway.store.base import AsyncStore
from gateway.store.sqlite import SQLiteStore

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _routed() -> set[tuple[str, str, bool]]:
    """(METHOD, path pattern, needs auth) of every route the API dispatches: its own routing table."""
    resource = ApiResource(store=None)  # type: ignore[arg-type]  # routing needs no store
    return {(route.method, route.pattern, route.auth) for route in resource.router.routes}


def _documented(doc: dict[str, Any]) -> set[tuple[str, str, bool]]:
    found = set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                auth = operation.get("security", doc["security"]) != []
                found.add((method.upper(), path, auth))
    return found


def test_document_is_valid_openapi_3_1() -> None:
    doc = build()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)  # openapi-spec-validator: raises on any error
    assert json.loads(document_bytes()) == doc


def test_every_route_is_documented_and_every_documented_operation_is_routed() -> None:
    """Same paths, same methods, and no-auth exactly where the router needs no token."""
    routed, documented = _routed(), _documented(build())
    assert routed == documented, (f"routed, not documented: {sorted(routed - documented)}; "
                                  f"documented, not routed: {sorted(documented - routed)}")
    assert {path for _m, path, auth in routed if not auth} == {"/health", "/openapi.json"}


def test_every_operation_documents_its_errors_as_the_error_shape() -> None:
    doc = build()
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "200" in responses, (method, path)
            codes = set(responses) - {"200"}
            assert all(code.startswith("4") for code in codes), (method, path, codes)  # never a 5xx
            if operation.get("security", doc["security"]):
                assert {"401", "403"} <= codes, (method, path)
            if "requestBody" in operation:
                assert {"400", "413"} <= codes, (method, path)
            for code in codes:
                name = responses[code]["$ref"].rsplit("/", 1)[1]
                media = doc["components"]["responses"][name]["content"]["application/json"]
                assert media["schema"] == error
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]


@pytest_twisted.ensureDeferred
async def test_served_without_a_token_as_json(tmp_path: Path) -> None:
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    port = reactor.listenTCP(0, make_site(store), interface="127.0.0.1")
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/openapi.json".encode()
        response = await agent.request(b"GET", url, Headers()).addTimeout(10, reactor)
        body = await readBody(response).addTimeout(10, reactor)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
        assert json.loads(body) == build()
        response = await agent.request(b"POST", url, Headers()).addTimeout(10, reactor)
        assert response.code == 405 and json.loads(await readBody(response))["error"] == "MethodNotAllowed"
        assert response.headers.getRawHeaders(b"allow") == [b"GET"]
    finally:
        await port.stopListening()
        store.stop()
        sync.close()


# Bugs the schemathesis run (tests/integration/test_api_openapi.py) found or led to: each was a 500.

_APP = {"name": "n", "provider": "generic", "clientId": "c", "clientSecret": "s",
        "tokenUrl": "https://idp.example.com/token"}
_ACCOUNT = {"account": "a", "email": "a@example.com",
            "imap": {"host": "imap.example.com", "auth": {"user": "u", "pass": "p"}}}


@pytest.mark.parametrize("app", [
    {**_APP, "provider": {}},                        # unhashable: TypeError
    {**_APP, "provider": ["gmail"]},
    {**_APP, "tokenUrl": "http://["},                # urlsplit: ValueError (bad IPv6 host)
    {**_APP, "redirectUrl": "https://[::1"},
    {**_APP, "tokenUrl": "https://idp.example.com/\ntoken"},  # urlsplit silently drops it
    {**_APP, "tokenUrl": " https://idp.example.com/token"},
    {**_APP, "provider": "outlook", "authority": "common\n"},  # `$` matched before the newline
])
def test_bad_apps_are_validation_errors(app: dict[str, Any]) -> None:
    from gateway.store.base import ValidationError
    from gateway.store.validation import normalize_app

    with pytest.raises(ValidationError):
        normalize_app(app)


@pytest.mark.parametrize("account", [
    {**_ACCOUNT, "proxy": "socks5://[x]:1080"},      # urlsplit: ValueError
    # expires out of datetime's range: stored, then every view of it (and GET /v1/accounts) was a 500
    *({"account": "a", "email": "a@example.com",
       "oauth2": {"provider": "app", "accessToken": "t", "expires": expires}}
      for expires in (1e300, json.loads("1e400"), 10 ** 400, -1, "0001-01-01T00:00:00+14:00")),
    {"account": "a", "email": "a@example.com",
     "oauth2": {"provider": "app", "refreshToken": "r", "expires": True}},  # unused, but still wrong
])
def test_bad_accounts_are_validation_errors(account: dict[str, Any]) -> None:
    from gateway.store.base import ValidationError
    from gateway.store.validation import normalize_account

    with pytest.raises(ValidationError):
        normalize_account(account, lambda app_id: {"id": app_id})


def test_an_expiry_in_range_is_kept() -> None:
    from gateway.store.validation import MAX_TIMESTAMP, normalize_account

    for expires, expected in ((0, 0.0), (MAX_TIMESTAMP, float(MAX_TIMESTAMP)),
                              ("2030-01-01T00:00:00Z", 1893456000.0)):
        account = normalize_account({"account": "a", "email": "a@example.com",
                                     "oauth2": {"provider": "app", "accessToken": "t", "expires": expires}},
                                    lambda app_id: {"id": app_id})
        assert account["oauth2"]["expires"] == expected
