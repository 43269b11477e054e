"""The dashboard's HTML: the layout and one function per page (the network page is in `network`),
building `twisted.web.template` tags (every text and attribute escaped by the flattener; no markup is
ever made from strings).

Pages take what the JSON API answered (the same dictionaries) and render them;
they fetch nothing themselves. No inline script or style anywhere (the
Content-Security-Policy forbids both): behaviour is in ``static/dashboard.js``,
which only adds conveniences (copy buttons, live-session refresh), and the
look in ``static/dashboard.css``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Iterable

from twisted.web.template import Tag, flattenString, tags

from gateway.api.dashboard.signin import Notice, Once

HOME = "/"
BASE = "/dashboard"
NAV = (("accounts", "Accounts", HOME), ("tokens", "Tokens", BASE + "/tokens"),
       ("sessions", "Live sessions", BASE + "/sessions"), ("network", "Network", BASE + "/network"))
SCOPES = (("imap-proxy", "IMAP"), ("smtp", "SMTP"), ("api", "Admin API and dashboard"))
PROVIDERS = {"gmail": "Gmail", "outlook": "Microsoft 365"}
STATES = {"connected": ("ok", "connected"), "connecting": ("neutral", "connecting"),
          "authenticationError": ("bad", "authentication error"), "connectError": ("bad", "connect error")}
REFRESH_SECONDS = 5


@dataclass(frozen=True)
class Chrome:
    """What every page of a signed-in browser carries: the static files, the CSRF token, who it is."""

    css: str
    js: str
    icon: str
    csrf: str = ""
    who: str = ""          # "admin token laptop" / "token of account alice"
    admin: bool = True     # an account-less api token (may do everything)


def main(*children: Any, **attributes: str) -> Tag:
    """<main> (not in twisted.web.template's list of tag names); a new Tag each call (calling one adds to it)."""
    return Tag("main")(*children, **attributes)


async def render(page: Tag) -> bytes:
    return b"<!DOCTYPE html>\n" + await flattenString(None, page)


def _head(title: str, chrome: Chrome) -> Tag:
    return tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.meta(name="referrer", content="no-referrer"),
        tags.title(f"{title} · Gateway"),
        tags.link(rel="stylesheet", href=chrome.css),
        tags.link(rel="icon", href=chrome.icon, type="image/svg+xml"),
        tags.script(src=chrome.js, defer="defer"),
    )


def hidden(name: str, value: str) -> Tag:
    return tags.input(type="hidden", name=name, value=value)


def post_form(action: str, chrome: Chrome, *children: Any, **attrs: str) -> Tag:
    """A POST form to ``action`` with the session's CSRF token."""
    return tags.form(hidden("csrf", chrome.csrf), *children, method="post", action=action, **attrs)


def layout(title: str, active: str, chrome: Chrome, notices: Iterable[Notice], *content: Any) -> Tag:
    links = [tags.a(label, href=href, **({"aria-current": "page"} if key == active else {}))
             for key, label, href in NAV]
    signout = post_form(BASE + "/signout", chrome, tags.button("Sign out", type="submit", class_="link"),
                        class_="signout")
    header = tags.header(
        tags.nav(tags.a("Gateway", href=HOME, class_="brand"), *links, class_="nav"),
        tags.div(tags.span(chrome.who, class_="who"), signout, class_="session"))
    return tags.html(_head(title, chrome), tags.body(header, main(
        tags.h1(title), *_notices(notices), *content)), lang="en")


def _notices(notices: Iterable[Notice]) -> list[Tag]:
    return [tags.p(n.text, class_=f"notice {n.kind}", role="alert" if n.kind == "error" else "status")
            for n in notices]


def bare(title: str, chrome: Chrome, notices: Iterable[Notice], *content: Any) -> Tag:
    """A page outside the signed-in layout (sign-in, errors)."""
    return tags.html(_head(title, chrome), tags.body(main(
        tags.h1(title), *_notices(notices), *content, class_="narrow")), lang="en")


def _once(once: Once | None) -> list[Tag]:
    """A new token or one-time link, shown once with a copy button (unhidden by the script)."""
    if once is None:
        return []
    value = tags.input(type="text", readonly="readonly", value=once.value, id="once-value",
                       class_="secret", spellcheck="false", autocomplete="off",
                       **{"aria-label": once.title})
    copy = tags.button("Copy", type="button", hidden="hidden", class_="copy", **{"data-copy": "once-value"})
    extra = [tags.a("Open it in this browser", href=once.value, class_="button")] if once.link else []
    return [tags.section(tags.h2(once.title), tags.div(value, copy, class_="copyrow"), tags.p(once.note),
                         *extra, class_="once", id="once")]


