"""Account states and pending hosted authorizations in the SQLite store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.auth.secrets import SecretBox
from gateway.store.base import Conflict, NotFound, ValidationError
from gateway.store.sqlite import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "gw.db"), SecretBox.generate(), clock=clock)


def _account(store: SQLiteStore, account: str = "alice") -> None:
    app = store.create_app({"name": "g", "provider": "gmail", "clientId": "c", "clientSecret": "s"})["id"]
    store.create_account({"account": account, "email": f"{account}@example.com",
                          "oauth2": {"provider": app, "refreshToken": "rt-1"}})


def test_state_starts_connecting_and_follows_what_happened(store: SQLiteStore) -> None:
    _account(store)
    assert store.get_account("alice")["state"] == "connecting"
    store.set_account_state("alice", "authenticationError", "invalid_grant", "Token has been expired or revoked.")
    view = store.get_account("alice")
    assert view["state"] == "authenticationError"
    assert view["lastError"] == {"error": "invalid_grant", "description": "Token has been expired or revoked.",
                                 "time": "2027-01-15T08:00:00.000Z"}
    assert store.get_account("alice", with_secrets=True)["lastError"]["error"] == "invalid_grant"
    assert store.list_accounts()[0]["state"] == "authenticationError"
    # A new refresh token (re-authorized) clears it.
    assert store.update_account("alice", {"oauth2": {"refreshToken": "rt-2"}})["state"] == "connecting"
    assert store.get_account("alice")["lastError"] is None
    store.set_account_state("alice", "connected")
    assert store.get_account("alice")["state"] == "connected"
    with pytest.raises(ValidationError):
        store.set_account_state("alice", "asleep")


def test_state_of_a_deleted_account_is_not_kept(store: SQLiteStore) -> None:
    _account(store)
    store.set_account_state("alice", "connectError", "upstream", "cannot connect")
    store.delete_account("alice")
    store.set_account_state("alice", "connected")  # a login that outlived the deletion
    _account(store)
    assert store.get_account("alice")["state"] == "connecting"


def test_an_authorization_request_is_opened_once_used_once_and_expires(store: SQLiteStore, clock: Clock) -> None:
    request = store.create_auth_request({"account": "bob", "app": "a1"}, "verifier-1", ttl=900)
    assert store.take_auth_request(request, "opened", ttl=900)["verifier"] == "verifier-1"
    with pytest.raises(Conflict):
        store.take_auth_request(request, "opened", ttl=900)
    assert store.take_auth_request(request, "used", ttl=900)["account"] == "bob"
    with pytest.raises(Conflict):
        store.take_auth_request(request, "used", ttl=900)
    late = store.create_auth_request({"account": "bob"}, "verifier-2", ttl=900)
    clock.now += 901
    with pytest.raises(NotFound):
        store.take_auth_request(late, "opened", ttl=900)
    with pytest.raises(NotFound):
        store.take_auth_request("nope", "used", ttl=900)


def test_verifiers_and_the_state_key_are_stored_encrypted(store: SQLiteStore, tmp_path: Path) -> None:
    store.create_auth_request({"account": "bob"}, "the-verifier-value", ttl=900)
    key = store.state_key()
    assert store.state_key() == key and len(key) == 32
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("gw.db*"))
    assert b"the-verifier-value" not in raw and key not in raw


def test_a_store_from_before_service_accounts_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE apps (id TEXT PRIMARY KEY, data TEXT NOT NULL, secret TEXT, created REAL NOT NULL)")
    db.commit()
    db.close()
    store = SQLiteStore(str(tmp_path / "old.db"), SecretBox.generate())
    app = store.create_app({"name": "g", "provider": "gmail", "clientId": "c", "clientSecret": "s"})
    assert store.get_app(app["id"], with_secret=True)["clientSecret"] == "s"
