"""Proxy URLs and what every proxy handshake shares: the parsed URL, a step, a handshake error.

No Twisted here: `gateway.net.socks` and `gateway.net.httpconnect` are
sans-io machines built on these; `gateway.net.tunnel` runs them on a
connection.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Protocol

SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}
MAX_REPLY = 16 * 1024


class HandshakeError(Exception):
    """The proxy refused or answered nonsense; the text is safe to show (never holds credentials)."""


@dataclass(frozen=True)
class Step:
    """What a handshake machine wants after some bytes arrived."""

    send: bytes = b""
    done: bool = False
    leftover: bytes = b""  # bytes after the proxy's final reply: the upstream's own first bytes


class Handshake(Protocol):
    """A sans-io proxy client: `start()` bytes first, then `receive_data` until a done Step."""

    def start(self) -> bytes: ...

    def receive_data(self, data: bytes) -> Step: ...


@dataclass(frozen=True)
class ProxySpec:
    """A parsed proxy URL (credentials percent-decoded)."""

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> "ProxySpec":
        """Parse ``socks5://user:pass@host:1080`` and friends; ValueError says what is wrong."""
        if not isinstance(url, str) or not url.strip():
            raise ValueError("expected a proxy URL")
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError("proxy must be a URL like socks5://host:1080 (schemes: " + ", ".join(SCHEMES) + ")")
        if not parts.hostname:
            raise ValueError("proxy URL has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("proxy URL has an invalid port") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("proxy URL must not have a path, query or fragment")
        username = urllib.parse.unquote(parts.username) if parts.username is not None else None
        password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        for value, what in ((username, "user name"), (password, "password")):
            if value is not None and len(value.encode("utf-8")) > 255:
                raise ValueError(f"proxy {what} is longer than 255 bytes")
        if scheme.startswith("socks4") and password:
            raise ValueError("SOCKS4 proxies take a user ID but no password")
        return cls(scheme, parts.hostname, port or DEFAULT_PORTS[scheme], username or None, password)

    @property
    def address(self) -> str:
        """host:port (IPv6 in brackets), no credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def masked(self) -> str:
        """The URL for logs and the API: the password (if any) shown as ***."""
        user = ""
        if self.username is not None:
            user = urllib.parse.quote(self.username, safe="")
            user += ":***@" if self.password is not None else "@"
        return f"{self.scheme}://{user}{self.address}"

    @property
    def url(self) -> str:
        """The full URL with credentials, for HTTP client libraries only (never log it)."""
        user = ""
        if self.username is not None:
            user = urllib.parse.quote(self.username, safe="")
            if self.password is not None:
                user += ":" + urllib.parse.quote(self.password, safe="")
            user += "@"
        return f"{self.scheme}://{user}{self.address}"

    @property
    def remote_dns(self) -> bool:
        """Whether the proxy resolves the upstream's name (socks4a, socks5h, HTTP CONNECT)."""
        return self.scheme in ("socks4a", "socks5h", "http", "https")


_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")


def printable(data: bytes, limit: int = 80) -> str:
    """Bytes from a proxy as one line of printable ASCII for an error message."""
    return _UNPRINTABLE.sub(b"?", data[:limit]).decode("ascii").strip()
