"""The admin API against its own OpenAPI document: schemathesis on a live gateway.

A gateway of its own (`started_gateway`) on loopback serves `/openapi.json`; schemathesis loads the
document from it and sends every operation generated requests (valid and invalid bodies, path and
query parameters, methods a path does not have, requests without or with a wrong token),
authenticated with an api token. No answer may be a 5xx; every answer must be a documented status
code with a documented content type whose body fits the response schema; data the document calls
invalid must be refused, a method a path lacks must get 405 and a missing token 401. `/metrics` is
checked for its content type only (its body is Prometheus text). Schemathesis leaves out the
operation that serves the document itself: the last test checks `/openapi.json`.

Bounded: a fixed seed, deterministic generation, MAX_EXAMPLES per operation in the fuzzing phase
(the coverage phase adds its boundary cases), no Hypothesis deadline or example database: about
2,400 requests, under 20 s with the gateway's start.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from gateway.api.openapi import build

from .gateway_proc import Gateway, started_gateway, wait_for
from .test_imap_login import read_until

MAX_EXAMPLES = 12  # per operation, for the fuzzing phase (the examples and coverage phases add their own)
SEED = 20240501

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, ignored_auth, unsupported_method]


@dataclass
class Live:
    """The gateway and the records that generated requests are pointed at (besides random ids)."""

    gw: Gateway
    apps: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # secrets and ids of spare tokens, never the test's
    sessions: list[int] = field(default_factory=list)
    requests: int = 0

    def aim(self, case: Any) -> None:
        """Point about half of the cases at records that exist, so 200s, 404s-after-delete and 409s
        get checked too, not only 404s for random ids (schemathesis re-checks whether an edited case
        is still invalid). Chosen from the case's own data, so a case replayed by Hypothesis is aimed
        the same way."""
        pools = {"/v1/oauth2/{id}": self.apps, "/v1/account/{id}": self.accounts,
                 "/v1/tokens/account/{id}": self.accounts, "/v1/token/{token}": self.tokens,
                 "/v1/connections/{id}": self.sessions}
        pick = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
        if pick % 2:
            return
        pick >>= 1
        # Whole containers are assigned, not edited in place: that is how schemathesis notices the
        # edit and re-checks which parts of the case are still invalid (negative_data_rejection).
        pool = pools.get(case.path)
        if pool:
            name = next(iter(case.path_parameters))
            case.path_parameters = {**case.path_parameters, name: pool[pick % len(pool)]}
        if case.path == "/v1/account" and isinstance(case.body, dict) and isinstance(case.body.get("oauth2"), dict):
            case.body = {**case.body, "oauth2": {**case.body["oauth2"], "provider": self.apps[0]}}
        if case.path == "/v1/authentication/form" and isinstance(case.body, dict) and "oauth2App" in case.body:
            case.body = {**case.body, "oauth2App": self.apps[0]}
        if case.path == "/v1/token" and isinstance(case.body, dict) and isinstance(case.body.get("account"), str):
            case.body = {**case.body, "account": self.accounts[pick % len(self.accounts)]}


@pytest.fixture(scope="module")
def live(dovecot, oauth2_provider) -> Iterator[Live]:
    with started_gateway(dovecot, oauth2_provider, "gw-openapi-") as gw:
        state = Live(gw, apps=[gw.app_id])
        for i in range(2):
            status, body = gw.api("POST", "/v1/oauth2", {
                "name": f"spare {i}", "provider": "generic", "clientId": "c", "clientSecret": "s",
                "tokenUrl": "https://idp.example.com/token"})
            assert status == 200, body
            state.apps.append(body["id"])
        email = f"openapi{os.getpid()}@example.com"
        live_account = email.split("@")[0]
        gw.add_oauth_account(live_account, email)
        state.accounts.append(live_account)
        for i in range(3):
            status, body = gw.api("POST", "/v1/account", {
                "account": f"spare-{i}", "name": f"Spare {i}", "email": f"spare{i}@example.com",
                "proxy": "socks5://user:pw@127.0.0.1:1080",
                "imap": {"host": "localhost", "port": dovecot.imaps_port, "auth": {"user": "u", "pass": "p"}},
                "smtp": {"host": "localhost", "port": 465, "auth": {"user": "u", "pass": "p"}}})
            assert status == 200, body
            state.accounts.append(f"spare-{i}")
        # Spare tokens for DELETE /v1/token/{token}: the api token the run uses (gw.admin_token) is
        # never among them, and a generated {token} cannot name it (64 random hex digits, or its
        # random 16-digit id), so no DELETE can revoke it; DELETE /v1/account/{id} cannot either
        # (it is an admin token, bound to no account).
        for account, scopes in ((live_account, ["imap-proxy"]), ("spare-0", ["api", "smtp"]), (None, ["api"])):
            status, body = gw.api("POST", "/v1/token", {"account": account, "scopes": scopes,
                                                        "description": "spare",
                                                        "restrictions": {"addresses": ["127.0.0.0/8"]}})
            assert status == 200, body
            state.tokens.append(body["token"])
        state.tokens += [t["id"] for t in gw.api("GET", "/v1/tokens")[1]["tokens"]
                         if t["description"] == "spare"]
        # A live IMAP session, so GET /v1/connections lists one and DELETE /v1/connections/{id} ends it.
        sock = gw.raw()
        try:
            token = gw.token(live_account)
            sock.sendall(b"a1 LOGIN " + live_account.encode() + b" " + token.encode() + b"\r\n")
            assert b"a1 OK" in read_until(sock, b"a1 ")
            assert wait_for(lambda: gw.api("GET", "/v1/connections")[1]["connections"])
            state.sessions = [c["id"] for c in gw.api("GET", "/v1/connections")[1]["connections"]]
            yield state
        finally:
            sock.close()


@pytest.fixture(scope="module")
def api_schema(live: Live) -> Any:
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "suppress-health-check": ["too_slow"],  # generation speed depends on the machine, not the API
        "auth": {"openapi": {"bearer": {"bearer": live.gw.admin_token}}},
        "request-timeout": 10,
    })
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{live.gw.api_port}/openapi.json", config=config,
                                         timeout=10)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_admin_api_conforms_to_its_openapi_document(case: Any, live: Live) -> None:
    live.aim(case)
    live.requests += 1
    case.call_and_validate(checks=CHECKS, timeout=10)


def test_the_run_left_the_api_token_alone_and_the_gateway_up(live: Live) -> None:
    """Runs after the schemathesis test (same module): the token it used still works, nothing
    reached the log as a traceback, and the served document is the built one."""
    if live.requests == 0:
        pytest.skip("checks what the schemathesis test above left behind; run the whole module")
    assert live.gw.admin_token not in live.tokens
    status, body = live.gw.api("GET", "/v1/accounts")
    assert status == 200, body
    served = requests.get(f"http://127.0.0.1:{live.gw.api_port}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"] == "application/json; charset=utf-8"
    assert served.json() == json.loads(json.dumps(build()))
    assert "Traceback" not in live.gw.log_text(), live.gw.log_tail()
