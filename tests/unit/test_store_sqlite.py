"""SQLite-only parts of the store: reopening, open_store, the worker thread (the contract itself is\ntested against both backends in tests/integration/test_store.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import pytest_twisted

from gateway.auth.secrets import SecretBox
from gateway.auth.tokens import TokenCheck
from gateway.store import StoreConfigError, open_store
from gateway.store.base import AsyncStore, Conflict
from gateway.store.sqlite import SQLiteStore


def _password_account(store: SQLiteStore, account: str = "alice") -> dict:
    return store.create_account({"account": account, "email": f"{account}@example.com",
                                 "imap": {"host": "imap.example.com", "port": 993, "secure": True,
                                          "auth": {"user": account, "pass": "imap-pass-s3cret"}}})


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
    ("redis://127.0.0.1:6379/0", "no blocking interface"),
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
        assert check is TokenCheck.OK and account.imap.password == "p4ss" and account.imap.user == "u"
        assert token_id == _record["id"]
        assert (yield store.check_login(secret, "imap-proxy", "192.0.2.1", "a")) == \
            (TokenCheck.DENIED_ADDRESS, None, None)
        assert (yield store.check_login(secret, "smtp", "10.1.2.3", "a")) == (TokenCheck.WRONG_SCOPE, None, None)
        assert (yield store.check_login("0" * 64, "imap-proxy", "10.1.2.3", "a")) == \
            (TokenCheck.INVALID, None, None)
    finally:
        store.stop()
        sync.close()


def test_a_store_from_before_service_accounts_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE apps (id TEXT PRIMARY KEY, data TEXT NOT NULL, secret TEXT, created REAL NOT NULL)")
    db.commit()
    db.close()
    store = SQLiteStore(str(tmp_path / "old.db"), SecretBox.generate())
    app = store.create_app({"name": "g", "provider": "gmail", "clientId": "c", "clientSecret": "s"})
    assert store.get_app(app["id"], with_secret=True)["clientSecret"] == "s"


def test_a_proxy_stored_in_clear_by_an_older_version_is_encrypted_at_open(tmp_path: Path) -> None:
    box = SecretBox.generate()
    first = SQLiteStore(str(tmp_path / "g.db"), box)
    first.create_account({"account": "p", "email": "p@x.org", "proxy": "socks5://u:pw-s3cret@10.0.0.1:1080",
                          "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}})
    first.close()
    db = sqlite3.connect(tmp_path / "g.db")  # as version 1 left it: the proxy in clear
    data = json.loads(db.execute("SELECT data FROM accounts").fetchone()[0])
    data["proxy"] = "socks5://u:pw-s3cret@10.0.0.1:1080"
    db.execute("UPDATE accounts SET data = ?", (json.dumps(data),))
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    again = SQLiteStore(str(tmp_path / "g.db"), box)
    assert again.get_account("p", with_secrets=True)["proxy"] == "socks5://u:pw-s3cret@10.0.0.1:1080"
    assert again.get_account("p")["proxy"] == "socks5://u:***@10.0.0.1:1080"
    again.close()
    assert b"pw-s3cret" not in (tmp_path / "g.db").read_bytes()
