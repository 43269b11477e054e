"""Backend-independent shapes of OAuth2 apps and accounts: validation, defaults and public views.

Input dicts follow DESIGN.md (EmailEngine's field names). `normalize_*`
return the full document with plaintext secrets; `*_public` strip every
secret. Backends encrypt the fields named in `ACCOUNT_SECRET_PATHS` /
`APP_SECRET_FIELD` before writing.
"""

from __future__ import annotations

import copy
import datetime
import re
import unicodedata
import urllib.parse
from typing import Any, Callable

import netaddr

from gateway.net.proxy import ProxySpec
from gateway.store.base import ValidationError, iso_utc

PROVIDERS: dict[str, dict[str, Any]] = {
    "gmail": {
        "authorizationUrl": "https://accounts.google.com/o/oauth2/v2/auth",
        "tokenUrl": "https://oauth2.googleapis.com/token",
        "revocationUrl": "https://oauth2.googleapis.com/revoke",
        "userinfoUrl": "https://openidconnect.googleapis.com/v1/userinfo",
        "jwksUrl": "https://www.googleapis.com/oauth2/v3/certs",
        "issuer": "https://accounts.google.com",
        "scopes": ["https://mail.google.com/"],
        # Asked for at consent only (openid email: who consented); refresh asks for `scopes` alone.
        "identityScopes": ["openid", "email"],
        "authorizationParams": {"access_type": "offline", "prompt": "consent"},
        "imap": {"host": "imap.gmail.com", "port": 993, "secure": True},
        "smtp": {"host": "smtp.gmail.com", "port": 465, "secure": True},
    },
    "outlook": {
        "authorizationUrl": "https://login.microsoftonline.com/{authority}/oauth2/v2.0/authorize",
        "tokenUrl": "https://login.microsoftonline.com/{authority}/oauth2/v2.0/token",
        "jwksUrl": "https://login.microsoftonline.com/{authority}/discovery/v2.0/keys",
        "scopes": [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access",
        ],
        "identityScopes": ["openid", "email"],
        "imap": {"host": "outlook.office365.com", "port": 993, "secure": True},
        "smtp": {"host": "smtp.office365.com", "port": 587, "secure": False},
    },
    "generic": {},
}

# Organization grants: no per-account consent, creating the account is enough.
GRANTS = ("authorizationCode", "serviceAccount", "clientCredentials")
GRANT_DEFAULT_SCOPES = {
    "serviceAccount": ["https://mail.google.com/"],               # Google, domain-wide delegation
    "clientCredentials": ["https://outlook.office365.com/.default"],  # Microsoft 365 application access
}
_TENANT_WIDE = ("common", "organizations", "consumers")

APP_SECRET_FIELD = "clientSecret"
APP_SECRET_FIELDS = ("clientSecret", "serviceKey")  # encrypted at rest, never in a view
ACCOUNT_SECRET_PATHS: tuple[tuple[str, ...], ...] = (
    ("imap", "auth", "pass"),
    ("smtp", "auth", "pass"),
    ("oauth2", "refreshToken"),
    ("oauth2", "accessToken"),
    ("proxy",),  # the whole URL: it may carry the proxy's password
)
PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
# Fields a client may echo back from a GET view; ignored on input.
_READ_ONLY = {"created", "updated", "state", "lastError", "hasRefreshToken", "hasAccessToken", "id", "network"}
_ACCOUNT_ID = re.compile(r"^[^\s\x00-\x1f\x7f]{1,256}$")
_MAX_TEXT = 4096


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed and key not in _READ_ONLY:
            raise ValidationError(f"unknown field {where}{key}")


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{path} must be an object")
    return value


def _text(value: Any, path: str, *, required: bool = False, max_len: int = _MAX_TEXT) -> str | None:
    if value is None:
        if required:
            raise ValidationError(f"{path} is required")
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{path} must be a string")
    if required and not value:
        raise ValidationError(f"{path} must not be empty")
    if len(value) > max_len:
        raise ValidationError(f"{path} is longer than {max_len} characters")
    return value


