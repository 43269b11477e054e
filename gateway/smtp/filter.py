"""Sans-io filter on the relayed SMTP session: passes bytes, fixes what the upstream lacks.

After authentication the client keeps using the extensions the gateway
advertised.  :class:`RelayFilter` sits between client and upstream, forwards
bytes unchanged wherever it can, and answers locally (in reply order, under
pipelining) or rewrites the command where the upstream cannot honour it.
Each command expects one reply, tracked in a FIFO of :class:`_Expect` kinds.
Message bodies pass as slices of the received chunks while the end marker is
searched across chunk boundaries.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union

from gateway.smtp.codec import (
    NEED_DATA, Line, LineReader, ehlo_reply, envelope_params, parse_ehlo,
)

__all__ = ["Action", "CloseBoth", "RelayFilter", "ToClient", "ToUpstream", "parse_ehlo"]


@dataclass(frozen=True)
class ToUpstream:
    """Write these bytes to the upstream server."""

    data: bytes


@dataclass(frozen=True)
class ToClient:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True)
class CloseBoth:
    """Close both connections once the previous writes are done."""


Action = Union[ToUpstream, ToClient, CloseBoth]


class Mode(Enum):
    COMMAND = "command"  # client lines are parsed
    DATA_REPLY = "data reply"  # DATA sent: client bytes held until its reply
    BODY = "body"  # message bytes pass through until CRLF.CRLF
    QUIT = "quit"  # QUIT sent: client bytes dropped
    CLOSED = "closed"


class _Expect(Enum):
    UPSTREAM = "upstream"  # pass the upstream's reply through
    DATA = "data"  # pass it through; 354 switches the client stream to BODY
    QUIT = "quit"  # pass it through, then CloseBoth
    SWALLOW = "swallow"  # drop the upstream's reply, send the local text instead
    LOCAL = "local"  # no upstream reply: send the local text at this position


@dataclass(frozen=True)
class _Pending:
    kind: _Expect
    text: bytes = b""


_DATA_MODE = {b"354": Mode.BODY}
"""The DATA reply's code -> the client stream's next mode (else COMMAND)."""

_END = b"\r\n.\r\n"
_PARAM_EXTENSION = {
    b"RET": b"DSN", b"ENVID": b"DSN", b"NOTIFY": b"DSN", b"ORCPT": b"DSN",
    b"BY": b"DELIVERBY", b"HOLDFOR": b"FUTURERELEASE", b"HOLDUNTIL": b"FUTURERELEASE",
}
"""Parameter keyword -> the EHLO extension that allows it (default: itself)."""
_BDAT_SIZE = re.compile(rb"\A *([0-9]{1,18})(?: |\Z)")
_UNSUPPORTED = b"555 5.5.4 Unsupported parameter"
_NON_ASCII_MAILBOX = b"553 5.6.7 Non-ASCII mailbox not supported by the upstream server"


class _Out:
    """Collects actions, joining adjacent small writes of the same direction."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._kind: type[ToUpstream] | type[ToClient] | None = None
        self._parts: list[bytes] = []

    def add(
        self, kind: type[ToUpstream] | type[ToClient], data: bytes, *, join: bool = True
    ) -> None:
        if not data:
            return
        if kind is not self._kind or not join:
            self._flush()
        self._kind = kind
        self._parts.append(data)
        if not join:  # a body slice: never copied into a joined buffer
            self._flush()

    def close(self) -> None:
        self._flush()
        self.actions.append(CloseBoth())

    def done(self) -> list[Action]:
        self._flush()
        return self.actions

    def _flush(self) -> None:
        if self._parts and self._kind is not None:
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self.actions.append(self._kind(data))
        self._parts = []
        self._kind = None


_Handler = Callable[["RelayFilter", Line, _Out], None]


