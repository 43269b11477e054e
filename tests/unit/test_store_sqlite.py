"""SQLiteStore: apps, accounts (secrets encrypted, never in public views), tokens; AsyncStore."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gateway.auth.secrets import SecretBox
from gateway.auth.tokens import TokenCheck
from gateway.store import StoreConfigError, open_store
from gateway.store.base import AsyncStore, Conflict, NotFound, ValidationError
from gateway.store.sqlite import SQLiteStore

SECRETS = ("imap-pass-s3cret", "refresh-s3cret", "access-s3cret", "client-s3cret")


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(str(tmp_path / "sub" / "gateway.db"), SecretBox.generate(), clock=lambda: 1700000000.0)
    yield s
    s.close()


def _app(store: SQLiteStore, provider: str = "gmail", **extra: Any) -> str:
    return store.create_app({"name": "app", "provider": provider, "clientId": "cid",
                             "clientSecret": "client-s3cret", **extra})["id"]


def _password_account(store: SQLiteStore, account: str = "alice") -> dict:
    return store.create_account({"account": account, "email": f"{account}@example.com",
                                 "imap": {"host": "imap.example.com", "port": 993, "secure": True,
                                          "auth": {"user": account, "pass": "imap-pass-s3cret"}}})


def _assert_no_secrets(view: Any) -> None:
    text = json.dumps(view)
    for secret in SECRETS:
        assert secret not in text
    assert '"pass"' not in text and "refreshToken" not in text and "clientSecret" not in text


# OAuth2 apps

def test_gmail_app_gets_well_known_urls_and_hides_secret(store: SQLiteStore) -> None:
    app = store.get_app(_app(store))
    assert app["tokenUrl"] == "https://oauth2.googleapis.com/token"
    assert app["authorizationUrl"] == "https://accounts.google.com/o/oauth2/v2/auth"
    assert app["scopes"] == ["https://mail.google.com/"]
    assert app["imap"] == {"host": "imap.gmail.com", "port": 993, "secure": True}
    assert app["smtp"] == {"host": "smtp.gmail.com", "port": 465, "secure": True}
    _assert_no_secrets(app)
    _assert_no_secrets(store.list_apps())
    assert store.get_app(app["id"], with_secret=True)["clientSecret"] == "client-s3cret"


def test_outlook_app_uses_starttls_submission(store: SQLiteStore) -> None:
    app = store.get_app(_app(store, "outlook"))
    assert app["tokenUrl"] == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert app["authorizationUrl"] == "https://login.microsoftonline.com/common/oauth2/v2.0/authorize"
    assert "offline_access" in app["scopes"]
    assert app["imap"] == {"host": "outlook.office365.com", "port": 993, "secure": True}
    assert app["smtp"] == {"host": "smtp.office365.com", "port": 587, "secure": False}


def test_generic_app_requires_token_url(store: SQLiteStore) -> None:
    with pytest.raises(ValidationError, match="tokenUrl"):
        _app(store, "generic")
    app_id = _app(store, "generic", tokenUrl="http://127.0.0.1:9/token")
    assert store.get_app(app_id)["tokenUrl"] == "http://127.0.0.1:9/token"


@pytest.mark.parametrize("data, field", [
    ({"provider": "yahoo"}, "provider"),
    ({"clientId": 5}, "clientId"),
    ({"imap": {"host": "h", "port": 0}}, "imap.port"),
    ({"imap": {"host": "h", "secure": "yes"}}, "imap.secure"),
    ({"tokenUrl": "ftp://x"}, "tokenUrl"),
    ({"bogus": 1}, "bogus"),
])
def test_app_validation_names_the_field(store: SQLiteStore, data: dict, field: str) -> None:
    base = {"name": "n", "provider": "gmail", "clientId": "c", "clientSecret": "s"}
    with pytest.raises(ValidationError, match=field):
        store.create_app({**base, **data})


def test_app_in_use_cannot_be_deleted(store: SQLiteStore) -> None:
    app_id = _app(store)
    store.create_account({"account": "a", "email": "a@x.org", "oauth2": {"provider": app_id, "refreshToken": "r"}})
    with pytest.raises(Conflict):
        store.delete_app(app_id)
    store.delete_account("a")
    assert store.delete_app(app_id) is True
    assert store.delete_app(app_id) is False
    assert store.get_app(app_id) is None


# Accounts

def test_password_account_public_view_has_no_secrets(store: SQLiteStore) -> None:
    created = _password_account(store)
    assert created["account"] == "alice" and created["created"].endswith("Z")
    for view in (created, store.get_account("alice"), store.list_accounts()):
        _assert_no_secrets(view)
    assert store.get_account("alice")["imap"]["auth"] == {"user": "alice"}
    full = store.get_account("alice", with_secrets=True)
    assert full["imap"]["auth"]["pass"] == "imap-pass-s3cret"


def test_secrets_are_encrypted_in_the_database_file(store: SQLiteStore) -> None:
    app_id = _app(store)
    store.create_account({"account": "bob", "email": "bob@example.com",
                          "oauth2": {"provider": app_id, "refreshToken": "refresh-s3cret",
                                     "accessToken": "access-s3cret", "expires": 1700003600}})
    _password_account(store)
    raw = sqlite3.connect(store.path)
    dump = "\n".join(raw.iterdump())
    raw.close()
    for secret in SECRETS:
        assert secret not in dump


def test_oauth2_account_public_and_secret_views(store: SQLiteStore) -> None:
    app_id = _app(store)
    store.create_account({"account": "bob", "email": "bob@example.com",
                          "oauth2": {"provider": app_id, "refreshToken": "refresh-s3cret"}})
    public = store.get_account("bob")
    _assert_no_secrets(public)
    assert public["oauth2"]["hasRefreshToken"] is True
    assert public["oauth2"]["auth"] == {"user": "bob@example.com"}
    full = store.get_account("bob", with_secrets=True)
    assert full["oauth2"]["refreshToken"] == "refresh-s3cret"
    assert full["imap"]["host"] == "imap.gmail.com"  # filled from the app for the data plane


def test_set_oauth_tokens_keeps_refresh_token_unless_rotated(store: SQLiteStore) -> None:
    app_id = _app(store)
    store.create_account({"account": "bob", "email": "bob@example.com",
                          "oauth2": {"provider": app_id, "refreshToken": "r1"}})
    store.set_oauth_tokens("bob", "a1", 1700003600.0)
    oauth = store.get_account("bob", with_secrets=True)["oauth2"]
    assert (oauth["accessToken"], oauth["expires"], oauth["refreshToken"]) == ("a1", 1700003600.0, "r1")
    store.set_oauth_tokens("bob", "a2", 1700007200.0, "r2")
    oauth = store.get_account("bob", with_secrets=True)["oauth2"]
    assert (oauth["accessToken"], oauth["refreshToken"]) == ("a2", "r2")
    assert store.get_account("bob")["oauth2"]["expires"] == "2023-11-15T00:13:20.000Z"
    with pytest.raises(NotFound):
        store.set_oauth_tokens("nobody", "a", 1.0)


def test_update_account_merges_and_revalidates(store: SQLiteStore) -> None:
    _password_account(store)
    updated = store.update_account("alice", {"name": "Alice", "imap": {"port": 143, "secure": False}})
    assert updated["name"] == "Alice"
    full = store.get_account("alice", with_secrets=True)
    assert full["imap"] == {"host": "imap.example.com", "port": 143, "secure": False,
                            "auth": {"user": "alice", "pass": "imap-pass-s3cret"}}
    store.update_account("alice", {"name": None})
    assert "name" not in store.get_account("alice")
    with pytest.raises(ValidationError, match="imap.port"):
        store.update_account("alice", {"imap": {"port": "993"}})
    with pytest.raises(NotFound):
        store.update_account("nobody", {"name": "x"})
    with pytest.raises(ValidationError, match="does not match"):
        store.update_account("alice", {"account": "mallory"})


def test_duplicate_account_is_a_conflict(store: SQLiteStore) -> None:
    _password_account(store)
    with pytest.raises(Conflict):
        _password_account(store)


@pytest.mark.parametrize("data, message", [
    ({"account": "has space"}, "account"),
    ({"account": "x" * 257}, "account"),
    ({"account": "tab\there"}, "account"),
    ({"account": 12}, "account"),
    ({"email": None}, "email"),
    ({"imap": {"host": "h", "port": 70000, "auth": {"user": "u", "pass": "p"}}}, "imap.port"),
    ({"imap": {"host": "h", "port": True, "auth": {"user": "u", "pass": "p"}}}, "imap.port"),
    ({"imap": {"host": "h", "auth": {"user": "u"}}}, "imap.auth"),
    ({"imap": None}, "imap settings or oauth2"),
    ({"oauth2": {"provider": "missing", "refreshToken": "r"}}, "oauth2.provider"),
    ({"proxy": "ftp://x"}, "proxy"),
    ({"localAddress": "nope"}, "localAddress"),
    ({"unknown": 1}, "unknown"),
])
def test_account_validation_names_the_problem(store: SQLiteStore, data: dict, message: str) -> None:
    base = {"account": "ok", "email": "ok@example.com",
            "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}}
    with pytest.raises(ValidationError, match=message):
        store.create_account({key: val for key, val in {**base, **data}.items() if val is not None})


def test_proxy_password_is_masked_in_public_view(store: SQLiteStore) -> None:
    store.create_account({"account": "p", "email": "p@x.org", "proxy": "socks5://u:pw-s3cret@10.0.0.1:1080",
                          "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}})
    assert "pw-s3cret" not in json.dumps(store.get_account("p"))
    assert store.get_account("p", with_secrets=True)["proxy"].endswith("pw-s3cret@10.0.0.1:1080")


def test_get_view_sent_back_to_update_keeps_secrets(store: SQLiteStore) -> None:
    """PUT of an unchanged GET view (masked proxy, no pass) keeps the stored secrets."""
    store.create_account({"account": "p", "email": "p@x.org", "proxy": "socks5://u:pw-s3cret@10.0.0.1:1080",
                          "imap": {"host": "h", "auth": {"user": "u", "pass": "imap-pass-s3cret"}}})
    store.update_account("p", store.get_account("p"))
    full = store.get_account("p", with_secrets=True)
    assert full["proxy"] == "socks5://u:pw-s3cret@10.0.0.1:1080"
    assert full["imap"]["auth"]["pass"] == "imap-pass-s3cret"


def test_set_oauth_tokens_refuses_password_accounts(store: SQLiteStore) -> None:
    _password_account(store)
    with pytest.raises(ValidationError, match="oauth2"):
        store.set_oauth_tokens("alice", "a", 1.0)


def test_delete_account_removes_its_tokens(store: SQLiteStore) -> None:
    _password_account(store)
    secret, _ = store.create_token("alice", ["imap-proxy"], "mail", None)
    assert store.delete_account("alice") is True
    assert store.delete_account("alice") is False
    assert store.verify_token(secret, "imap-proxy", "127.0.0.1")[0] is TokenCheck.INVALID
    assert store.list_tokens() == []


# Tokens

def test_token_create_and_verify(store: SQLiteStore) -> None:
    _password_account(store)
    secret, record = store.create_token("alice", ["imap-proxy", "smtp"], "laptop", ["10.0.0.0/8"])
    assert len(secret) == 64 and record["id"] != secret and secret not in json.dumps(record)
    assert record == {"id": record["id"], "account": "alice", "description": "laptop",
                      "scopes": ["imap-proxy", "smtp"], "created": "2023-11-14T22:13:20.000Z",
                      "restrictions": {"addresses": ["10.0.0.0/8"]}}
    assert store.verify_token(secret, "imap-proxy", "10.9.9.9") == (TokenCheck.OK, record)
    assert store.verify_token(secret, "smtp", "::ffff:10.9.9.9", account="alice")[0] is TokenCheck.OK
    assert store.verify_token(secret, "smtp", "192.0.2.1")[0] is TokenCheck.DENIED_ADDRESS
    assert store.verify_token(secret, "api", "10.9.9.9") == (TokenCheck.WRONG_SCOPE, None)
    assert store.verify_token(secret, "imap-proxy", "10.9.9.9", account="bob") == (TokenCheck.INVALID, None)
    tampered = secret[:-1] + ("1" if secret.endswith("0") else "0")
    assert store.verify_token(tampered, "imap-proxy", "10.9.9.9")[0] is TokenCheck.INVALID
    assert store.verify_token("", "imap-proxy", None)[0] is TokenCheck.INVALID


def test_only_the_hash_is_stored(store: SQLiteStore) -> None:
    secret, _ = store.create_token(None, ["api"], "admin", None)
    raw = sqlite3.connect(store.path)
    dump = "\n".join(raw.iterdump())
    raw.close()
    assert secret not in dump


def test_admin_token_needs_exactly_api_scope(store: SQLiteStore) -> None:
    secret, record = store.create_token(None, ["api"], "bootstrap", None)
    assert record["account"] is None
    assert store.verify_token(secret, "api", None)[0] is TokenCheck.OK
    with pytest.raises(ValidationError, match="exactly the scope api"):
        store.create_token(None, ["imap-proxy"], "x", None)
    with pytest.raises(ValidationError):
        store.create_token(None, ["api", "smtp"], "x", None)


def test_token_create_validates_input(store: SQLiteStore) -> None:
    _password_account(store)
    with pytest.raises(NotFound):
        store.create_token("nobody", ["imap-proxy"], "x", None)
    with pytest.raises(ValidationError, match="scope"):
        store.create_token("alice", ["root"], "x", None)
    with pytest.raises(ValidationError, match="CIDR"):
        store.create_token("alice", ["smtp"], "x", ["10.0.0.0/99"])
    with pytest.raises(ValidationError, match="description"):
        store.create_token("alice", ["smtp"], "", None)


def test_revoke_by_secret_or_id_and_listing(store: SQLiteStore) -> None:
    _password_account(store)
    _password_account(store, "carol")
    s1, r1 = store.create_token("alice", ["imap-proxy"], "one", None)
    s2, r2 = store.create_token("alice", ["smtp"], "two", None)
    _s3, r3 = store.create_token("carol", ["smtp"], "three", None)
    assert {t["id"] for t in store.list_tokens("alice")} == {r1["id"], r2["id"]}
    assert {t["id"] for t in store.list_tokens()} == {r1["id"], r2["id"], r3["id"]}
    assert store.get_token(s1) == r1 and store.get_token(r2["id"]) == r2
    assert store.revoke_token(s1) is True
    assert store.revoke_token(r2["id"]) is True
    assert store.revoke_token(r2["id"]) is False and store.revoke_token("nope") is False
    assert store.verify_token(s1, "imap-proxy", None)[0] is TokenCheck.INVALID
    assert store.verify_token(s2, "smtp", None)[0] is TokenCheck.INVALID
    assert [t["id"] for t in store.list_tokens()] == [r3["id"]]


def test_store_survives_reopen_with_same_key(tmp_path: Path) -> None:
    box = SecretBox.generate()
    first = SQLiteStore(str(tmp_path / "g.db"), box)
    _password_account(first)
    secret, _ = first.create_token("alice", ["imap-proxy"], "x", None)
    first.close()
    second = SQLiteStore(str(tmp_path / "g.db"), box)
    assert second.get_account("alice", with_secrets=True)["imap"]["auth"]["pass"] == "imap-pass-s3cret"
    assert second.verify_token(secret, "imap-proxy", None)[0] is TokenCheck.OK
    assert second._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    second.close()


# open_store

def test_open_store_sqlite_creates_db_and_key(tmp_path: Path) -> None:
    class Config:
        store = f"sqlite:{tmp_path}/var/g.db"
        secret_key_file = str(tmp_path / "var" / "secret.key")
    s = open_store(Config())
    assert isinstance(s, SQLiteStore)
    assert (tmp_path / "var" / "g.db").exists() and (tmp_path / "var" / "secret.key").exists()
    s.close()


@pytest.mark.parametrize("url, message", [
    ("redis://127.0.0.1:6379/0", "redis store not implemented yet"),
    ("sqlite:", "file path"),
    ("mysql://x", "sqlite:PATH"),
])
def test_open_store_rejects_unusable_urls(tmp_path: Path, url: str, message: str) -> None:
    class Config:
        store = url
        secret_key_file = str(tmp_path / "k")
    with pytest.raises(StoreConfigError, match=message):
        open_store(Config())


# AsyncStore

@pytest_twisted.inlineCallbacks
def test_async_store_runs_calls_in_its_pool_and_returns_deferreds(tmp_path: Path):
    """Every method is a Deferred; errors arrive as failures of the same type."""
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    try:
        created = yield store.create_account({"account": "a", "email": "a@x.org",
                                              "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}})
        assert created["account"] == "a"
        secret, record = yield store.create_token("a", ["imap-proxy"], "d", None)
        check, found = yield store.verify_token(secret, "imap-proxy", "127.0.0.1", "a")
        assert check is TokenCheck.OK and found == record
        assert (yield store.list_accounts())[0]["account"] == "a"
        with pytest.raises(Conflict):
            yield store.create_account({"account": "a", "email": "a@x.org",
                                        "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}})
        assert (yield store.revoke_token(record["id"])) is True
    finally:
        store.stop()
        store.stop()  # idempotent
        sync.close()


@pytest_twisted.inlineCallbacks
def test_check_login_gives_the_account_with_secrets_only_for_a_good_token(tmp_path: Path):
    """check_login: OK with the account and its secrets; a bad token or address gets no account."""
    from twisted.internet import reactor
    sync = SQLiteStore(str(tmp_path / "g.db"), SecretBox.generate())
    store = AsyncStore(sync, reactor)
    store.start()
    try:
        yield store.create_account({"account": "a", "email": "a@x.org",
                                    "imap": {"host": "h", "auth": {"user": "u", "pass": "p4ss"}}})
        secret, _record = yield store.create_token("a", ["imap-proxy"], "d", ["10.0.0.0/8"])
        check, account, token_id = yield store.check_login(secret, "imap-proxy", "10.1.2.3", "a")
        assert check is TokenCheck.OK and account["imap"]["auth"]["pass"] == "p4ss"
        assert token_id == _record["id"]
        assert (yield store.check_login(secret, "imap-proxy", "192.0.2.1", "a")) == \
            (TokenCheck.DENIED_ADDRESS, None, None)
        assert (yield store.check_login(secret, "smtp", "10.1.2.3", "a")) == (TokenCheck.WRONG_SCOPE, None, None)
        assert (yield store.check_login("0" * 64, "imap-proxy", "10.1.2.3", "a")) == \
            (TokenCheck.INVALID, None, None)
    finally:
        store.stop()
        sync.close()