def _split_url(text: str, path: str, what: str) -> urllib.parse.SplitResult:
    """urlsplit, with its ValueError (a bad [IPv6] host) as a ValidationError."""
    try:
        return urllib.parse.urlsplit(text)
    except ValueError:
        raise ValidationError(f"{path} must be {what}") from None


def _url(value: Any, path: str, *, required: bool = False) -> str | None:
    text = _text(value, path, required=required)
    if text is None:
        return None
    # urlsplit drops tabs and newlines and strips leading spaces: refuse them instead of storing them.
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValidationError(f"{path} must be an http(s) URL without spaces or control characters")
    parts = _split_url(text, path, "an http(s) URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{path} must be an http(s) URL")
    return text


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValidationError(f"{path} must be an integer from 1 to 65535")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{path} must be true or false")
    return value


# Characters an ID must not contain: control (Cc), format (Cf: bidi overrides such as
# U+202E, zero-width spaces and joiners, U+FEFF), surrogates (Cs), private use (Co),
# unassigned (Cn) and line/paragraph separators. They make IDs that look like others.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def validate_account_id(value: Any, path: str = "account") -> str:
    """An account ID: 1..256 characters, no whitespace, control, invisible or look-alike-making ones."""
    if not isinstance(value, str):
        raise ValidationError(f"{path} must be a string")
    if not _ACCOUNT_ID.match(value):
        raise ValidationError(f"{path} must be 1 to 256 characters without spaces or control characters")
    for char in value:
        if unicodedata.category(char) in _INVISIBLE:
            raise ValidationError(f"{path} must not contain invisible or direction-changing characters "
                                  f"(found U+{ord(char):04X})")
    return value


def _server(value: Any, path: str, default_port: tuple[int, int], with_auth: bool) -> dict[str, Any]:
    """host/port/secure (+ auth {user, pass}); port and secure default from each other."""
    obj = _obj(value, path)
    _check_keys(obj, {"host", "port", "secure", "auth"} if with_auth else {"host", "port", "secure"},
                f"{path}.")
    secure_port, plain_port = default_port
    result: dict[str, Any] = {"host": _text(obj.get("host"), f"{path}.host", required=True, max_len=255)}
    port = obj.get("port")
    secure = obj.get("secure")
    if secure is not None:
        secure = _bool(secure, f"{path}.secure")
    if port is not None:
        port = _port(port, f"{path}.port")
    if secure is None:
        secure = port is None or port == secure_port
    if port is None:
        port = secure_port if secure else plain_port
    result["port"], result["secure"] = port, secure
    if with_auth and obj.get("auth") is not None:
        auth = _obj(obj["auth"], f"{path}.auth")
        _check_keys(auth, {"user", "pass"}, f"{path}.auth.")
        result["auth"] = {
            key: val for key, val in (
                ("user", _text(auth.get("user"), f"{path}.auth.user", required=True, max_len=1024)),
                ("pass", _text(auth.get("pass"), f"{path}.auth.pass")),
            ) if val is not None
        }
    return result


def _proxy(value: Any) -> str | None:
    text = _text(value, "proxy")
    if not text:
        return None
    parts = _split_url(text, "proxy", "a URL like socks5://host:1080")
    if parts.scheme not in PROXY_SCHEMES or not parts.hostname:
        raise ValidationError("proxy must be a URL like socks5://host:1080 (schemes: "
                              + ", ".join(PROXY_SCHEMES) + ")")
    try:
        parts.port
    except ValueError:
        raise ValidationError("proxy has an invalid port") from None
    try:
        ProxySpec.parse(text)
    except ValueError as e:
        raise ValidationError(f"proxy: {e}") from None
    return text


# The latest moment `expires` may name (9999-12-31T23:59:59Z): every view formats it as ISO 8601.
MAX_TIMESTAMP = 253402300799


