"""Every OAuth2 step with a provider, built on authlib, sent on Twisted's HTTP client.

One client for: the authorization URL (state, PKCE S256, the provider's
offline-access parameters), the code exchange, refresh, the organization
grants (client credentials for Microsoft 365 application access, the JWT
bearer grant of Google service accounts with domain-wide delegation),
revocation, and who the user is (the ID token checked against the provider's
keys, else userinfo). authlib prepares every request and reads every answer;
the requests go through the gateway's connector (source address, proxy,
``no_proxy``, verified TLS) like the IMAP and SMTP legs, without a thread.

Failures are :class:`ProviderError` with a text safe to show and log: the
host and the cause when the provider could not be reached
(``cannot connect to oauth2.googleapis.com:443: DNS lookup failed``), its own
``error`` and ``error_description`` when it answered
(``invalid_grant: Token has been expired or revoked.``).
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7009.parameters import prepare_revoke_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from gateway.auth.http import HTTPError, host_port, request
from gateway.store.records import AppRecord, Routing

with warnings.catch_warnings():  # authlib.jose works; its successor (joserfc) is not a dependency
    warnings.simplefilter("ignore")
    from authlib.jose import JsonWebKey, jwt
    from authlib.jose.errors import JoseError
    from authlib.oauth2.rfc7523 import JWTBearerGrant

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # seconds, the longest Google accepts

# Errors that mean the grant itself is gone: the user (or an administrator) has to authorize again.
GRANT_GONE = ("invalid_grant",)


class ProviderError(Exception):
    """The provider refused, or could not be reached; ``str()`` is safe to show and log.

    ``error`` is the provider's OAuth2 error code (``invalid_grant``, ...) when it
    answered with one, else None (unreachable, timed out, not OAuth2 JSON).
    """

    def __init__(self, text: str, error: str | None = None, description: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(text)
        self.error = error
        self.description = description
        self.status = status

    @property
    def grant_gone(self) -> bool:
        """The authorization was revoked or expired (re-authorizing is the fix)."""
        return self.error in GRANT_GONE


def _snippet(body: bytes) -> str:
    """The start of a non-JSON answer (an HTML error page), printable, for the reason text."""
    text = body[:300].decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:120] or "empty answer"


def _error_from(url: str, status: int, body: bytes) -> ProviderError | None:
    """The ProviderError an answer means, or None when it is a success."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        if status < 400:
            return ProviderError(f"{host_port(url)} answered HTTP {status} with no JSON: {_snippet(body)}",
                                 status=status)
        return ProviderError(f"HTTP {status}: {_snippet(body)}", status=status)
    if data.get("error") or status >= 400:
        error = str(data.get("error") or f"HTTP {status}")
        description = data.get("error_description")
        text = f"{error}: {description}" if description else error
        return ProviderError(text, error=str(data.get("error")) if data.get("error") else None,
                             description=str(description) if description else None, status=status)
    return None


def scope_of(app: AppRecord) -> str | None:
    return " ".join(app.scopes) or None


def authorization_url(app: AppRecord, redirect_uri: str, state: str, verifier: str,
                      login_hint: str | None = None) -> str:
    """Where to send the user's browser: the app's authorization URL with its client ID, scopes,
    ``state``, the PKCE S256 challenge of ``verifier`` and the provider's extra parameters
    (Google: ``access_type=offline&prompt=consent``)."""
    extra: dict[str, str] = dict(app.authorization_params)
    if login_hint:
        extra["login_hint"] = login_hint
    scopes = list(app.scopes)
    scopes += [s for s in app.identity_scopes if s not in scopes]  # who consents
    return str(prepare_grant_uri(
        app.authorization_url or "", app.client_id, "code", redirect_uri=redirect_uri, scope=" ".join(scopes) or None,
        state=state, code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256",
        **extra))


