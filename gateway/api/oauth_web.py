"""The browser side of hosted OAuth2 authorization: ``/oauth/authorize/{id}`` and ``/oauth/callback``.

Small HTML pages (escaped, no script, a strict Content-Security-Policy, not
cached, no referrer: the callback URL carries the authorization code) and
redirects. No API token: the one-time link and the signed state are the
credentials.
"""

from __future__ import annotations

import html
from typing import Any, cast

from twisted.logger import Logger
from twisted.python.failure import Failure
from gateway.api.asynchronous import AsyncLeaf
from twisted.web import resource, server
from twisted.web.resource import IResource

from gateway.auth.hosted import HostedAuth, HostedError

log = Logger()

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title></head>
<body><h1>{title}</h1><p>{text}</p></body></html>
"""


def page(title: str, text: str) -> bytes:
    return _PAGE.format(title=html.escape(title), text=html.escape(text)).encode("utf-8")


class OAuthWeb(AsyncLeaf):
    """``/oauth/...``: every path here goes through :meth:`_respond`."""

    failed = "OAuth2 page failed"

    def __init__(self, hosted: HostedAuth) -> None:
        super().__init__()
        self.hosted = hosted

    async def _respond(self, request: server.Request, gone: list[Failure]) -> None:
        status, body, location = 404, page("Not found", "There is no such page."), None
        try:
            path = [p.decode("utf-8") for p in request.postpath or []]
            if request.method not in (b"GET", b"HEAD"):
                status, body = 405, page("Method not allowed", "Open this link in a browser.")
            elif len(path) == 2 and path[0] == "authorize" and path[1]:
                status, location = 302, await self.hosted.open_link(path[1])
                body = page("Redirecting", "Continue to the provider's sign-in page.")
            elif path == ["callback"]:
                args: dict[bytes, list[bytes]] = request.args or {}
                query = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in args.items() if v}
                account, email, location = await self.hosted.callback(query)
                status = 302 if location else 200
                body = page("Account connected",
                            f"The mailbox {email} is connected to the gateway as account {account}. "
                            "You can close this window.")
        except HostedError as e:
            status, body, location = 400, page("Authorization failed", str(e)), None
        except UnicodeDecodeError:
            status, body, location = 400, page("Bad request", "The address is not valid UTF-8."), None
        except Exception:
            log.failure("OAuth2 {path} failed", path=request.path.split(b"?")[0][:40].decode("latin-1"))
            status, body, location = 500, page("Error", "The gateway could not finish this step; "
                                                        "its log says why."), None
        if gone or request.finished:
            return
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; frame-ancestors 'none'")
        if location:
            request.setHeader(b"Location", location.encode("utf-8"))
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


class Root(resource.Resource):
    """The admin listener: ``/oauth/...`` and the dashboard (``/`` and ``/dashboard/...``) for browsers,
    everything else is the JSON API."""

    def __init__(self, api: resource.Resource, oauth: resource.Resource | None,
                 dashboard: resource.Resource | None = None) -> None:
        super().__init__()
        self.api = api
        self.dashboard = dashboard
        if oauth is not None:
            self.putChild(b"oauth", cast(IResource, oauth))  # @implementer, invisible to mypy
        if dashboard is not None:
            self.putChild(b"dashboard", cast(IResource, dashboard))

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        if path == b"" and not request.postpath and self.dashboard is not None:
            return self.dashboard  # "/" itself: the dashboard's home page
        request.postpath.insert(0, request.prepath.pop())  # the API routes on the whole path
        return self.api

    def render(self, request: server.Request) -> Any:  # "" (no path at all)
        return (self.dashboard or self.api).render(request)
