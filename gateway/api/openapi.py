"""The admin API described as an OpenAPI 3.1 document, served at `GET /openapi.json` (no auth).

Built in code from the same constants the validators use (providers, scopes, proxy
schemes, address strategies, read-only fields, the body limit), so the request
schemas say what `gateway.store.validation`, `gateway.api.resources` and
`gateway.net.policy` accept and the response schemas what they return.
`tests/unit/test_api_openapi.py` checks that its paths and methods are exactly the
router's; `tests/integration/test_api_openapi.py` runs schemathesis against a
live gateway with it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from gateway.api.app import MAX_BODY
from gateway.auth.tokens import SCOPES
from gateway.net.addresses import STRATEGIES
from gateway.net.dnsbl import MAX_ZONES
from gateway.net.warmup import ACTIONS as WARMUP_ACTIONS
from gateway.store.validation import _READ_ONLY, GRANTS, MAX_TIMESTAMP, PROVIDERS, PROXY_SCHEMES

Schema = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
TITLE = "IMAP/SMTP gateway admin API"

# --- schema helpers ---------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_null(schema: Schema) -> Schema:
    """The schema, or JSON null (input fields where null means "not given" / "remove")."""
    if "type" in schema and "$ref" not in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return {**schema, "type": [*kinds, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _text(max_len: int, *, min_len: int = 0, **extra: Any) -> Schema:
    schema: Schema = {"type": "string", "maxLength": max_len, **extra}
    if min_len:
        schema["minLength"] = min_len
    return schema


def _object(properties: dict[str, Any], required: tuple[str, ...] = (), *,
            closed: bool = True, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


_IGNORED: Schema = {"description": "A read-only field of the GET view: accepted and ignored on input."}


def _input(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    """An input object of `gateway.store.validation`: unknown fields are refused (400), except the
    read-only ones of a GET view (`created`, `state`, ...), which may be echoed back and are ignored."""
    ignored = {name: _IGNORED for name in sorted(_READ_ONLY) if name not in properties}
    return _object({**properties, **ignored}, required, **extra)


_TIMESTAMP: Schema = {"type": "string", "description": "ISO 8601 UTC, e.g. 2024-05-01T12:00:00.000Z"}
_URL: Schema = _text(4096, pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*$",
                     description="An http(s) URL with a host, no spaces or control characters.")
_ACCOUNT_ID: Schema = _text(256, min_len=1, pattern=r"^[^\s\x00-\x1f\x7f]+$",
                            description="1 to 256 characters: no whitespace, control, format (bidi, "
                                        "zero-width), private-use or unassigned characters.")


# The consent page's parameters the gateway sets itself (normalize_app refuses them in authorizationParams).
RESERVED_AUTHORIZATION_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge",
                                 "code_challenge_method")


def _strings(**extra: Any) -> Schema:
    return {"type": "array", "items": {"type": "string"}, **extra}


def _pools(description: str) -> Schema:
    return {"type": "object", "additionalProperties": _strings(), "description": description}


# --- component schemas --------------------------------------------------------


def _schemas() -> dict[str, Schema]:
    server = {
        "host": _text(255, min_len=1),
        "port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535,
                 "description": "Default: the TLS port when `secure` (or not given), else the plain one."},
        "secure": {"type": ["boolean", "null"],
                   "description": "TLS from the start; default: true unless `port` is the plain port."},
    }
    server_view = {
        "host": {"type": "string"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "secure": {"type": "boolean"},
    }
    return {
        "Error": _object({
            "error": {"type": "string", "description": "Short error name, e.g. BadRequest, NotFound.",
                      "examples": ["BadRequest"]},
            "message": {"type": "string", "description": "What was wrong, safe to show.",
                        "examples": ["unknown field foo"]},
        }, ("error", "message")),
        # OAuth2 apps
        "ServerInput": _input(server, ("host",)),
        "Server": _object(server_view, ("host", "port", "secure")),
        "OAuth2AppInput": _input({
            "name": _text(256, min_len=1),
            "provider": {"type": "string", "enum": list(PROVIDERS),
                         "description": "gmail and outlook fill in their URLs, scopes and servers."},
            "grant": {"type": "string", "enum": list(GRANTS),
                      "description": "How its accounts get access tokens: authorizationCode (each user "
                                     "consents; the default), serviceAccount (a Google service account "
                                     "with domain-wide delegation) or clientCredentials (Microsoft 365 "
                                     "application access; `authority` must be the tenant ID)."},
            "clientId": _or_null(_text(4096, description="Required unless grant is serviceAccount.")),
            "clientSecret": _or_null(_text(4096, writeOnly=True,
                                           description="Required unless grant is serviceAccount.")),
            "serviceClientEmail": {"description": "grant serviceAccount: the service account's e-mail "
                                                  "(a string of at most 320 characters); ignored otherwise."},
            "serviceKey": {"writeOnly": True,
                           "description": "grant serviceAccount: its RSA private key, PEM (private_key of its "
                                          "JSON key file); ignored otherwise."},
            "serviceClient": {"description": "grant serviceAccount: its client id, when clientId is not "
                                             "given (default: serviceClientEmail)."},
            "authorizationUrl": _or_null(_URL),
            "tokenUrl": _or_null({**_URL, "description": "Required for the generic provider."}),
            "revocationUrl": _or_null(_URL),
            "userinfoUrl": _or_null(_URL),
            "jwksUrl": _or_null(_URL),
            "issuer": _or_null(_text(1024)),
            "scopes": _or_null({"type": "array", "items": {"type": "string", "minLength": 1}}),
            "authorizationParams": _or_null({
                "type": "object", "additionalProperties": _text(1024),
                "propertyNames": {"not": {"enum": list(RESERVED_AUTHORIZATION_PARAMS)}},
                "description": "Extra query parameters of the consent page (the gateway sets the "
                               "OAuth2 ones)."}),
            "imap": _or_null(_ref("ServerInput")),
            "smtp": _or_null(_ref("ServerInput")),
            "redirectUrl": _or_null(_URL),
            "authority": _or_null(_text(256, pattern=r"^[A-Za-z0-9.\-]*$",
                                        description="outlook: common (default), organizations, "
                                                    "consumers or a tenant ID.")),
            "description": _or_null(_text(4096)),
        }, ("name", "provider"), **{
            "if": {"properties": {"grant": {"const": "serviceAccount"}}, "required": ["grant"]},
            "then": {"properties": {"serviceClientEmail": _text(320, min_len=1),
                                    "serviceKey": _text(16384, min_len=1)},
                     "required": ["serviceClientEmail", "serviceKey"]},
            "else": {"properties": {"clientId": _text(4096, min_len=1), "clientSecret": _text(4096, min_len=1)},
                     "required": ["clientId", "clientSecret"]},
        }),
        "OAuth2App": _object({
            "id": {"type": "string"},
            "name": {"type": "string"},
            "provider": {"type": "string", "enum": list(PROVIDERS)},
            "grant": {"type": "string", "enum": list(GRANTS), "description": "Absent: authorizationCode."},
            "clientId": {"type": "string"},
            "serviceClientEmail": {"type": "string"},
            "authorizationUrl": {"type": "string"},
            "tokenUrl": {"type": "string"},
            "revocationUrl": {"type": "string"},
            "userinfoUrl": {"type": "string"},
            "jwksUrl": {"type": "string"},
            "issuer": {"type": "string"},
            "scopes": _strings(),
            "identityScopes": _strings(description="Asked for at consent only."),
            "authorizationParams": {"type": "object", "additionalProperties": {"type": "string"}},
            "imap": _ref("Server"),
            "smtp": _ref("Server"),
            "redirectUrl": {"type": "string"},
            "authority": {"type": "string"},
            "description": {"type": "string"},
            "created": _TIMESTAMP,
        }, ("id", "name", "provider", "clientId", "tokenUrl", "scopes", "created"),
            description="An OAuth2 app; its client secret and service account key are never returned."),
        # Accounts
        "ServerAuthInput": _input({
            "user": _text(1024, min_len=1),
            "pass": _or_null(_text(4096, writeOnly=True)),
        }, ("user",)),
        "AccountServerInput": _input({**server, "auth": _or_null(_ref("ServerAuthInput"))}, ("host",)),
        "AccountOAuth2Input": _input({
            "provider": _text(256, min_len=1, description="The id of a registered OAuth2 app."),
            "auth": _or_null(_input({"user": _or_null(_text(1024))},
                                    description="`user`: the login name upstream (default: `email`).")),
            "refreshToken": _or_null(_text(16384, writeOnly=True)),
            "accessToken": _or_null(_text(16384, writeOnly=True)),
            "expires": {"anyOf": [{"type": "number", "minimum": 0, "maximum": MAX_TIMESTAMP},
                                  {"type": "string", "description": "An ISO 8601 date and time."},
                                  {"type": "null"}],
                        "description": "When `accessToken` expires: a POSIX timestamp or an ISO 8601 date."},
        }, ("provider",), description="`refreshToken` (or `accessToken`) is required unless the app's grant "
                                      "is serviceAccount or clientCredentials."),
        "AccountInput": _input({
            "account": _ACCOUNT_ID,
            "name": _or_null(_text(256)),
            "email": _text(320, pattern="@"),
            "proxy": _or_null(_text(4096, description="A proxy URL for this account's upstream connections "
                                                      "(schemes: " + ", ".join(PROXY_SCHEMES)
                                                      + "); empty: none.")),
            "localAddress": _or_null(_text(64, description="The IPv4 or IPv6 source address of this "
                                                           "account's upstream connections.")),
            "imap": _or_null(_ref("AccountServerInput")),
            "smtp": _or_null(_ref("AccountServerInput")),
            "oauth2": _or_null(_ref("AccountOAuth2Input")),
        }, ("account", "email"), anyOf=[
            {"required": ["oauth2"], "properties": {"oauth2": {"type": "object"}}},
            {"required": ["imap"], "properties": {"imap": {
                "type": "object", "required": ["auth"], "properties": {"auth": {
                    "type": "object", "required": ["pass"], "properties": {"pass": {"type": "string",
                                                                                   "minLength": 1}}}}}}},
        ], description="Without `oauth2`, `imap` with `auth.user` and `auth.pass` is required."),
        "AccountUpdate": _input({
            "account": {**_ACCOUNT_ID, "description": "If given, the account's own id."},
            "name": _or_null(_text(256)),
            "email": _or_null(_text(320)),
            "proxy": _or_null(_text(4096)),
            "localAddress": _or_null(_text(64)),
            "imap": {"type": ["object", "null"]},
            "smtp": {"type": ["object", "null"]},
            "oauth2": {"type": ["object", "null"]},
        }, description="Merged into the stored account (objects deeply, `null` removes a field); the "
                       "result must be a valid account (see AccountInput). A proxy sent back masked as "
                       "GET shows it keeps its password."),
        "AccountServer": _object({**server_view, "auth": _object({"user": {"type": "string"}}, ("user",))},
                                 ("host", "port", "secure")),
        "AccountOAuth2": _object({
            "provider": {"type": "string"},
            "auth": _object({"user": {"type": "string"}}, ("user",)),
            "hasRefreshToken": {"type": "boolean"},
            "hasAccessToken": {"type": "boolean"},
            "expires": {"type": ["string", "null"], "description": "ISO 8601 UTC, or null."},
        }, ("provider", "auth", "hasRefreshToken", "hasAccessToken", "expires")),
        "AccountNetwork": _object({
            "addressStrategy": {"type": "string", "enum": list(STRATEGIES)},
            "pool": _strings(),
            "poolLevel": {"type": "string", "enum": ["account", "domain", "default", "account localAddress"]},
            "localAddress": {"type": ["string", "null"]},
            "localAddressIPv6": {"type": ["string", "null"]},
            "smtpLocalAddress": {"type": ["string", "null"],
                                 "description": "static: the address its SMTP connections leave from (another "
                                                "than localAddress when that one is excluded)."},
            "excluded": _strings(description="Addresses of its pool (or its localAddress) listed on a DNSBL "
                                             "and left out of SMTP (reputation.policy exclude)."),
            "proxy": {"type": ["string", "null"], "description": "Masked: no password."},
        }, ("addressStrategy", "pool", "poolLevel", "localAddress", "localAddressIPv6", "smtpLocalAddress",
            "excluded", "proxy"),
            description="How this account's upstream connections leave the machine."),
        "AccountError": _object({
            "error": {"type": "string"},
            "description": {"type": ["string", "null"]},
            "time": _TIMESTAMP,
        }, ("error", "description", "time"), description="The last login or refresh error."),
        "Account": _object({
            "account": {"type": "string"},
            "name": {"type": "string"},
            "email": {"type": "string"},
            "proxy": {"type": "string", "description": "Its password masked as ***."},
            "localAddress": {"type": "string"},
            "imap": _ref("AccountServer"),
            "smtp": _ref("AccountServer"),
            "oauth2": _ref("AccountOAuth2"),
            "created": _TIMESTAMP,
            "updated": _TIMESTAMP,
            "state": {"type": "string", "description": "What the last login or token refresh found: "
                                                       "connected, connecting (nothing yet), "
                                                       "authenticationError or connectError."},
            "lastError": {"anyOf": [_ref("AccountError"), {"type": "null"}]},
            "network": _ref("AccountNetwork"),
        }, ("account", "email", "created", "updated"),
            description="An account without passwords, refresh or access tokens."),
        "AuthenticationFormInput": _object({
            "account": _ACCOUNT_ID,
            "name": _or_null(_text(256)),
            "email": _or_null(_text(320, pattern="@", description="Also sent to the provider as a login hint.")),
            "oauth2App": _text(4096, min_len=1, description="The id of a registered OAuth2 app with the "
                                                            "authorizationCode grant."),
            "redirectUrl": _or_null({**_URL, "description": "Where the browser goes when the account is "
                                                            "connected (default: a page saying so)."}),
        }, ("account", "oauth2App")),
        # Access tokens
        "TokenInput": _object({
            "account": _or_null({**_ACCOUNT_ID, "description": "The account the token is for; none: an "
                                                               "admin token (scopes must be exactly api)."}),
            "scopes": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": list(SCOPES)}},
            "description": _text(1024, pattern=r"\S"),
            "restrictions": _or_null(_object({
                "addresses": _or_null(_strings(description="CIDRs (or single addresses) the token may be "
                                                           "used from.")),
            })),
        }, ("scopes", "description")),
        "Token": _object({
            "id": {"type": "string", "description": "The public id (not the secret)."},
            "account": {"type": ["string", "null"]},
            "description": {"type": "string"},
            "scopes": {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}},
            "created": _TIMESTAMP,
            "restrictions": {"anyOf": [_object({"addresses": _strings()}, ("addresses",)), {"type": "null"}]},
        }, ("id", "account", "description", "scopes", "created", "restrictions")),
        # Network settings
        "NetworkSettingsInput": _object({
            "addressStrategy": {"enum": [*STRATEGIES, None]},
            "localAddresses": _or_null(_strings(description="The default pool.")),
            "domainPools": _or_null({**_pools("E-mail domain -> addresses."), "maxProperties": 10000}),
            "accountPools": _or_null({**_pools("Account id -> addresses."), "maxProperties": 10000}),
        }, description="Given keys replace the stored value; null returns to gateway.yaml's. Every "
                       "address must be configured on this machine."),
        "NetworkSettings": _object({
            "addressStrategy": {"type": ["string", "null"]},
            "localAddresses": {"anyOf": [_strings(), {"type": "null"}]},
            "domainPools": _pools("Stored domain pools."),
            "accountPools": _pools("Stored account pools."),
            "effective": _object({
                "addressStrategy": {"type": "string", "enum": list(STRATEGIES)},
                "localAddresses": _strings(),
                "domainPools": _pools("gateway.yaml's, overridden by the stored ones."),
            }, ("addressStrategy", "localAddresses", "domainPools")),
            "config": _object({
                "addressStrategy": {"type": "string"},
                "localAddresses": _strings(),
                "domainPools": _pools("gateway.yaml's domain pools."),
                "ipStrategy": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
                               "description": "A strategy name or a list of {if, then} / {else} rules."},
                "proxy": {"type": ["string", "null"]},
                "noProxy": _strings(),
                "warmup": _object({"days": {"type": "integer", "minimum": 0}}, ("days",)),
            }, ("addressStrategy", "localAddresses", "domainPools", "ipStrategy", "proxy", "noProxy", "warmup")),
            "warmup": {"type": "object", "additionalProperties": _ref("WarmupState"),
                       "description": "Every pool address: its warm-up."},
        }, ("addressStrategy", "localAddresses", "domainPools", "accountPools", "effective", "config", "warmup"),
            description="The stored overrides (null: gateway.yaml's), gateway.yaml's values and the "
                        "effective ones."),
        "WarmupState": _object({
            "started": {"type": ["string", "null"], "description": "When its warm-up started (ISO 8601 UTC); "
                                                                  "null: warm (or warm-up off)."},
            "share": {"type": "number", "minimum": 0, "maximum": 1,
                      "description": "Its weight in the address picker: 1/days at first, 1 when warm."},
        }, ("started", "share")),
        "WarmupInput": _object({
            "address": {"type": "string", "description": "A pool address."},
            "action": {"type": "string", "enum": list(WARMUP_ACTIONS),
                       "description": "restart: the ramp starts again now; skip: warm at once."},
        }, ("address", "action")),
        "Warmup": _object({
            "address": {"type": "string"},
            "started": {"type": ["string", "null"]},
            "share": {"type": "number", "minimum": 0, "maximum": 1},
        }, ("address", "started", "share")),
        # Reputation
        "ZoneInput": _object({
            "host": {"type": "string", "minLength": 1,
                     "description": "The DNSBL zone, e.g. zen.spamhaus.org (ASCII, at least two labels)."},
            "name": {"type": ["string", "null"], "description": "What people call it (default: host)."},
        }, ("host",)),
        "Zone": _object({"host": {"type": "string"}, "name": {"type": "string"}}, ("host", "name")),
        "ZonesInput": _object({
            "zones": {"anyOf": [{"type": "array", "items": _ref("ZoneInput"), "maxItems": MAX_ZONES},
                                {"type": "null"}],
                      "description": "The new list (hosts unique); null: gateway.yaml's reputation.zones."},
        }, ("zones",)),
        "Zones": _object({"zones": {"type": "array", "items": _ref("Zone")}}, ("zones",)),
        "CheckInput": _object({
            "address": {"type": ["string", "null"],
                        "description": "A source address (pool or account localAddress); omitted: all."},
            "zone": {"type": ["string", "null"], "description": "A configured zone's host; omitted: all."},
        }),
        "ReputationResult": _object({
            "address": {"type": "string"},
            "zone": {"type": "string"},
            "listed": {"type": ["boolean", "null"], "description": "null: unknown (timeout, SERVFAIL, an error "
                                                                   "code of the zone), never clean."},
            "code": {"type": ["string", "null"], "description": "The A answer(s), e.g. 127.0.0.2."},
            "reason": {"type": ["string", "null"], "description": "Listed: the TXT record; unknown: why."},
            "checked": _TIMESTAMP,
        }, ("address", "zone", "listed", "code", "reason", "checked")),
        "ReputationResults": _object({"results": {"type": "array", "items": _ref("ReputationResult")}},
                                     ("results",)),
        # Live sessions
        "Connection": _object({
            "id": {"type": "integer"},
            "protocol": {"type": "string", "enum": ["imap", "smtp"]},
            "account": {"type": "string"},
            "client": {"type": "string", "description": "The client's address."},
            "upstream": {"type": "string"},
            "localAddress": {"type": ["string", "null"]},
            "proxy": {"type": ["string", "null"], "description": "Masked: no password."},
            "pooled": {"type": "boolean", "description": "The upstream connection was reused from the pool."},
            "started": _TIMESTAMP,
            "bytesToUpstream": {"type": "integer", "minimum": 0},
            "bytesToClient": {"type": "integer", "minimum": 0},
        }, ("id", "protocol", "account", "client", "upstream", "localAddress", "proxy", "pooled", "started",
            "bytesToUpstream", "bytesToClient")),
    }


# --- responses ------------------------------------------------------------------

_ERRORS = {
    "400": ("BadRequest", "Bad JSON, a wrong type, a missing or unknown field (`error`: BadRequest)."),
    "401": ("Unauthorized", "No bearer token, or one that is unknown, revoked or without the api scope."),
    "403": ("Forbidden", "The token may not be used from this address, or is limited to another account."),
    "404": ("NotFound", "No such record."),
    "405": ("MethodNotAllowed", "The path exists but not with this method; `Allow` lists the methods."),
    "409": ("Conflict", "The record exists already, or is still in use."),
    "413": ("PayloadTooLarge", f"The request body is larger than {MAX_BODY} bytes."),
}


def _responses() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code, (name, description) in _ERRORS.items():
        response: dict[str, Any] = {"description": description,
                                    "content": {"application/json": {"schema": _ref("Error")}}}
        if code == "401":
            response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"},
                                                        "description": 'Bearer realm="gateway"'}}
        if code == "405":
            response["headers"] = {"Allow": {"required": True, "schema": {"type": "string"}}}
        out[name] = response
    return out


def _ok(description: str, schema: Schema, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _operation(operation_id: str, tag: str, summary: str, ok: dict[str, Any], errors: tuple[str, ...],
               *, body: str | None = None, params: list[dict[str, Any]] | None = None,
               auth: bool = True, description: str | None = None) -> dict[str, Any]:
    """One operation; every authenticated one may also answer 401 and 403."""
    codes = set(errors) | ({"401", "403"} if auth else set())
    if body is not None:
        codes |= {"400", "413"}
    if params and any(p["in"] == "path" for p in params):
        codes.add("400")  # a path that is not valid UTF-8
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _ref(body)}}}
    operation["responses"] = {"200": ok, **{code: {"$ref": f"#/components/responses/{_ERRORS[code][0]}"}
                                            for code in sorted(codes)}}
    if not auth:
        operation["security"] = []
    return operation


def _path_param(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string", "minLength": 1}}


_APP_ID = _path_param("id", "The OAuth2 app's id.")
_ACCOUNT = _path_param("id", "The account id.")
_TOKEN = _path_param("token", "The token's secret or its public id.")
_CONNECTION = _path_param("id", "The session's id (from GET /v1/connections).", {"type": "integer"})
_DISCONNECT: dict[str, Any] = {
    "name": "disconnect", "in": "query", "required": False,
    "description": "End the sessions that logged in with this token too (true/false, 1/0, yes/no; "
                   "any case; empty: true).",
    "schema": {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|1|[Ff][Aa][Ll][Ss][Ee]|[Nn][Oo]|0)?$"},
}


def _paths() -> dict[str, Any]:
    deleted = {"type": "boolean", "const": True}
    return {
        "/v1/oauth2": {
            "post": _operation("postOAuth2App", "OAuth2 Applications", "Register an OAuth2 app", _ok(
                "Registered.", _object({"id": {"type": "string"}}, ("id",))), (), body="OAuth2AppInput"),
            "get": _operation("getOAuth2Apps", "OAuth2 Applications", "List OAuth2 apps", _ok(
                "Every app, oldest first.", _object({"apps": {"type": "array", "items": _ref("OAuth2App")},
                                                     "total": {"type": "integer", "minimum": 0}},
                                                    ("apps", "total"))), ()),
        },
        "/v1/oauth2/{id}": {
            "get": _operation("getOAuth2App", "OAuth2 Applications", "Get an OAuth2 app",
                              _ok("The app, without its client secret.", _ref("OAuth2App")), ("404",),
                              params=[_APP_ID]),
            "delete": _operation("deleteOAuth2App", "OAuth2 Applications", "Delete an OAuth2 app", _ok(
                "Deleted.", _object({"id": {"type": "string"}, "deleted": deleted}, ("id", "deleted"))),
                ("404", "409"), params=[_APP_ID], description="409 while accounts still use it."),
        },
        "/v1/account": {
            "post": _operation("postAccount", "Account", "Add an account", _ok(
                "Added.", _object({"account": {"type": "string"}, "state": {"const": "new"}},
                                  ("account", "state"))), ("409",), body="AccountInput",
                description="409 when the account id is taken."),
        },
        "/v1/account/{id}": {
            "get": _operation("getAccount", "Account", "Get an account", _ok(
                "The account without secrets, with how its connections leave the machine.", _ref("Account")),
                ("404",), params=[_ACCOUNT]),
            "put": _operation("putAccount", "Account", "Update an account", _ok(
                "Updated.", _object({"account": {"type": "string"}}, ("account",))), ("404",),
                body="AccountUpdate", params=[_ACCOUNT]),
            "delete": _operation("deleteAccount", "Account", "Delete an account and its tokens", _ok(
                "Deleted.", _object({"account": {"type": "string"}, "deleted": deleted}, ("account", "deleted"))),
                ("404",), params=[_ACCOUNT]),
        },
        "/v1/accounts": {
            "get": _operation("getAccounts", "Account", "List accounts", _ok(
                "Every account, by id.", _object({"accounts": {"type": "array", "items": _ref("Account")},
                                                  "total": {"type": "integer", "minimum": 0}},
                                                 ("accounts", "total"))), ()),
        },
        "/v1/authentication/form": {
            "post": _operation("postAuthenticationForm", "Account", "Authorize an account at its provider", _ok(
                "A one-time link to give the user: it opens the provider's consent page; the account is "
                "created (or its grant replaced) when the user consents.",
                _object({"url": {"type": "string"}}, ("url",))), ("404",), body="AuthenticationFormInput",
                description="Links point at `api.public_url`; 404 where hosted authorization is not available."),
        },
        "/v1/token": {
            "post": _operation("postToken", "Access Tokens", "Create an access token", _ok(
                "The token's secret: shown once, never stored.",
                _object({"token": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}, ("token",)),
                headers={"Cache-Control": {"required": True, "schema": {"const": "no-store"}}}),
                ("404",), body="TokenInput", description="404 when the account does not exist."),
        },
        "/v1/tokens": {
            "get": _operation("getTokens", "Access Tokens", "List every token", _ok(
                "Every live token, oldest first.", _object({"tokens": {"type": "array", "items": _ref("Token")}},
                                                           ("tokens",))), ()),
        },
        "/v1/tokens/account/{id}": {
            "get": _operation("getAccountTokens", "Access Tokens", "List an account's tokens", _ok(
                "The account's live tokens, oldest first.",
                _object({"tokens": {"type": "array", "items": _ref("Token")}}, ("tokens",))),
                ("404",), params=[_ACCOUNT]),
        },
        "/v1/token/{token}": {
            "delete": _operation("deleteToken", "Access Tokens", "Revoke a token", _ok(
                "Revoked; with ?disconnect=true, `disconnected` counts the sessions ended.",
                _object({"deleted": deleted, "disconnected": {"type": "integer", "minimum": 0}}, ("deleted",))),
                ("400", "404"), params=[_TOKEN, _DISCONNECT]),
        },
        "/v1/settings/network": {
            "get": _operation("getNetworkSettings", "Settings", "Source-address pools", _ok(
                "The network settings.", _ref("NetworkSettings")), ("404",),
                description="404 when this gateway has no network policy."),
            "put": _operation("putNetworkSettings", "Settings", "Change source-address pools", _ok(
                "The new network settings.", _ref("NetworkSettings")), ("404",), body="NetworkSettingsInput"),
        },
        "/v1/settings/network/warmup": {
            "post": _operation("postNetworkWarmup", "Settings", "Restart or skip an address's warm-up", _ok(
                "Its warm-up now.", _ref("Warmup")), ("404",), body="WarmupInput",
                description="404 when the address is in no pool; 400 when warm-up is off."),
        },
        **_reputation_paths(),
        "/v1/connections": {
            "get": _operation("getConnections", "Connections", "Live relayed sessions", _ok(
                "The live sessions (an account-bound token sees its account's only).",
                _object({"connections": {"type": "array", "items": _ref("Connection")}}, ("connections",))), ()),
        },
        "/v1/connections/{id}": {
            "delete": _operation("deleteConnection", "Connections", "End a live session", _ok(
                "Ended: the IMAP client gets `* BYE Session ended by administrator`, the SMTP client "
                "`421 4.3.2 Session ended by administrator`.", _object({"deleted": deleted}, ("deleted",))),
                ("404",), params=[_CONNECTION]),
        },
        "/metrics": {
            "get": _operation("getMetrics", "Operations", "Prometheus metrics", {
                "description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}, ()),
        },
        "/health": {
            "get": _operation("getHealth", "Operations", "Liveness", _ok(
                "Up.", _object({"status": {"const": "ok"}}, ("status",))), (), auth=False),
        },
        "/openapi.json": {
            "get": _operation("getOpenApi", "Operations", "This document", _ok(
                "The OpenAPI 3.1 document of this API.", {"type": "object"}), (), auth=False),
        },
    }


def _reputation_paths() -> dict[str, Any]:
    csv_body = {"type": "string", "description": "Rows rbl_hostname,rbl_name (header line optional)."}
    check = _operation("postReputationCheck", "Reputation", "Check source addresses on DNSBLs now", _ok(
        "The results of this check, when every lookup has answered or timed out.", _ref("ReputationResults")),
        ("404",), body="CheckInput",
        description="No body (or {}): every source address in every zone. 404: an address that is no source "
                    "address of this gateway, or a zone that is not configured.")
    check["requestBody"]["required"] = False
    import_csv = _operation("postReputationZonesCsv", "Reputation", "Import DNSBL zones from CSV", _ok(
        "Imported: the zones now in use.", _object({"imported": {"type": "integer", "minimum": 0},
                                                    "zones": {"type": "array", "items": _ref("Zone")}},
                                                   ("imported", "zones"))),
        ("404",), body="Zones", params=[{
            "name": "replace", "in": "query", "required": False,
            "description": "true: the file replaces the list; default: rows add zones or rename those with "
                           "the same host.",
            "schema": {"type": "string",
                       "pattern": "^([Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|1|[Ff][Aa][Ll][Ss][Ee]|[Nn][Oo]|0)?$"}}],
        description="Any bad row is a 400 whose message names each bad line; then nothing is imported.")
    import_csv["requestBody"] = {"required": True, "content": {"text/csv": {"schema": csv_body}}}
    return {
        "/v1/reputation": {
            "get": _operation("getReputation", "Reputation", "DNSBL results of the source addresses", _ok(
                "The last result of every source address in every zone.", _ref("ReputationResults")), ("404",)),
        },
        "/v1/reputation/check": {"post": check},
        "/v1/reputation/zones": {
            "get": _operation("getReputationZones", "Reputation", "DNSBL zones", _ok(
                "The zones in use (set here, else gateway.yaml's).", _ref("Zones")), ("404",)),
            "put": _operation("putReputationZones", "Reputation", "Replace the DNSBL zones", _ok(
                "The zones now in use; new ones are checked at once, in the background.", _ref("Zones")),
                ("404",), body="ZonesInput"),
        },
        "/v1/reputation/zones.csv": {
            "get": _operation("getReputationZonesCsv", "Reputation", "DNSBL zones as CSV", {
                "description": "rbl_hostname,rbl_name with a header line.",
                "content": {"text/csv": {"schema": {"type": "string"}}}}, ("404",)),
            "post": import_csv,
        },
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("imap-smtp-gateway")
    except Exception:  # not installed (running from a source tree)
        return "0"


def build() -> dict[str, Any]:
    """A fresh copy of the document."""
    description = (
        "Admin API of the IMAP/SMTP gateway; paths and shapes follow EmailEngine's API.\n\n"
        "Every path but `/health` and `/openapi.json` needs `Authorization: Bearer <token>` with a token "
        "of scope `api` (`gateway token create --scope api --description admin`). A token without an "
        "account may use every path; one bound to an account only that account and its tokens (403).\n\n"
        "Errors are JSON `{\"error\", \"message\"}` with a 4xx status, never a traceback: 400 for bad "
        "JSON, wrong types, missing or unknown fields; 404 for unknown ids and paths; 405 (with `Allow`) "
        f"for a method a path does not have; 413 for a body larger than {MAX_BODY} bytes.")
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": TITLE, "version": _version(), "description": description,
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "security": [{"bearer": []}],
        "tags": [{"name": name} for name in ("OAuth2 Applications", "Account", "Access Tokens", "Settings",
                                             "Reputation", "Connections", "Operations")],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An access token with the scope api."}},
            "schemas": _schemas(),
            "responses": _responses(),
        },
    }


@functools.lru_cache(maxsize=1)
def document_bytes() -> bytes:
    """The document as served: UTF-8 JSON, built once."""
    return json.dumps(build(), ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
