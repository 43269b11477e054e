"""Hosted OAuth2 authorization: a one-time link, the provider's consent page, the callback.

1. ``POST /v1/authentication/form`` (:meth:`HostedAuth.start`) remembers the
   request (account, app, e-mail, where to send the browser after) with a fresh
   PKCE verifier, and answers a link on ``api.public_url``.
2. Opening the link (:meth:`HostedAuth.open_link`, once) redirects the browser
   to the app's authorization URL with the PKCE S256 challenge and a ``state``
   that names the request and is signed with the store's state key.
3. The provider sends the browser to ``<public_url>/oauth/callback``
   (:meth:`HostedAuth.callback`): the state is checked (signature, known, not
   used, not older than ``oauth2.state_ttl``), the code exchanged with the
   verifier, the account created or its refresh token replaced.

Anything wrong is a :class:`HostedError` whose text the callback page shows;
nothing is changed then. The state is the only credential of the callback: no
API token is needed there.
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse
from base64 import urlsafe_b64encode
from typing import Any, Callable

from authlib.common.security import generate_token
from twisted.logger import Logger

from gateway.auth.provider import ProviderClient, ProviderError, authorization_url
from gateway.store.base import Conflict, NotFound, ValidationError
from gateway.store.records import AccountRecord, AppRecord
from gateway.store.validation import validate_account_id, validate_url

log = Logger()

CALLBACK_PATH = "/oauth/callback"
LINK_PATH = "/oauth/authorize/"


class HostedError(Exception):
    """The authorization cannot go on; the text is shown on the page (400)."""


class HostedAuth:
    def __init__(self, store: Any, provider: ProviderClient, public_url: str, state_ttl: float,
                 account_changed: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.provider = provider
        self.public_url = public_url.rstrip("/")
        self.state_ttl = state_ttl
        self.account_changed = account_changed

    @property
    def redirect_uri(self) -> str:
        """What to register as the redirect URI in the provider's console."""
        return self.public_url + CALLBACK_PATH

    # 1. the form -------------------------------------------------------------

    async def start(self, form: Any) -> str:
        """Validate the form, remember the request; the one-time link."""
        if not isinstance(form, dict):
            raise ValidationError("body must be an object")
        unknown = set(form) - {"account", "name", "email", "oauth2App", "redirectUrl"}
        if unknown:
            raise ValidationError(f"unknown field {sorted(unknown)[0]}")
        account = validate_account_id(form.get("account"))
        app_id = form.get("oauth2App")
        if not isinstance(app_id, str) or not app_id:
            raise ValidationError("oauth2App is required: the id of a registered OAuth2 app")
        app: AppRecord | None = await self.store.app_record(app_id)
        if app is None:
            raise ValidationError(f"oauth2App {app_id!r} is not a registered OAuth2 app")
        if app.grant != "authorizationCode":
            raise ValidationError(f"OAuth2 app {app_id} uses {app.grant}: its accounts need no consent, "
                                  "create them with POST /v1/account")
        if not app.authorization_url:
            raise ValidationError(f"OAuth2 app {app_id} has no authorizationUrl")
        email = form.get("email")
        if email is not None and (not isinstance(email, str) or "@" not in email or len(email) > 320):
            raise ValidationError("email must be an e-mail address")
        name = form.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 256):
            raise ValidationError("name must be a string of at most 256 characters")
        redirect = validate_url(form.get("redirectUrl"), "redirectUrl")
        verifier = generate_token(64)
        request_id = await self.store.create_auth_request(
            {"account": account, "name": name, "email": email, "app": app_id, "redirectUrl": redirect},
            verifier, self.state_ttl)
        return self.public_url + LINK_PATH + request_id

    # 2. the link -------------------------------------------------------------

    async def open_link(self, request_id: str) -> str:
        """The provider URL the browser goes to (the link works once)."""
        request = await self._take(request_id, "opened")
        app = await self.store.app_record(request["app"])
        if app is None:
            raise HostedError("The OAuth2 app of this link was deleted.")
        state = request_id + "." + self._sign(await self.store.state_key(), request_id)
        return authorization_url(app, self.redirect_uri, state, request["verifier"], login_hint=request["email"])

    # 3. the callback ---------------------------------------------------------

    async def callback(self, query: dict[str, str]) -> tuple[str, str, str | None]:
        """Finish the authorization; (account id, e-mail, where to redirect or None for the page)."""
        state = query.get("state") or ""
        request_id, _, signature = state.partition(".")
        if not request_id or not hmac.compare_digest(signature, self._sign(await self.store.state_key(), request_id)):
            raise HostedError("The authorization state is missing or was altered; start again from a new link.")
        request = await self._take(request_id, "used")
        if query.get("error"):
            description = query.get("error_description")
            raise HostedError("The provider did not authorize the account: " + query["error"]
                              + (f" ({description})" if description else "") + ". Nothing was changed.")
        code = query.get("code")
        if not code:
            raise HostedError("The provider sent no authorization code; start again from a new link.")
        app = await self.store.app_record(request["app"])
        if app is None:
            raise HostedError("The OAuth2 app of this link was deleted.")
        try:
            token = await self.provider.exchange_code(app, code, request["verifier"], self.redirect_uri)
        except ProviderError as e:
            raise HostedError(f"The provider refused the authorization code: {e}") from None
        refresh = token.get("refresh_token")
        if not refresh:
            raise HostedError("The provider gave no refresh token (offline access was not granted); start "
                              "again and accept every permission asked.")
        email = request.get("email")
        if not email:
            try:
                email = (await self.provider.identity(app, token))["email"]
            except ProviderError as e:
                raise HostedError(f"Cannot tell which mailbox was authorized: {e}") from None
        account_id = request["account"]
        oauth2: dict[str, Any] = {"provider": request["app"], "auth": {"user": email}, "refreshToken": refresh,
                                  "accessToken": token["access_token"], "expires": _expires(token)}
        existing = await self.store.get_account(account_id)
        try:
            if existing is None:
                fields = {"account": account_id, "email": email, "oauth2": oauth2}
                if request.get("name"):
                    fields["name"] = request["name"]
                await self.store.create_account(fields)
            else:
                patch: dict[str, Any] = {"oauth2": oauth2}
                if request.get("name"):
                    patch["name"] = request["name"]
                if request.get("email") or "@" not in str(existing.get("email") or ""):
                    patch["email"] = email
                await self.store.update_account(account_id, patch)
                await self.store.set_account_state(account_id, "connecting")
        except (ValidationError, Conflict, NotFound) as e:
            raise HostedError(f"The account could not be saved: {e}") from None
        if self.account_changed is not None:
            self.account_changed(account_id)
        log.info("OAuth2 authorization of account {account} ({email}) {how} through the hosted flow",
                 event="oauth2.authorized", account=account_id, email=email,
                 how="created" if existing is None else "re-authorized")
        redirect = request.get("redirectUrl")
        if redirect:
            parts = urllib.parse.urlsplit(redirect)
            extra = urllib.parse.urlencode({"account": account_id, "state": "success"})
            redirect = urllib.parse.urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))
        return account_id, email, redirect

    async def revoke(self, account: AccountRecord) -> None:
        """A deleted account's refresh token is revoked at the provider when it has an endpoint for
        it (Google does, Microsoft does not); a failure is logged, the deletion stands."""
        refresh = account.oauth2.refresh_token if account.oauth2 is not None else None
        if account.oauth2 is None or not refresh:
            return
        app = await self.store.app_record(account.oauth2.app)
        if app is None or not app.revocation_url:
            return
        try:
            await self.provider.revoke(app, refresh, "refresh_token")
        except ProviderError as e:
            log.warn("Revoking the OAuth2 grant of deleted account {account} failed: {why}",
                     account=account.id, why=str(e))
            return
        log.info("Revoked the OAuth2 grant of deleted account {account} at the provider",
                 event="oauth2.revoke", account=account.id)

    async def _take(self, request_id: str, step: str) -> dict[str, Any]:
        try:
            return dict(await self.store.take_auth_request(request_id, step, self.state_ttl))
        except (NotFound, Conflict) as e:
            message = str(e)
            raise HostedError(message[0].upper() + message[1:] + ".") from None

    @staticmethod
    def _sign(key: bytes, request_id: str) -> str:
        digest = hmac.new(key, b"oauth2-state:" + request_id.encode("utf-8", "replace"), hashlib.sha256).digest()
        return urlsafe_b64encode(digest[:24]).decode("ascii")


def _expires(token: dict[str, Any]) -> float | None:
    expires = token.get("expires_at")
    return float(expires) if expires else None
