"""The Redis store (`store: redis://host:6379/0`, `rediss://` for TLS): everything SQLite holds, shared by
every gateway on the same Redis, plus what a cluster needs (locks, leases, events).

Keys (all under ``gateway:``):

- ``app:{id}`` hash (data, secret, service_key, created); ``apps`` sorted set by creation;
  ``app:{id}:accounts`` the accounts that use it (so an app in use is not deleted);
- ``account:{id}`` hash (data: the document with its secrets encrypted, created, updated);
  ``account:{id}:oauth`` hash (the encrypted access and refresh token, expiry: written alone by
  every refresh, so a refresh never races an edit of the account); ``accounts`` set;
  ``state:{id}`` hash (state, error, description, time);
- ``token:{id}`` hash; ``tokenhash:{sha256}`` -> id; ``tokens`` set; ``account:{id}:tokens`` set;
- ``settings:{name}`` JSON; ``authreq:{id}`` hash, expiring with ``oauth2.state_ttl``;
- ``lock:{name}`` (SET NX PX), ``leases:{protocol}:{account}`` sorted set by expiry;
- channel ``gateway:events``: JSON messages (``settings``, ``account``, ``released``).

Secrets are encrypted with the same secret key file as SQLite's (every gateway of a cluster needs the
same file). A Redis that is down makes store calls fail with :class:`StoreUnavailable` (logins answer
``NO [UNAVAILABLE]``); the connection pool reconnects by itself.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.parse
from typing import Any, Awaitable, Callable, TypeVar

import txredisapi  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.logger import Logger

from gateway.auth.secrets import SecretBox, SecretDecryptError
from gateway.auth.tokens import TokenCheck, hash_token, looks_like_token
from gateway.store.base import (Conflict, NotFound, StoreError, TokenRecord, ValidationError, judge_token,
                                new_token_record, state_view)
from gateway.store.records import AccountRecord, AppRecord
from gateway.store.validation import (
    APP_SECRET_FIELD,
    account_public,
    stored_public,
    app_public,
    map_secrets,
    mask_proxy,
    merge,
    normalize_account,
    normalize_app,
    with_app_defaults,
)

log = Logger()

T = TypeVar("T")
PREFIX = "gateway:"
EVENTS = PREFIX + "events"
ACCOUNT_STATES = ("connected", "connecting", "authenticationError", "connectError")
_OAUTH_FIELDS = ("accessToken", "refreshToken", "expires")  # kept in account:{id}:oauth

# Take a lease if fewer than ARGV[2] unexpired ones exist: ARGV = now, cap, expiry, lease id.
_TAKE_LEASE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[3]) - tonumber(ARGV[1])) * 1000) + 1000)
return 1
"""
# Delete a lock only if it is still ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StoreUnavailable(StoreError):
    """The store (Redis) cannot be reached; the message says so, without a secret."""


