"""The network page: strategy, proxy and pools, and each source address's reputation, warm-up and
exclusion when the gateway has those features.

Read through the JSON API's own routes and documents (``GET /v1/reputation``
``{results: [{address, zone, listed, code, reason, checked}]}``; the
``warmup`` and ``excluded`` entries of ``GET /v1/settings/network``), looked
up by path in `Handlers.routes()`: a gateway without them shows pools alone,
and a failure there leaves the rest of the page standing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import netaddr
from twisted.logger import Logger
from twisted.web.template import Tag, tags

from gateway.api.dashboard.pages import Chrome, cell, layout, post_form, share, table, when
from gateway.api.dashboard.signin import Notice
from gateway.api.resources import ApiError, Call, Handler, Handlers

log = Logger()


@dataclass
class AddressFacts:
    """What is known of each source address beyond its pools (when the gateway has those features)."""

    reputation: dict[str, list[dict[str, Any]]]   # address -> [{zone, listed, code, reason, checked}]
    warmup: dict[str, dict[str, Any]]              # address -> {started, share}
    excluded: set[str]
    zones: list[dict[str, Any]] | None = None      # the DNSBL zones ({host, name}); None: not known here
    can_check: bool = False


def route(handlers: Handlers, method: str, pattern: str) -> Handler | None:
    """The API handler of ``method pattern``, or None when this gateway has no such route."""
    for m, p, handler, _auth in handlers.routes():
        if m == method and p == pattern:
            return handler
    return None


async def _read(handlers: Handlers, pattern: str, call: Callable[[], Call]) -> dict[str, Any] | None:
    """``GET pattern`` through the API's handler; None when there is no such route or it says no."""
    handler = route(handlers, "GET", pattern)
    if handler is None:
        return None
    try:
        body = (await handler(call())).body
    except ApiError:  # 404: not available here; 403: an account-bound token
        return None
    except Exception:
        log.failure("Dashboard: reading GET {pattern} failed; the network page shows pools only", pattern=pattern)
        return None
    return body if isinstance(body, dict) else None


async def address_facts(handlers: Handlers, call: Callable[[], Call], view: dict[str, Any] | None) -> AddressFacts:
    facts = AddressFacts(reputation={}, warmup={}, excluded=set())
    if view is not None:
        _walk(view, facts)
    facts.warmup = {a: w for a, w in facts.warmup.items() if w.get("started")}  # null: warm (or warm-up off)
    results = await _read(handlers, "/v1/reputation", call)
    if results is None:
        return facts
    for result in results.get("results") or []:
        if isinstance(result, dict) and isinstance(result.get("address"), str):
            facts.reputation.setdefault(result["address"], []).append(result)
    zones = await _read(handlers, "/v1/reputation/zones", call)
    if zones is not None:
        facts.zones = [z for z in zones.get("zones") or [] if isinstance(z, dict)]
    facts.can_check = route(handlers, "POST", "/v1/reputation/check") is not None and facts.zones != []
    return facts


def _is_address(value: Any) -> bool:
    try:
        netaddr.IPAddress(value)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return False
    return True


def _walk(node: Any, facts: AddressFacts) -> None:
    """Collect `warmup` ({address: {started, share}} or {address, warmup} entries) and `excluded` lists."""
    if isinstance(node, list):
        for item in node:
            _walk(item, facts)
        return
    if not isinstance(node, dict):
        return
    warmup = node.get("warmup")
    if isinstance(node.get("address"), str) and isinstance(warmup, dict):
        facts.warmup[node["address"]] = warmup
    elif isinstance(warmup, dict):
        for address, value in warmup.items():
            if _is_address(address) and isinstance(value, dict):
                facts.warmup[address] = value
    excluded = node.get("excluded")
    if isinstance(excluded, list):
        facts.excluded.update(a for a in excluded if isinstance(a, str))
    for key, value in node.items():
        if key not in ("warmup", "excluded"):
            _walk(value, facts)


# The page ----------------------------------------------------------------------

def _address(address: str, facts: AddressFacts) -> Tag:
    badges: list[Any] = [tags.code(address)]
    results = facts.reputation.get(address)
    if address in facts.excluded:
        badges.append(tags.span("excluded", class_="badge bad"))
    if results:
        listed = [r for r in results if r.get("listed") is True]
        unknown = [r for r in results if r.get("listed") is None]
        if listed:
            badges.append(tags.span("listed: " + ", ".join(str(r.get("zone")) for r in listed), class_="badge bad"))
        elif unknown:
            badges.append(tags.span("reputation unknown", class_="badge neutral"))
        else:
            badges.append(tags.span("not listed", class_="badge ok"))
    warm = facts.warmup.get(address)
    if warm and isinstance(warm.get("share"), (int, float)) and warm["share"] < 1:
        badges.append(tags.span(f"warming up: {share(warm.get('share'))}", class_="badge neutral"))
    return tags.li(*_spaced(badges))