def _expires(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= MAX_TIMESTAMP:  # also refuses inf and NaN (1e400 parses as inf)
            raise ValidationError(f"oauth2.expires must be a timestamp from 0 to {MAX_TIMESTAMP}")
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError("oauth2.expires must be a timestamp or an ISO 8601 date") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        try:
            timestamp = moment.timestamp()
        except (OverflowError, ValueError):
            timestamp = -1.0
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise ValidationError("oauth2.expires must be a date from 1970 to 9999")
        return timestamp
    raise ValidationError("oauth2.expires must be a timestamp or an ISO 8601 date")


def normalize_app(data: Any) -> dict[str, Any]:
    """Validate an OAuth2 app and fill the provider's well-known URLs, scopes and hosts.

    ``grant`` is how its accounts get access tokens: ``authorizationCode`` (each
    user consents; the default), ``serviceAccount`` (Google service account with
    domain-wide delegation: ``serviceClientEmail`` and ``serviceKey``, the JWT
    bearer grant) or ``clientCredentials`` (Microsoft 365 application access:
    ``clientId``, ``clientSecret`` and a tenant ID as ``authority``).
    """
    obj = _obj(data, "body")
    _check_keys(obj, {"name", "provider", "clientId", "clientSecret", "authorizationUrl", "tokenUrl",
                      "scopes", "imap", "smtp", "redirectUrl", "authority", "description", "grant",
                      "revocationUrl", "userinfoUrl", "jwksUrl", "issuer", "authorizationParams",
                      "serviceClient", "serviceClientEmail", "serviceKey"}, "")
    provider = obj.get("provider")
    if not isinstance(provider, str) or provider not in PROVIDERS:
        raise ValidationError("provider must be one of: " + ", ".join(PROVIDERS))
    grant = obj.get("grant", "authorizationCode")
    if grant not in GRANTS:
        raise ValidationError("grant must be one of: " + ", ".join(GRANTS))
    preset = copy.deepcopy(PROVIDERS[provider])
    authority = _text(obj.get("authority"), "authority", max_len=256) or "common"
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", authority):
        raise ValidationError("authority must be common, organizations, consumers or a tenant ID")
    app: dict[str, Any] = {"name": _text(obj.get("name"), "name", required=True, max_len=256),
                           "provider": provider}
    if grant != "authorizationCode":
        app["grant"] = grant
    if grant == "serviceAccount":
        app["serviceClientEmail"] = _text(obj.get("serviceClientEmail"), "serviceClientEmail", required=True,
                                          max_len=320)
        app["serviceKey"] = _private_key(obj.get("serviceKey"))
        app["clientId"] = (_text(obj.get("clientId"), "clientId") or _text(obj.get("serviceClient"), "serviceClient")
                           or app["serviceClientEmail"])
        secret = _text(obj.get("clientSecret"), "clientSecret")
        if secret:
            app["clientSecret"] = secret
    else:
        app["clientId"] = _text(obj.get("clientId"), "clientId", required=True)
        app["clientSecret"] = _text(obj.get("clientSecret"), "clientSecret", required=True)
    if grant == "clientCredentials" and provider == "outlook" and authority in _TENANT_WIDE:
        raise ValidationError("authority must be your tenant ID (not common, organizations or consumers) "
                              "for Microsoft 365 application access")
    for key in ("authorizationUrl", "tokenUrl", "revocationUrl", "userinfoUrl", "jwksUrl"):
        given = _url(obj.get(key), key)
        default = preset.get(key)
        app[key] = given or (default.format(authority=authority) if default else None)
    app["issuer"] = _text(obj.get("issuer"), "issuer", max_len=1024) or preset.get("issuer")
    if app["tokenUrl"] is None:
        raise ValidationError("tokenUrl is required for a generic provider")
    if grant != "authorizationCode":
        app["authorizationUrl"] = None  # no consent page for an organization grant
    scopes = obj.get("scopes")
    if scopes is None:
        scopes = GRANT_DEFAULT_SCOPES.get(grant) or preset.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise ValidationError("scopes must be a list of strings")
    app["scopes"] = list(scopes)
    if grant == "authorizationCode" and preset.get("identityScopes") and obj.get("scopes") is None:
        app["identityScopes"] = preset["identityScopes"]
    params = obj.get("authorizationParams")
    if params is None:
        params = preset.get("authorizationParams") if grant == "authorizationCode" else None
    if params is not None:
        if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 1024
                                                   for k, v in params.items()):
            raise ValidationError("authorizationParams must be an object of strings")
        reserved = {"response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge",
                    "code_challenge_method"} & set(params)
        if reserved:
            raise ValidationError(f"authorizationParams must not set {sorted(reserved)[0]} (the gateway does)")
        app["authorizationParams"] = dict(params)
    for key, ports in (("imap", (993, 143)), ("smtp", (465, 587))):
        value = obj.get(key)
        server = _server(value, key, ports, with_auth=False) if value is not None else preset.get(key)
        if server is not None:
            app[key] = server
    for key in ("redirectUrl", "description"):
        text = _url(obj.get(key), key) if key == "redirectUrl" else _text(obj.get(key), key)
        if text is not None:
            app[key] = text
    if provider == "outlook":
        app["authority"] = authority
    return {key: val for key, val in app.items() if val is not None}


