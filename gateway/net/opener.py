"""Open an authenticated upstream connection for an account: connect, TLS, token, login.

IMAP and SMTP differ only in their :class:`Leg`: which settings, default ports,
protocol class and login routine. Everything else (where the server comes from,
credentials, one forced token refresh when the provider refuses a cached token,
error texts) is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gateway.auth.oauth2 import RefreshError
from gateway.metrics import UPSTREAM_CONNECT_SECONDS, UPSTREAM_LOGIN_SECONDS
from gateway.metrics import UPSTREAM_TLS_HANDSHAKES as TLS_HANDSHAKES
from gateway.net.connector import ProxyError, Route
from gateway.store.records import AccountRecord, AppRecord, Server
from gateway.net.upstream import (Credentials, OAuth2Unavailable, ProviderThrottled, ResponseReader,
                                  UpstreamAuthError, UpstreamError)

log = Logger()



@dataclass(frozen=True)
class Target:
    host: str
    port: int
    secure: bool  # True: implicit TLS; False: STARTTLS (never plaintext)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Leg:
    """What differs between the IMAP and the SMTP upstream."""

    name: str                      # "imap" | "smtp": the account's settings key
    protocol: type[ResponseReader]
    tls_port: int
    starttls_port: int
    password_mechanism: str        # what Credentials.mechanism says for password accounts
    # login(core, proto, creds, starttls_options, route, client) -> whatever the leg's relay needs
    login: Callable[[Any, Any, Credentials, Any, Route, "ClientAddress | None"], Awaitable[Any]]


@dataclass(frozen=True)
class ClientAddress:
    """The client a connection is opened for (``upstream.forward_client_ip`` tells the provider)."""

    host: str
    port: int


@dataclass
class Opened:
    protocol: Any
    result: Any                    # IMAP: capabilities (bytes); SMTP: SMTPLogin
    target: Target
    route: Route


async def target_for(core: Any, account: AccountRecord, leg: Leg) -> Target:
    """The account's server for ``leg``: its own settings, else its OAuth2 app's."""
    server = account.server(leg.name) or Server()
    if not server.host and account.oauth2 is not None:
        app: AppRecord | None = await core.store.app_record(account.oauth2.app)
        fallback = (app.server(leg.name) if app is not None else None) or Server()
        server = Server(host=fallback.host, port=server.port or fallback.port,
                        secure=server.secure if server.secure is not None else fallback.secure)
    if not server.host:
        raise UpstreamError(f"account has no {leg.name.upper()} server configured")
    port = server.port or 0
    if server.secure is None:  # unsaid: implicit TLS, except on the leg's STARTTLS port
        secure = port != leg.starttls_port
    else:
        secure = server.secure
    return Target(server.host, port or (leg.tls_port if secure else leg.starttls_port), secure)


async def credentials_for(core: Any, account: AccountRecord, leg: Leg, refused: str | None = None) -> Credentials:
    """What to log in upstream with; ``refused``: the access token the server just refused (a new one
    is needed, not that one again)."""
    if account.oauth2 is not None:
        try:
            token = await core.tokens.access_token(account, force=refused is not None, stale=refused)
        except RefreshError as e:
            raise OAuth2Unavailable(str(e)) from None
        return Credentials("XOAUTH2", account.oauth2.user or account.email, token)
    server = account.server(leg.name)
    if server is None or not server.password:
        raise UpstreamError(f"account has neither OAuth2 nor an {leg.name.upper()} password")
    return Credentials(leg.password_mechanism, server.user or account.email, server.password)


async def open_upstream(core: Any, account: AccountRecord, leg: Leg,
                        client: ClientAddress | None = None) -> Opened:
    """Connect, verify TLS, log in upstream; one forced token refresh if the provider refuses ours.

    The account's state follows: ``connected`` after a login, ``connectError`` (with the
    reason as ``lastError``) when the server could not be reached or refused the login. OAuth2
    trouble is recorded where it happens (the token source)."""
    try:
        opened = await _open(core, account, leg, client)
    except OAuth2Unavailable:
        raise
    except UpstreamError as e:
        if not isinstance(e, ProviderThrottled):
            await _note_state(core, account, "connectError", e.code, str(e))
        raise
    await _note_state(core, account, "connected")
    return opened


async def _note_state(core: Any, account: AccountRecord, state: str, error: str | None = None,
                      description: str | None = None) -> None:
    """Record the account's state when it changed (a login that changes nothing writes nothing)."""
    last = account.last_error
    if account.state == state and (last.error if last else None) == error and \
            (last.description if last else None) == description:
        return
    try:
        await core.store.set_account_state(account.id, state, error, description)
    except Exception as e:  # the store's trouble must not fail a login that worked
        log.warn("Cannot record the state of account {account}: {why}", account=account.id, why=str(e))


