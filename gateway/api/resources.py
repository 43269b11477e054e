"""Admin API handlers: OAuth2 apps, accounts, access tokens, connections, metrics, health, OpenAPI.

Each handler is `async (Call) -> Reply` and knows nothing about Twisted's
request object; `gateway.api.app` routes, authenticates and renders.

Who may do what: a token with scope `api` and no account is an admin token
and may use every path. A token with scope `api` bound to an account may only
read and change that account and its tokens (403 otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import prometheus_client

from gateway import metrics
from gateway.store.base import AsyncStore, NotFound, ValidationError


class ApiError(Exception):
    """An error with an HTTP status, a short error name and a message safe to show."""

    def __init__(self, status: int, error: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}


@dataclass
class Reply:
    """What a handler answers: JSON-able body, or bytes with a content type."""

    body: Any
    status: int = 200
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) that UTF-8 cannot encode, or None.

    JSON's \\uDCFF escapes decode to lone surrogates, which no response, log
    line or database row can hold.
    """
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "a key"
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


@dataclass
class Call:
    """One authenticated API call as handlers see it."""

    params: dict[str, str]
    body: bytes
    principal: dict[str, Any] | None
    peer_ip: str | None = None
    query: dict[str, str] = field(default_factory=dict)  # the first value of each query argument

    def flag(self, name: str) -> bool:
        """A true/false query argument (`?disconnect=true`); anything else is a 400."""
        value = self.query.get(name)
        if value is None or value.lower() in ("false", "0", "no"):
            return False
        if value.lower() in ("true", "1", "yes", ""):
            return True
        raise ApiError(400, "BadRequest", f"query argument {name} must be true or false")

    def json(self) -> dict[str, Any]:
        """The body parsed as a JSON object, or ApiError 400."""
        if not self.body.strip():
            raise ApiError(400, "BadRequest", "request body must be a JSON object")
        try:
            value = json.loads(self.body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, "BadRequest", "request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "BadRequest", "request body must be a JSON object")
        where = _unencodable(value)
        if where is not None:
            raise ApiError(400, "BadRequest", f"{where or 'request body'} is not valid Unicode "
                                              "(a lone UTF-16 surrogate)")
        return value

    @property
    def bound_account(self) -> str | None:
        """The account an account-bound api token is limited to (None for admin tokens)."""
        return (self.principal or {}).get("account")

    def require_admin(self) -> None:
        """403 unless the caller holds an admin (account-less) api token."""
        if self.bound_account is not None:
            raise ApiError(403, "Forbidden", "this token is limited to one account")

    def require_account(self, account: str) -> None:
        """403 unless the caller may act on this account."""
        if self.bound_account is not None and self.bound_account != account:
            raise ApiError(403, "Forbidden", "this token is limited to another account")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


Handler = Callable[[Call], Awaitable[Reply]]


class Handlers:
    """The admin API's operations on one store (and optionally a live-connection registry)."""

    def __init__(self, store: AsyncStore, connections: Any = None, network: Any = None,
                 account_changed: Any = None, hosted: Any = None) -> None:
        self.store = store
        self.connections = connections
        self.network = network
        self.account_changed = account_changed or (lambda account_id: None)
        self.hosted = hosted  # gateway.auth.hosted.HostedAuth, or None (no hosted authorization)

    # OAuth2 apps -----------------------------------------------------------

    async def create_app(self, call: Call) -> Reply:
        """POST /v1/oauth2 -> {id}"""
        call.require_admin()
        app = await self.store.create_app(call.json())
        return Reply({"id": app["id"]})

    async def list_apps(self, call: Call) -> Reply:
        """GET /v1/oauth2 -> {apps, total}"""
        call.require_admin()
        apps = await self.store.list_apps()
        return Reply({"apps": apps, "total": len(apps)})

    async def get_app(self, call: Call) -> Reply:
        """GET /v1/oauth2/{id} -> the app without its client secret"""
        call.require_admin()
        app = await self.store.get_app(call.params["id"])
        if app is None:
            raise NotFound(f"OAuth2 app {call.params['id']} not found")
        return Reply(app)

    async def delete_app(self, call: Call) -> Reply:
        """DELETE /v1/oauth2/{id} -> {id, deleted: true}"""
        call.require_admin()
        if not await self.store.delete_app(call.params["id"]):
            raise NotFound(f"OAuth2 app {call.params['id']} not found")
        return Reply({"id": call.params["id"], "deleted": True})

    # Hosted OAuth2 authorization ---------------------------------------------

    async def authentication_form(self, call: Call) -> Reply:
        """POST /v1/authentication/form {account, name?, email?, oauth2App, redirectUrl?} -> {url}:
        a one-time link that sends the user to the provider's consent page"""
        call.require_admin()
        if self.hosted is None:
            raise ApiError(404, "NotFound", "hosted authorization is not available here")
        return Reply({"url": await self.hosted.start(call.json())})

    # Accounts --------------------------------------------------------------

    async def create_account(self, call: Call) -> Reply:
        """POST /v1/account -> {account, state: "new"}"""
        call.require_admin()
        account = await self.store.create_account(call.json())
        return Reply({"account": account["account"], "state": "new"})

    async def get_account(self, call: Call) -> Reply:
        """GET /v1/account/{id} -> the account without secrets"""
        account_id = call.params["id"]
        call.require_account(account_id)
        account = await self.store.get_account(account_id)
        if account is None:
            raise NotFound(f"account {account_id} not found")
        if self.network is not None:
            account["network"] = await self.network.describe(account, await self._imap_host(account))
        return Reply(account)

    async def _imap_host(self, account: dict[str, Any]) -> str | None:
        """The account's IMAP host (its own, else its OAuth2 app's): no_proxy is matched on it."""
        host = (account.get("imap") or {}).get("host")
        if host is None and account.get("oauth2"):
            app = await self.store.get_app(account["oauth2"].get("provider"))
            host = ((app or {}).get("imap") or {}).get("host")
        return host

    async def update_account(self, call: Call) -> Reply:
        """PUT /v1/account/{id} (merge; null removes a field) -> {account}"""
        account_id = call.params["id"]
        call.require_account(account_id)
        updated = await self.store.update_account(account_id, call.json())
        self.account_changed(account_id)
        return Reply({"account": updated["account"]})

    async def delete_account(self, call: Call) -> Reply:
        """DELETE /v1/account/{id} -> {account, deleted: true} (its tokens go too)"""
        account_id = call.params["id"]
        call.require_account(account_id)
        account = await self.store.login_account(account_id) if self.hosted else None
        if not await self.store.delete_account(account_id):
            raise NotFound(f"account {account_id} not found")
        self.account_changed(account_id)
        if account is not None:
            await self.hosted.revoke(account)  # best effort: the grant at the provider goes too
        return Reply({"account": account_id, "deleted": True})

    async def list_accounts(self, call: Call) -> Reply:
        """GET /v1/accounts -> {accounts, total}"""
        call.require_admin()
        accounts = await self.store.list_accounts()
        return Reply({"accounts": accounts, "total": len(accounts)})

    # Access tokens ---------------------------------------------------------

    async def create_token(self, call: Call) -> Reply:
        """POST /v1/token {account, scopes, description, restrictions?} -> {token}"""
        body = call.json()
        for key in body:
            if key not in ("account", "scopes", "description", "restrictions"):
                raise ValidationError(f"unknown field {key}")
        account = body.get("account")
        if account is not None and not isinstance(account, str):
            raise ValidationError("account must be a string")
        if account is None:
            call.require_admin()
        else:
            call.require_account(account)
        scopes = body.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ValidationError("scopes must be a list of strings")
        description = body.get("description")
        if not isinstance(description, str):
            raise ValidationError("description must be a string")
        addresses = None
        restrictions = body.get("restrictions")
        if restrictions is not None:
            if not isinstance(restrictions, dict):
                raise ValidationError("restrictions must be an object")
            for key in restrictions:
                if key != "addresses":
                    raise ValidationError(f"unknown field restrictions.{key}")
            addresses = restrictions.get("addresses")
        secret, _record = await self.store.create_token(account, scopes, description, addresses)
        return Reply({"token": secret}, headers={"Cache-Control": "no-store"})

    async def list_account_tokens(self, call: Call) -> Reply:
        """GET /v1/tokens/account/{id} -> {tokens: [{id, description, scopes, created, restrictions}]}"""
        account_id = call.params["id"]
        call.require_account(account_id)
        if await self.store.get_account(account_id) is None:
            raise NotFound(f"account {account_id} not found")
        return Reply({"tokens": await self.store.list_tokens(account_id)})

    async def list_tokens(self, call: Call) -> Reply:
        """GET /v1/tokens -> every token, admin only"""
        call.require_admin()
        return Reply({"tokens": await self.store.list_tokens()})

    async def revoke_token(self, call: Call) -> Reply:
        """DELETE /v1/token/{token or id} -> {deleted: true}"""
        token_or_id = call.params["token"]
        record = await self.store.get_token(token_or_id)
        if record is None:
            raise NotFound("token not found")
        if call.bound_account is not None and record.get("account") != call.bound_account:
            raise NotFound("token not found")
        disconnect = call.flag("disconnect")
        if not await self.store.revoke_token(token_or_id):
            raise NotFound("token not found")
        body: dict[str, Any] = {"deleted": True}
        if disconnect and self.connections is not None:
            body["disconnected"] = self.connections.end_token(record["id"])
            if getattr(self.store, "cluster", False):  # the other gateways end theirs too
                await self.store.publish({"kind": "disconnect", "token": record["id"]})
        return Reply(body)

    # Network settings ------------------------------------------------------

    def _network(self) -> Any:
        if self.network is None:
            raise ApiError(404, "NotFound", "network settings are not available here")
        return self.network

    async def get_network(self, call: Call) -> Reply:
        """GET /v1/settings/network -> stored overrides, gateway.yaml's values, effective pools"""
        call.require_admin()
        network = self._network()
        return Reply(network.view(await network.settings()))

    async def put_network(self, call: Call) -> Reply:
        """PUT /v1/settings/network {addressStrategy?, localAddresses?, domainPools?, accountPools?}
        (given keys replace the stored value; null returns to gateway.yaml's) -> the new view"""
        call.require_admin()
        return Reply(await self._network().update(call.json()))

    # Operations ------------------------------------------------------------

    async def list_connections(self, call: Call) -> Reply:
        """GET /v1/connections -> {connections: [...]}; an account-bound token sees its own only"""
        sessions = list(self.connections.snapshot()) if self.connections is not None else []
        if call.bound_account is not None:
            sessions = [s for s in sessions if s.get("account") == call.bound_account]
        return Reply({"connections": sessions})

    async def end_connection(self, call: Call) -> Reply:
        """DELETE /v1/connections/{id} -> {deleted: true}: the session is ended (IMAP `* BYE Session
        ended by administrator`, SMTP `421 4.3.2 Session ended by administrator`)"""
        try:
            session_id = int(call.params["id"])
        except ValueError:
            raise NotFound(f"connection {call.params['id']} not found") from None
        sessions = self.connections.snapshot() if self.connections is not None else []
        found = next((s for s in sessions if s.get("id") == session_id), None)
        if found is None or (call.bound_account is not None and found.get("account") != call.bound_account):
            raise NotFound(f"connection {session_id} not found")
        assert self.connections is not None
        self.connections.end(session_id)
        return Reply({"deleted": True})

    async def metrics(self, call: Call) -> Reply:
        """GET /metrics -> Prometheus text.

        Requires an admin api token like every other operational path. Point
        Prometheus at it with `authorization: {credentials: <token>}` in the
        scrape config. The gateway's own registry (gateway.metrics).
        """
        call.require_admin()
        return Reply(prometheus_client.generate_latest(metrics.REGISTRY),
                     content_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def health(self, call: Call) -> Reply:
        """GET /health -> {status: ok}, no authentication"""
        return Reply({"status": "ok"})

    async def openapi(self, call: Call) -> Reply:
        """GET /openapi.json -> the OpenAPI 3.1 document of this API, no authentication"""
        from gateway.api.openapi import document_bytes  # it reads MAX_BODY from gateway.api.app

        return Reply(document_bytes())

    def routes(self) -> list[tuple[str, str, Handler, bool]]:
        """(method, path pattern, handler, needs auth) for the router."""
        from gateway.api.reputation import ReputationApi  # it imports this module

        return ReputationApi(self.network).routes() + [
            ("POST", "/v1/oauth2", self.create_app, True),
            ("GET", "/v1/oauth2", self.list_apps, True),
            ("GET", "/v1/oauth2/{id}", self.get_app, True),
            ("DELETE", "/v1/oauth2/{id}", self.delete_app, True),
            ("POST", "/v1/account", self.create_account, True),
            ("GET", "/v1/account/{id}", self.get_account, True),
            ("PUT", "/v1/account/{id}", self.update_account, True),
            ("DELETE", "/v1/account/{id}", self.delete_account, True),
            ("GET", "/v1/accounts", self.list_accounts, True),
            ("POST", "/v1/token", self.create_token, True),
            ("GET", "/v1/tokens", self.list_tokens, True),
            ("GET", "/v1/tokens/account/{id}", self.list_account_tokens, True),
            ("DELETE", "/v1/token/{token}", self.revoke_token, True),
            ("GET", "/v1/settings/network", self.get_network, True),
            ("PUT", "/v1/settings/network", self.put_network, True),
            ("GET", "/v1/connections", self.list_connections, True),
            ("DELETE", "/v1/connections/{id}", self.end_connection, True),
            ("GET", "/metrics", self.metrics, True),
            ("GET", "/health", self.health, False),
            ("POST", "/v1/authentication/form", self.authentication_form, True),
            ("GET", "/openapi.json", self.openapi, False),
        ]
