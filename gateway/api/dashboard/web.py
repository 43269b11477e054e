"""The dashboard's HTTP answers: what goes back to the browser, with the headers every page carries
(a strict Content-Security-Policy, no caching, no framing, no referrer), and the form fields."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from twisted.web import server

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'{extra}; frame-ancestors 'none'; base-uri 'none'")
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]+)?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]+)?")

Query = dict[bytes, list[bytes]]
Form = dict[str, list[str]]


def csp(form_targets: list[str] | None = None) -> str:
    """The policy; ``form_targets``: origins a form's redirects may reach (Chrome checks form-action on
    every redirect after a submission: adding an account ends at the provider's consent page)."""
    origins = sorted({o for o in form_targets or [] if _ORIGIN.fullmatch(o)})
    return CSP.format(extra="".join(" " + o for o in origins))


def origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}" if parts.scheme and parts.netloc else ""


@dataclass
class Answer:
    """What goes back to the browser."""

    status: int = 200
    body: bytes = b""
    location: str | None = None
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def redirect(location: str) -> Answer:
    """303 See Other: after a change, the browser loads the page again (reloading repeats nothing)."""
    return Answer(303, b"", location=location, content_type="text/plain; charset=utf-8")


def write(request: server.Request, answer: Answer) -> None:
    request.setResponseCode(answer.status)
    request.setHeader(b"Content-Type", answer.content_type.encode("ascii"))
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": csp(), "X-Content-Type-Options": "nosniff",
               "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", **answer.headers}
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    if answer.location:
        request.setHeader(b"Location", answer.location.encode("utf-8"))
    request.setHeader(b"Content-Length", str(len(answer.body)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(answer.body)
    request.finish()


def peer_ip(request: server.Request) -> str:
    host = getattr(request.getClientAddress(), "host", None)
    return host if isinstance(host, str) else ""


def form_of(request: server.Request) -> Form:
    """The fields of a posted form (and the query), as text."""
    args: Query = request.args or {}
    return {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs] for k, vs in args.items()}


def first(form: Form, name: str) -> str:
    values = form.get(name) or [""]
    return values[0].strip()
