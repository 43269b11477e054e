"""Open an authenticated upstream IMAP connection for an account (connect, TLS, token, login)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gateway.auth.oauth2 import RefreshError
from gateway.imap.upstream import Credentials, UpstreamAuthError, UpstreamError, UpstreamIMAP, login
from gateway.net.connector import Route

log = Logger()


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    secure: bool  # True: implicit TLS; False: STARTTLS (never plaintext)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Opened:
    protocol: UpstreamIMAP
    capabilities: bytes
    target: Target
    route: Route


async def imap_target(core: Any, account: dict[str, Any]) -> Target:
    """The account's IMAP server: its own settings, else its OAuth2 app's."""
    settings = account.get("imap") or {}
    if not settings.get("host") and account.get("oauth2"):
        app = await core.store.get_app(account["oauth2"].get("provider"))
        settings = {**((app or {}).get("imap") or {}), **settings}
    if not settings.get("host"):
        raise UpstreamError("account has no IMAP server configured")
    secure = bool(settings.get("secure", True))
    port = int(settings.get("port") or (993 if secure else 143))
    return Target(str(settings["host"]), port, secure)


async def open_imap(core: Any, account: dict[str, Any]) -> Opened:
    """Connect, verify TLS, log in upstream; one forced token refresh if the provider refuses ours."""
    target = await imap_target(core, account)
    oauth = account.get("oauth2")
    forced = False
    while True:
        if oauth:
            try:
                token = await core.tokens.access_token(account, force=forced)
            except RefreshError as e:
                raise UpstreamError(str(e)) from None
            user = (oauth.get("auth") or {}).get("user") or account.get("email") or ""
            creds = Credentials("XOAUTH2", user, token)
        else:
            auth = (account.get("imap") or {}).get("auth") or {}
            if not auth.get("pass"):
                raise UpstreamError("account has neither OAuth2 nor an IMAP password")
            creds = Credentials("LOGIN", auth.get("user") or account.get("email") or "", auth["pass"])
        try:
            return await _attempt(core, account, target, creds)
        except UpstreamAuthError:
            if not oauth or forced:
                raise
            forced = True
            log.info("Upstream refused the cached access token of {account}; refreshing once",
                     account=account["account"])


async def _attempt(core: Any, account: dict[str, Any], target: Target, creds: Credentials) -> Opened:
    factory = Factory.forProtocol(UpstreamIMAP)
    try:
        proto, route = await core.connector.connect(
            target.host, target.port, factory, tls=target.secure, account=account)
    except (ConnectError, DNSLookupError, TxTimeoutError) as e:
        raise UpstreamError(f"cannot connect to {target}: {_reason(e)}") from None
    starttls = None if target.secure else core.connector.tls_options(target.host)
    try:
        caps = await login(proto, creds, starttls_options=starttls, gateway_id=core.imap_id)
    except (UpstreamError, defer.CancelledError):
        proto.transport.abortConnection()
        raise
    except Exception as e:  # TLS verification errors arrive as connection loss or SSL errors
        proto.transport.abortConnection()
        raise UpstreamError(f"upstream TLS or protocol error with {target}: {_reason(e)}") from None
    return Opened(proto, caps, target, route)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]
