"""A plain HTTP client of the dashboard (requests), as a script or an attacker would drive it."""

from __future__ import annotations

import re

import requests

from .gateway_proc import Gateway

CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.api_port}"


def csrf_of(html: str) -> str:
    """The CSRF token of the page's forms (every form of one page carries the same one)."""
    found = CSRF.search(html)
    assert found, html[:2000]
    return found.group(1)


def sign_in(gw: Gateway, token: str | None = None) -> requests.Session:
    """A requests session signed in to the dashboard with ``token`` (default: the admin token)."""
    session = requests.Session()
    page = session.get(base(gw) + "/", timeout=10)
    answer = session.post(base(gw) + "/dashboard/signin", timeout=30, allow_redirects=False,
                          data={"csrf": csrf_of(page.text), "token": token or gw.admin_token, "next": "/"})
    assert answer.status_code == 303, answer.text
    return session


def page(session: requests.Session, gw: Gateway, path: str) -> requests.Response:
    answer = session.get(base(gw) + path, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer


def post(session: requests.Session, gw: Gateway, path: str, data: dict[str, str | list[str]],
         csrf: str | None = "page") -> requests.Response:
    """POST a dashboard form; ``csrf="page"`` takes the token from the tokens page, None sends none."""
    fields = dict(data)
    if csrf == "page":
        csrf = csrf_of(page(session, gw, "/dashboard/tokens").text)
    if csrf is not None:
        fields["csrf"] = csrf
    return session.post(base(gw) + path, data=fields, timeout=30, allow_redirects=False)
