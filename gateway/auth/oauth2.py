"""OAuth2 access tokens for upstream logins: refreshed with authlib, one refresh per account at a time.

The token request goes out on Twisted's HTTP client (gateway.auth.http), not
in a worker thread: a slow provider holds no thread another account needs.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.http import HTTPError, post_form
from gateway.metrics import OAUTH2_REFRESH_SECONDS, OAUTH2_REFRESHES

log = Logger()


class RefreshError(Exception):
    """The provider would not give an access token; the message is safe to show to the client."""


async def refresh_grant(reactor: Any, connector: Any, app: dict[str, Any], account: dict[str, Any],
                        refresh_token: str, timeout: float) -> dict[str, Any]:
    """One refresh_token grant: the request prepared and the answer read with authlib, sent on
    Twisted's HTTP client through the account's route, the whole exchange within ``timeout``."""
    scope = " ".join(app.get("scopes") or []) or None
    body = prepare_token_request("refresh_token", refresh_token=refresh_token, scope=scope)
    url, headers, body = ClientAuth(app["clientId"], app.get("clientSecret"), "client_secret_post").prepare(
        "POST", app["tokenUrl"], {}, body)
    try:
        response = await post_form(reactor, connector, url, body, timeout=timeout, account=account,
                                   headers=headers)
    except HTTPError as e:
        raise RefreshError(f"OAuth2 token refresh failed: {e}") from None
    try:
        data = json.loads(response.body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise RefreshError(f"OAuth2 token refresh failed: HTTP {response.status}: {_snippet(response.body)}")
    if data.get("error") or response.status >= 400:
        error = str(data.get("error") or f"HTTP {response.status}")
        description = data.get("error_description")
        raise RefreshError(f"OAuth2 token refresh failed: {error}: {description}" if description
                           else f"OAuth2 token refresh failed: {error}")
    return dict(OAuth2Token.from_dict(data))


def _snippet(body: bytes) -> str:
    """The start of a non-JSON answer (an HTML error page), printable, for the reason text."""
    text = body[:300].decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:120] or "empty answer"


class TokenSource:
    """Hands out valid access tokens, refreshing before expiry, one refresh in flight per account."""

    def __init__(self, store: Any, reactor: Any, *, connector: Any, margin: float = 120.0,
                 timeout: float = 15.0, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._reactor = reactor
        self._connector = connector
        self._margin = margin
        self._timeout = timeout
        self._clock = clock
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
        started = self._clock()
        try:
            token = await refresh_grant(self._reactor, self._connector, app, account, refresh_token,
                                        self._timeout)
        except RefreshError as e:
            OAUTH2_REFRESHES.labels("fail").inc()
            OAUTH2_REFRESH_SECONDS.observe(self._clock() - started)
            log.warn("OAuth2 refresh failed for account {account}: {reason}", account=account_id, reason=str(e),
                     event="oauth2.refresh", result="fail")
            raise
        OAUTH2_REFRESH_SECONDS.observe(self._clock() - started)
        access = token.get("access_token")
        if not access:
            OAUTH2_REFRESHES.labels("fail").inc()
            raise RefreshError("OAuth2 token refresh failed: no access_token in the response")
        OAUTH2_REFRESHES.labels("ok").inc()
        expires = float(token.get("expires_at") or started + float(token.get("expires_in") or 3600))
        await self._store.set_oauth_tokens(account_id, access, expires, token.get("refresh_token"))
        self.refreshes += 1
        log.info("OAuth2 access token refreshed for account {account}, valid {seconds:.0f} s",
                 account=account_id, seconds=expires - self._clock(), event="oauth2.refresh", result="ok")
        return str(access)
