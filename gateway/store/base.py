"""Store contract: errors, the token record, the sync `Store` protocol and the async facade.

Every backend (SQLite now, Redis later) implements `Store` with blocking
methods. The data plane and the admin API use `AsyncStore`, which runs those
calls one at a time in a dedicated single-thread pool and returns Deferreds;
the CLI uses a sync store directly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.auth.tokens import TokenCheck

log = Logger()

T = TypeVar("T")


class StoreError(Exception):
    """Base class of errors the store reports to callers; the message is safe to show."""


class ValidationError(StoreError, ValueError):
    """Input rejected: the message names the bad field."""


class NotFound(StoreError, LookupError):
    """A referenced account, app or token does not exist."""


class Conflict(StoreError):
    """The record already exists, or is still in use."""


def iso_utc(timestamp: float) -> str:
    """Format a POSIX timestamp as ISO 8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.000Z."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TokenRecord:
    """One stored access token. Only the SHA-256 of the secret is kept."""

    id: str
    hash: str
    account: str | None
    scopes: tuple[str, ...]
    description: str
    created: float
    addresses: tuple[str, ...] = ()
    revoked: bool = False

    def public(self) -> dict[str, Any]:
        """The view shown by the API and CLI: no hash, no secret."""
        view: dict[str, Any] = {
            "id": self.id,
            "account": self.account,
            "description": self.description,
            "scopes": list(self.scopes),
            "created": iso_utc(self.created),
            "restrictions": {"addresses": list(self.addresses)} if self.addresses else None,
        }
        return view

    def check_view(self) -> dict[str, Any]:
        """The mapping `gateway.auth.tokens.check_token` reads."""
        return {
            "hash": self.hash,
            "scopes": self.scopes,
            "revoked": self.revoked,
            "restrictions": {"addresses": list(self.addresses)},
        }


def new_token_record(account: str | None, scopes: list[str], description: str,
                     addresses: list[str] | None, now: float) -> tuple[str, TokenRecord]:
    """Validate a token request and make its record; (secret, record). Every backend stores the record."""
    from gateway.auth.tokens import SCOPES, hash_token, new_token, validate_cidrs, validate_scopes
    from gateway.store.validation import validate_account_id

    try:
        scope_list = validate_scopes(scopes)
        cidrs = validate_cidrs(addresses)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if not isinstance(description, str) or not description.strip():
        raise ValidationError("description is required")
    if len(description) > 1024:
        raise ValidationError("description is longer than 1024 characters")
    if account is None and scope_list != ["api"]:
        raise ValidationError("a token without an account must have exactly the scope api "
                              f"(scopes: {', '.join(SCOPES)})")
    if account is not None:
        validate_account_id(account)
    import secrets as _secrets

    secret = new_token()
    record = TokenRecord(id=_secrets.token_hex(8), hash=hash_token(secret), account=account,
                         scopes=tuple(scope_list), description=description, created=now,
                         addresses=tuple(cidrs))
    return secret, record


def judge_token(record: TokenRecord | None, presented_hash: str, scope: str, peer_ip: str | None,
                account: str | None) -> tuple[TokenCheck, dict[str, Any] | None]:
    """A presented token against its stored record (None: unknown): (check, public record or None)."""
    from gateway.auth.tokens import check_token

    if record is None:
        return TokenCheck.INVALID, None
    if account is not None and record.account != account:
        return TokenCheck.INVALID, None
    if record.account is None and scope != "api":
        return TokenCheck.INVALID, None
    result = check_token(record.check_view(), presented_hash, scope, peer_ip)
    known = result is TokenCheck.OK or result is TokenCheck.DENIED_ADDRESS
    return result, (record.public() if known else None)


def state_view(state: str | None, error: str | None, description: str | None, time: float | None
               ) -> dict[str, Any]:
    """`state` and `lastError` of an account view, from what a backend keeps (None: nothing yet)."""
    if state is None:
        return {"state": "connecting", "lastError": None}
    last = None
    if error is not None:
        last = {"error": error, "description": description, "time": iso_utc(float(time or 0))}
    return {"state": state, "lastError": last}


