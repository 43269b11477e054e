"""Sans-io SMTP syntax shared by preauth and filter: lines, EHLO replies, MAIL/RCPT params.

:class:`LineReader` splits client bytes into :class:`Line` events (the raw
bytes, terminator included, so unchanged lines can be relayed exactly) and
:class:`LineTooLong` events.  A line longer than ``max_line`` is dropped as it
arrives and the rest of it skipped through the next LF, so the buffer never
holds more than ``max_line`` bytes of a line being assembled.  Also here:
the gateway's EHLO reply (:func:`ehlo_reply`), the upstream's parsed one
(:func:`parse_ehlo`) and where MAIL FROM / RCPT TO parameters sit
(:func:`envelope_params`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final, Union

__all__ = [
    "NEED_DATA", "Line", "LineReader", "LineTooLong", "ReaderEvent", "ehlo_reply",
    "envelope_params", "parse_ehlo",
]


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by :meth:`LineReader.next_line` when more bytes are needed."""

_PATH = re.compile(rb"(?i)(?:MAIL FROM|RCPT TO): ?")
_TOKEN = re.compile(rb"[^ ]+")


@dataclass(frozen=True)
class Line:
    """One complete line; ``raw`` ends with LF (usually CRLF)."""

    raw: bytes

    @property
    def text(self) -> bytes:
        """The line without its CRLF or bare LF."""
        end = -2 if self.raw.endswith(b"\r\n") else -1
        return self.raw[:end]


@dataclass(frozen=True)
class LineTooLong:
    """``max_line`` bytes came without a LF; the rest of that line is skipped."""


ReaderEvent = Union[Line, LineTooLong]


class LineReader:
    """Turn a byte stream into lines, one per :meth:`next_line` call."""

    def __init__(self, max_line: int = 4096) -> None:
        self._max_line = max(max_line, 8)
        self._buf = bytearray()
        self._skip_line = False  # drop through the next LF (rest of a long line)
        self._skip_bytes = 0  # drop this many bytes (a refused BDAT chunk)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by a returned event."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Append bytes; nothing is parsed until :meth:`next_line`."""
        self._buf += data

    def skip(self, count: int) -> None:
        """Discard the next ``count`` bytes (the payload of a refused BDAT)."""
        self._skip_bytes += max(count, 0)

    def take_buffer(self) -> bytes:
        """Return and clear the bytes after the last event; forget any skipping."""
        data = bytes(self._buf)
        self._buf.clear()
        self._skip_line = False
        self._skip_bytes = 0
        return data

    def next_line(self) -> ReaderEvent | _Sentinel:
        """The next complete line or :class:`LineTooLong`, else ``NEED_DATA``."""
        buf = self._buf
        while self._skip_bytes or self._skip_line:
            if self._skip_bytes:
                count = min(self._skip_bytes, len(buf))
                del buf[:count]
                self._skip_bytes -= count
                if self._skip_bytes:
                    return NEED_DATA
                continue
            lf = buf.find(b"\n")
            if lf < 0:
                buf.clear()
                return NEED_DATA
            del buf[: lf + 1]
            self._skip_line = False
        lf = buf.find(b"\n", 0, self._max_line)
        if lf < 0:
            if len(buf) < self._max_line:
                return NEED_DATA
            del buf[: self._max_line]
            self._skip_line = True
            return LineTooLong()
        raw = bytes(buf[: lf + 1])
        del buf[: lf + 1]
        return Line(raw)


def ehlo_reply(
    hostname: bytes, client: bytes, *, max_size: int, starttls: bool, auth: bool
) -> bytes:
    """The gateway's multi-line ``250`` answer to ``EHLO <client>``."""
    keywords = [b"PIPELINING", b"8BITMIME", b"SIZE %d" % max_size, b"ENHANCEDSTATUSCODES",
                b"SMTPUTF8"]
    if starttls:
        keywords.append(b"STARTTLS")
    if auth:
        keywords.append(b"AUTH PLAIN LOGIN")
    lines = [hostname + b" Hello " + client, *keywords]
    return b"".join(b"250-" + line + b"\r\n" for line in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"


def parse_ehlo(reply: bytes) -> dict[bytes, bytes]:
    """Keywords (upper-case) -> parameters from a multi-line 250 EHLO reply."""
    extensions: dict[bytes, bytes] = {}
    for line in reply.split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b"-", b" "):
            continue
        keyword, _, params = line[4:].strip().partition(b" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def envelope_params(text: bytes) -> list[tuple[int, int]] | None:
    """The (start, end) of each ``keyword[=value]`` after the path of MAIL FROM / RCPT TO."""
    match = _PATH.match(text)
    if match is None:
        return None
    i = match.end()
    if text[i : i + 1] == b"<":
        quoted = False
        j = i + 1
        while j < len(text):
            c = text[j]
            if c == 0x5C and quoted:  # backslash escape inside a quoted local part
                j += 2
                continue
            if c == 0x22:
                quoted = not quoted
            elif c == 0x3E and not quoted:
                break
            j += 1
        else:
            return None
        i = j + 1
    else:
        space = text.find(b" ", i)
        i = len(text) if space < 0 else space
    return [(m.start(), m.end()) for m in _TOKEN.finditer(text, i)]
