"""Typed records of the data path: what a login, a refresh and an outbound connection read.

The admin API speaks JSON documents with EmailEngine's key names (``oauth2.refreshToken``,
``localAddress``...). The data path does not: the store hands it these frozen records, built in
one place from the stored document (secrets decrypted, the OAuth2 app's servers filled in), so
that a renamed API field is one change here, not a hunt through the session, the pool, the
opener, the token source and the network policy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

# Everything stored that an upstream connection depends on, except bookkeeping and the short-lived
# tokens (a rotated or re-authorized grant keeps the account's pooled connections).
_VOLATILE_TOP = ("created", "updated", "state", "lastError")
_VOLATILE_OAUTH = ("accessToken", "expires", "refreshToken")


@dataclass(frozen=True)
class Server:
    """An IMAP or SMTP server of an account: where, how, and (password accounts) as whom."""

    host: str | None = None
    port: int | None = None
    secure: bool | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_document(cls, doc: Mapping[str, Any] | None) -> "Server | None":
        if not isinstance(doc, Mapping):
            return None
        auth: Mapping[str, Any] = doc["auth"] if isinstance(doc.get("auth"), Mapping) else {}
        port = doc.get("port")
        return cls(host=doc.get("host") or None, port=int(port) if port else None,
                   secure=doc.get("secure") if isinstance(doc.get("secure"), bool) else None,
                   user=auth.get("user") or None, password=auth.get("pass") or None)


@dataclass(frozen=True)
class OAuth2Grant:
    """An account's OAuth2 authorization: its app, the login name at the provider, its tokens."""

    app: str
    user: str
    refresh_token: str | None = None
    access_token: str | None = None
    expires: float = 0.0


@dataclass(frozen=True)
class LastError:
    error: str
    description: str | None = None


@dataclass(frozen=True)
class Routing:
    """What the outbound network policy needs to know of an account."""

    account: str = ""
    email: str = ""
    local_address: str | None = None
    proxy: str | None = None

    @property
    def domain(self) -> str:
        return self.email.rsplit("@", 1)[-1].lower() if "@" in self.email else ""

    @classmethod
    def from_view(cls, doc: Mapping[str, Any] | None) -> "Routing":
        """From an API view of an account (its JSON keys), for the API's own questions."""
        doc = doc or {}
        return cls(account=str(doc.get("account") or ""), email=str(doc.get("email") or ""),
                   local_address=doc.get("localAddress") or None, proxy=doc.get("proxy") or None)


@dataclass(frozen=True)
class AccountRecord:
    """One account as the data path sees it (secrets in clear: keep it in memory only)."""

    id: str
    email: str
    name: str | None = None
    proxy: str | None = None
    local_address: str | None = None
    imap: Server | None = None
    smtp: Server | None = None
    oauth2: OAuth2Grant | None = None
    state: str = "connecting"
    last_error: LastError | None = None
    fingerprint: str = field(default="", compare=False)

    def server(self, leg: str) -> Server | None:
        """The ``imap`` or ``smtp`` server."""
        return self.imap if leg == "imap" else self.smtp if leg == "smtp" else None

    @property
    def routing(self) -> Routing:
        return Routing(account=self.id, email=self.email, local_address=self.local_address, proxy=self.proxy)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> "AccountRecord":
        """From the store's document with secrets (the OAuth2 app's servers filled in) and state."""
        oauth = doc.get("oauth2") if isinstance(doc.get("oauth2"), Mapping) else None
        grant = None
        if oauth is not None:
            auth: Mapping[str, Any] = oauth["auth"] if isinstance(oauth.get("auth"), Mapping) else {}
            grant = OAuth2Grant(app=str(oauth.get("provider") or ""), user=auth.get("user") or str(doc.get("email") or ""),
                                refresh_token=oauth.get("refreshToken") or None,
                                access_token=oauth.get("accessToken") or None,
                                expires=float(oauth.get("expires") or 0.0))
        last = doc.get("lastError") if isinstance(doc.get("lastError"), Mapping) else None
        return cls(id=str(doc["account"]), email=str(doc.get("email") or ""), name=doc.get("name"),
                   proxy=doc.get("proxy") or None, local_address=doc.get("localAddress") or None,
                   imap=Server.from_document(doc.get("imap")), smtp=Server.from_document(doc.get("smtp")),
                   oauth2=grant, state=str(doc.get("state") or "connecting"),
                   last_error=LastError(str(last["error"]), last.get("description")) if last and last.get("error")
                   else None,
                   fingerprint=fingerprint(doc))


def fingerprint(doc: Mapping[str, Any]) -> str:
    """What the account's upstream connections depend on; a change empties its pool."""
    data = {k: v for k, v in doc.items() if k not in _VOLATILE_TOP}
    if isinstance(data.get("oauth2"), Mapping):
        data["oauth2"] = {k: v for k, v in data["oauth2"].items() if k not in _VOLATILE_OAUTH}
    raw = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class AppRecord:
    """An OAuth2 app as the token source and the provider client use it (secrets in clear)."""

    id: str
    provider: str
    client_id: str
    token_url: str
    grant: str = "authorizationCode"
    name: str = ""
    client_secret: str | None = None
    authorization_url: str | None = None
    revocation_url: str | None = None
    userinfo_url: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    scopes: tuple[str, ...] = ()
    identity_scopes: tuple[str, ...] = ()
    authorization_params: tuple[tuple[str, str], ...] = ()
    service_client_email: str | None = None
    service_key: str | None = None
    imap: Server | None = None
    smtp: Server | None = None

    def server(self, leg: str) -> Server | None:
        return self.imap if leg == "imap" else self.smtp if leg == "smtp" else None

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> "AppRecord":
        """From the store's view of an app with its secrets."""
        params: Mapping[str, Any] = (doc["authorizationParams"] if isinstance(doc.get("authorizationParams"), Mapping)
                                     else {})
        return cls(id=str(doc["id"]), provider=str(doc.get("provider") or "generic"),
                   client_id=str(doc.get("clientId") or ""), token_url=str(doc.get("tokenUrl") or ""),
                   grant=str(doc.get("grant") or "authorizationCode"), name=str(doc.get("name") or ""),
                   client_secret=doc.get("clientSecret") or None,
                   authorization_url=doc.get("authorizationUrl") or None,
                   revocation_url=doc.get("revocationUrl") or None, userinfo_url=doc.get("userinfoUrl") or None,
                   jwks_url=doc.get("jwksUrl") or None, issuer=doc.get("issuer") or None,
                   scopes=tuple(doc.get("scopes") or ()), identity_scopes=tuple(doc.get("identityScopes") or ()),
                   authorization_params=tuple((str(k), str(v)) for k, v in params.items()),
                   service_client_email=doc.get("serviceClientEmail") or None,
                   service_key=doc.get("serviceKey") or None,
                   imap=Server.from_document(doc.get("imap")), smtp=Server.from_document(doc.get("smtp")))
