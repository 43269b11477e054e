"""OAuth2 access tokens for upstream logins: refreshed with authlib, one refresh per account at a time.

The token request goes out on Twisted's HTTP client (gateway.auth.http), not
in a worker thread: a slow provider holds no thread another account needs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth.provider import GRANT_GONE, ProviderClient, ProviderError
from gateway.metrics import OAUTH2_REFRESH_SECONDS, OAUTH2_REFRESHES
from gateway.store.records import AccountRecord, AppRecord

log = Logger()


class RefreshError(Exception):
    """The provider would not give an access token; the message is safe to show to the client."""


REAUTHORIZE = "OAuth2 authorization for this account was revoked or expired; re-authorize it"


def needs_reauthorization(account: AccountRecord) -> bool:
    """The account's grant was refused as revoked or expired (its state says so): asking the
    provider again is pointless until someone re-authorizes it."""
    return (account.state == "authenticationError" and account.last_error is not None
            and account.last_error.error in GRANT_GONE)


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
        self.provider = ProviderClient(reactor, connector, timeout)

    async def access_token(self, account: AccountRecord, force: bool = False, stale: str | None = None) -> str:
        """A usable access token for ``account`` (a record with secrets).

        An account whose grant was refused as revoked or expired gets :data:`REAUTHORIZE` at
        once, without asking the provider, until it is re-authorized."""
        if needs_reauthorization(account):
            raise RefreshError(REAUTHORIZE)
        grant = account.oauth2
        token = grant.access_token if grant is not None else None
        expires = grant.expires if grant is not None else 0.0
        if token and not force and expires - self._margin > self._clock():
            return token
        if stale is None and token:
            stale = token  # the one we have is not good enough: another gateway's would be
        return await self._refresh_shared(account.id, stale)

    def _refresh_shared(self, account_id: str, stale: str | None = None) -> defer.Deferred[str]:
        """One refresh per account in this process (later askers wait for it) and, through the
        store's lock, in the whole cluster."""
        waiters = self._inflight.get(account_id)
        d: defer.Deferred[str] = defer.Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[account_id] = [d]
        run = defer.Deferred.fromCoroutine(self._refresh_locked(account_id, stale))

        def settle(result: Any) -> None:
            for waiter in self._inflight.pop(account_id, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        run.addBoth(settle)
        return d

    async def _refresh_locked(self, account_id: str, stale: str | None) -> str:
        """Refresh under the cluster lock ``refresh:<account>``; when another gateway holds it, wait
        for its result (a new access token in the store) instead of refreshing too: a provider that
        rotates refresh tokens must never see the same one twice."""
        name = f"refresh:{account_id}"
        deadline = self._reactor.seconds() + self._timeout + 5
        while True:
            lock = await self._store.lock(name, self._timeout + 5)
            if lock is not None:
                try:
                    fresh = await self._fresh_in_store(account_id, stale)
                    return fresh if fresh is not None else await self._refresh(account_id)
                finally:
                    await self._store.unlock(name, lock)
            fresh = await self._fresh_in_store(account_id, stale)
            if fresh is not None:
                return fresh
            if self._reactor.seconds() >= deadline:
                raise RefreshError("OAuth2 token refresh failed: another gateway's refresh of this account "
                                   f"did not finish within {self._timeout + 5:.0f} s")
            await task.deferLater(self._reactor, 0.1, lambda: None)

    async def _fresh_in_store(self, account_id: str, stale: str | None) -> str | None:
        """An access token another gateway stored meanwhile (not ``stale``, not about to expire)."""
        account: AccountRecord | None = await self._store.login_account(account_id)
        grant = account.oauth2 if account is not None else None
        if grant is not None and grant.access_token and grant.access_token != stale and \
                grant.expires - self._margin > self._clock():
            return grant.access_token
        return None

    async def _refresh(self, account_id: str) -> str:
        # Re-read under the lock: the refresh token may have been rotated by another gateway.
        account: AccountRecord | None = await self._store.login_account(account_id)
        if account is None:
            raise RefreshError("account no longer exists")
        if account.oauth2 is None:
            raise RefreshError("account has no OAuth2 settings")
        app: AppRecord | None = await self._store.app_record(account.oauth2.app)
        if app is None or not app.token_url:
            raise RefreshError("account's OAuth2 app is missing or has no token URL")
        grant = app.grant
        refresh_token = account.oauth2.refresh_token
        if grant == "authorizationCode" and not refresh_token:
            raise RefreshError("account has no OAuth2 refresh token: authorize it (POST /v1/authentication/form)")
        started = self._clock()
        try:
            if grant == "serviceAccount":
                subject = account.oauth2.user or account.email
                token = await self.provider.jwt_bearer(app, account.routing, subject)
            elif grant == "clientCredentials":
                token = await self.provider.client_credentials(app, account.routing)
            else:
                token = await self.provider.refresh(app, account.routing, str(refresh_token))
        except ProviderError as e:
            OAUTH2_REFRESHES.labels("fail").inc()
            OAUTH2_REFRESH_SECONDS.observe(self._clock() - started)
            log.warn("OAuth2 refresh failed for account {account}: {reason}", account=account_id, reason=str(e),
                     event="oauth2.refresh", result="fail")
            if e.error is not None:  # the provider refused: authorization trouble
                await self._store.set_account_state(account_id, "authenticationError", e.error,
                                                    e.description or str(e))
            else:  # the provider could not be reached or answered nonsense
                await self._store.set_account_state(account_id, "connectError", "oauth2", str(e))
            raise RefreshError(f"OAuth2 token refresh failed: {e}") from None
        OAUTH2_REFRESH_SECONDS.observe(self._clock() - started)
        OAUTH2_REFRESHES.labels("ok").inc()
        access = str(token["access_token"])
        expires = float(token.get("expires_at") or started + float(token.get("expires_in") or 3600))
        rotated = token.get("refresh_token") if grant == "authorizationCode" else None
        await self._store.set_oauth_tokens(account_id, access, expires, rotated)
        self.refreshes += 1
        log.info("OAuth2 access token refreshed for account {account}, valid {seconds:.0f} s{rotated}",
                 account=account_id, seconds=expires - self._clock(), event="oauth2.refresh", result="ok",
                 rotated=", refresh token rotated" if rotated and rotated != refresh_token else "")
        return access