def _private_key(value: Any) -> str:
    """A service account's private key: PEM (as in Google's JSON key file), RSA."""
    text = _text(value, "serviceKey", required=True, max_len=16384)
    assert text is not None
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(text.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        raise ValidationError("serviceKey must be the PEM private key of the service account "
                              "(private_key in its JSON key file)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValidationError("serviceKey must be an RSA private key")
    return text


def app_public(app: dict[str, Any]) -> dict[str, Any]:
    """An app without its secrets (client secret, service account key)."""
    return {key: copy.deepcopy(val) for key, val in app.items() if key not in APP_SECRET_FIELDS}


def normalize_account(data: Any, app_lookup: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
    """Validate a full account document (after any merge) and return it with plaintext secrets."""
    obj = _obj(data, "body")
    _check_keys(obj, {"account", "name", "email", "proxy", "localAddress", "imap", "smtp", "oauth2"}, "")
    account: dict[str, Any] = {
        "account": validate_account_id(obj.get("account")),
        "name": _text(obj.get("name"), "name", max_len=256),
        "email": _text(obj.get("email"), "email", required=True, max_len=320),
        "proxy": _proxy(obj.get("proxy")),
    }
    if "@" not in account["email"]:
        raise ValidationError("email must be an e-mail address")
    local = _text(obj.get("localAddress"), "localAddress", max_len=64)
    if local:
        try:
            account["localAddress"] = str(netaddr.IPAddress(local))
        except (netaddr.AddrFormatError, ValueError):
            raise ValidationError("localAddress must be an IPv4 or IPv6 address") from None
    if obj.get("imap") is not None:
        account["imap"] = _server(obj["imap"], "imap", (993, 143), with_auth=True)
    if obj.get("smtp") is not None:
        account["smtp"] = _server(obj["smtp"], "smtp", (465, 587), with_auth=True)
    if obj.get("oauth2") is not None:
        account["oauth2"] = _oauth2(obj["oauth2"], account["email"], app_lookup)
    else:
        imap_auth = (account.get("imap") or {}).get("auth") or {}
        if "imap" not in account:
            raise ValidationError("account needs imap settings or oauth2")
        if not imap_auth.get("pass"):
            raise ValidationError("imap.auth.user and imap.auth.pass are required without oauth2")
    return {key: val for key, val in account.items() if val is not None}


def _oauth2(value: Any, email: str, app_lookup: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
    obj = _obj(value, "oauth2")
    _check_keys(obj, {"provider", "auth", "refreshToken", "accessToken", "expires"}, "oauth2.")
    provider = _text(obj.get("provider"), "oauth2.provider", required=True, max_len=256)
    assert provider is not None
    app = app_lookup(provider)
    if app is None:
        raise ValidationError(f"oauth2.provider {provider!r} is not a registered OAuth2 app")
    organization_grant = (app.get("grant") or "authorizationCode") != "authorizationCode"
    user = email
    if obj.get("auth") is not None:
        auth = _obj(obj["auth"], "oauth2.auth")
        _check_keys(auth, {"user"}, "oauth2.auth.")
        user = _text(auth.get("user"), "oauth2.auth.user", max_len=1024) or email
    result: dict[str, Any] = {"provider": provider, "auth": {"user": user}}
    refresh = _text(obj.get("refreshToken"), "oauth2.refreshToken", max_len=16384)
    access = _text(obj.get("accessToken"), "oauth2.accessToken", max_len=16384)
    expires = _expires(obj.get("expires"))  # checked even when unused: a bad value is a mistake to report
    if not refresh and not access and not organization_grant:
        raise ValidationError("oauth2.refreshToken is required (or authorize the account: "
                              "POST /v1/authentication/form)")
    if refresh:
        result["refreshToken"] = refresh
    if access:
        result["accessToken"] = access
        result["expires"] = expires
    return {key: val for key, val in result.items() if val is not None}


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge patch into a copy of base; a None value removes the key."""
    result = copy.deepcopy(base)
    for key, val in patch.items():
        if val is None:
            result.pop(key, None)
        elif isinstance(val, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], val)
        else:
            result[key] = copy.deepcopy(val)
    return result


def mask_proxy(proxy: str) -> str:
    """The URL (a proxy, a Redis store) with its password (if any) shown as ***."""
    parts = urllib.parse.urlsplit(proxy)
    if parts.password is None:
        return proxy
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def stored_public(stored: dict[str, Any], decrypt: Callable[[str], str], created: float | None = None,
                  updated: float | None = None) -> dict[str, Any]:
    """The public view of an account as stored (secrets encrypted): the proxy is decrypted to be shown
    masked; every other secret is left out anyway."""
    if isinstance(stored.get("proxy"), str):
        stored = {**stored, "proxy": decrypt(stored["proxy"])}
    return account_public(stored, created, updated)


def account_public(account: dict[str, Any], created: float | None = None,
                   updated: float | None = None) -> dict[str, Any]:
    """An account without passwords, refresh or access tokens (and a masked proxy password)."""
    view = copy.deepcopy(account)
    for server in ("imap", "smtp"):
        auth = (view.get(server) or {}).get("auth")
        if auth is not None:
            auth.pop("pass", None)
    oauth = view.get("oauth2")
    if oauth is not None:
        oauth["hasRefreshToken"] = bool(oauth.pop("refreshToken", None))
        oauth["hasAccessToken"] = bool(oauth.pop("accessToken", None))
        expires = oauth.get("expires")
        oauth["expires"] = iso_utc(expires) if isinstance(expires, (int, float)) else None
    if view.get("proxy"):
        view["proxy"] = mask_proxy(view["proxy"])
    if created is not None:
        view["created"] = iso_utc(created)
    if updated is not None:
        view["updated"] = iso_utc(updated)
    return view


def with_app_defaults(account: dict[str, Any], app: dict[str, Any] | None) -> dict[str, Any]:
    """Fill an OAuth2 account's missing imap/smtp server from its app (data-plane view)."""
    if app is None or "oauth2" not in account:
        return account
    user = account["oauth2"]["auth"]["user"]
    for key in ("imap", "smtp"):
        if key not in account and app.get(key):
            account[key] = {**copy.deepcopy(app[key]), "auth": {"user": user}}
    return account


def map_secrets(account: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """Return a copy of account with fn applied to every secret field present."""
    result = copy.deepcopy(account)
    for path in ACCOUNT_SECRET_PATHS:
        node: Any = result
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            node[path[-1]] = fn(node[path[-1]])
    return result


def validate_url(value: Any, path: str) -> str | None:
    """An optional http(s) URL (None when absent); ValidationError naming ``path`` otherwise."""
    return _url(value, path)
