"""Sans-io decoder for IMAP client commands before authentication (RFC 3501/9051).

Bytes go in through :meth:`CommandDecoder.receive_data`; frozen dataclass
events come out of :meth:`CommandDecoder.next_event`, one per call, parsed
lazily so that :meth:`CommandDecoder.take_buffer` hands back exactly the raw
bytes after the last event returned (relayed upstream after login, dropped
after STARTTLS).  Every buffer is bounded: a line by ``max_line``, a literal by
``max_literal``, a whole command by ``max_command``, and garbage without a line
end is discarded as it arrives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final, Union

__all__ = [
    "NEED_DATA", "Arg", "BadCommand", "Command", "CommandDecoder",
    "ContinuationLine", "Event", "LiteralContinuation",
]


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by :meth:`CommandDecoder.next_event` when more bytes are needed."""

# bytes (atom, unescaped quoted string, literal content) | None (NIL) | list
Arg = Union[bytes, None, tuple["Arg", ...]]


@dataclass(frozen=True)
class Command:
    """A complete command line (literals included); ``name`` is upper-cased."""

    tag: bytes
    name: bytes
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True)
class LiteralContinuation:
    """A synchronizing literal ``{n}`` was announced: send ``+ Ready ...``."""


@dataclass(frozen=True)
class ContinuationLine:
    """A raw line (CRLF stripped) read after :meth:`expect_continuation`."""

    line: bytes


@dataclass(frozen=True)
class BadCommand:
    """A line that could not be parsed; ``fatal`` means close the session."""

    tag: bytes | None
    reason: str
    fatal: bool = False


Event = Union[Command, LiteralContinuation, ContinuationLine, BadCommand]

# tag = 1*<ASTRING-CHAR except "+">; ATOM-CHAR excludes ( ) { SP CTL % * " \ ]
_TAG = re.compile(rb"[!#$&'\x2c-\x5b\x5d-\x7a|}~-]+")
_COMMAND_NAME = re.compile(rb"[!#$&'+\x2c-\x5b\x5e-\x7a|}~-]+")
# Arguments are read leniently (flags like \Seen, wildcards, resp-specials).
_ATOM = re.compile(rb"[!#-'*-z|}~]+")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_QUOTED_ESCAPE = re.compile(rb"\\([\"\\])")
_LITERAL = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}")
_TRAILING_LITERAL = re.compile(rb"~?\{([0-9]{1,20})(\+?)\}\r?\n\Z")
_TAIL_KEEP = 48  # bytes of a skipped line kept to spot a trailing literal


@dataclass
class _Partial:
    """A command whose earlier parts were scanned but not yet returned."""

    tag: bytes
    name: bytes
    stack: list[list[Arg]]
    count: int = 0  # arguments so far, nested ones included


@dataclass(frozen=True)
class _NeedLiteral:
    size: int
    sync: bool


class _Done:
    pass


_DONE: Final = _Done()