# Sign-in -------------------------------------------------------------------

def signin(chrome: Chrome, csrf: str, notices: Iterable[Notice], next_path: str = "") -> Tag:
    form = tags.form(
        hidden("csrf", csrf), hidden("next", next_path),
        tags.label("Access token with the api scope", tags.input(
            type="password", name="token", id="token", required="required", autocomplete="current-password",
            spellcheck="false", autofocus="autofocus")),
        tags.button("Sign in", type="submit"),
        method="post", action=BASE + "/signin", class_="stack")
    hint = tags.p("Make one with ", tags.code("gateway token create --scope api --description NAME"),
                  " on the gateway's host.", class_="hint")
    return bare("Sign in", chrome, notices, form, hint)


def bounce(chrome: Chrome) -> Tag:
    """Load this address again at once, as a same-site navigation (its SameSite=Strict cookie comes along)."""
    return tags.html(tags.head(tags.meta(charset="utf-8"), tags.meta(**{"http-equiv": "refresh", "content": "0"}),
                               tags.title("Gateway"), tags.link(rel="icon", href=chrome.icon, type="image/svg+xml")),
                     tags.body(tags.p(tags.a("Continue to the dashboard", href=HOME))), lang="en")


def message(chrome: Chrome, title: str, text: str, back: str = HOME) -> Tag:
    return bare(title, chrome, [], tags.p(text), tags.p(tags.a("Back to the dashboard", href=back)))


# Accounts ------------------------------------------------------------------

def cell(label: str, *content: Any, **attrs: str) -> Tag:
    """A table cell that knows its column's name (phones show it before the value)."""
    return tags.td(tags.div(*content), **{"data-label": label}, **attrs)


def _state(account: dict[str, Any]) -> Tag:
    kind, text = STATES.get(str(account.get("state")), ("neutral", str(account.get("state") or "-")))
    return tags.span(text, class_=f"badge {kind}")


def _last_error(account: dict[str, Any]) -> Any:
    error = account.get("lastError")
    if not isinstance(error, dict):
        return "-"
    parts: list[Any] = [tags.strong(str(error.get("error") or "error"))]
    if error.get("description"):
        parts.append(": " + str(error["description"]))
    if error.get("time"):
        parts += [tags.br(), tags.small(when(str(error["time"])))]
    return parts


def app_label(app: dict[str, Any]) -> str:
    """Gmail, Microsoft 365, or the app's name."""
    return PROVIDERS.get(str(app.get("provider"))) or str(app.get("name") or app.get("id"))


def add_label(app: dict[str, Any]) -> str:
    provider = PROVIDERS.get(str(app.get("provider")))
    return f"Add {provider} account" if provider else f"Add other account ({app.get('name') or app.get('id')})"


