"""The store contract, run against both backends: SQLite (behind its worker thread) and a real
redis-server. Apps, accounts (secrets encrypted, never in public views), tokens, account state,
pending authorizations, copy between backends, all through the asynchronous contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from gateway.auth.secrets import SecretBox
from gateway.auth.tokens import TokenCheck
from gateway.store.base import AsyncStore, Conflict, NotFound, ValidationError
from gateway.store.sqlite import SQLiteStore

SECRETS = ("imap-pass-s3cret", "refresh-s3cret", "access-s3cret", "client-s3cret")
NOW = 1700000000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Backend:
    """A store under test, plus ``raw()``: everything it keeps, as text (for "no secret in clear"),
    and its ``clock``."""

    def __init__(self, store: Any, raw: Any, clock: Clock, box: SecretBox) -> None:
        self.store = store
        self.raw = raw
        self.clock = clock
        self.box = box

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path: Path) -> Any:
    box = SecretBox.generate()
    clock = Clock()
    if request.param == "sqlite":
        sync = SQLiteStore(str(tmp_path / "sub" / "gateway.db"), box, clock=clock)
        backend: Any = AsyncStore(sync, reactor)
        backend.start()

        def raw() -> str:
            import sqlite3
            db = sqlite3.connect(sync.path)
            try:
                return "\n".join(db.iterdump())
            finally:
                db.close()
    else:
        from gateway.store.redis import RedisStore

        server = request.getfixturevalue("redis_server")
        url = request.getfixturevalue("redis_url")
        backend = RedisStore(url, box, clock=clock)
        backend.start()
        db = int(url.rsplit("/", 1)[1])

        def raw() -> str:
            return server.values(db)
    yield Backend(backend, raw, clock, box)
    pytest_twisted.blockon(defer.maybeDeferred(backend.close))


async def _app(store: Any, provider: str = "gmail", **extra: Any) -> str:
    return (await store.create_app({"name": "app", "provider": provider, "clientId": "cid",
                             "clientSecret": "client-s3cret", **extra}))["id"]


async def _password_account(store: Any, account: str = "alice") -> dict:
    return await store.create_account({"account": account, "email": f"{account}@example.com",
                                 "imap": {"host": "imap.example.com", "port": 993, "secure": True,
                                          "auth": {"user": account, "pass": "imap-pass-s3cret"}}})


def _assert_no_secrets(view: Any) -> None:
    text = json.dumps(view)
    for secret in SECRETS:
        assert secret not in text
    assert '"pass"' not in text and "refreshToken" not in text and "clientSecret" not in text


# OAuth2 apps

@pytest_twisted.ensureDeferred
async def test_gmail_app_gets_well_known_urls_and_hides_secret(store: Any) -> None:
    app = (await store.get_app((await _app(store))))
    assert app["tokenUrl"] == "https://oauth2.googleapis.com/token"
    assert app["authorizationUrl"] == "https://accounts.google.com/o/oauth2/v2/auth"
    assert app["scopes"] == ["https://mail.google.com/"]
    assert app["imap"] == {"host": "imap.gmail.com", "port": 993, "secure": True}
    assert app["smtp"] == {"host": "smtp.gmail.com", "port": 465, "secure": True}
    _assert_no_secrets(app)
    _assert_no_secrets((await store.list_apps()))
    assert (await store.get_app(app["id"], with_secret=True))["clientSecret"] == "client-s3cret"


@pytest_twisted.ensureDeferred
async def test_outlook_app_uses_starttls_submission(store: Any) -> None:
    app = (await store.get_app((await _app(store, "outlook"))))
    assert app["tokenUrl"] == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert app["authorizationUrl"] == "https://login.microsoftonline.com/common/oauth2/v2.0/authorize"
    assert "offline_access" in app["scopes"]
    assert app["imap"] == {"host": "outlook.office365.com", "port": 993, "secure": True}
    assert app["smtp"] == {"host": "smtp.office365.com", "port": 587, "secure": False}


@pytest_twisted.ensureDeferred
async def test_generic_app_requires_token_url(store: Any) -> None:
    with pytest.raises(ValidationError, match="tokenUrl"):
        await _app(store, "generic")
    app_id = (await _app(store, "generic", tokenUrl="http://127.0.0.1:9/token"))
    assert (await store.get_app(app_id))["tokenUrl"] == "http://127.0.0.1:9/token"


@pytest.mark.parametrize("data, field", [
    ({"provider": "yahoo"}, "provider"),
    ({"clientId": 5}, "clientId"),
    ({"imap": {"host": "h", "port": 0}}, "imap.port"),
    ({"imap": {"host": "h", "secure": "yes"}}, "imap.secure"),
    ({"tokenUrl": "ftp://x"}, "tokenUrl"),
    ({"bogus": 1}, "bogus"),
])
@pytest_twisted.ensureDeferred
async def test_app_validation_names_the_field(store: Any, data: dict, field: str) -> None:
    base = {"name": "n", "provider": "gmail", "clientId": "c", "clientSecret": "s"}
    with pytest.raises(ValidationError, match=field):
        await store.create_app({**base, **data})


@pytest_twisted.ensureDeferred
async def test_app_in_use_cannot_be_deleted(store: Any) -> None:
    app_id = (await _app(store))
    await store.create_account({"account": "a", "email": "a@x.org", "oauth2": {"provider": app_id, "refreshToken": "r"}})
    with pytest.raises(Conflict):
        await store.delete_app(app_id)
    await store.delete_account("a")
    assert (await store.delete_app(app_id)) is True
    assert (await store.delete_app(app_id)) is False
    assert (await store.get_app(app_id)) is None


# Accounts

@pytest_twisted.ensureDeferred
async def test_password_account_public_view_has_no_secrets(store: Any) -> None:
    created = (await _password_account(store))
    assert created["account"] == "alice" and created["created"].endswith("Z")
    for view in (created, (await store.get_account("alice")), (await store.list_accounts())):
        _assert_no_secrets(view)
    assert (await store.get_account("alice"))["imap"]["auth"] == {"user": "alice"}
    full = (await store.get_account("alice", with_secrets=True))
    assert full["imap"]["auth"]["pass"] == "imap-pass-s3cret"


@pytest_twisted.ensureDeferred
async def test_secrets_are_encrypted_in_the_database_file(store: Any) -> None:
    app_id = (await _app(store))
    (await store.create_account({"account": "bob", "email": "bob@example.com",
                          "oauth2": {"provider": app_id, "refreshToken": "refresh-s3cret",
                                     "accessToken": "access-s3cret", "expires": 1700003600}}))
    await _password_account(store)
    dump = store.raw()
    for secret in SECRETS:
        assert secret not in dump


@pytest_twisted.ensureDeferred
async def test_oauth2_account_public_and_secret_views(store: Any) -> None:
    app_id = (await _app(store))
    (await store.create_account({"account": "bob", "email": "bob@example.com",
                          "oauth2": {"provider": app_id, "refreshToken": "refresh-s3cret"}}))
    public = (await store.get_account("bob"))
    _assert_no_secrets(public)
    assert public["oauth2"]["hasRefreshToken"] is True
    assert public["oauth2"]["auth"] == {"user": "bob@example.com"}
    full = (await store.get_account("bob", with_secrets=True))
    assert full["oauth2"]["refreshToken"] == "refresh-s3cret"
    assert full["imap"]["host"] == "imap.gmail.com"  # filled from the app for the data plane


@pytest_twisted.ensureDeferred
async def test_set_oauth_tokens_keeps_refresh_token_unless_rotated(store: Any) -> None:
    app_id = (await _app(store))
    (await store.create_account({"account": "bob", "email": "bob@example.com",
                          "oauth2": {"provider": app_id, "refreshToken": "r1"}}))
    await store.set_oauth_tokens("bob", "a1", 1700003600.0)
    oauth = (await store.get_account("bob", with_secrets=True))["oauth2"]
    assert (oauth["accessToken"], oauth["expires"], oauth["refreshToken"]) == ("a1", 1700003600.0, "r1")
    await store.set_oauth_tokens("bob", "a2", 1700007200.0, "r2")
    oauth = (await store.get_account("bob", with_secrets=True))["oauth2"]
    assert (oauth["accessToken"], oauth["refreshToken"]) == ("a2", "r2")
    assert (await store.get_account("bob"))["oauth2"]["expires"] == "2023-11-15T00:13:20.000Z"
    with pytest.raises(NotFound):
        await store.set_oauth_tokens("nobody", "a", 1.0)


@pytest_twisted.ensureDeferred
async def test_update_account_merges_and_revalidates(store: Any) -> None:
    await _password_account(store)
    updated = (await store.update_account("alice", {"name": "Alice", "imap": {"port": 143, "secure": False}}))
    assert updated["name"] == "Alice"
    full = (await store.get_account("alice", with_secrets=True))
    assert full["imap"] == {"host": "imap.example.com", "port": 143, "secure": False,
                            "auth": {"user": "alice", "pass": "imap-pass-s3cret"}}
    await store.update_account("alice", {"name": None})
    assert "name" not in (await store.get_account("alice"))
    with pytest.raises(ValidationError, match="imap.port"):
        await store.update_account("alice", {"imap": {"port": "993"}})
    with pytest.raises(NotFound):
        await store.update_account("nobody", {"name": "x"})
    with pytest.raises(ValidationError, match="does not match"):
        await store.update_account("alice", {"account": "mallory"})


@pytest_twisted.ensureDeferred
async def test_duplicate_account_is_a_conflict(store: Any) -> None:
    await _password_account(store)
    with pytest.raises(Conflict):
        await _password_account(store)


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
@pytest_twisted.ensureDeferred
async def test_account_validation_names_the_problem(store: Any, data: dict, message: str) -> None:
    base = {"account": "ok", "email": "ok@example.com",
            "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}}
    with pytest.raises(ValidationError, match=message):
        await store.create_account({key: val for key, val in {**base, **data}.items() if val is not None})


@pytest_twisted.ensureDeferred
async def test_proxy_password_is_masked_in_public_view(store: Any) -> None:
    (await store.create_account({"account": "p", "email": "p@x.org", "proxy": "socks5://u:pw-s3cret@10.0.0.1:1080",
                          "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}}))
    assert "pw-s3cret" not in json.dumps((await store.get_account("p")))
    assert "pw-s3cret" not in store.raw()  # the proxy URL is encrypted at rest too
    assert (await store.get_account("p", with_secrets=True))["proxy"].endswith("pw-s3cret@10.0.0.1:1080")


@pytest_twisted.ensureDeferred
async def test_get_view_sent_back_to_update_keeps_secrets(store: Any) -> None:
    """PUT of an unchanged GET view (masked proxy, no pass) keeps the stored secrets."""
    (await store.create_account({"account": "p", "email": "p@x.org", "proxy": "socks5://u:pw-s3cret@10.0.0.1:1080",
                          "imap": {"host": "h", "auth": {"user": "u", "pass": "imap-pass-s3cret"}}}))
    await store.update_account("p", (await store.get_account("p")))
    full = (await store.get_account("p", with_secrets=True))
    assert full["proxy"] == "socks5://u:pw-s3cret@10.0.0.1:1080"
    assert full["imap"]["auth"]["pass"] == "imap-pass-s3cret"


@pytest_twisted.ensureDeferred
async def test_set_oauth_tokens_refuses_password_accounts(store: Any) -> None:
    await _password_account(store)
    with pytest.raises(ValidationError, match="oauth2"):
        await store.set_oauth_tokens("alice", "a", 1.0)


@pytest_twisted.ensureDeferred
async def test_delete_account_removes_its_tokens(store: Any) -> None:
    await _password_account(store)
    secret, _ = (await store.create_token("alice", ["imap-proxy"], "mail", None))
    assert (await store.delete_account("alice")) is True
    assert (await store.delete_account("alice")) is False
    assert (await store.verify_token(secret, "imap-proxy", "127.0.0.1"))[0] is TokenCheck.INVALID
    assert (await store.list_tokens()) == []


# Tokens

@pytest_twisted.ensureDeferred
async def test_token_create_and_verify(store: Any) -> None:
    await _password_account(store)
    secret, record = (await store.create_token("alice", ["imap-proxy", "smtp"], "laptop", ["10.0.0.0/8"]))
    assert len(secret) == 64 and record["id"] != secret and secret not in json.dumps(record)
    assert record == {"id": record["id"], "account": "alice", "description": "laptop",
                      "scopes": ["imap-proxy", "smtp"], "created": "2023-11-14T22:13:20.000Z",
                      "restrictions": {"addresses": ["10.0.0.0/8"]}}
    assert (await store.verify_token(secret, "imap-proxy", "10.9.9.9")) == (TokenCheck.OK, record)
    assert (await store.verify_token(secret, "smtp", "::ffff:10.9.9.9", account="alice"))[0] is TokenCheck.OK
    assert (await store.verify_token(secret, "smtp", "192.0.2.1"))[0] is TokenCheck.DENIED_ADDRESS
    assert (await store.verify_token(secret, "api", "10.9.9.9")) == (TokenCheck.WRONG_SCOPE, None)
    assert (await store.verify_token(secret, "imap-proxy", "10.9.9.9", account="bob")) == (TokenCheck.INVALID, None)
    tampered = secret[:-1] + ("1" if secret.endswith("0") else "0")
    assert (await store.verify_token(tampered, "imap-proxy", "10.9.9.9"))[0] is TokenCheck.INVALID
    assert (await store.verify_token("", "imap-proxy", None))[0] is TokenCheck.INVALID


@pytest_twisted.ensureDeferred
async def test_only_the_hash_is_stored(store: Any) -> None:
    secret, _ = (await store.create_token(None, ["api"], "admin", None))
    dump = store.raw()
    assert secret not in dump


@pytest_twisted.ensureDeferred
async def test_admin_token_needs_exactly_api_scope(store: Any) -> None:
    secret, record = (await store.create_token(None, ["api"], "bootstrap", None))
    assert record["account"] is None
    assert (await store.verify_token(secret, "api", None))[0] is TokenCheck.OK
    with pytest.raises(ValidationError, match="exactly the scope api"):
        await store.create_token(None, ["imap-proxy"], "x", None)
    with pytest.raises(ValidationError):
        await store.create_token(None, ["api", "smtp"], "x", None)


@pytest_twisted.ensureDeferred
async def test_token_create_validates_input(store: Any) -> None:
    await _password_account(store)
    with pytest.raises(NotFound):
        await store.create_token("nobody", ["imap-proxy"], "x", None)
    with pytest.raises(ValidationError, match="scope"):
        await store.create_token("alice", ["root"], "x", None)
    with pytest.raises(ValidationError, match="CIDR"):
        await store.create_token("alice", ["smtp"], "x", ["10.0.0.0/99"])
    with pytest.raises(ValidationError, match="description"):
        await store.create_token("alice", ["smtp"], "", None)


@pytest_twisted.ensureDeferred
async def test_revoke_by_secret_or_id_and_listing(store: Any) -> None:
    await _password_account(store)
    await _password_account(store, "carol")
    s1, r1 = (await store.create_token("alice", ["imap-proxy"], "one", None))
    s2, r2 = (await store.create_token("alice", ["smtp"], "two", None))
    _s3, r3 = (await store.create_token("carol", ["smtp"], "three", None))
    assert {t["id"] for t in (await store.list_tokens("alice"))} == {r1["id"], r2["id"]}
    assert {t["id"] for t in (await store.list_tokens())} == {r1["id"], r2["id"], r3["id"]}
    assert (await store.get_token(s1)) == r1 and (await store.get_token(r2["id"])) == r2
    assert (await store.revoke_token(s1)) is True
    assert (await store.revoke_token(r2["id"])) is True
    assert (await store.revoke_token(r2["id"])) is False and (await store.revoke_token("nope")) is False
    assert (await store.verify_token(s1, "imap-proxy", None))[0] is TokenCheck.INVALID
    assert (await store.verify_token(s2, "smtp", None))[0] is TokenCheck.INVALID
    assert [t["id"] for t in (await store.list_tokens())] == [r3["id"]]




# Account state ---------------------------------------------------------------

async def _oauth_account(store: Any, account: str = "alice") -> None:
    app = await _app(store)
    await store.create_account({"account": account, "email": f"{account}@example.com",
                                "oauth2": {"provider": app, "refreshToken": "refresh-s3cret"}})


@pytest_twisted.ensureDeferred
async def test_state_starts_connecting_and_follows_what_happened(store: Any) -> None:
    await _oauth_account(store)
    assert (await store.get_account("alice"))["state"] == "connecting"
    await store.set_account_state("alice", "authenticationError", "invalid_grant", "Token has been expired or revoked.")
    view = await store.get_account("alice")
    assert view["state"] == "authenticationError"
    assert view["lastError"] == {"error": "invalid_grant", "description": "Token has been expired or revoked.",
                                 "time": "2023-11-14T22:13:20.000Z"}
    assert (await store.get_account("alice", with_secrets=True))["lastError"]["error"] == "invalid_grant"
    assert (await store.list_accounts())[0]["state"] == "authenticationError"
    assert (await store.update_account("alice", {"oauth2": {"refreshToken": "rt-2"}}))["state"] == "connecting"
    assert (await store.get_account("alice"))["lastError"] is None
    await store.set_account_state("alice", "connected")
    assert (await store.get_account("alice"))["state"] == "connected"
    with pytest.raises(ValidationError):
        await store.set_account_state("alice", "asleep")


@pytest_twisted.ensureDeferred
async def test_state_of_a_deleted_account_is_not_kept(store: Any) -> None:
    await _oauth_account(store)
    await store.set_account_state("alice", "connectError", "upstream", "cannot connect")
    await store.delete_account("alice")
    await store.set_account_state("alice", "connected")  # a login that outlived the deletion
    await store.create_account({"account": "alice", "email": "alice@example.com",
                                "imap": {"host": "h", "auth": {"user": "u", "pass": "p"}}})
    assert (await store.get_account("alice"))["state"] == "connecting"


# Pending authorizations --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_authorization_request_is_opened_once_used_once_and_expires(store: Any) -> None:
    request = await store.create_auth_request({"account": "bob", "app": "a1"}, "verifier-1", 900)
    assert (await store.take_auth_request(request, "opened", 900))["verifier"] == "verifier-1"
    with pytest.raises(Conflict):
        await store.take_auth_request(request, "opened", 900)
    assert (await store.take_auth_request(request, "used", 900))["account"] == "bob"
    with pytest.raises(Conflict):
        await store.take_auth_request(request, "used", 900)
    late = await store.create_auth_request({"account": "bob"}, "verifier-2", 900)
    store.clock.now += 901
    with pytest.raises(NotFound):
        await store.take_auth_request(late, "opened", 900)
    with pytest.raises(NotFound):
        await store.take_auth_request("nope", "used", 900)


@pytest_twisted.ensureDeferred
async def test_verifiers_and_the_state_key_are_stored_encrypted(store: Any) -> None:
    await store.create_auth_request({"account": "bob"}, "the-verifier-value", 900)
    key = await store.state_key()
    assert await store.state_key() == key and len(key) == 32
    raw = store.raw()
    import base64
    assert "the-verifier-value" not in raw and base64.urlsafe_b64encode(key).decode() not in raw


# Copy between backends -----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dump_and_load_carry_every_record(store: Any, tmp_path: Path) -> None:
    """What one backend dumps, an empty store of the other kind loads, and dumps identically; the
    copy works (tokens verify, secrets decrypt with the same key file)."""
    app = await _app(store)
    await store.create_account({"account": "bob", "email": "bob@example.com",
                                "oauth2": {"provider": app, "refreshToken": "refresh-s3cret",
                                           "accessToken": "access-s3cret", "expires": NOW + 3600}})
    await _password_account(store)
    await store.set_account_state("bob", "connected")
    secret, _ = await store.create_token("alice", ["imap-proxy"], "laptop", ["10.0.0.0/8"])
    await store.put_settings("network", {"pools": {"example.com": ["127.0.0.2"]}})
    dump = await store.dump()
    assert {k: len(v) for k, v in dump.items()} == {"apps": 1, "accounts": 2, "tokens": 1, "settings": 1,
                                                    "states": 1}
    box = store.box
    other = SQLiteStore(str(tmp_path / "copy.db"), box)
    target = AsyncStore(other, reactor)
    target.start()
    try:
        await target.load(dump)
        assert await target.dump() == dump
        assert (await target.verify_token(secret, "imap-proxy", "10.1.1.1"))[0] is TokenCheck.OK
        assert (await target.get_account("bob", with_secrets=True))["oauth2"]["refreshToken"] == "refresh-s3cret"
        await target.load(dump)  # idempotent
        assert await target.dump() == dump
    finally:
        await target.close()