class CommandDecoder:
    """Turn client bytes into :class:`Command` and friends, one event per call."""

    def __init__(
        self,
        max_line: int = 8192,
        max_literal: int = 65536,
        max_args: int = 64,
        *,
        max_depth: int = 8,
        max_command: int | None = None,
    ) -> None:
        self._max_line = max_line
        self._max_literal = max_literal
        self._max_args = max_args
        self._max_depth = max_depth
        self._max_command = max_line + max_literal if max_command is None else max_command
        self._buf = bytearray()
        self._dead = False
        self._continuation = False
        self._reset()

    def _reset(self) -> None:
        """Forget the command in progress and any skipping (not the buffer)."""
        self._pos = 0  # bytes of _buf scanned into _partial, not yet returned
        self._partial: _Partial | None = None
        self._literal: int | None = None  # literal bytes awaited
        self._cmd_bytes = 0  # raw size of the command so far
        self._skip_bytes = 0  # literal bytes of a rejected command to drop
        self._skip_line = False  # drop everything through the next LF
        self._skip_tail = b""
        self._skip_tag: bytes | None = None

    # -- public API ----------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by a returned event."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Append client bytes; nothing is parsed until :meth:`next_event`."""
        if not self._dead:
            self._buf += data

    def expect_continuation(self) -> None:
        """Return the next line raw, as a :class:`ContinuationLine`."""
        self._continuation = True

    def take_buffer(self) -> bytes:
        """Return and clear the bytes after the last event returned."""
        data = bytes(self._buf)
        self._buf.clear()
        self._continuation = False
        self._reset()
        return data

    def next_event(self) -> Event | _Sentinel:
        """Parse at most one event from the buffer, or return ``NEED_DATA``."""
        while not self._dead:
            if self._skip_bytes or self._skip_line:
                skipped = self._skip()
                if skipped is not None:
                    return skipped
                continue
            if self._literal is not None:
                if not self._read_literal():
                    return NEED_DATA
            line = self._take_line()
            if line is NEED_DATA or isinstance(line, BadCommand):
                return line
            event = self._parse(line)
            if event is not None:
                return event
        return NEED_DATA

    # -- internals -----------------------------------------------------------

    def _consume(self) -> None:
        """Drop the scanned bytes: they belong to the event being returned."""
        del self._buf[: self._pos]
        self._pos = 0

    def _skip(self) -> BadCommand | _Sentinel | None:
        """Drop the rest of a rejected command; None when done skipping."""
        buf = self._buf
        if self._skip_bytes:
            n = min(self._skip_bytes, len(buf))
            del buf[:n]
            self._skip_bytes -= n
            if self._skip_bytes:
                return NEED_DATA
            self._skip_line = True  # the command goes on after its literal
            self._skip_tail = b""
        lf = buf.find(b"\n")
        if lf < 0:
            self._skip_tail = (self._skip_tail + bytes(buf[-_TAIL_KEEP:]))[-_TAIL_KEEP:]
            buf.clear()
            return NEED_DATA
        tail = (self._skip_tail + bytes(buf[max(0, lf + 1 - _TAIL_KEEP) : lf + 1]))[-_TAIL_KEEP:]
        del buf[: lf + 1]
        self._skip_line = False
        self._skip_tail = b""
        return self._skip_literal_after(tail, self._skip_tag)

    def _skip_literal_after(self, line: bytes, tag: bytes | None) -> BadCommand | None:
        """If a rejected line announced a non-sync literal, skip its bytes too."""
        match = _TRAILING_LITERAL.search(line)
        if match is None or not match.group(2):
            return None  # no literal, or a sync one the client won't send
        size = int(match.group(1))
        if size > self._max_literal:
            return self._fatal(tag, "Literal too large")
        self._skip_bytes = size
        self._skip_tag = tag
        return None

    def _fatal(self, tag: bytes | None, reason: str) -> BadCommand:
        self._dead = True
        self._buf.clear()
        self._reset()
        return BadCommand(tag, reason, fatal=True)

    def _read_literal(self) -> bool:
        """Append the awaited literal's content once it has all arrived."""
        assert self._literal is not None and self._partial is not None
        end = self._pos + self._literal
        if len(self._buf) < end:
            return False
        self._partial.stack[-1].append(bytes(self._buf[self._pos : end]))
        self._cmd_bytes += self._literal
        self._pos = end
        self._literal = None
        return True

    def _guess_tag(self) -> bytes | None:
        if self._partial is not None:
            return self._partial.tag
        if self._continuation:
            return None
        match = _TAG.match(self._buf, self._pos, self._pos + self._max_line)
        if match and match.end() < self._pos + self._max_line and self._buf[match.end()] == 0x20:
            return match.group()
        return None

    def _take_line(self) -> bytes | BadCommand | _Sentinel:
        """Next complete line (CRLF stripped), or a too-long error."""
        buf, pos = self._buf, self._pos
        lf = buf.find(b"\n", pos, pos + self._max_line)
        if lf < 0:
            if len(buf) - pos < self._max_line:
                return NEED_DATA
            tag = self._guess_tag()
            dropped = pos + self._max_line
            tail = bytes(buf[max(0, dropped - _TAIL_KEEP) : dropped])
            del buf[:dropped]
            self._reset()
            self._continuation = False
            self._skip_line = True
            self._skip_tail = tail
            self._skip_tag = tag
            return BadCommand(tag, "Line too long")
        self._pos = lf + 1
        self._cmd_bytes += lf + 1 - pos
        end = lf - 1 if lf > pos and buf[lf - 1] == 0x0D else lf
        return bytes(buf[pos:end])

    def _parse(self, line: bytes) -> Event | None:
        """Handle one complete line; None means keep scanning (non-sync literal)."""
        if self._continuation and self._partial is None:
            self._continuation = False
            self._consume()
            return ContinuationLine(line)
        if self._partial is None:
            result = self._start(line)
        elif self._cmd_bytes > self._max_command:
            result = "Command too long"
        else:
            result = self._args(line, 0, need_sep=True)
        partial = self._partial
        if isinstance(result, _Done):
            assert partial is not None
            self._consume()
            self._reset()
            return Command(partial.tag, partial.name, tuple(partial.stack[0]))
        if isinstance(result, _NeedLiteral):
            assert partial is not None
            too_big = (
                result.size > self._max_literal
                or self._cmd_bytes + result.size > self._max_command
            )
            if too_big and not result.sync:
                return self._fatal(partial.tag, "Literal too large")
            if too_big:
                self._consume()
                self._reset()
                return BadCommand(partial.tag, "Literal too large")
            self._literal = result.size
            if result.sync:
                self._consume()
                return LiteralContinuation()
            return None
        tag = result[0] if isinstance(result, tuple) else (partial.tag if partial else None)
        reason = result[1] if isinstance(result, tuple) else result
        self._consume()
        self._reset()
        fatal = self._skip_literal_after(line + b"\n", tag)
        return fatal if fatal is not None else BadCommand(tag, reason)

    def _start(self, line: bytes) -> _Done | _NeedLiteral | str | tuple[bytes | None, str]:
        """Parse ``tag SP name [SP args]``; errors carry the tag when known."""
        if not line:
            return (None, "Empty command line")
        tag_match = _TAG.match(line)
        if tag_match is None or (tag_match.end() < len(line) and line[tag_match.end()] != 0x20):
            return (None, "Invalid tag")
        tag = tag_match.group()
        start = tag_match.end() + 1
        if start >= len(line):
            return (tag, "Missing command")
        name_match = _COMMAND_NAME.match(line, start)
        if name_match is None or (
            name_match.end() < len(line) and line[name_match.end()] != 0x20
        ):
            return (tag, "Invalid command name")
        self._partial = _Partial(tag, name_match.group().upper(), [[]])
        if name_match.end() == len(line):
            return _DONE
        return self._args(line, name_match.end() + 1, need_sep=False)

    def _count(self) -> str | None:
        """Count one more argument (nested ones and announced literals too)."""
        assert self._partial is not None
        self._partial.count += 1
        return "Too many arguments" if self._partial.count > self._max_args else None

    def _add(self, arg: Arg) -> str | None:
        error = self._count()
        if error is None:
            assert self._partial is not None
            self._partial.stack[-1].append(arg)
        return error

    def _args(self, line: bytes, i: int, *, need_sep: bool) -> _Done | _NeedLiteral | str:
        """Parse arguments from ``line[i:]`` into the partial command."""
        assert self._partial is not None
        stack = self._partial.stack
        n = len(line)
        while True:
            if need_sep:
                if i == n:
                    return _DONE if len(stack) == 1 else "Unterminated list"
                c = line[i]
                if c == 0x29:  # ")"
                    if len(stack) == 1:
                        return "Unexpected )"
                    done = tuple(stack.pop())
                    stack[-1].append(done)
                    i += 1
                elif c == 0x20:
                    need_sep = False
                    i += 1
                else:
                    return "Expected space between arguments"
                continue
            if i == n:
                return "Unexpected end of line"
            c = line[i]
            error: str | None
            if c == 0x28:  # "("
                if len(stack) > self._max_depth:
                    return "Lists nested too deeply"
                error = self._count()
                if error is not None:
                    return error
                if i + 1 < n and line[i + 1] == 0x29:  # "()"
                    stack[-1].append(())
                    i += 2
                    need_sep = True
                else:
                    stack.append([])
                    i += 1
                continue
            if c == 0x22:  # '"'
                match = _QUOTED.match(line, i)
                if match is None:
                    return "Invalid quoted string"
                error = self._add(_QUOTED_ESCAPE.sub(rb"\1", match.group(1)))
                i = match.end()
            elif c == 0x7B or line.startswith(b"~{", i):
                match = _LITERAL.match(line, i)
                if match is None or match.end() != n:
                    return "Invalid literal"
                if match.group(1):
                    return "literal8 is not supported"
                error = self._count()
                if error is None:
                    return _NeedLiteral(int(match.group(2)), not match.group(3))
            else:
                match = _ATOM.match(line, i)
                if match is None:
                    return "Invalid character in command"
                atom = match.group()
                error = self._add(None if atom.upper() == b"NIL" else atom)
                i = match.end()
            if error is not None:
                return error
            need_sep = True