def consent_apps(apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The apps whose accounts are added through the hosted consent flow: Gmail, Microsoft 365, the others."""
    usable = [a for a in apps if (a.get("grant") or "authorizationCode") == "authorizationCode"
              and a.get("authorizationUrl")]
    order = list(PROVIDERS)
    return sorted(usable, key=lambda a: order.index(a["provider"]) if a.get("provider") in order else len(order))


def _kind(account: dict[str, Any], apps: dict[str, dict[str, Any]]) -> str:
    oauth = account.get("oauth2")
    if isinstance(oauth, dict):
        app = apps.get(str(oauth.get("provider")))
        return "OAuth2, " + (app_label(app) if app else f"app {oauth.get('provider')}")
    imap = account.get("imap") or {}
    return f"password, {imap.get('host')}" if imap.get("host") else "password"


def _authorize_buttons(go: str, link: str) -> Tag:
    return tags.div(tags.button(go, type="submit", name="then", value="go"),
                    tags.button(link, type="submit", name="then", value="link", class_="secondary"),
                    class_="buttons")


def _account_actions(account: dict[str, Any], apps: dict[str, dict[str, Any]], chrome: Chrome) -> list[Tag]:
    account_id = str(account.get("account"))
    actions: list[Tag] = []
    oauth = account.get("oauth2")
    app = apps.get(str(oauth.get("provider"))) if isinstance(oauth, dict) else None
    if chrome.admin and app is not None and consent_apps([app]):
        actions.append(tags.details(tags.summary("Re-authorize…"), post_form(
            BASE + "/accounts/authorize", chrome, hidden("account", account_id), hidden("oauth2App", str(app["id"])),
            hidden("email", str(account.get("email") or "")),
            _authorize_buttons("Re-authorize in this browser", "Make a link to send"))))
    actions.append(tags.details(tags.summary("Delete…"), post_form(
        BASE + "/accounts/delete", chrome, hidden("account", account_id),
        tags.p(f"Delete {account_id}? Its tokens go too and its live sessions stay until they end."),
        tags.button(f"Delete {account_id}", type="submit", class_="danger"))))
    return actions


def _add_forms(apps: list[dict[str, Any]], chrome: Chrome) -> Tag:
    usable = consent_apps(apps)
    if not usable:
        return tags.section(tags.h2("Add an account"), tags.p(
            "No OAuth2 app with a consent page is registered yet: register the provider's client once with ",
            tags.code("POST /v1/oauth2"), " (README, \"Connecting mailboxes\"), then come back here."))
    forms = []
    for app in usable:
        label = add_label(app)
        forms.append(post_form(
            BASE + "/accounts/authorize", chrome, hidden("oauth2App", str(app["id"])),
            tags.h3(label),
            tags.label("Account ID", tags.input(name="account", required="required", autocomplete="off",
                                                spellcheck="false", placeholder="alice")),
            tags.label("E-mail (optional: else the one the provider names)",
                       tags.input(name="email", type="email", autocomplete="off")),
            tags.label("Name (optional)", tags.input(name="name", autocomplete="off")),
            _authorize_buttons(label, "Make a link to send"),
            class_="card stack"))
    return tags.section(tags.h2("Add an account"), tags.p(
        "The gateway sends the browser to the provider's consent page (or makes a one-time link to send to "
        "the mailbox owner); the account exists once consent is given.", class_="hint"),
        tags.div(*forms, class_="cards"))


def accounts(chrome: Chrome, notices: Iterable[Notice], rows: list[dict[str, Any]],
             apps: list[dict[str, Any]], once: Once | None) -> Tag:
    by_id = {str(a.get("id")): a for a in apps}
    body = [tags.tr(
        cell("Account", tags.strong(str(a.get("account"))), *([tags.br(), tags.small(str(a["name"]))]
                                                              if a.get("name") not in (None, "", a.get("account"))
                                                              else [])),
        cell("E-mail", str(a.get("email") or "-")),
        cell("Type", _kind(a, by_id)),
        cell("State", _state(a)),
        cell("Last error", _last_error(a)),
        cell("Actions", *_account_actions(a, by_id, chrome), class_="actions"),
        id=f"account-{a.get('account')}") for a in rows]
    listing = table(("Account", "E-mail", "Type", "State", "Last error", ""), body, "No accounts yet.")
    content: list[Any] = [*_once(once), listing]
    if chrome.admin:
        content.append(_add_forms(apps, chrome))
    return layout("Accounts", "accounts", chrome, notices, *content)


def table(headings: Iterable[str], rows: list[Tag], empty: str, **attrs: str) -> Tag:
    if not rows:
        return tags.p(empty, class_="empty", **attrs)
    return tags.table(tags.thead(tags.tr(*[tags.th(h, scope="col") for h in headings])), tags.tbody(*rows),
                      class_="rows", **attrs)


# Tokens --------------------------------------------------------------------

def tokens(chrome: Chrome, notices: Iterable[Notice], rows: list[dict[str, Any]], account_ids: list[str],
           own_token: str, once: Once | None, form: dict[str, Any] | None = None) -> Tag:
    form = form or {}
    body = []
    for t in rows:
        token_id = str(t.get("id"))
        cidrs = ((t.get("restrictions") or {}).get("addresses")) or []
        revoke = tags.details(tags.summary("Revoke…"), post_form(
            BASE + "/tokens/revoke", chrome, hidden("token", token_id),
            tags.label(tags.input(type="checkbox", name="disconnect", value="true"),
                       " also end the live sessions that logged in with it", class_="check"),
            *([tags.p("This is the token of this dashboard session: you will be signed out.")]
              if token_id == own_token else []),
            tags.button("Revoke", type="submit", class_="danger")))
        body.append(tags.tr(
            cell("ID", tags.code(token_id), *([" ", tags.span("this session", class_="badge neutral")]
                                                if token_id == own_token else [])),
            cell("Account", str(t.get("account") or "(admin)")),
            cell("Description", str(t.get("description") or "")),
            cell("Scopes", ", ".join(str(s) for s in t.get("scopes") or [])),
            cell("Allowed from", ", ".join(str(c) for c in cidrs) or "anywhere"),
            cell("Created", when(str(t.get("created") or ""))),
            cell("Revoke", revoke, class_="actions"),
            id=f"token-{token_id}"))
    listing = table(("ID", "Account", "Description", "Scopes", "Allowed from", "Created", ""), body, "No tokens.")
    return layout("Tokens", "tokens", chrome, notices, *_once(once), _token_form(chrome, account_ids, form),
                  tags.section(tags.h2("Tokens"), listing))


def _token_form(chrome: Chrome, account_ids: list[str], form: dict[str, Any]) -> Tag:
    chosen = str(form.get("account") or "")
    options = [tags.option(account_id, value=account_id, **({"selected": "selected"} if account_id == chosen else {}))
               for account_id in account_ids]
    if chrome.admin:
        options.append(tags.option("none: an admin token (api scope only)", value="",
                                   **({"selected": "selected"} if form and not chosen else {})))
    scopes = form.get("scopes") or ["imap-proxy"]
    boxes = [tags.label(tags.input(type="checkbox", name="scopes", value=value,
                                   **({"checked": "checked"} if value in scopes else {})),
                        f" {value} ({text})", class_="check") for value, text in SCOPES]
    return tags.section(tags.h2("Create a token"), post_form(
        BASE + "/tokens/create", chrome,
        tags.label("Account", tags.select(*options, name="account")),
        tags.fieldset(tags.legend("Scopes"), *boxes),
        tags.label("Allowed from (CIDRs, one per line or comma-separated; empty: anywhere)",
                   tags.textarea(str(form.get("cidrs") or ""), name="cidrs", rows="2", spellcheck="false",
                                 placeholder="192.0.2.0/24")),
        tags.label("Description", tags.input(name="description", required="required",
                                             value=str(form.get("description") or ""), placeholder="laptop")),
        tags.button("Create token", type="submit"), class_="stack card"))


# Live sessions -------------------------------------------------------------

def sessions(chrome: Chrome, notices: Iterable[Notice], rows: list[dict[str, Any]], now: float) -> Tag:
    body = []
    for s in rows:
        session_id = str(s.get("id"))
        end = post_form(BASE + "/sessions/end", chrome, hidden("id", session_id),
                        tags.button("End", type="submit", class_="danger"))
        body.append(tags.tr(
            cell("ID", session_id),
            cell("Protocol", str(s.get("protocol") or "").upper()),
            cell("Account", tags.strong(str(s.get("account") or ""))),
            cell("From", str(s.get("client") or "-")),
            cell("Upstream", str(s.get("upstream") or "-")),
            cell("Source address", str(s.get("localAddress") or "OS choice")),
            cell("Proxy", str(s.get("proxy") or "none")),
            cell("Pooled", "yes" if s.get("pooled") else "no"),
            cell("Bytes up / down", f"{size(s.get('bytesToUpstream'))} / {size(s.get('bytesToClient'))}"),
            cell("Since", when(str(s.get("started") or "")), tags.br(),
                  tags.small(ago(str(s.get("started") or ""), now))),
            cell("End", end, class_="actions"),
            id=f"session-{session_id}"))
    listing = table(("ID", "Protocol", "Account", "From", "Upstream", "Source address", "Proxy", "Pooled",
                    "Bytes up / down", "Since", ""), body, "No live sessions.")
    live = tags.section(tags.p(f"{len(rows)} live session{'s' if len(rows) != 1 else ''}. Bytes up: from the "
                               "client to the provider; down: back. Ending one closes its upstream connection; an "
                               "IMAP client is told ",
                               tags.code("* BYE Session ended by administrator"), ".", class_="hint"),
                        listing, id="live", **{"data-refresh": str(REFRESH_SECONDS)})
    return layout("Live sessions", "sessions", chrome, notices, live)


# Formatting ----------------------------------------------------------------

def _parse(iso: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None


def when(iso: str) -> str:
    """2026-12-02T03:00:16.118Z -> 2026-12-02 03:00:16 UTC"""
    moment = _parse(iso)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else (iso or "-")


def ago(iso: str, now: float) -> str:
    moment = _parse(iso)
    if moment is None:
        return ""
    seconds = max(0, int(now - moment.timestamp()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} d ago"


def size(value: Any) -> str:
    n = float(value) if isinstance(value, (int, float)) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def share(value: Any) -> str:
    return f"{float(value) * 100:.0f} %" if isinstance(value, (int, float)) else str(value or "-")