def parse_url(url: str) -> dict[str, Any]:
    """``redis://[user:password@]host[:port][/db]`` (``rediss://``: TLS) as connection arguments."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("expected redis://HOST:PORT/DB or rediss://...")
    db = (parts.path or "/0").strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the port must be a number") from None
    return {"host": parts.hostname, "port": port, "db": int(db), "tls": parts.scheme == "rediss",
            "username": urllib.parse.unquote(parts.username) if parts.username else None,
            "password": urllib.parse.unquote(parts.password) if parts.password else None}


def safe_url(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    return mask_proxy(url)


def _d(fn: Callable[..., Awaitable[T]]) -> Callable[..., defer.Deferred[T]]:
    """A coroutine method as a Deferred-returning one (the store contract), with Redis's connection
    errors turned into StoreUnavailable."""
    def call(self: "RedisStore", *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        async def run() -> T:
            try:
                return await fn(self, *args, **kwargs)
            except (txredisapi.ConnectionError, ConnectionError) as e:
                raise StoreUnavailable(f"the store (Redis at {self.where}) is unavailable: "
                                       f"{str(e) or type(e).__name__}") from None

        def timed_out(result: Any, seconds: float) -> Any:
            raise StoreUnavailable(f"the store (Redis at {self.where}) did not answer within {seconds:.0f} s")

        # While Redis is down the pool queues commands until it reconnects: bound every call.
        return defer.Deferred.fromCoroutine(run()).addTimeout(self._timeout, self._reactor(),
                                                                onTimeoutCancel=timed_out)
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


class RedisStore:
    """The store contract on Redis (txredisapi): every method returns a Deferred."""

    cluster = True  # several gateways share it: locks, leases and events are real

    def __init__(self, url: str, box: SecretBox, clock: Callable[[], float] = time.time,
                 poolsize: int = 10, timeout: float = 5.0) -> None:
        self.url = url
        self.where = safe_url(url)
        self.settings = parse_url(url)
        self._box = box
        self._clock = clock
        self._poolsize = poolsize
        self._timeout = timeout
        self._redis: Any = None
        self._subscriber: Any = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.channel = f"{EVENTS}:{self.settings['db']}"  # channels are server-wide, databases are not

    # Life ------------------------------------------------------------------

    def start(self) -> None:
        """Connect (lazily: the pool connects and reconnects by itself)."""
        if self._redis is not None:
            return
        s = self.settings
        self._redis = txredisapi.lazyConnectionPool(
            s["host"], s["port"], dbid=s["db"], poolsize=self._poolsize, reconnect=True,
            password=s["password"], username=s["username"], ssl_context_factory=self._tls(),
            connectTimeout=self._timeout, replyTimeout=self._timeout, convertNumbers=False)

    def close(self) -> defer.Deferred[None]:
        redis, self._redis = self._redis, None
        subscriber, self._subscriber = self._subscriber, None
        closing = [d for d in (redis.disconnect() if redis is not None else None,
                               subscriber.disconnect() if subscriber is not None else None) if d is not None]
        return defer.DeferredList(closing).addCallback(lambda _: None)

    @staticmethod
    def _reactor() -> Any:
        from twisted.internet import reactor
        return reactor

    @property
    def r(self) -> Any:
        if self._redis is None:
            self.start()
        return self._redis

    # Events (cluster) ------------------------------------------------------

    def on_event(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Be told of every event published by any gateway on this Redis (this one included)."""
        self._listeners.append(listener)
        if self._subscriber is None:
            self._subscribe()

    def _subscribe(self) -> None:
        store = self
        channel = self.channel

        class Subscriber(txredisapi.SubscriberProtocol):
            def connectionMade(self) -> Any:
                ready = super().connectionMade()  # AUTH first, when there is a password
                return ready.addCallback(lambda _: self.subscribe(channel))

            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                try:
                    event = json.loads(message)
                except (TypeError, ValueError):
                    return
                for listener in list(store._listeners):
                    try:
                        listener(event)
                    except Exception:
                        log.failure("Store event listener failed")

        s = self.settings
        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = Subscriber
        factory.password = s["password"]
        factory.username = s["username"]
        factory.convertNumbers = False
        factory.startConnecting(txredisapi._makeEndpoint(s["host"], s["port"], self._timeout, self._tls()))
        self._subscriber = factory

    def _tls(self) -> Any:
        if not self.settings["tls"]:
            return False
        from twisted.internet import ssl
        return ssl.optionsForClientTLS(self.settings["host"])

    @_d
    async def publish(self, event: dict[str, Any]) -> None:
        await self.r.publish(self.channel, json.dumps(event))

    # Locks and leases (cluster) --------------------------------------------

    @_d
    async def lock(self, name: str, ttl: float) -> str | None:
        """Take the named lock for ``ttl`` seconds; its token, or None when another holds it."""
        token = secrets.token_hex(12)
        taken = await self.r.set(PREFIX + "lock:" + name, token, pexpire=max(1, int(ttl * 1000)),
                                 only_if_not_exists=True)
        return token if taken else None

    @_d
    async def unlock(self, name: str, token: str) -> None:
        await self.r.eval(_UNLOCK, [PREFIX + "lock:" + name], [token])

    @_d
    async def take_lease(self, kind: str, account: str, cap: int, ttl: float) -> str | None:
        """A slot of ``account``'s cluster-wide cap for ``ttl`` seconds (renew it before it expires);
        its id, or None when ``cap`` unexpired leases exist (0: no cap)."""
        lease = secrets.token_hex(8)
        now = self._clock()
        taken = await self.r.eval(_TAKE_LEASE, [f"{PREFIX}leases:{kind}:{account}"],
                                  [repr(now), str(cap), repr(now + ttl), lease])
        return lease if int(taken) == 1 else None

    @_d
    async def renew_lease(self, kind: str, account: str, lease: str, ttl: float) -> None:
        await self.r.execute_command("ZADD", f"{PREFIX}leases:{kind}:{account}", "XX",
                                     repr(self._clock() + ttl), lease)

    @_d
    async def release_lease(self, kind: str, account: str, lease: str) -> None:
        await self.r.zrem(f"{PREFIX}leases:{kind}:{account}", lease)
        await self.r.publish(self.channel, json.dumps({"kind": "released", "protocol": kind, "account": account}))

    # OAuth2 apps -----------------------------------------------------------

    @_d
    async def create_app(self, data: dict[str, Any]) -> dict[str, Any]:
        app = normalize_app(data)
        secret = app.pop(APP_SECRET_FIELD, None)
        service_key = app.pop("serviceKey", None)
        app_id = secrets.token_hex(6)
        created = self._clock()
        fields = {"data": json.dumps(app), "created": repr(created)}
        if secret is not None:
            fields["secret"] = self._box.encrypt(secret)
        if service_key is not None:
            fields["service_key"] = self._box.encrypt(service_key)
        await self.r.hmset(PREFIX + "app:" + app_id, fields)
        await self.r.zadd(PREFIX + "apps", created, app_id)
        return _app_view(app_id, app, created)

    @_d
    async def get_app(self, app_id: str, with_secret: bool = False) -> dict[str, Any] | None:
        row = await self.r.hgetall(PREFIX + "app:" + app_id)
        if not row:
            return None
        view = _app_view(app_id, json.loads(row["data"]), float(row["created"]))
        if with_secret:
            view[APP_SECRET_FIELD] = self._box.decrypt(row.get("secret"))
            if row.get("service_key"):
                view["serviceKey"] = self._box.decrypt(row["service_key"])
        return view

    @_d
    async def list_apps(self) -> list[dict[str, Any]]:
        ids = await self.r.zrange(PREFIX + "apps", 0, -1)
        views = []
        for app_id in ids:
            row = await self.r.hgetall(PREFIX + "app:" + app_id)
            if row:
                views.append(_app_view(app_id, json.loads(row["data"]), float(row["created"])))
        return views

    @_d
    async def delete_app(self, app_id: str) -> bool:
        users = await self.r.smembers(f"{PREFIX}app:{app_id}:accounts")
        if users:
            raise Conflict(f"OAuth2 app {app_id} is used by accounts: " + ", ".join(sorted(users)[:10]))
        removed = await self.r.delete(PREFIX + "app:" + app_id)
        await self.r.zrem(PREFIX + "apps", app_id)
        return bool(removed)

    async def _app_grant(self, app_id: str) -> dict[str, Any] | None:
        data = await self.r.hget(PREFIX + "app:" + app_id, "data")
        if data is None:
            return None
        return {"id": app_id, "grant": json.loads(data).get("grant") or "authorizationCode"}

    async def _lookup(self, account: dict[str, Any]) -> dict[str, Any]:
        """normalize_account with the app lookups it needs done first (they are Redis reads)."""
        provider = (account.get("oauth2") or {}).get("provider") if isinstance(account.get("oauth2"), dict) else None
        app = await self._app_grant(provider) if isinstance(provider, str) and provider else None
        return normalize_account(account, lambda _id: app)

    # Accounts --------------------------------------------------------------

    async def _write_account(self, account: dict[str, Any], created: float, updated: float,
                             previous_app: str | None) -> None:
        encrypted = map_secrets(account, self._box.encrypt)
        oauth = encrypted.get("oauth2")
        key = PREFIX + "account:" + account["account"]
        secrets_part: dict[str, str] = {}
        if isinstance(oauth, dict):
            for name in _OAUTH_FIELDS:
                if oauth.get(name) is not None:
                    secrets_part[name] = oauth.pop(name) if name != "expires" else repr(float(oauth.pop(name)))
        await self.r.hmset(key, {"data": json.dumps(encrypted), "created": repr(created), "updated": repr(updated)})
        await self.r.delete(key + ":oauth")
        if secrets_part:
            await self.r.hmset(key + ":oauth", secrets_part)
        app = (account.get("oauth2") or {}).get("provider")
        if previous_app and previous_app != app:
            await self.r.srem(f"{PREFIX}app:{previous_app}:accounts", account["account"])
        if app:
            await self.r.sadd(f"{PREFIX}app:{app}:accounts", account["account"])

    async def _read_account(self, account_id: str) -> tuple[dict[str, Any], float, float] | None:
        key = PREFIX + "account:" + account_id
        row = await self.r.hgetall(key)
        if not row:
            return None
        stored = json.loads(row["data"])
        oauth = await self.r.hgetall(key + ":oauth")
        if oauth and isinstance(stored.get("oauth2"), dict):
            for name in _OAUTH_FIELDS:
                if name in oauth:
                    stored["oauth2"][name] = float(oauth[name]) if name == "expires" else oauth[name]
        return stored, float(row["created"]), float(row["updated"])

    @_d
    async def create_account(self, data: dict[str, Any]) -> dict[str, Any]:
        account = await self._lookup(data if isinstance(data, dict) else {})
        now = self._clock()
        key = PREFIX + "account:" + account["account"]
        if not await self.r.hsetnx(key, "data", "{}"):
            raise Conflict(f"account {account['account']} already exists")
        await self._write_account(account, now, now, None)
        await self.r.sadd(PREFIX + "accounts", account["account"])
        await self.r.delete(PREFIX + "state:" + account["account"])
        return account_public(account, now, now)

    @_d
    async def update_account(self, account_id: str, data: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValidationError("body must be an object")
        if data.get("account", account_id) != account_id:
            raise ValidationError("account in the body does not match the account being updated")
        found = await self._read_account(account_id)
        if found is None:
            raise NotFound(f"account {account_id} not found")
        stored, created, _updated = found
        current = map_secrets(stored, self._box.decrypt)
        patch = {key: val for key, val in data.items() if key != "account"}
        if current.get("proxy") and patch.get("proxy") == mask_proxy(current["proxy"]):
            del patch["proxy"]
        account = await self._lookup(merge(current, patch))
        now = self._clock()
        await self._write_account(account, created, now, (current.get("oauth2") or {}).get("provider"))
        if isinstance(patch.get("oauth2"), dict) and patch["oauth2"].get("refreshToken"):
            await self._put_state(account_id, "connecting", None, None, now)
        return {**account_public(account, created, now), **await self._state_of(account_id)}

    @_d
    async def get_account(self, account_id: str, with_secrets: bool = False) -> dict[str, Any] | None:
        found = await self._read_account(account_id)
        if found is None:
            return None
        stored, created, updated = found
        state = await self._state_of(account_id)
        if not with_secrets:
            return {**stored_public(stored, self._box.decrypt, created, updated), **state}
        account = map_secrets(stored, self._box.decrypt)
        app = None
        if "oauth2" in account:
            row = await self.r.hgetall(PREFIX + "app:" + account["oauth2"]["provider"])
            if row:
                app = _app_view(account["oauth2"]["provider"], json.loads(row["data"]), float(row["created"]))
        return {**with_app_defaults(account, app), **state}

    @_d
    async def list_accounts(self) -> list[dict[str, Any]]:
        views = []
        for account_id in sorted(await self.r.smembers(PREFIX + "accounts")):
            found = await self._read_account(account_id)
            if found is not None:
                stored, created, updated = found
                views.append({**stored_public(stored, self._box.decrypt, created, updated),
                              **await self._state_of(account_id)})
        return views

    @_d
    async def delete_account(self, account_id: str) -> bool:
        found = await self._read_account(account_id)
        key = PREFIX + "account:" + account_id
        if found is None:
            return False
        app = (found[0].get("oauth2") or {}).get("provider")
        token_ids = await self.r.smembers(key + ":tokens")
        for token_id in token_ids:
            await self._delete_token(token_id)
        await self.r.delete([key, key + ":oauth", key + ":tokens", PREFIX + "state:" + account_id])
        await self.r.srem(PREFIX + "accounts", account_id)
        if app:
            await self.r.srem(f"{PREFIX}app:{app}:accounts", account_id)
        return True

    @_d
    async def set_oauth_tokens(self, account_id: str, access_token: str, expires: float,
                               refresh_token: str | None = None) -> None:
        key = PREFIX + "account:" + account_id
        data = await self.r.hget(key, "data")
        if data is None:
            raise NotFound(f"account {account_id} not found")
        if not isinstance(json.loads(data).get("oauth2"), dict):
            raise ValidationError(f"account {account_id} has no oauth2 settings")
        fields = {"accessToken": self._box.encrypt(access_token), "expires": repr(float(expires))}
        if refresh_token:
            fields["refreshToken"] = self._box.encrypt(refresh_token)
        await self.r.hmset(key + ":oauth", fields)

    # Account state ---------------------------------------------------------

    async def _state_of(self, account_id: str) -> dict[str, Any]:
        row = await self.r.hgetall(PREFIX + "state:" + account_id)
        if not row:
            return state_view(None, None, None, None)
        return state_view(row.get("state"), row.get("error") or None, row.get("description") or None,
                          float(row.get("time") or 0))

    async def _put_state(self, account_id: str, state: str, error: str | None, description: str | None,
                         now: float) -> None:
        key = PREFIX + "state:" + account_id
        await self.r.delete(key)
        fields = {"state": state, "time": repr(now)}
        if error is not None:
            fields["error"] = error
        if description is not None:
            fields["description"] = description
        await self.r.hmset(key, fields)

    @_d
    async def set_account_state(self, account_id: str, state: str, error: str | None = None,
                                description: str | None = None) -> None:
        if state not in ACCOUNT_STATES:
            raise ValidationError(f"unknown account state {state!r}")
        if await self.r.sismember(PREFIX + "accounts", account_id):
            await self._put_state(account_id, state, error, description, self._clock())

    # Access tokens ---------------------------------------------------------

    @_d
    async def create_token(self, account: str | None, scopes: list[str], description: str,
                           addresses: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        secret, record = new_token_record(account, scopes, description, addresses, self._clock())
        if account is not None and not await self.r.sismember(PREFIX + "accounts", account):
            raise NotFound(f"account {account} not found")
        await self.r.hmset(PREFIX + "token:" + record.id, _token_fields(record))
        await self.r.set(PREFIX + "tokenhash:" + record.hash, record.id)
        await self.r.sadd(PREFIX + "tokens", record.id)
        if account is not None:
            await self.r.sadd(f"{PREFIX}account:{account}:tokens", record.id)
        return secret, record.public()

    async def _token(self, token_id: str | None) -> TokenRecord | None:
        if not token_id:
            return None
        row = await self.r.hgetall(PREFIX + "token:" + token_id)
        return _token_record(token_id, row) if row else None

    async def _find_token(self, token_or_id: str) -> TokenRecord | None:
        if not isinstance(token_or_id, str) or not token_or_id:
            return None
        if looks_like_token(token_or_id):
            return await self._token(await self.r.get(PREFIX + "tokenhash:" + hash_token(token_or_id)))
        return await self._token(token_or_id)

    @_d
    async def verify_token(self, secret: str, scope: str, peer_ip: str | None,
                           account: str | None = None) -> tuple[TokenCheck, dict[str, Any] | None]:
        return await self._verify(secret, scope, peer_ip, account)

    async def _verify(self, secret: str, scope: str, peer_ip: str | None,
                      account: str | None) -> tuple[TokenCheck, dict[str, Any] | None]:
        if not isinstance(secret, str) or not secret:
            return TokenCheck.INVALID, None
        presented = hash_token(secret)
        record = await self._token(await self.r.get(PREFIX + "tokenhash:" + presented))
        return judge_token(record, presented, scope, peer_ip, account)

    @_d
    async def check_login(self, secret: str, scope: str, peer_ip: str | None, account: str
                          ) -> tuple[TokenCheck, AccountRecord | None, str | None]:
        check, record = await self._verify(secret, scope, peer_ip, account)
        if check is not TokenCheck.OK:
            return check, None, None
        found = await self.login_account(account)
        return check, found, (record or {}).get("id")

    @_d
    async def login_account(self, account_id: str) -> AccountRecord | None:
        """The account as logins, refreshes and connections read it (secrets in clear)."""
        doc = await self.get_account(account_id, with_secrets=True)
        return AccountRecord.from_document(doc) if doc is not None else None

    @_d
    async def app_record(self, app_id: str) -> AppRecord | None:
        doc = await self.get_app(app_id, with_secret=True)
        return AppRecord.from_document(doc) if doc is not None else None

    @_d
    async def get_token(self, token_or_id: str) -> dict[str, Any] | None:
        record = await self._find_token(token_or_id)
        return record.public() if record is not None and not record.revoked else None

    @_d
    async def list_tokens(self, account: str | None = None) -> list[dict[str, Any]]:
        key = PREFIX + "tokens" if account is None else f"{PREFIX}account:{account}:tokens"
        records = [r for r in [await self._token(i) for i in await self.r.smembers(key)] if r and not r.revoked]
        return [r.public() for r in sorted(records, key=lambda r: (r.created, r.id))]

    async def _delete_token(self, token_id: str) -> bool:
        record = await self._token(token_id)
        if record is None:
            return False
        await self.r.delete([PREFIX + "token:" + token_id, PREFIX + "tokenhash:" + record.hash])
        await self.r.srem(PREFIX + "tokens", token_id)
        if record.account is not None:
            await self.r.srem(f"{PREFIX}account:{record.account}:tokens", token_id)
        return True

    @_d
    async def revoke_token(self, token_or_id: str) -> bool:
        record = await self._find_token(token_or_id)
        return record is not None and await self._delete_token(record.id)

    # Settings --------------------------------------------------------------

    @_d
    async def get_settings(self, name: str) -> dict[str, Any] | None:
        raw = await self.r.get(PREFIX + "settings:" + name)
        return json.loads(raw) if raw is not None else None

    @_d
    async def put_settings(self, name: str, data: dict[str, Any]) -> None:
        await self.r.set(PREFIX + "settings:" + name, json.dumps(data))
        await self.r.publish(self.channel, json.dumps({"kind": "settings", "name": name}))

    # Hosted OAuth2 authorization -------------------------------------------

    @_d
    async def create_auth_request(self, data: dict[str, Any], verifier: str, ttl: float) -> str:
        request_id = secrets.token_urlsafe(24)
        key = PREFIX + "authreq:" + request_id
        await self.r.hmset(key, {"data": json.dumps(data), "verifier": self._box.encrypt(verifier),
                                 "created": repr(self._clock()), "opened": "0", "used": "0"})
        await self.r.expire(key, max(1, int(ttl) + 1))
        return request_id

    @_d
    async def take_auth_request(self, request_id: str, step: str, ttl: float) -> dict[str, Any]:
        if step not in ("opened", "used"):
            raise ValueError(step)
        key = PREFIX + "authreq:" + request_id
        row = await self.r.hgetall(key)
        if not row or float(row["created"]) < self._clock() - ttl:
            raise NotFound("this authorization link is unknown or has expired; ask for a new one")
        if int(await self.r.hincr(key, step)) != 1:  # atomic: only the first one sees 1
            raise Conflict("this authorization link was used already; ask for a new one")
        return {**json.loads(row["data"]), "verifier": self._box.decrypt(row["verifier"]),
                "created": float(row["created"])}

    @_d
    async def state_key(self) -> bytes:
        key = PREFIX + "settings:oauth2.state_key"
        for _ in range(2):
            raw = await self.r.get(key)
            if raw is not None:
                try:
                    return base64.urlsafe_b64decode(self._box.decrypt(json.loads(raw)["key"]))
                except (SecretDecryptError, ValueError, KeyError, TypeError):
                    await self.r.delete(key)
            fresh = secrets.token_bytes(32)
            document = json.dumps({"key": self._box.encrypt(base64.urlsafe_b64encode(fresh).decode())})
            if await self.r.set(key, document, only_if_not_exists=True):
                return fresh
        raise StoreError("cannot make the OAuth2 state key")

    # Copy (gateway store copy) ----------------------------------------------

    @_d
    async def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every record in the backend-neutral form `gateway store copy` moves (ciphertexts as stored)."""
        apps = []
        for app_id in await self.r.zrange(PREFIX + "apps", 0, -1):
            row = await self.r.hgetall(PREFIX + "app:" + app_id)
            if row:
                apps.append({"id": app_id, "data": json.loads(row["data"]), "secret": row.get("secret"),
                             "service_key": row.get("service_key"), "created": float(row["created"])})
        accounts, states = [], []
        for account_id in sorted(await self.r.smembers(PREFIX + "accounts")):
            found = await self._read_account(account_id)
            if found is not None:
                accounts.append({"account": account_id, "data": found[0], "created": found[1], "updated": found[2]})
            row = await self.r.hgetall(PREFIX + "state:" + account_id)
            if row:
                states.append({"account": account_id, "state": row["state"], "error": row.get("error"),
                               "description": row.get("description"), "time": float(row["time"])})
        tokens = [_token_fields(r, for_dump=True) for r in
                  sorted([t for t in [await self._token(i) for i in await self.r.smembers(PREFIX + "tokens")] if t],
                         key=lambda r: r.id)]
        settings = []
        cursor = 0
        names = []
        while True:
            cursor, keys = await self.r.scan(cursor, PREFIX + "settings:*", 500)
            names += [k[len(PREFIX + "settings:"):] for k in keys]
            if int(cursor) == 0:
                break
        for name in sorted(set(names)):
            raw = await self.r.get(PREFIX + "settings:" + name)
            if raw is not None:
                settings.append({"name": name, "data": json.loads(raw)})
        return {"apps": apps, "accounts": accounts, "tokens": tokens, "settings": settings, "states": states}

    @_d
    async def load(self, dump: dict[str, list[dict[str, Any]]]) -> None:
        """Write records from :meth:`dump` (of any backend): existing ones with the same id are replaced."""
        for app in dump.get("apps", []):
            fields = {"data": json.dumps(app["data"]), "created": repr(float(app["created"]))}
            for name in ("secret", "service_key"):
                if app.get(name):
                    fields[name] = app[name]
            await self.r.delete(PREFIX + "app:" + app["id"])
            await self.r.hmset(PREFIX + "app:" + app["id"], fields)
            await self.r.zadd(PREFIX + "apps", float(app["created"]), app["id"])
        for account in dump.get("accounts", []):
            stored = json.loads(json.dumps(account["data"]))
            key = PREFIX + "account:" + account["account"]
            oauth = stored.get("oauth2")
            part: dict[str, str] = {}
            if isinstance(oauth, dict):
                for name in _OAUTH_FIELDS:
                    if oauth.get(name) is not None:
                        value = oauth.pop(name)
                        part[name] = repr(float(value)) if name == "expires" else value
            await self.r.delete([key, key + ":oauth"])
            await self.r.hmset(key, {"data": json.dumps(stored), "created": repr(float(account["created"])),
                                     "updated": repr(float(account["updated"]))})
            if part:
                await self.r.hmset(key + ":oauth", part)
            await self.r.sadd(PREFIX + "accounts", account["account"])
            if isinstance(oauth, dict) and oauth.get("provider"):
                await self.r.sadd(f"{PREFIX}app:{oauth['provider']}:accounts", account["account"])
        for state in dump.get("states", []):
            await self._put_state(state["account"], state["state"], state.get("error"), state.get("description"),
                                  float(state["time"]))
        for token in dump.get("tokens", []):
            record = _token_from_dump(token)
            await self.r.hmset(PREFIX + "token:" + record.id, _token_fields(record))
            await self.r.set(PREFIX + "tokenhash:" + record.hash, record.id)
            await self.r.sadd(PREFIX + "tokens", record.id)
            if record.account is not None:
                await self.r.sadd(f"{PREFIX}account:{record.account}:tokens", record.id)
        for setting in dump.get("settings", []):
            await self.r.set(PREFIX + "settings:" + setting["name"], json.dumps(setting["data"]))


def _app_view(app_id: str, app: dict[str, Any], created: float) -> dict[str, Any]:
    from gateway.store.base import iso_utc

    return {"id": app_id, **app_public(app), "created": iso_utc(created)}


def _token_fields(record: TokenRecord, for_dump: bool = False) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": record.id, "hash": record.hash, "account": record.account if record.account is not None else "",
        "scopes": json.dumps(list(record.scopes)), "description": record.description,
        "created": repr(record.created), "addresses": json.dumps(list(record.addresses)),
        "revoked": "1" if record.revoked else "0",
    }
    if for_dump:
        return {"id": record.id, "hash": record.hash, "account": record.account, "scopes": list(record.scopes),
                "description": record.description, "created": record.created,
                "addresses": list(record.addresses), "revoked": record.revoked}
    return fields


def _token_record(token_id: str, row: dict[str, Any]) -> TokenRecord:
    return TokenRecord(id=token_id, hash=row["hash"], account=row.get("account") or None,
                       scopes=tuple(json.loads(row["scopes"])), description=row["description"],
                       created=float(row["created"]), addresses=tuple(json.loads(row.get("addresses") or "[]")),
                       revoked=row.get("revoked") == "1")


def _token_from_dump(token: dict[str, Any]) -> TokenRecord:
    return TokenRecord(id=token["id"], hash=token["hash"], account=token.get("account"),
                       scopes=tuple(token["scopes"]), description=token["description"],
                       created=float(token["created"]), addresses=tuple(token.get("addresses") or ()),
                       revoked=bool(token.get("revoked")))