class Store(Protocol):
    """The blocking store interface every backend implements."""

    def create_app(self, data: dict[str, Any]) -> dict[str, Any]: ...
    def get_app(self, app_id: str, with_secret: bool = False) -> dict[str, Any] | None: ...
    def list_apps(self) -> list[dict[str, Any]]: ...
    def delete_app(self, app_id: str) -> bool: ...
    def create_account(self, data: dict[str, Any]) -> dict[str, Any]: ...
    def update_account(self, account_id: str, data: dict[str, Any]) -> dict[str, Any]: ...
    def get_account(self, account_id: str, with_secrets: bool = False) -> dict[str, Any] | None: ...
    def list_accounts(self) -> list[dict[str, Any]]: ...
    def delete_account(self, account_id: str) -> bool: ...
    def set_oauth_tokens(self, account_id: str, access_token: str, expires: float,
                         refresh_token: str | None = None) -> None: ...
    def create_token(self, account: str | None, scopes: list[str], description: str,
                     addresses: list[str] | None = None) -> tuple[str, dict[str, Any]]: ...
    def verify_token(self, secret: str, scope: str, peer_ip: str | None,
                     account: str | None = None) -> tuple[TokenCheck, dict[str, Any] | None]: ...
    def get_token(self, token_or_id: str) -> dict[str, Any] | None: ...
    def list_tokens(self, account: str | None = None) -> list[dict[str, Any]]: ...
    def revoke_token(self, token_or_id: str) -> bool: ...
    def get_settings(self, name: str) -> dict[str, Any] | None: ...
    def put_settings(self, name: str, data: dict[str, Any]) -> None: ...
    def set_account_state(self, account_id: str, state: str, error: str | None = None,
                          description: str | None = None) -> None: ...
    def create_auth_request(self, data: dict[str, Any], verifier: str, ttl: float) -> str: ...
    def take_auth_request(self, request_id: str, step: str, ttl: float) -> dict[str, Any]: ...
    def state_key(self) -> bytes: ...
    def login_account(self, account_id: str) -> Any: ...
    def app_record(self, app_id: str) -> Any: ...
    def dump(self) -> dict[str, list[dict[str, Any]]]: ...
    def load(self, dump: dict[str, list[dict[str, Any]]]) -> None: ...
    def close(self) -> None: ...


