"""The typed records the data path reads: built from the store's document in one place."""

from __future__ import annotations

from gateway.store.records import AccountRecord, AppRecord, Routing

DOC = {"account": "alice", "email": "Alice@Example.com", "proxy": "socks5://p:1080", "localAddress": "127.0.0.2",
       "imap": {"host": "imap.example.com", "port": 993, "secure": True, "auth": {"user": "alice@example.com"}},
       "oauth2": {"provider": "app1", "auth": {"user": "alice@example.com"}, "refreshToken": "r1",
                  "accessToken": "a1", "expires": 1700000000.0},
       "state": "authenticationError", "lastError": {"error": "invalid_grant", "description": "gone", "time": "t"}}


def test_an_account_record_names_what_the_data_path_reads() -> None:
    record = AccountRecord.from_document(DOC)
    assert (record.id, record.email, record.proxy, record.local_address) == (
        "alice", "Alice@Example.com", "socks5://p:1080", "127.0.0.2")
    assert record.server("imap").host == "imap.example.com" and record.server("imap").secure is True
    assert record.server("smtp") is None
    assert record.oauth2 is not None and record.oauth2.app == "app1" and record.oauth2.refresh_token == "r1"
    assert record.oauth2.access_token == "a1" and record.oauth2.expires == 1700000000.0
    assert record.state == "authenticationError" and record.last_error.error == "invalid_grant"
    assert record.routing == Routing("alice", "Alice@Example.com", "127.0.0.2", "socks5://p:1080")
    assert record.routing.domain == "example.com"


def test_the_fingerprint_ignores_tokens_and_bookkeeping_but_not_settings() -> None:
    base = AccountRecord.from_document(DOC).fingerprint
    renewed = {**DOC, "oauth2": {**DOC["oauth2"], "accessToken": "a2", "refreshToken": "r2", "expires": 1.0},
               "state": "connected", "lastError": None, "updated": "later"}
    assert AccountRecord.from_document(renewed).fingerprint == base
    moved = {**DOC, "imap": {**DOC["imap"], "host": "elsewhere.example.com"}}
    assert AccountRecord.from_document(moved).fingerprint != base
    other_user = {**DOC, "oauth2": {**DOC["oauth2"], "auth": {"user": "bob@example.com"}}}
    assert AccountRecord.from_document(other_user).fingerprint != base


def test_a_password_account_has_its_server_credentials_and_no_grant() -> None:
    record = AccountRecord.from_document({"account": "p", "email": "p@x.org",
                                          "imap": {"host": "h", "auth": {"user": "u", "pass": "s3cret"}}})
    assert record.oauth2 is None and record.imap.user == "u" and record.imap.password == "s3cret"
    assert record.state == "connecting" and record.last_error is None


def test_an_app_record_from_the_store_view() -> None:
    app = AppRecord.from_document({"id": "a1", "provider": "gmail", "clientId": "c", "clientSecret": "s",
                                   "tokenUrl": "https://t", "scopes": ["x"], "identityScopes": ["openid"],
                                   "authorizationParams": {"prompt": "consent"},
                                   "imap": {"host": "imap.gmail.com", "port": 993, "secure": True}})
    assert (app.id, app.client_id, app.client_secret, app.grant) == ("a1", "c", "s", "authorizationCode")
    assert app.scopes == ("x",) and app.identity_scopes == ("openid",)
    assert dict(app.authorization_params) == {"prompt": "consent"} and app.server("imap").port == 993