def _spaced(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if out:
            out.append(" ")
        out.append(item)
    return out


def _pool_row(name: str, level: str, addresses: list[str], facts: AddressFacts) -> Tag:
    listing = tags.ul(*[_address(a, facts) for a in addresses], class_="plain") if addresses else \
        tags.span("none: the operating system picks", class_="muted")
    return tags.tr(cell("Pool", tags.strong(name)), cell("Level", level), cell("Addresses", listing))


def page(chrome: Chrome, notices: Iterable[Notice], view: dict[str, Any] | None, facts: AddressFacts) -> Tag:
    if view is None:
        return layout("Network", "network", chrome, notices,
                      tags.p("Network settings are not available on this gateway.", class_="empty"))
    effective = view.get("effective") or {}
    config = view.get("config") or {}
    stored = view.get("addressStrategy") is not None
    summary = tags.dl(
        tags.dt("Address strategy"),
        tags.dd(str(effective.get("addressStrategy") or "default"), " ",
                tags.small("(set through the API)" if stored else "(gateway.yaml)")),
        tags.dt("IP family order"), tags.dd(_plain(config.get("ipStrategy"))),
        tags.dt("Proxy"), tags.dd(str(config.get("proxy") or "none")),
        tags.dt("No proxy for"), tags.dd(", ".join(str(p) for p in config.get("noProxy") or []) or "-"),
        class_="facts")
    rows = [_pool_row("default", "every account", list(effective.get("localAddresses") or []), facts)]
    for domain, pool in sorted((effective.get("domainPools") or {}).items()):
        rows.append(_pool_row(domain, "e-mail domain", list(pool), facts))
    for account, pool in sorted((view.get("accountPools") or {}).items()):
        rows.append(_pool_row(account, "account", list(pool), facts))
    content: list[Any] = [summary, tags.section(tags.h2("Source-address pools"), table(
        ("Pool", "Level", "Addresses"), rows, ""))]
    content.append(_reputation(chrome, facts))
    if facts.warmup:
        content.append(tags.section(tags.h2("Warm-up"), table(("Address", "Started", "Share"), [
            tags.tr(cell("Address", tags.code(a)), cell("Started", when(str(w.get("started") or ""))),
                    cell("Share", share(w.get("share")))) for a, w in sorted(facts.warmup.items())], "")))
    content.append(tags.p("Change pools and the strategy with ", tags.code("PUT /v1/settings/network"),
                          " or gateway.yaml (README, \"Network (outbound)\").", class_="hint"))
    return layout("Network", "network", chrome, notices, *content)


def _reputation(chrome: Chrome, facts: AddressFacts) -> Any:
    if facts.zones == [] and not facts.reputation:
        return tags.section(tags.h2("Reputation (DNSBL)"), tags.p(
            "No DNSBL zone is configured, so no address is checked: set ", tags.code("reputation.zones"),
            " in gateway.yaml or use ", tags.code("PUT /v1/reputation/zones"), ".", class_="hint"))
    if not facts.reputation and not facts.can_check:
        return ""
    rows = []
    for address, results in sorted(facts.reputation.items()):
        for r in results:
            listed = r.get("listed")
            text, kind = ("listed", "bad") if listed is True else ("not listed", "ok") if listed is False \
                else ("unknown", "neutral")
            rows.append(tags.tr(
                cell("Address", tags.code(address)), cell("Zone", str(r.get("zone") or "")),
                cell("Result", tags.span(text, class_=f"badge {kind}")),
                cell("Reason", " ".join(str(x) for x in (r.get("code"), r.get("reason")) if x) or "-"),
                cell("Checked", when(str(r.get("checked") or "")))))
    check = post_form("/dashboard/network/check", chrome, tags.button("Check all now", type="submit")) \
        if facts.can_check and chrome.admin else ""
    zones = tags.p("Zones: " + ", ".join(f"{z.get('name') or z.get('host')} ({z.get('host')})"
                                         for z in facts.zones), class_="hint") if facts.zones else ""
    return tags.section(tags.h2("Reputation (DNSBL)"), zones, table(
        ("Address", "Zone", "Result", "Reason", "Checked"), rows, "No check has run yet."), check)


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "))