class ProviderClient:
    """OAuth2 requests of the gateway, each within ``timeout`` seconds."""

    def __init__(self, reactor: Any, connector: Any, timeout: float) -> None:
        self.reactor = reactor
        self.connector = connector
        self.timeout = timeout

    async def _send(self, method: str, url: str, *, body: str | None = None, headers: dict[str, str] | None = None,
                    account: Routing | None = None) -> tuple[int, bytes]:
        try:
            response = await request(self.reactor, self.connector, method, url, timeout=self.timeout, body=body,
                                     account=account, headers=headers)
        except HTTPError as e:
            raise ProviderError(str(e)) from None
        return response.status, response.body

    async def _token(self, app: AppRecord, body: str, account: Routing | None,
                     client_auth: bool = True) -> dict[str, Any]:
        url = app.token_url
        headers: dict[str, str] = {}
        if client_auth:
            url, headers, body = ClientAuth(app.client_id, app.client_secret, "client_secret_post").prepare(
                "POST", url, headers, body)
        status, payload = await self._send("POST", url, body=body, headers=dict(headers), account=account)
        error = _error_from(url, status, payload)
        if error is not None:
            raise error
        token = dict(OAuth2Token.from_dict(json.loads(payload)))
        if not token.get("access_token"):
            raise ProviderError(f"{host_port(url)} answered without an access_token")
        return token

    async def exchange_code(self, app: AppRecord, code: str, verifier: str, redirect_uri: str,
                            account: Routing | None = None) -> dict[str, Any]:
        """The authorization code grant, with the PKCE verifier."""
        body = prepare_token_request("authorization_code", code=code, redirect_uri=redirect_uri,
                                     code_verifier=verifier)
        return await self._token(app, body, account)

    async def refresh(self, app: AppRecord, account: Routing, refresh_token: str) -> dict[str, Any]:
        """The refresh_token grant (the answer may carry a rotated refresh token)."""
        body = prepare_token_request("refresh_token", refresh_token=refresh_token, scope=scope_of(app))
        return await self._token(app, body, account)

    async def client_credentials(self, app: AppRecord, account: Routing) -> dict[str, Any]:
        """Microsoft 365 application access: a token for the app, valid for the mailboxes an
        Exchange administrator granted it."""
        body = prepare_token_request("client_credentials", scope=scope_of(app))
        return await self._token(app, body, account)

    async def jwt_bearer(self, app: AppRecord, account: Routing, subject: str) -> dict[str, Any]:
        """A Google service account with domain-wide delegation acting as ``subject`` (the mailbox):
        an assertion signed with the service account's key, no client secret."""
        now = int(time.time())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assertion = JWTBearerGrant.sign(
                app.service_key, issuer=app.service_client_email, audience=app.token_url, subject=subject,
                issued_at=now, expires_at=now + ASSERTION_LIFETIME, claims={"scope": scope_of(app) or ""},
                header={"alg": "RS256", "typ": "JWT"})
        text = assertion.decode("ascii") if isinstance(assertion, bytes) else str(assertion)
        body = prepare_token_request(JWT_BEARER, assertion=text)
        return await self._token(app, body, account, client_auth=False)

    async def revoke(self, app: AppRecord, token: str, hint: str = "refresh_token") -> None:
        """Revoke a token where the provider has an endpoint for it (RFC 7009); a no-op otherwise."""
        url = app.revocation_url
        if not url:
            return
        body, headers = prepare_revoke_token_request(token, hint)
        url, headers, body = ClientAuth(app.client_id, app.client_secret, "client_secret_post").prepare(
            "POST", url, dict(headers), body)
        status, payload = await self._send("POST", url, body=body, headers=dict(headers))
        if status >= 400:
            error = _error_from(url, status, payload)
            raise error or ProviderError(f"HTTP {status}")

    async def identity(self, app: AppRecord, token: dict[str, Any]) -> dict[str, Any]:
        """Who consented: ``{"email", "sub"}`` from the ID token (signature checked with the
        provider's published keys, issuer and audience checked), else from userinfo."""
        id_token = token.get("id_token")
        if id_token and app.jwks_url:
            claims = await self._id_token_claims(app, str(id_token))
            email = claims.get("email") or claims.get("preferred_username") or claims.get("upn")
            if email:
                return {"email": str(email), "sub": str(claims.get("sub") or "")}
        if app.userinfo_url:
            status, payload = await self._send("GET", app.userinfo_url,
                                               headers={"Authorization": f"Bearer {token['access_token']}"})
            error = _error_from(app.userinfo_url, status, payload)
            if error is not None:
                raise error
            data = json.loads(payload)
            if data.get("email"):
                return {"email": str(data["email"]), "sub": str(data.get("sub") or "")}
        raise ProviderError("the provider did not say which address was authorized (no email in the ID token "
                            "or userinfo): give email in the form")

    async def _id_token_claims(self, app: AppRecord, id_token: str) -> dict[str, Any]:
        assert app.jwks_url is not None
        status, payload = await self._send("GET", app.jwks_url)
        if status != 200:
            raise ProviderError(f"{host_port(app.jwks_url)} answered HTTP {status} for its keys")
        options: dict[str, Any] = {"aud": {"essential": True, "value": app.client_id}}
        issuer = app.issuer
        if issuer and "{" not in issuer:
            # Google's ID tokens say https://accounts.google.com or accounts.google.com: either form is it.
            bare = issuer.split("://", 1)[-1]
            options["iss"] = {"essential": True, "values": sorted({issuer, bare, "https://" + bare})}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keys = JsonWebKey.import_key_set(json.loads(payload))
                claims = jwt.decode(id_token, keys, claims_options=options)
                claims.validate(leeway=120)
        except (JoseError, ValueError, KeyError) as e:
            raise ProviderError(f"the ID token did not check out: {e}") from None
        return dict(claims)
