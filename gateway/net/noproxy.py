"""`network.no_proxy`: which upstream hosts are reached directly even when a proxy is set.

Patterns (case-insensitive, matched against the host name or IP literal the
account is configured with; nothing is resolved to decide):

- `*` matches every host;
- `imap.example.com` (or `localhost`) matches that exact name;
- `*.example.com` and `.example.com` match any name below example.com (not
  example.com itself);
- `127.0.0.0/8`, `fd00::/8` match IP literals inside the network;
- `192.0.2.7`, `[::1]`, `::1` match that address (any spelling of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import netaddr

_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _ip(text: str) -> netaddr.IPAddress | None:
    """An IP address from a literal (brackets allowed around IPv6), else None."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "%" in text:
        return None
    try:
        if ":" in text:
            return netaddr.IPAddress(text, 6)
        if text.count(".") == 3 and all(part.isdigit() for part in text.split(".")):
            return netaddr.IPAddress(text, 4, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    return None


@dataclass(frozen=True)
class NoProxy:
    """A parsed no_proxy list; `matches(host)` says whether ``host`` bypasses the proxy."""

    everything: bool = False
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[netaddr.IPNetwork, ...] = ()

    @classmethod
    def parse(cls, patterns: tuple[str, ...] | list[str]) -> "NoProxy":
        """Validate and compile patterns; ValueError names the bad one."""
        everything = False
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[netaddr.IPNetwork] = []
        for raw in patterns:
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError("no_proxy patterns must be non-empty strings")
            pattern = raw.strip().lower()
            if pattern == "*":
                everything = True
                continue
            address = _ip(pattern)
            if address is not None:
                networks.append(netaddr.IPNetwork(str(address)))
                continue
            if "/" in pattern:
                try:
                    network = netaddr.IPNetwork(pattern.strip("[]"), flags=netaddr.NOHOST)
                except (netaddr.AddrFormatError, ValueError, TypeError):
                    raise ValueError(f"no_proxy pattern {raw!r} is not a valid CIDR network") from None
                networks.append(network)
                continue
            if pattern.startswith("*."):
                pattern = pattern[1:]
            name = pattern[1:] if pattern.startswith(".") else pattern
            if not name or not set(name) <= _LABEL_CHARS or ".." in name or name.startswith("."):
                raise ValueError(f"no_proxy pattern {raw!r} is not a host name, *.domain, IP or CIDR")
            if pattern.startswith("."):
                suffixes.append(pattern.rstrip("."))
            else:
                names.add(name.rstrip("."))
        return cls(everything, frozenset(names), tuple(suffixes), tuple(networks))

    def matches(self, host: str) -> bool:
        """True when connections to ``host`` must not use the proxy."""
        if self.everything:
            return True
        address = _ip(host)
        if address is not None:
            return any(address in network for network in self.networks
                       if network.version == address.version)
        name = host.strip().lower().rstrip(".")
        if name in self.names:
            return True
        return any(name.endswith(suffix) and len(name) > len(suffix) for suffix in self.suffixes)
