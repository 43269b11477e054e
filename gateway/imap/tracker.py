"""Sans-io follower of a relayed IMAP session: command and response boundaries, both ways.

The relay feeds it the very chunks it forwards (:meth:`Tracker.from_client`,
:meth:`Tracker.from_server`); it never copies or keeps them. It walks lines
with ``bytes.find``, skips literals (``{n}``, ``{n+}``, ``~{n}``) by count,
and keeps only a short head of each line (tag, command name) and a short
tail (a literal announcement), so a 10 MB FETCH costs a few calls.

What it knows: the tags in flight and their command names, whether a mailbox
is selected, synchronizing literals waiting for the server's ``+``,
AUTHENTICATE continuation lines, IDLE/DONE, and that COMPRESS or STARTTLS
turned the stream opaque. What it decides: whether the upstream connection
could be handed to another client (:attr:`Tracker.reusable`; any doubt taints
it for good, with the reason in :attr:`Tracker.why_not`) and where a client's
``LOGOUT`` starts, so the gateway can answer it and keep the connection.

With ``record=True`` it lists every boundary it finds as :class:`Boundary`
events with absolute stream offsets: the property tests compare those for a
stream fed whole and fed in random pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Boundary", "ClientState", "Tracker"]

HEAD = 64   # bytes of a line kept for its tag and command name
TAIL = 24   # bytes of a line kept to see a literal announcement at its end

_LITERAL = re.compile(rb"~?\{(\d{1,10})(\+?)\}\r?$")
_TAG_BYTES = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c\x7e]+$")  # astring chars but + ( ) { % * " \
# Arguments that turn on per-session state (RFC 7162 CONDSTORE/QRESYNC enabling commands).
_STATEFUL_ARGS = re.compile(rb"(?i)MODSEQ|CHANGEDSINCE|CONDSTORE|QRESYNC|VANISHED")
_KEYWORD_OVERLAP = 12

# Commands after which the connection's session state is no longer the plain
# authenticated state another client would expect.
TAINTING = frozenset({
    b"IDLE", b"COMPRESS", b"ENABLE", b"STARTTLS", b"NOTIFY", b"LANGUAGE", b"COMPARATOR",
    b"UNAUTHENTICATE", b"LOGIN", b"AUTHENTICATE",
})
SELECTING = frozenset({b"SELECT", b"EXAMINE"})
UNSELECTING = frozenset({b"CLOSE", b"UNSELECT"})
OPAQUE_AFTER = frozenset({b"COMPRESS", b"STARTTLS"})


class ClientState(Enum):
    COMMAND = "command"            # at or inside a command line
    LITERAL = "literal"            # skipping literal bytes
    LITERAL_WAIT = "literal wait"  # a synchronizing literal awaits the server's "+" (or the tagged answer)
    SASL = "sasl"                  # AUTHENTICATE: each client line is a SASL response
    IDLE = "idle"                  # IDLE: the next client line is DONE
    OPAQUE = "opaque"              # COMPRESS or STARTTLS took effect: bytes are no longer IMAP text


@dataclass(frozen=True)
class Boundary:
    """One boundary found (recorded only with ``record=True``).

    ``side`` is "client" or "server"; ``offset`` the absolute stream offset
    just after the line that ended the unit; ``kind`` "command", "response",
    "continuation", "untagged", "sasl", "done", "opaque" or "refused" (a
    command whose synchronizing literal the server refused, so it ended
    without the client's rest); ``tag``/``word``
    the tag and command name (or status) when there is one.
    """

    side: str
    offset: int
    kind: str
    tag: bytes = b""
    word: bytes = b""


class _Line:
    """Head and tail of the line being read on one side, across chunks."""

    __slots__ = ("head", "tail", "fresh", "started")

    def __init__(self) -> None:
        self.head = b""      # first HEAD bytes of the unit's first line
        self.tail = b""      # last TAIL bytes of the current line piece
        self.fresh = True    # the next line starts a new unit (command or response)
        self.started = False  # part of the current line was seen in an earlier chunk

    def add(self, data: bytes, start: int, end: int) -> None:
        """Remember what a line piece data[start:end] contributes to head and tail."""
        if self.fresh and len(self.head) < HEAD:
            self.head += data[start:min(end, start + HEAD - len(self.head))]
        if end - start >= TAIL:
            self.tail = data[end - TAIL:end]
        else:
            self.tail = (self.tail + data[start:end])[-TAIL:]


class Tracker:
    """Follows one relayed IMAP session after login; see the module docstring."""

    def __init__(self, *, record: bool = False) -> None:
        self.in_flight: dict[bytes, bytes] = {}   # tag -> command name (upper case)
        self.selected = False
        self.why_not = ""                         # why the connection is not reusable ("" = it may be)
        self.events: list[Boundary] | None = [] if record else None
        self.client_state = ClientState.COMMAND
        self._c = _Line()
        self._c_tag = b""         # the command being read
        self._c_name = b""
        self._c_carry = b""       # end of the previous piece, for keywords split across chunks
        self._c_left = 0          # literal bytes still to come
        self._c_waiting = 0       # announced size of the literal waiting for "+"
        self._c_wait_tag = b""    # the command whose continuation lines (SASL, DONE) we read
        self._c_offset = 0
        self._s = _Line()
        self._s_left = 0
        self._s_opaque = False
        self._s_offset = 0
        self.logged_out = False   # a LOGOUT was found for the gateway to answer; later client bytes are ignored
        self.logout_tag = b""

    # -- what the session asks ----------------------------------------------

    @property
    def reusable(self) -> bool:
        """True when nothing is in flight, both sides sit between units, and nothing tainted it
        (also right after a LOGOUT the gateway answers itself, which never went upstream)."""
        return (not self.why_not and not self.in_flight
                and self.client_state is ClientState.COMMAND and self._c.fresh and not self._c.started
                and self._s.fresh and not self._s.started and self._s_left == 0)

    @property
    def reason(self) -> str:
        """Why :attr:`reusable` is False, in words for a log line."""
        if self.why_not:
            return self.why_not
        if self.in_flight:
            return "command in flight: " + b", ".join(self.in_flight.values()).decode("ascii", "replace")
        if self.client_state is not ClientState.COMMAND or not self._c.fresh or self._c.started:
            return "client stopped inside a command"
        if not self._s.fresh or self._s.started or self._s_left:
            return "server stopped inside a response"
        return ""

    def taint(self, reason: str) -> None:
        if not self.why_not:
            self.why_not = reason

    # -- client to server -----------------------------------------------------

    def from_client(self, data: bytes) -> int:
        """Follow client bytes; returns -1, or the offset in ``data`` where a LOGOUT the
        gateway may answer itself starts (the bytes from there on must not be forwarded)."""
        base = self._c_offset
        self._c_offset += len(data)
        if self.logged_out or self.client_state is ClientState.OPAQUE:
            return -1
        pos, size = 0, len(data)
        while pos < size:
            state = self.client_state
            if state is ClientState.LITERAL:
                step = min(self._c_left, size - pos)
                self._c_left -= step
                pos += step
                if self._c_left == 0:
                    self.client_state = ClientState.COMMAND
                continue
            if state is ClientState.LITERAL_WAIT:
                # Bytes before the server's "+": the server would take them as the literal.
                self.taint("client sent a literal before the server asked for it")
                self.client_state, self._c_left = ClientState.LITERAL, self._c_waiting
                continue
            if state is ClientState.OPAQUE:
                return -1
            end = data.find(b"\n", pos)
            if end < 0:
                self._client_piece(data, pos, size)
                self._c.started = True
                return -1
            line_start = pos if not self._c.started else -1
            self._client_piece(data, pos, end + 1)
            self._c.started = False
            pos = end + 1
            logout_at = self._client_line_end(base + pos, line_start)
            if logout_at >= 0:
                return logout_at
        return -1

    def _client_piece(self, data: bytes, start: int, end: int) -> None:
        line = self._c
        line.add(data, start, end)
        if self.client_state is ClientState.COMMAND:
            if self._c_carry and _STATEFUL_ARGS.search(self._c_carry + data[start:start + _KEYWORD_OVERLAP]):
                self.taint("a command turned on CONDSTORE/QRESYNC")
            elif _STATEFUL_ARGS.search(data, start, end):
                self.taint("a command turned on CONDSTORE/QRESYNC")
            self._c_carry = data[max(start, end - _KEYWORD_OVERLAP):end]

    def _client_line_end(self, offset: int, line_start: int) -> int:
        """A whole client line was read (its head and tail are in ``self._c``)."""
        line = self._c
        state = self.client_state
        self._c_carry = b""
        if state is ClientState.SASL:
            line.head = line.tail = b""
            self._record("client", offset, "sasl", self._c_wait_tag)
            return -1
        if state is ClientState.IDLE:
            self.client_state = ClientState.COMMAND
            line.head = line.tail = b""
            self._record("client", offset, "done", self._c_wait_tag)
            return -1
        if line.fresh:
            if not self._start_command(line.head):
                line.head = line.tail = b""
                return -1
        literal = _LITERAL.search(line.tail[:-1] if line.tail.endswith(b"\n") else line.tail)
        if literal is not None:
            size = int(literal.group(1))
            line.fresh = False
            line.tail = b""
            if literal.group(2):
                if size:
                    self.client_state, self._c_left = ClientState.LITERAL, size
            else:
                self.client_state, self._c_waiting = ClientState.LITERAL_WAIT, size
            return -1
        # The command is complete.
        tag, name = self._c_tag, self._c_name
        intercept = (name == b"LOGOUT" and line_start >= 0 and line.head.rstrip(b"\r\n").upper() ==
                     tag.upper() + b" LOGOUT" and len(self.in_flight) == 1 and self.reusable_but_for(tag))
        line.fresh, line.head, line.tail = True, b"", b""
        self._record("client", offset, "command", tag, name)
        if intercept:
            del self.in_flight[tag]
            self.logged_out = True
            self.logout_tag = tag
            return line_start
        if name == b"LOGOUT":
            self.taint("client LOGOUT went to the server")
        if name == b"AUTHENTICATE":
            self.client_state, self._c_wait_tag = ClientState.SASL, tag
        elif name == b"IDLE":
            self.client_state, self._c_wait_tag = ClientState.IDLE, tag
        return -1

    def reusable_but_for(self, tag: bytes) -> bool:
        """Everything is clean except that ``tag`` (the LOGOUT just read) is in flight."""
        return (not self.why_not and self._s.fresh and not self._s.started and self._s_left == 0
                and set(self.in_flight) == {tag})

    def _start_command(self, head: bytes) -> bool:
        words = head.rstrip(b"\r\n").split(b" ", 3)
        tag = words[0]
        if not tag or not _TAG_BYTES.match(tag):
            self.taint("client line without a valid tag")
            return False
        name = words[1].upper() if len(words) > 1 else b""
        if name == b"UID" and len(words) > 2:
            name = b"UID " + words[2].upper()
        if tag in self.in_flight:
            self.taint("client reused a tag in flight")
        self.in_flight[tag] = name
        self._c_tag, self._c_name = tag, name
        if name in TAINTING:
            self.taint(f"client used {name.decode('ascii')}")
        return True

    # -- server to client -----------------------------------------------------

    def from_server(self, data: bytes) -> None:
        """Follow server bytes."""
        base = self._s_offset
        self._s_offset += len(data)
        if self._s_opaque:
            return
        pos, size = 0, len(data)
        line = self._s
        while pos < size:
            if self._s_left:
                step = min(self._s_left, size - pos)
                self._s_left -= step
                pos += step
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                line.add(data, pos, size)
                line.started = True
                return
            line.add(data, pos, end + 1)
            line.started = False
            pos = end + 1
            self._server_line_end(base + pos)
            if self._s_opaque:
                return

    def _server_line_end(self, offset: int) -> None:
        line = self._s
        literal = _LITERAL.search(line.tail[:-1] if line.tail.endswith(b"\n") else line.tail)
        if literal is not None and not line.head.startswith(b"+"):
            line.fresh = False
            line.tail = b""
            self._s_left = int(literal.group(1))
            return
        head = line.head
        line.fresh, line.head, line.tail = True, b"", b""
        if head.startswith(b"+"):
            self._record("server", offset, "continuation")
            self._continuation()
        elif head.startswith(b"*"):
            self._record("server", offset, "untagged")
            word = head[2:6].upper()
            if word in (b"BYE ", b"BYE\r", b"BAD ", b"BAD\r"):
                self.taint(f"server said {word.strip().decode('ascii')}")
        else:
            words = head.split(b" ", 2)
            tag, status = words[0], (words[1].upper().rstrip(b"\r\n") if len(words) > 1 else b"")
            self._record("server", offset, "response", tag, status)
            self._tagged(tag, status, offset)

    def _continuation(self) -> None:
        state = self.client_state
        if state is ClientState.LITERAL_WAIT:
            self.client_state, self._c_left = ClientState.LITERAL, self._c_waiting
            if self._c_left == 0:
                self.client_state = ClientState.COMMAND
        elif state not in (ClientState.SASL, ClientState.IDLE):
            self.taint("server continuation nobody asked for")

    def _tagged(self, tag: bytes, status: bytes, offset: int) -> None:
        name = self.in_flight.pop(tag, None)
        if name is None:
            self.taint("server answered a tag not in flight")
            return
        if tag in (self._c_wait_tag, self._c_tag):
            state = self.client_state
            if state in (ClientState.SASL, ClientState.IDLE) and tag == self._c_wait_tag:
                self.client_state = ClientState.COMMAND
            elif state is ClientState.LITERAL_WAIT and tag == self._c_tag:
                # Refused before the literal: the client will not send it.
                self.client_state = ClientState.COMMAND
                self._c.fresh, self._c.head, self._c.tail = True, b"", b""
                self._record("client", self._c_offset, "refused", tag, name)
        ok = status == b"OK"
        if name in SELECTING:
            self.selected = ok
            if status == b"NO":
                self.selected = False
        elif name in UNSELECTING and ok:
            self.selected = False
        elif name in OPAQUE_AFTER and ok:
            self._s_opaque = True
            self.client_state = ClientState.OPAQUE
            self._record("server", offset, "opaque", tag, name)
        if status not in (b"OK", b"NO", b"BAD"):
            self.taint("server answered with an unknown status")

    def _record(self, side: str, offset: int, kind: str, tag: bytes = b"", word: bytes = b"") -> None:
        if self.events is not None:
            self.events.append(Boundary(side, offset, kind, tag, word))