class Immediate:
    """The store contract over a blocking store, answered at once (already-fired Deferreds): for the CLI,
    which has the SQLite file to itself for one command and needs neither a worker nor a reactor."""

    cluster = False

    def __init__(self, sync_store: Store) -> None:
        self.sync = sync_store

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)

        def call(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.maybeDeferred(method, *args, **kwargs)
        return call

    def close(self) -> defer.Deferred[None]:
        self.sync.close()
        return defer.succeed(None)


class AsyncStore:
    """Deferred-returning facade over a sync `Store`, one worker thread, calls in order."""

    def __init__(self, sync_store: Store, reactor: Any) -> None:
        self.sync = sync_store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="gateway-store")
        self._started = False
        self._trigger: Any = None

    def start(self) -> None:
        """Start the worker thread and stop it again when the reactor shuts down."""
        if self._started:
            return
        self._pool.start()
        self._started = True
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Stop the worker thread (waits for the call in progress). Safe to call twice."""
        if not self._started:
            return
        self._started = False
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # already fired: we are being called from that trigger
            self._trigger = None
        self._pool.stop()

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        if not self._started:
            self.start()
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    # OAuth2 apps
    def create_app(self, data: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        return self._call(self.sync.create_app, data)

    def get_app(self, app_id: str, with_secret: bool = False) -> defer.Deferred[dict[str, Any] | None]:
        return self._call(self.sync.get_app, app_id, with_secret=with_secret)

    def list_apps(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self._call(self.sync.list_apps)

    def delete_app(self, app_id: str) -> defer.Deferred[bool]:
        return self._call(self.sync.delete_app, app_id)

    # Accounts
    def create_account(self, data: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        return self._call(self.sync.create_account, data)

    def update_account(self, account_id: str, data: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        return self._call(self.sync.update_account, account_id, data)

    def get_account(self, account_id: str,
                    with_secrets: bool = False) -> defer.Deferred[dict[str, Any] | None]:
        return self._call(self.sync.get_account, account_id, with_secrets=with_secrets)

    def list_accounts(self) -> defer.Deferred[list[dict[str, Any]]]:
        return self._call(self.sync.list_accounts)

    def delete_account(self, account_id: str) -> defer.Deferred[bool]:
        return self._call(self.sync.delete_account, account_id)

    def set_oauth_tokens(self, account_id: str, access_token: str, expires: float,
                         refresh_token: str | None = None) -> defer.Deferred[None]:
        return self._call(self.sync.set_oauth_tokens, account_id, access_token, expires, refresh_token)

    # Access tokens
    def create_token(self, account: str | None, scopes: list[str], description: str,
                     addresses: list[str] | None = None) -> defer.Deferred[tuple[str, dict[str, Any]]]:
        return self._call(self.sync.create_token, account, scopes, description, addresses)

    def verify_token(self, secret: str, scope: str, peer_ip: str | None,
                     account: str | None = None
                     ) -> defer.Deferred[tuple[TokenCheck, dict[str, Any] | None]]:
        return self._call(self.sync.verify_token, secret, scope, peer_ip, account)

    def check_login(self, secret: str, scope: str, peer_ip: str | None, account: str
                    ) -> defer.Deferred[tuple[TokenCheck, Any, str | None]]:
        """A client login's token check and, when it passes, the account as an `AccountRecord`
        (None when it does not exist) and the token's public id, in one trip to the store thread."""
        def both() -> tuple[TokenCheck, Any, str | None]:
            check, record = self.sync.verify_token(secret, scope, peer_ip, account)
            if check is not TokenCheck.OK:
                return check, None, None
            return check, self.sync.login_account(account), (record or {}).get("id")
        return self._call(both)

    def login_account(self, account_id: str) -> defer.Deferred[Any]:
        """The account as a typed `AccountRecord` (secrets in clear), or None."""
        return self._call(self.sync.login_account, account_id)

    def app_record(self, app_id: str) -> defer.Deferred[Any]:
        """The OAuth2 app as a typed `AppRecord` (secrets in clear), or None."""
        return self._call(self.sync.app_record, app_id)

    def get_token(self, token_or_id: str) -> defer.Deferred[dict[str, Any] | None]:
        return self._call(self.sync.get_token, token_or_id)

    def list_tokens(self, account: str | None = None) -> defer.Deferred[list[dict[str, Any]]]:
        return self._call(self.sync.list_tokens, account)

    def revoke_token(self, token_or_id: str) -> defer.Deferred[bool]:
        return self._call(self.sync.revoke_token, token_or_id)

    # Settings
    def get_settings(self, name: str) -> defer.Deferred[dict[str, Any] | None]:
        return self._call(self.sync.get_settings, name)

    # Account state and pending authorizations
    def set_account_state(self, account_id: str, state: str, error: str | None = None,
                          description: str | None = None) -> defer.Deferred[None]:
        return self._call(self.sync.set_account_state, account_id, state, error, description)

    def create_auth_request(self, data: dict[str, Any], verifier: str, ttl: float) -> defer.Deferred[str]:
        return self._call(self.sync.create_auth_request, data, verifier, ttl)

    def take_auth_request(self, request_id: str, step: str, ttl: float) -> defer.Deferred[dict[str, Any]]:
        return self._call(self.sync.take_auth_request, request_id, step, ttl)

    def state_key(self) -> defer.Deferred[bytes]:
        return self._call(self.sync.state_key)

    # Copy
    def dump(self) -> defer.Deferred[dict[str, list[dict[str, Any]]]]:
        return self._call(self.sync.dump)

    def load(self, dump: dict[str, list[dict[str, Any]]]) -> defer.Deferred[None]:
        return self._call(self.sync.load, dump)

    # Cluster: one gateway on a SQLite file is the whole cluster
    cluster = False

    def lock(self, name: str, ttl: float) -> defer.Deferred[str | None]:
        """Locks matter between gateways; alone, every lock is free (the caller's own single flight holds)."""
        return defer.succeed("local")

    def unlock(self, name: str, token: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def on_event(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """No other gateway can change what this one caches: nothing to be told."""

    def publish(self, event: dict[str, Any]) -> defer.Deferred[None]:
        """No other gateway to tell."""
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        """Stop the worker, then fold SQLite's write-ahead log into the file (a clean copy)."""
        self.stop()
        self.sync.close()
        return defer.succeed(None)

    def put_settings(self, name: str, data: dict[str, Any]) -> defer.Deferred[None]:
        return self._call(self.sync.put_settings, name, data)
