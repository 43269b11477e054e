"""SOCKS4, SOCKS4a, SOCKS5 and SOCKS5h clients as sans-io machines (RFC 1928, RFC 1929).

`Socks4Client(host, port, user_id, remote_dns)` and
`Socks5Client(host, port, username, password, remote_dns)` produce the bytes to
send and consume the proxy's replies; `gateway.net.tunnel` runs them on a
connection. With `remote_dns` (socks4a, socks5h) a host name is sent to the
proxy; without it the caller passes an IP address it resolved itself.
Every buffer is bounded; a refusal or a malformed reply is a `HandshakeError`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

from gateway.net.proxy import MAX_REPLY, HandshakeError, Step

SOCKS4_REPLIES = {
    90: "request granted",
    91: "request rejected or failed",
    92: "request rejected: the proxy cannot reach our identd",
    93: "request rejected: identd reports a different user ID",
}

SOCKS5_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}

NO_AUTH, USERNAME_PASSWORD, NO_ACCEPTABLE = 0x00, 0x02, 0xFF


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _hostname(host: str) -> bytes:
    try:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
    except UnicodeError:
        raise HandshakeError(f"cannot send host name {host!r} to the proxy") from None
    if not name or len(name) > 255:
        raise HandshakeError("host name for the proxy must be 1 to 255 bytes")
    return name


class S4(enum.Enum):
    REQUEST_SENT = "request sent"
    DONE = "done"


class Socks4Client:
    """SOCKS4 (an IPv4 address) or SOCKS4a (a host name, resolved by the proxy) CONNECT."""

    def __init__(self, host: str, port: int, user_id: str | None = None, remote_dns: bool = False) -> None:
        self.state = S4.REQUEST_SENT
        self._buffer = b""
        address = _ip_literal(host)
        user = (user_id or "").encode("utf-8")
        if b"\x00" in user:
            raise HandshakeError("SOCKS4 user ID must not contain NUL")
        if isinstance(address, ipaddress.IPv4Address):
            self._request = struct.pack("!BBH", 4, 1, port) + address.packed + user + b"\x00"
        elif address is not None:
            raise HandshakeError("SOCKS4 proxies cannot reach IPv6 addresses")
        elif remote_dns:
            self._request = (struct.pack("!BBH", 4, 1, port) + b"\x00\x00\x00\x01" + user + b"\x00"
                             + _hostname(host) + b"\x00")
        else:
            raise HandshakeError("SOCKS4 needs an IPv4 address (use socks4a:// for host names)")

    def start(self) -> bytes:
        return self._request

    def receive_data(self, data: bytes) -> Step:
        if self.state is S4.DONE:
            raise HandshakeError("SOCKS4 handshake already finished")
        self._buffer += data
        if len(self._buffer) < 8:
            return Step()
        reply, leftover = self._buffer[:8], self._buffer[8:]
        version, code = reply[0], reply[1]
        if version not in (0, 4):
            raise HandshakeError(f"malformed SOCKS4 reply (version {version})")
        if code != 90:
            text = SOCKS4_REPLIES.get(code)
            if text is None:
                raise HandshakeError(f"malformed SOCKS4 reply (code {code})")
            raise HandshakeError(f"SOCKS4 {text} (reply {code})")
        self.state = S4.DONE
        self._buffer = b""
        return Step(done=True, leftover=leftover)


class S5(enum.Enum):
    GREETING_SENT = "greeting sent"
    AUTH_SENT = "authentication sent"
    REQUEST_SENT = "request sent"
    DONE = "done"


class Socks5Client:
    """SOCKS5 CONNECT with no authentication or username/password (RFC 1929)."""

    def __init__(self, host: str, port: int, username: str | None = None, password: str | None = None,
                 remote_dns: bool = False) -> None:
        self.state = S5.GREETING_SENT
        self._buffer = b""
        self._credentials: tuple[bytes, bytes] | None = None
        if username is not None or password is not None:
            user, secret = (username or "").encode("utf-8"), (password or "").encode("utf-8")
            if not 1 <= len(user) <= 255 or len(secret) > 255:
                raise HandshakeError("SOCKS5 user name must be 1 to 255 bytes and password at most 255")
            self._credentials = (user, secret)
        address = _ip_literal(host)
        if isinstance(address, ipaddress.IPv4Address):
            target = b"\x01" + address.packed
        elif isinstance(address, ipaddress.IPv6Address):
            target = b"\x04" + address.packed
        elif remote_dns:
            name = _hostname(host)
            target = b"\x03" + bytes([len(name)]) + name
        else:
            raise HandshakeError("SOCKS5 needs an IP address here (use socks5h:// for remote DNS)")
        self._request = b"\x05\x01\x00" + target + struct.pack("!H", port)
        # (state) -> handler; each handler returns the Step for the bytes it consumed.
        self._table = {
            S5.GREETING_SENT: self._on_method,
            S5.AUTH_SENT: self._on_auth,
            S5.REQUEST_SENT: self._on_reply,
        }

    def start(self) -> bytes:
        methods = bytes([NO_AUTH, USERNAME_PASSWORD]) if self._credentials else bytes([NO_AUTH])
        return b"\x05" + bytes([len(methods)]) + methods

    def receive_data(self, data: bytes) -> Step:
        self._buffer += data
        if len(self._buffer) > MAX_REPLY:
            raise HandshakeError("SOCKS5 reply too long")
        sent = b""
        while True:
            handler = self._table.get(self.state)
            if handler is None:
                raise HandshakeError("SOCKS5 handshake already finished")
            step = handler()
            if step is None:  # need more bytes
                return Step(send=sent)
            sent += step.send
            if step.done:
                return Step(send=sent, done=True, leftover=step.leftover)

    def _take(self, n: int) -> bytes:
        chunk, self._buffer = self._buffer[:n], self._buffer[n:]
        return chunk

    def _on_method(self) -> Step | None:
        if len(self._buffer) < 2:
            return None
        version, method = self._take(2)
        if version != 5:
            raise HandshakeError(f"malformed SOCKS5 reply (version {version}): is this a SOCKS5 proxy?")
        if method == NO_AUTH:
            self.state = S5.REQUEST_SENT
            return Step(send=self._request)
        if method == USERNAME_PASSWORD and self._credentials is not None:
            user, secret = self._credentials
            self.state = S5.AUTH_SENT
            return Step(send=b"\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret)
        if method == NO_ACCEPTABLE:
            if self._credentials is None:
                raise HandshakeError("SOCKS5 proxy requires authentication (no acceptable method)")
            raise HandshakeError("SOCKS5 proxy accepts none of our authentication methods")
        raise HandshakeError(f"malformed SOCKS5 reply (method {method} was not offered)")

    def _on_auth(self) -> Step | None:
        if len(self._buffer) < 2:
            return None
        version, status = self._take(2)
        if version != 1:
            raise HandshakeError(f"malformed SOCKS5 authentication reply (version {version})")
        if status != 0:
            raise HandshakeError("SOCKS5 authentication refused")
        self.state = S5.REQUEST_SENT
        return Step(send=self._request)

    def _on_reply(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        version, code = buf[0], buf[1]
        if version != 5:
            raise HandshakeError(f"malformed SOCKS5 reply (version {version})")
        if code != 0:
            text = SOCKS5_REPLIES.get(code)
            if text is None:
                raise HandshakeError(f"SOCKS5 connect failed (unknown reply {code})")
            raise HandshakeError(f"SOCKS5 {text} (reply {code})")
        if len(buf) < 5:
            return None
        if buf[2] != 0:
            raise HandshakeError("malformed SOCKS5 reply (reserved byte not zero)")
        kind = buf[3]
        if kind == 1:
            length = 4 + 4 + 2
        elif kind == 4:
            length = 4 + 16 + 2
        elif kind == 3:
            length = 4 + 1 + buf[4] + 2
        else:
            raise HandshakeError(f"malformed SOCKS5 reply (address type {kind})")
        if len(buf) < length:
            return None
        self._take(length)
        self.state = S5.DONE
        leftover, self._buffer = self._buffer, b""
        return Step(done=True, leftover=leftover)
