"""HTTP CONNECT tunnel client as a sans-io machine (RFC 9110 section 9.3.6), with Basic auth.

`ConnectClient(host, port, username, password)` sends one CONNECT request and
reads the proxy's response head (bounded at 16 KiB). A 2xx status opens the
tunnel; bytes after the head belong to the upstream. A `https://` proxy is the
same exchange inside TLS to the proxy, which `gateway.net.connector` arranges.
"""

from __future__ import annotations

import base64
import enum
import re

from gateway.net.proxy import MAX_REPLY, HandshakeError, Step, printable

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([0-9]{3})(?: (.*))?$")


class State(enum.Enum):
    REQUEST_SENT = "request sent"
    DONE = "done"


class ConnectClient:
    """One CONNECT host:port exchange."""

    def __init__(self, host: str, port: int, username: str | None = None,
                 password: str | None = None) -> None:
        self.state = State.REQUEST_SENT
        self._buffer = b""
        if any(c in host for c in "\r\n /@") or not host:
            raise HandshakeError("invalid host name for HTTP CONNECT")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise HandshakeError("invalid host name for HTTP CONNECT") from None
        authority = (f"[{host}]" if ":" in host else host) + f":{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode("utf-8")).decode("ascii")
            lines.append(f"Proxy-Authorization: Basic {token}")
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        self._with_auth = username is not None

    def start(self) -> bytes:
        return self._request

    def receive_data(self, data: bytes) -> Step:
        if self.state is State.DONE:
            raise HandshakeError("HTTP CONNECT already finished")
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_REPLY:
                raise HandshakeError("HTTP CONNECT response head longer than 16 KiB")
            if not b"HTTP/1.".startswith(self._buffer[:7]):
                raise HandshakeError("malformed HTTP CONNECT response: "
                                     + (printable(self._buffer, 40) or "binary data"))
            return Step()
        head, leftover = self._buffer[:end], self._buffer[end + 4:]
        status_line = head.split(b"\r\n", 1)[0]
        match = _STATUS_LINE.match(status_line)
        if match is None:
            raise HandshakeError("malformed HTTP CONNECT response: " + (printable(status_line, 40) or "empty"))
        status = int(match.group(1))
        reason = printable(match.group(2) or b"")
        shown = f"{status} {reason}".strip()
        if 200 <= status < 300:
            self.state = State.DONE
            self._buffer = b""
            return Step(done=True, leftover=leftover)
        if status in (401, 407):
            if self._with_auth:
                raise HandshakeError(f"HTTP CONNECT authentication refused: {shown}")
            raise HandshakeError(f"HTTP CONNECT proxy requires authentication: {shown}")
        raise HandshakeError(f"HTTP CONNECT refused: {shown}")