class RelayFilter:
    """The relayed session after AUTH: client and upstream bytes in, writes out."""

    def __init__(
        self,
        upstream_extensions: dict[bytes, bytes],
        *,
        hostname: bytes,
        max_size: int,
        max_line: int = 4096,
        max_pending: int = 256 * 1024,
    ) -> None:
        self._ext = {key.upper(): value for key, value in upstream_extensions.items()}
        self._pipelining = b"PIPELINING" in self._ext
        self._hostname = hostname
        self._max_size = max_size
        self._max_line = max(max_line, 8)
        self._max_pending = max_pending
        self._hard_limit = 4 * max_pending + self._max_line
        self._mode = Mode.COMMAND
        self._expected: deque[_Pending] = deque()
        self._client = LineReader(self._max_line)
        self._tail = b""  # last bytes of the body (up to 4), for the end marker
        self._up = bytearray()  # a partial upstream line
        self._up_start = b""  # first bytes of an over-long upstream line being streamed

    # -- public API ----------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def in_body(self) -> bool:
        return self._mode is Mode.BODY

    @property
    def should_pause_client(self) -> bool:
        """True while held client bytes exceed ``max_pending``: stop reading the client."""
        return self._client.buffered > self._max_pending

    def from_client(self, data: bytes) -> list[Action]:
        """Bytes from the client (the pre-auth leftovers first)."""
        out = _Out()
        if self._mode in (Mode.QUIT, Mode.CLOSED):
            return []
        if self._mode is Mode.BODY and not self._client.buffered:
            end = self._body(data, out)  # fast path: slices of data, no buffer
            if end < 0 or end == len(data):
                return out.done()
            data = data[end:]
        self._client.receive_data(data)
        self._pump_client(out)
        if self._client.buffered > self._hard_limit:
            self._mode = Mode.CLOSED  # the protocol did not pause: give up
            out.add(ToClient, b"421 4.7.0 Too much pipelined data\r\n")
            out.close()
        return out.done()

    def from_upstream(self, data: bytes) -> list[Action]:
        """Bytes from the upstream server: replies, in order."""
        if self._mode is Mode.CLOSED:
            return []
        out = _Out()
        self._up += data
        buf = self._up
        while buf and not self._closed():
            if self._up_start:  # the rest of an over-long line
                lf = buf.find(b"\n")
                if lf < 0:
                    self._reply_piece(bytes(buf), out)
                    buf.clear()
                    break
                start, self._up_start = self._up_start, b""
                self._reply_piece(bytes(buf[: lf + 1]), out)
                del buf[: lf + 1]
                self._line_done(start, out)
                continue
            lf = buf.find(b"\n", 0, self._max_line)
            if lf < 0:
                if len(buf) < self._max_line:
                    break
                self._up_start = bytes(buf[:4])  # stream it: keep what says final or not
                continue
            line = bytes(buf[: lf + 1])
            del buf[: lf + 1]
            self._reply_piece(line, out)
            self._line_done(line, out)
        self._pump_client(out)
        return out.done()

    # -- upstream replies ----------------------------------------------------

    def _closed(self) -> bool:
        return self._mode is Mode.CLOSED

    def _reply_piece(self, data: bytes, out: _Out) -> None:
        """Part of an upstream reply: to the client unless it is being swallowed."""
        if not (self._expected and self._expected[0].kind is _Expect.SWALLOW):
            out.add(ToClient, data)

    def _line_done(self, start: bytes, out: _Out) -> None:
        """A reply line ended; ``start`` is its beginning.  A non-``ddd-`` line ends the reply."""
        if len(start) >= 4 and start[:3].isdigit() and start[3:4] == b"-":
            return
        if not self._expected:
            return  # unsolicited (e.g. 421 before closing): passed through
        pending = self._expected.popleft()
        if pending.kind is _Expect.SWALLOW:
            out.add(ToClient, pending.text)
        elif pending.kind is _Expect.DATA:
            self._mode = _DATA_MODE.get(start[:3], Mode.COMMAND)
            self._tail = b"\r\n"  # so that a body of just ".\r\n" ends at once
        elif pending.kind is _Expect.QUIT:
            self._mode = Mode.CLOSED
            self._expected.clear()
            out.close()
            return
        self._flush_local(out)

    def _flush_local(self, out: _Out) -> None:
        while self._expected and self._expected[0].kind is _Expect.LOCAL:
            out.add(ToClient, self._expected.popleft().text)

    # -- client stream -------------------------------------------------------

    def _body(self, data: bytes, out: _Out) -> int:
        """Forward body bytes; return the index after the end marker, or -1."""
        window = self._tail + data[:4]
        hit = window.find(_END)
        end = hit + len(_END) - len(self._tail) if hit >= 0 else data.find(_END)
        if hit < 0 and end >= 0:
            end += len(_END)
        if end < 0:
            self._tail = (self._tail + data[-4:])[-4:]
            out.add(ToUpstream, data, join=False)
            return -1
        out.add(ToUpstream, data if end == len(data) else data[:end], join=False)
        self._mode = Mode.COMMAND
        self._tail = b""
        self._expected.append(_Pending(_Expect.UPSTREAM))
        return end

    def _pump_client(self, out: _Out) -> None:
        """Process held client bytes as far as the mode and the replies allow."""
        while True:
            if self._mode is Mode.BODY:
                if not self._client.buffered:
                    return
                held = self._client.take_buffer()
                end = self._body(held, out)
                if 0 <= end < len(held):
                    self._client.receive_data(held[end:])
                continue
            if self._mode is not Mode.COMMAND:
                return
            if not self._pipelining and self._expected:
                return  # one command at a time: wait for the previous reply
            event = self._client.next_line()
            if event is NEED_DATA:
                return
            if not isinstance(event, Line):  # LineTooLong
                self._local(b"500 5.5.2 Line too long", out)
                continue
            verb = event.text.partition(b" ")[0].upper()
            _COMMANDS.get(verb, RelayFilter._forward)(self, event, out)

    def _local(self, text: bytes, out: _Out) -> None:
        self._expected.append(_Pending(_Expect.LOCAL, text + b"\r\n"))
        self._flush_local(out)

    def _send(self, data: bytes, kind: _Expect, out: _Out) -> None:
        out.add(ToUpstream, data)
        self._expected.append(_Pending(kind))

    # -- commands ------------------------------------------------------------

    def _forward(self, line: Line, out: _Out) -> None:
        self._send(line.raw, _Expect.UPSTREAM, out)

    def _data(self, line: Line, out: _Out) -> None:
        self._send(line.raw, _Expect.DATA, out)
        self._mode = Mode.DATA_REPLY

    def _quit(self, line: Line, out: _Out) -> None:
        self._send(line.raw, _Expect.QUIT, out)
        self._mode = Mode.QUIT
        self._client.take_buffer()

    def _hello(self, line: Line, out: _Out) -> None:
        verb, _, arg = line.text.partition(b" ")
        name = arg.strip(b" \t")
        if not name:
            self._local(b"501 5.5.4 Syntax: %s hostname" % verb.upper(), out)
            return
        if verb.upper() == b"HELO":
            text = b"250 " + self._hostname + b"\r\n"
        else:
            text = ehlo_reply(self._hostname, name, max_size=self._max_size,
                              starttls=False, auth=False)
        out.add(ToUpstream, b"RSET\r\n")  # EHLO resets the transaction
        self._expected.append(_Pending(_Expect.SWALLOW, text))

    def _bdat(self, line: Line, out: _Out) -> None:
        match = _BDAT_SIZE.match(line.text.partition(b" ")[2])
        if match:  # skip the chunk so that its bytes are not read as commands
            self._client.skip(int(match.group(1)))
        self._local(b"502 5.5.1 CHUNKING not supported", out)

    def _envelope(self, line: Line, out: _Out, *, mail: bool) -> None:
        """MAIL/RCPT: refuse or strip parameters the upstream cannot take."""
        text = line.text
        spans = envelope_params(text)
        if spans is None:  # unparsable: the upstream's syntax error is the answer
            self._forward(line, out)
            return
        if b"SMTPUTF8" not in self._ext and any(byte >= 0x80 for byte in text[:spans[0][0] if spans else None]):
            # We advertised SMTPUTF8; an upstream without it cannot take a non-ASCII mailbox.
            self._local(_NON_ASCII_MAILBOX, out)
            return
        strip: list[tuple[int, int]] = []
        for start, end in spans:
            keyword, _, value = text[start:end].partition(b"=")
            verdict = self._check_param(keyword.upper(), value, mail)
            if verdict is None:
                strip.append((start, end))
            elif verdict:
                self._local(verdict, out)
                return
        if not strip:
            self._forward(line, out)
            return
        kept, pos = [], 0
        for start, end in strip:
            cut = start
            while cut > pos and text[cut - 1] == 0x20:
                cut -= 1
            kept.append(text[pos:cut])
            pos = end
        kept.append(text[pos:])
        self._send(b"".join(kept) + line.raw[len(text):], _Expect.UPSTREAM, out)

    def _check_param(self, keyword: bytes, value: bytes, mail: bool) -> bytes | None:
        """b"" to keep, None to strip, else the local refusal."""
        ext = self._ext
        if mail and keyword == b"SIZE":
            if value.isdigit() and int(value) > self._max_size:
                return b"552 5.3.4 Message size exceeds fixed limit"
            return b"" if b"SIZE" in ext else None
        if mail and keyword == b"BODY":
            body = value.upper()
            if b"8BITMIME" in ext:
                return b"" if body != b"BINARYMIME" else _UNSUPPORTED
            if body == b"7BIT":
                return None  # the default anyway
            if body == b"8BITMIME":
                return b"555 5.5.4 BODY=8BITMIME not supported by the upstream server"
            return _UNSUPPORTED
        if mail and keyword == b"SMTPUTF8":
            # Advertised by us, so never refused: without the upstream's support it is dropped,
            # as an MTA does for an ASCII-only envelope (non-ASCII mailboxes got 553 above).
            return b"" if b"SMTPUTF8" in ext else None
        return b"" if _PARAM_EXTENSION.get(keyword, keyword) in ext else _UNSUPPORTED


def _refuse(text: bytes) -> _Handler:
    """A handler answering ``text`` locally."""
    return lambda self, line, out: self._local(text, out)


_COMMANDS: dict[bytes, _Handler] = {
    b"EHLO": RelayFilter._hello,
    b"HELO": RelayFilter._hello,
    b"AUTH": _refuse(b"503 5.5.1 Already authenticated"),
    b"STARTTLS": _refuse(b"503 5.5.1 TLS already active"),
    b"BDAT": RelayFilter._bdat,
    b"MAIL": lambda self, line, out: self._envelope(line, out, mail=True),
    b"RCPT": lambda self, line, out: self._envelope(line, out, mail=False),
    b"DATA": RelayFilter._data,
    b"QUIT": RelayFilter._quit,
}
"""Command verb (in COMMAND mode) -> handler; anything else is forwarded as is."""
