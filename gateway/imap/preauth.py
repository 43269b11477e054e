"""Sans-io IMAP state machine for the session before the upstream login.

It answers CAPABILITY, NOOP, ID, LOGOUT, STARTTLS, LOGIN and AUTHENTICATE
PLAIN itself and turns the client's credentials into a :class:`Login` action;
the Twisted protocol carries out the actions and reports the login result back
with :meth:`PreAuth.login_succeeded` or :meth:`PreAuth.login_failed`.
Dispatch goes through one table, ``_TRANSITIONS``, keyed by (state, command).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union

from gateway.actions import Close, Send, StartRelay, StartTLS, safe_reason
from gateway.imap.codec import (
    NEED_DATA,
    Arg,
    BadCommand,
    Command,
    CommandDecoder,
    ContinuationLine,
    LiteralContinuation,
)

__all__ = [
    "ACCESS_DENIED",
    "INVALID_CREDENTIALS",
    "Action",
    "Close",
    "Login",
    "PreAuth",
    "Send",
    "StartRelay",
    "StartTLS",
    "State",
    "unavailable",
]

# Pre-auth lines, literals and whole commands are capped at 8 KiB (a token is 64 characters):
# a longer line gets a tagged BAD and * BYE, and a larger literal is refused before its
# continuation, then the connection is closed.
MAX_PREAUTH = 8192
_OVERSIZE = frozenset({"Line too long", "Literal too large", "Command too long"})

INVALID_CREDENTIALS = b"[AUTHENTICATIONFAILED] Invalid credentials"
ACCESS_DENIED = b"[AUTHENTICATIONFAILED] Access denied, traffic not accepted from this IP"
PRIVACY_REQUIRED = b"[PRIVACYREQUIRED] Run STARTTLS first"
UNKNOWN_COMMAND = b"Command unknown or not allowed before authentication"


def unavailable(reason: str) -> bytes:
    """``[UNAVAILABLE] <reason>`` as printable ASCII on one line, at most 200 chars."""
    return b"[UNAVAILABLE] " + safe_reason(reason)


class State(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATING = "authenticating"  # AUTHENTICATE PLAIN awaits the client's line
    LOGGING_IN = "logging in"  # the protocol checks the credentials upstream
    RELAYING = "relaying"
    LOGGED_OUT = "logged out"


@dataclass(frozen=True)
class Login:
    """Check these credentials and log in upstream; answer with login_*()."""

    tag: bytes
    username: str
    password: str
    mechanism: str  # "LOGIN" or "PLAIN"


Action = Union[Send, StartTLS, Login, StartRelay, Close]
_Handler = Callable[["PreAuth", Command], list[Action]]


def _quote(value: bytes) -> bytes:
    """An IMAP quoted string of printable ASCII."""
    text = re.sub(rb"[^\x20-\x7e]", b"", value)
    return b'"' + re.sub(rb'(["\\])', rb"\\\1", text) + b'"'


def _one_line(text: bytes) -> bytes:
    return re.sub(rb"[\x00-\x1f\x7f]+", b" ", text)


class PreAuth:
    """The pre-authentication IMAP session: events in, actions out."""

    def __init__(
        self,
        *,
        tls: bool,
        allow_plaintext_login: bool,
        server_name: bytes = b"gateway",
        version: bytes = b"0.1",
        max_errors: int = 10,
    ) -> None:
        self._tls = tls
        self._allow_plaintext = allow_plaintext_login
        self._id_response = (
            b"* ID (\"name\" " + _quote(server_name) + b' "version" ' + _quote(version) + b")\r\n"
        )
        self._max_errors = max_errors
        self._errors = 0
        self._state = State.NOT_AUTHENTICATED
        self._awaiting_tls = False  # StartTLS emitted, tls_started() not yet called
        self._auth_tag = b""
        self._decoder = CommandDecoder(max_line=MAX_PREAUTH, max_literal=MAX_PREAUTH)

    # -- public API ----------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def capabilities(self) -> bytes:
        """The capability list before authentication, in the current TLS state."""
        caps = b"IMAP4rev1 ID LITERAL+ SASL-IR"
        if not self._tls:
            caps += b" STARTTLS"
        return caps + (b" AUTH=PLAIN" if self._login_allowed else b" LOGINDISABLED")

    def greeting(self) -> bytes:
        return b"* OK [CAPABILITY " + self.capabilities + b"] IMAP gateway ready\r\n"

    @property
    def buffered(self) -> int:
        """Client bytes held unprocessed: pause reading if this grows while logging in."""
        return self._decoder.buffered

    def receive_data(self, data: bytes) -> list[Action]:
        """Feed client bytes; process commands while the state allows it.

        Outside NOT_AUTHENTICATED/AUTHENTICATING (and while STARTTLS awaits
        :meth:`tls_started`) bytes are only buffered, unbounded: the protocol
        should pause the transport then (see :attr:`buffered`).
        """
        if self._state is State.LOGGED_OUT:
            return []
        self._decoder.receive_data(data)
        return self._run()

    def login_succeeded(self, tag: bytes, account: str, capabilities: bytes) -> list[Action]:
        """The upstream login worked: answer OK and hand over to the relay."""
        if self._state is not State.LOGGING_IN:
            return []
        self._state = State.RELAYING
        name = _one_line(account.encode("utf-8"))
        line = b"%s OK [CAPABILITY %s] %s authenticated\r\n" % (tag, _one_line(capabilities), name)
        return [Send(line), StartRelay()]

    def login_failed(self, tag: bytes, text: bytes) -> list[Action]:
        """The login was refused: answer NO and go on with buffered commands."""
        if self._state is not State.LOGGING_IN:
            return []
        self._state = State.NOT_AUTHENTICATED
        return [Send(tag + b" NO " + _one_line(text) + b"\r\n"), *self._run()]

    def tls_started(self) -> list[Action]:
        """TLS is up: capabilities change; process whatever is buffered."""
        self._tls = True
        self._awaiting_tls = False
        return self._run()

    def take_pending(self) -> bytes:
        """Raw client bytes not consumed yet (pipelined after LOGIN/STARTTLS)."""
        return self._decoder.take_buffer()

    # -- event processing ----------------------------------------------------

    @property
    def _login_allowed(self) -> bool:
        return self._tls or self._allow_plaintext

    def _run(self) -> list[Action]:
        actions: list[Action] = []
        while (
            self._state in (State.NOT_AUTHENTICATED, State.AUTHENTICATING)
            and not self._awaiting_tls
        ):
            event = self._decoder.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Command):
                handler = _TRANSITIONS.get((self._state, event.name), PreAuth._unknown)
                actions += handler(self, event)
            elif isinstance(event, ContinuationLine):
                actions += self._continuation(event.line)
            elif isinstance(event, LiteralContinuation):
                actions.append(Send(b"+ Ready for literal data\r\n"))
            elif isinstance(event, BadCommand):
                actions += self._bad_command(event)
        return actions

    def _bad(self, tag: bytes | None, text: bytes) -> list[Action]:
        """One BAD response; the max_errors-th one also ends the session."""
        actions: list[Action] = [Send((tag or b"*") + b" BAD " + text + b"\r\n")]
        self._errors += 1
        if self._errors >= self._max_errors:
            actions += self._bye(b"Too many invalid commands")
        return actions

    def _bye(self, text: bytes) -> list[Action]:
        self._state = State.LOGGED_OUT
        return [Send(b"* BYE " + text + b"\r\n"), Close()]

    def _bad_command(self, event: BadCommand) -> list[Action]:
        tag = event.tag
        if self._state is State.AUTHENTICATING:  # the continuation line was bad
            tag = self._auth_tag
            self._state = State.NOT_AUTHENTICATED
        reason = event.reason.encode("ascii", "replace")
        actions = self._bad(tag, reason)
        if (event.fatal or event.reason in _OVERSIZE) and self._state is not State.LOGGED_OUT:
            actions += self._bye(reason)  # over the 8 KiB pre-auth cap: no second chance
        return actions

    def _unknown(self, command: Command) -> list[Action]:
        return self._bad(command.tag, UNKNOWN_COMMAND)

    def _ok(self, tag: bytes, text: bytes) -> bytes:
        return tag + b" OK " + text + b"\r\n"

    def _capability(self, command: Command) -> list[Action]:
        if command.args:
            return self._bad(command.tag, b"CAPABILITY takes no arguments")
        untagged = b"* CAPABILITY " + self.capabilities + b"\r\n"
        return [Send(untagged + self._ok(command.tag, b"CAPABILITY completed"))]

    def _noop(self, command: Command) -> list[Action]:
        if command.args:
            return self._bad(command.tag, b"NOOP takes no arguments")
        return [Send(self._ok(command.tag, b"NOOP completed"))]

    def _id(self, command: Command) -> list[Action]:
        if not (len(command.args) == 1 and _is_id_params(command.args[0])):
            return self._bad(command.tag, b"ID expects NIL or a list of field/value pairs")
        return [Send(self._id_response + self._ok(command.tag, b"ID completed"))]

    def _logout(self, command: Command) -> list[Action]:
        if command.args:
            return self._bad(command.tag, b"LOGOUT takes no arguments")
        self._state = State.LOGGED_OUT
        data = b"* BYE IMAP gateway logging out\r\n" + self._ok(command.tag, b"LOGOUT completed")
        return [Send(data), Close()]

    def _starttls(self, command: Command) -> list[Action]:
        if command.args:
            return self._bad(command.tag, b"STARTTLS takes no arguments")
        if self._tls:
            return self._bad(command.tag, b"TLS is already active")
        self._awaiting_tls = True
        return [Send(self._ok(command.tag, b"Begin TLS negotiation now")), StartTLS()]

    def _login(self, command: Command) -> list[Action]:
        args = command.args
        if len(args) != 2 or not all(isinstance(arg, bytes) for arg in args):
            return self._bad(command.tag, b"LOGIN expects a user name and a password")
        if not self._login_allowed:
            return [Send(command.tag + b" NO " + PRIVACY_REQUIRED + b"\r\n")]
        user, password = args
        assert isinstance(user, bytes) and isinstance(password, bytes)
        return self._credentials(command.tag, user, password, "LOGIN")

    def _authenticate(self, command: Command) -> list[Action]:
        args = command.args
        if not 1 <= len(args) <= 2 or not all(isinstance(arg, bytes) for arg in args):
            return self._bad(
                command.tag, b"AUTHENTICATE expects a mechanism and an optional initial response"
            )
        mechanism = args[0]
        assert isinstance(mechanism, bytes)
        if mechanism.upper() != b"PLAIN":
            return [Send(command.tag + b" NO [CANNOT] Unsupported authentication mechanism\r\n")]
        if not self._login_allowed:
            return [Send(command.tag + b" NO " + PRIVACY_REQUIRED + b"\r\n")]
        self._auth_tag = command.tag
        if len(args) == 2:
            response = args[1]
            assert isinstance(response, bytes)
            return self._plain(b"" if response == b"=" else response)
        self._state = State.AUTHENTICATING
        self._decoder.expect_continuation()
        return [Send(b"+ \r\n")]

    def _continuation(self, line: bytes) -> list[Action]:
        if self._state is not State.AUTHENTICATING:  # cannot happen; be safe
            return self._bad(None, b"Unexpected continuation")
        self._state = State.NOT_AUTHENTICATED
        if line == b"*":
            return self._bad(self._auth_tag, b"Authentication cancelled")
        return self._plain(line)

    def _plain(self, encoded: bytes) -> list[Action]:
        """Decode a base64 SASL PLAIN message: authzid NUL authcid NUL passwd."""
        tag = self._auth_tag
        try:
            message = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return self._bad(tag, b"Invalid base64")
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return self._bad(tag, b"Malformed PLAIN message")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return [Send(tag + b" NO " + INVALID_CREDENTIALS + b"\r\n")]
        return self._credentials(tag, authcid, password, "PLAIN")

    def _credentials(self, tag: bytes, user: bytes, password: bytes, mechanism: str) -> list[Action]:
        try:
            username, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return [Send(tag + b" NO " + INVALID_CREDENTIALS + b"\r\n")]
        self._state = State.LOGGING_IN
        return [Login(tag, username, secret, mechanism)]


def _is_id_params(arg: Arg) -> bool:
    """NIL, or a list of (string, nstring) pairs (RFC 2971)."""
    if arg is None:
        return True
    if not isinstance(arg, tuple) or len(arg) % 2:
        return False
    keys, values = arg[0::2], arg[1::2]
    return all(isinstance(k, bytes) for k in keys) and all(
        v is None or isinstance(v, bytes) for v in values
    )


_N = State.NOT_AUTHENTICATED
_TRANSITIONS: dict[tuple[State, bytes], _Handler] = {
    (_N, b"CAPABILITY"): PreAuth._capability,
    (_N, b"NOOP"): PreAuth._noop,
    (_N, b"ID"): PreAuth._id,
    (_N, b"LOGOUT"): PreAuth._logout,
    (_N, b"STARTTLS"): PreAuth._starttls,
    (_N, b"LOGIN"): PreAuth._login,
    (_N, b"AUTHENTICATE"): PreAuth._authenticate,
}
"""(state, command name) -> handler; anything else gets the 'unknown' BAD."""
