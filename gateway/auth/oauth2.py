"""OAuth2 access tokens for upstream logins: refreshed with authlib, one refresh per account at a time."""

from __future__ import annotations

import time
from typing import Any, Callable

from authlib.integrations.requests_client import OAuth2Session
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class RefreshError(Exception):
    """The provider would not give an access token; the message is safe to show to the client."""


def _refresh_blocking(app: dict[str, Any], refresh_token: str, timeout: float,
                      proxies: dict[str, str] | None) -> dict[str, Any]:
    """One refresh_token grant with authlib (runs in a worker thread)."""
    session = OAuth2Session(
        client_id=app["clientId"],
        client_secret=app.get("clientSecret"),
        token_endpoint_auth_method="client_secret_post",
        scope=" ".join(app.get("scopes") or []) or None,
    )
    if proxies:
        session.proxies.update(proxies)
    try:
        return dict(session.refresh_token(app["tokenUrl"], refresh_token=refresh_token, timeout=timeout))
    except Exception as e:
        error = getattr(e, "error", None)
        description = getattr(e, "description", None)
        if error:
            text = f"{error}: {description}" if description else str(error)
        else:
            text = type(e).__name__
        raise RefreshError(f"OAuth2 token refresh failed: {text}") from None
    finally:
        session.close()


class TokenSource:
    """Hands out valid access tokens, refreshing before expiry, one refresh in flight per account."""

    def __init__(self, store: Any, reactor: Any, *, margin: float = 120.0, timeout: float = 15.0,
                 clock: Callable[[], float] = time.time,
                 proxies_for: Callable[[dict[str, Any], str], dict[str, str] | None] | None = None) -> None:
        self._store = store
        self._reactor = reactor
        self._margin = margin
        self._timeout = timeout
        self._clock = clock
        self._proxies_for = proxies_for
        self._inflight: dict[str, list[defer.Deferred[str]]] = {}
        self.refreshes = 0

    async def access_token(self, account: dict[str, Any], force: bool = False) -> str:
        """A usable access token for ``account`` (a record with secrets)."""
        oauth = account.get("oauth2") or {}
        token = oauth.get("accessToken")
        expires = oauth.get("expires") or 0
        if token and not force and float(expires) - self._margin > self._clock():
            return str(token)
        return await self._refresh_shared(account["account"])

    def _refresh_shared(self, account_id: str) -> defer.Deferred[str]:
        waiters = self._inflight.get(account_id)
        d: defer.Deferred[str] = defer.Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[account_id] = [d]
        run = defer.Deferred.fromCoroutine(self._refresh(account_id))

        def settle(result: Any) -> None:
            for waiter in self._inflight.pop(account_id, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        run.addBoth(settle)
        return d

    async def _refresh(self, account_id: str) -> str:
        # Re-read under the single flight: another gateway node may have refreshed it already.
        account = await self._store.get_account(account_id, with_secrets=True)
        if account is None:
            raise RefreshError("account no longer exists")
        oauth = account.get("oauth2") or {}
        refresh_token = oauth.get("refreshToken")
        if not refresh_token:
            raise RefreshError("account has no OAuth2 refresh token")
        app = await self._store.get_app(oauth.get("provider"), with_secret=True)
        if app is None or not app.get("tokenUrl"):
            raise RefreshError("account's OAuth2 app is missing or has no token URL")
        # (account, token URL): the URL's host decides whether no_proxy applies
        proxies = self._proxies_for(account, app["tokenUrl"]) if self._proxies_for else None
        started = self._clock()
        try:
            token = await threads.deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(),
                _refresh_blocking, app, refresh_token, self._timeout, proxies,
            )
        except RefreshError as e:
            log.warn("OAuth2 refresh failed for account {account}: {reason}", account=account_id, reason=str(e))
            raise
        access = token.get("access_token")
        if not access:
            raise RefreshError("OAuth2 token refresh failed: no access_token in the response")
        expires = float(token.get("expires_at") or started + float(token.get("expires_in") or 3600))
        await self._store.set_oauth_tokens(account_id, access, expires, token.get("refresh_token"))
        self.refreshes += 1
        log.info("OAuth2 access token refreshed for account {account}, valid {seconds:.0f} s",
                 account=account_id, seconds=expires - self._clock())
        return str(access)
