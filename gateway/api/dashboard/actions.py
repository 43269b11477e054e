"""What each dashboard page shows and each form does, through the JSON API's own handlers.

A page or a form never touches the store or the live sessions itself: it
builds the `Call` the JSON API would have built for the same request (the
signed-in token's record as principal, the same JSON body, the same
``?disconnect`` query) and awaits the same handler of
`gateway.api.resources.Handlers`, so validation, permissions (an
account-bound api token sees and changes its own account only) and side
effects are the API's. A change answers with a redirect to its page
(post/redirect/get) and a one-line notice there; a refused one shows its page
again with the reason and the HTTP status the API would have given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.logger import Logger

from gateway.api.dashboard import pages
from gateway.api.dashboard.network import address_facts, route
from gateway.api.dashboard.network import page as network_page
from gateway.api.dashboard.pages import BASE, HOME, Chrome
from gateway.api.dashboard.signin import Notice, Once, WebSession, WebSessions
from gateway.api.dashboard.web import Answer, Form, Query, csp, first, origin, redirect
from gateway.api.resources import ApiError, Call, Handlers, Reply
from gateway.store.base import Conflict, NotFound, ValidationError

log = Logger()


@dataclass
class Visit:
    """One request of a signed-in browser: its session, its token's current record, its address."""

    session: WebSession
    principal: dict[str, Any]
    client: str
    chrome: Chrome

    @property
    def admin(self) -> bool:
        return self.principal.get("account") is None

    def call(self, params: dict[str, str] | None = None, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> Call:
        """The `Call` the JSON API would make for this request."""
        payload = json.dumps(body).encode("utf-8") if body is not None else b""
        return Call(params or {}, payload, self.principal, self.client or None, query or {})

    def note(self, kind: str, text: str) -> None:
        self.session.notices.append(Notice(kind, text))

    def notices(self, first: list[Notice] | None = None) -> list[Notice]:
        return list(first or []) + self.session.take_notices()


class Refused(Exception):
    """An API handler said no: the status and message to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def call_api(handler: Callable[[Call], Awaitable[Reply]], call: Call) -> Any:
    """Await one API handler; its errors become `Refused` with the status the API would answer."""
    try:
        reply = await handler(call)
    except ApiError as e:
        raise Refused(e.status, e.message) from None
    except ValidationError as e:
        raise Refused(400, str(e)) from None
    except NotFound as e:
        raise Refused(404, str(e)) from None
    except Conflict as e:
        raise Refused(409, str(e)) from None
    return reply.body


class Actions:
    """The pages (GET) and the changes (POST) of the dashboard."""

    def __init__(self, handlers: Handlers, sessions: WebSessions, public_url: str, state_ttl: float,
                 clock: Callable[[], float]) -> None:
        self.handlers = handlers
        self.sessions = sessions
        self.public_url = public_url.rstrip("/")
        self.state_ttl = state_ttl
        self.clock = clock
        self.pages: dict[str, Callable[[Visit, Query], Awaitable[Answer]]] = {
            "": self.accounts, "accounts": self.accounts, "tokens": self.tokens,
            "sessions": self.sessions_page, "network": self.network}
        self.changes: dict[str, Callable[[Visit, Form], Awaitable[Answer]]] = {
            "accounts/authorize": self.authorize, "accounts/delete": self.delete_account,
            "tokens/create": self.create_token, "tokens/revoke": self.revoke_token,
            "sessions/end": self.end_session, "network/check": self.check_reputation}

    # Pages ----------------------------------------------------------------------

    async def accounts(self, visit: Visit, query: Query, status: int = 200,
                       notices: list[Notice] | None = None) -> Answer:
        h = self.handlers
        if visit.admin:
            rows = (await call_api(h.list_accounts, visit.call()))["accounts"]
            apps = (await call_api(h.list_apps, visit.call()))["apps"]
        else:
            apps = []
            try:
                rows = [await call_api(h.get_account, visit.call({"id": str(visit.principal["account"])}))]
            except Refused:
                rows = []
        shown = visit.notices(notices)
        back = (query.get(b"account") or [b""])[0].decode("utf-8", "replace")
        if (query.get(b"state") or [b""])[0] == b"success" and any(r.get("account") == back for r in rows):
            shown.append(Notice("ok", f"Account {back} is connected: the provider gave its consent."))
        page = pages.accounts(visit.chrome, shown, rows, apps, visit.session.take_once())
        # Its forms lead (through the one-time link on api.public_url) to the providers' consent pages.
        targets = [origin(self.public_url)] + [origin(str(a["authorizationUrl"])) for a in pages.consent_apps(apps)]
        return Answer(status, await pages.render(page), headers={"Content-Security-Policy": csp(targets)})

    async def tokens(self, visit: Visit, query: Query | None = None, status: int = 200,
                     notices: list[Notice] | None = None, form: dict[str, Any] | None = None) -> Answer:
        h = self.handlers
        if visit.admin:
            rows = (await call_api(h.list_tokens, visit.call()))["tokens"]
            account_ids = [str(a["account"]) for a in (await call_api(h.list_accounts, visit.call()))["accounts"]]
        else:
            account_ids = [str(visit.principal["account"])]
            rows = (await call_api(h.list_account_tokens, visit.call({"id": account_ids[0]})))["tokens"]
        page = pages.tokens(visit.chrome, visit.notices(notices), rows, account_ids, str(visit.principal["id"]),
                            visit.session.take_once(), form)
        return Answer(status, await pages.render(page))

    async def sessions_page(self, visit: Visit, query: Query | None = None, status: int = 200,
                            notices: list[Notice] | None = None) -> Answer:
        rows = (await call_api(self.handlers.list_connections, visit.call()))["connections"]
        page = pages.sessions(visit.chrome, visit.notices(notices), rows, self.clock())
        return Answer(status, await pages.render(page))

    async def network(self, visit: Visit, query: Query | None = None, status: int = 200,
                      notices: list[Notice] | None = None) -> Answer:
        shown = visit.notices(notices)
        view: dict[str, Any] | None = None
        try:
            view = await call_api(self.handlers.get_network, visit.call())
        except Refused as e:
            if e.status != 404:
                shown.append(Notice("error", e.message))
        facts = await address_facts(self.handlers, visit.call, view)
        return Answer(status, await pages.render(network_page(visit.chrome, shown, view, facts)))

    # Changes ---------------------------------------------------------------------

    async def authorize(self, visit: Visit, form: Form) -> Answer:
        """Add or re-authorize an account: the hosted consent flow's form, as POST /v1/authentication/form."""
        account = first(form, "account")
        body: dict[str, Any] = {"account": account, "oauth2App": first(form, "oauth2App")}
        for name in ("email", "name"):
            if first(form, name):
                body[name] = first(form, name)
        here = first(form, "then") != "link"
        if here:  # back to the dashboard once the provider has answered (a link sent to someone else is not)
            body["redirectUrl"] = self.public_url + HOME
        try:
            url = (await call_api(self.handlers.authentication_form, visit.call(body=body)))["url"]
        except Refused as e:
            return await self.accounts(visit, {}, e.status, [Notice("error", e.message)])
        self._audit(visit, "authorize", account=account)
        if here:
            return redirect(url)
        minutes = max(1, round(self.state_ttl / 60))
        visit.session.once = Once(
            f"One-time link for {account}", url,
            f"Send it to the owner of the mailbox: opening it leads to the provider's consent page. It works once, "
            f"within {minutes} minutes; the account exists as soon as consent is given.", link=True)
        return redirect(HOME + "#once")

    async def delete_account(self, visit: Visit, form: Form) -> Answer:
        account = first(form, "account")
        try:
            await call_api(self.handlers.delete_account, visit.call({"id": account}))
        except Refused as e:
            return await self.accounts(visit, {}, e.status, [Notice("error", e.message)])
        self._audit(visit, "account.delete", account=account)
        visit.note("ok", f"Account {account} deleted, with its tokens.")
        return redirect(HOME)

    async def create_token(self, visit: Visit, form: Form) -> Answer:
        account = first(form, "account") or (None if visit.admin else str(visit.principal["account"]))
        scopes = [s for s in form.get("scopes") or [] if s]
        cidrs = [c for c in re.split(r"[\s,]+", first(form, "cidrs")) if c]
        description = first(form, "description")
        body: dict[str, Any] = {"scopes": scopes, "description": description}
        if account is not None:
            body["account"] = account
        if cidrs:
            body["restrictions"] = {"addresses": cidrs}
        try:
            secret = (await call_api(self.handlers.create_token, visit.call(body=body)))["token"]
        except Refused as e:
            kept = {"account": account or "", "scopes": scopes, "cidrs": first(form, "cidrs"),
                    "description": description}
            return await self.tokens(visit, None, e.status, [Notice("error", e.message)], kept)
        self._audit(visit, "token.create", account=account or "-")
        visit.session.once = Once(
            f"New token for {account}" if account else "New admin token", secret,
            "Shown once: copy it now. The gateway keeps only its hash and cannot show it again.")
        return redirect(BASE + "/tokens#once")

    async def revoke_token(self, visit: Visit, form: Form) -> Answer:
        token = first(form, "token")
        disconnect = first(form, "disconnect") == "true"
        try:
            answer = await call_api(self.handlers.revoke_token, visit.call(
                {"token": token}, query={"disconnect": "true" if disconnect else "false"}))
        except Refused as e:
            return await self.tokens(visit, None, e.status, [Notice("error", e.message)])
        self.sessions.close_token(token)
        self._audit(visit, "token.revoke", token=token)
        if token == visit.principal["id"]:
            return redirect(HOME + "?ended=token")
        ended = answer.get("disconnected")
        visit.note("ok", f"Token {token} revoked" + (f"; {ended} live session{'s' if ended != 1 else ''} ended."
                                                     if isinstance(ended, int) else "."))
        return redirect(BASE + "/tokens")

    async def end_session(self, visit: Visit, form: Form) -> Answer:
        session_id = first(form, "id")
        try:
            await call_api(self.handlers.end_connection, visit.call({"id": session_id}))
        except Refused as e:
            return await self.sessions_page(visit, None, e.status,
                                            [Notice("error", e.message + " (it may have ended already)")])
        self._audit(visit, "session.end", session=session_id)
        visit.note("ok", f"Session {session_id} ended.")
        return redirect(BASE + "/sessions")

    async def check_reputation(self, visit: Visit, form: Form) -> Answer:
        check = route(self.handlers, "POST", "/v1/reputation/check")
        if check is None:
            return await self.network(visit, None, 404, [Notice("error", "This gateway has no reputation checks.")])
        try:
            await call_api(check, visit.call(body={}))
        except Refused as e:
            return await self.network(visit, None, e.status, [Notice("error", e.message)])
        self._audit(visit, "reputation.check")
        visit.note("ok", "Reputation checked.")
        return redirect(BASE + "/network")

    @staticmethod
    def _audit(visit: Visit, action: str, **fields: str) -> None:
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("Dashboard {action} {detail} by token {by} from {client}", event="dashboard.action",
                 action=action, detail=detail, by=visit.principal["id"], client=visit.client, **fields)