async def _open(core: Any, account: AccountRecord, leg: Leg, client: ClientAddress | None) -> Opened:
    target = await target_for(core, account, leg)
    refused: str | None = None
    while True:
        creds = await credentials_for(core, account, leg, refused)
        try:
            return await _attempt(core, account, target, creds, leg, client)
        except UpstreamAuthError:
            if creds.mechanism != "XOAUTH2" or refused is not None:
                raise
            refused = creds.secret
            log.info("Upstream refused the cached access token of {account}; refreshing once",
                     account=account.id)


async def _attempt(core: Any, account: AccountRecord, target: Target, creds: Credentials,
                   leg: Leg, client: ClientAddress | None) -> Opened:
    factory = Factory.forProtocol(leg.protocol)
    factory.noisy = False  # no "Starting factory" log line per upstream connection
    clock = core.reactor.seconds
    started = clock()
    connect_seconds = UPSTREAM_CONNECT_SECONDS.labels(leg.name, "fail")
    try:
        proto, route = await core.connector.connect(
            target.host, target.port, factory, tls=target.secure, account=account.routing, purpose=leg.name)
    except ProxyError as e:  # "proxy: SOCKS5 authentication refused" etc., safe to show
        connect_seconds.observe(clock() - started)
        raise UpstreamError(str(e)) from None
    except (ConnectError, DNSLookupError, TxTimeoutError) as e:
        connect_seconds.observe(clock() - started)
        raise UpstreamError(f"cannot connect to {target}: {_reason(e)}") from None
    connected = clock()
    UPSTREAM_CONNECT_SECONDS.labels(leg.name, "ok").observe(connected - started)
    login_seconds = UPSTREAM_LOGIN_SECONDS.labels(leg.name, "fail")
    starttls = None if target.secure else core.connector.tls_options(target.host)
    try:
        result = await leg.login(core, proto, creds, starttls, route, client)
    except (UpstreamError, defer.CancelledError):
        login_seconds.observe(clock() - connected)
        proto.transport.abortConnection()
        raise
    except Exception as e:  # TLS verification errors arrive as connection loss or SSL errors
        login_seconds.observe(clock() - connected)
        proto.transport.abortConnection()
        raise UpstreamError(f"upstream TLS or protocol error with {target}: {_reason(e)}") from None
    UPSTREAM_LOGIN_SECONDS.labels(leg.name, "ok").observe(clock() - connected)
    _remember_tls_session(core, target, proto, leg)
    return Opened(proto, result, target, route)


def _remember_tls_session(core: Any, target: Target, proto: Any, leg: Leg) -> None:
    """Keep the connection's TLS session for the host's next connection; count resumptions."""
    handle = getattr(proto.transport, "getHandle", None)
    options = core.connector.tls_options(target.host)
    remember = getattr(options, "remember", None)
    if handle is None or remember is None:
        return
    resumed = remember(handle())
    TLS_HANDSHAKES.labels(leg.name, "yes" if resumed else "no").inc()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]
