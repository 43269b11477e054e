"""Sans-io SMTP state machine for the session before the upstream exists.

It answers EHLO/HELO, STARTTLS, NOOP, RSET, QUIT and AUTH PLAIN/LOGIN itself
and turns the client's credentials into a :class:`Login` action; the Twisted
protocol carries out the actions and reports the result back with
:meth:`PreAuth.login_succeeded` or :meth:`PreAuth.login_failed`.  Dispatch
goes through one table, ``_TRANSITIONS``, keyed by (state, command verb), with
``None`` as the verb for the raw lines of an AUTH exchange.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union

from gateway.actions import Close, Send, StartRelay, StartTLS, safe_reason
from gateway.smtp.codec import NEED_DATA, Line, LineReader, ehlo_reply

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

INVALID_CREDENTIALS = b"535 5.7.8 Authentication credentials invalid"
ACCESS_DENIED = b"535 5.7.1 Access denied, traffic not accepted from this IP"
_SUCCESS = b"235 2.7.0 Authentication successful"
_TOO_MANY_ERRORS = b"421 4.7.0 Too many errors"
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BDAT_SIZE = re.compile(rb"\A *([0-9]{1,18})(?: |\Z)")


def unavailable(reason: str) -> bytes:
    """``454 4.7.0 <reason>`` as printable ASCII on one line, at most 200 chars of reason."""
    return b"454 4.7.0 " + safe_reason(reason)


class State(Enum):
    GREETED = "greeted"  # waiting for EHLO/HELO (again, after STARTTLS)
    READY = "ready"  # EHLO/HELO done: AUTH possible
    AUTH_PLAIN = "auth plain"  # 334 sent, waiting for the PLAIN response line
    AUTH_LOGIN_USER = "auth login user"  # 334 Username: sent
    AUTH_LOGIN_PASS = "auth login pass"  # 334 Password: sent
    STARTING_TLS = "starting tls"  # StartTLS emitted, waiting for tls_started()
    LOGGING_IN = "logging in"  # the protocol checks the credentials upstream
    RELAYING = "relaying"
    CLOSED = "closed"


@dataclass(frozen=True)
class Login:
    """Check these credentials and log in upstream; answer with login_*()."""

    username: str
    password: str
    mechanism: str  # "PLAIN" or "LOGIN"


Action = Union[Send, StartTLS, Login, StartRelay, Close]
_Handler = Callable[["PreAuth", bytes], list[Action]]
_CONSUMING = frozenset({State.GREETED, State.READY, State.AUTH_PLAIN,
                        State.AUTH_LOGIN_USER, State.AUTH_LOGIN_PASS})
_AUTH_STATES = frozenset({State.AUTH_PLAIN, State.AUTH_LOGIN_USER, State.AUTH_LOGIN_PASS})


def _one_line(text: bytes) -> bytes:
    return re.sub(rb"[\x00-\x1f\x7f]+", b" ", text)


class PreAuth:
    """The pre-authentication SMTP session: client bytes in, actions out."""

    def __init__(
        self,
        *,
        tls: bool,
        hostname: bytes,
        max_size: int,
        allow_plaintext_login: bool = False,
        max_errors: int = 10,
        max_line: int = 4096,
    ) -> None:
        self._tls = tls
        self._hostname = hostname
        self._max_size = max_size
        self._allow_plaintext = allow_plaintext_login
        self._max_errors = max_errors
        self._errors = 0
        self._state = State.GREETED
        self._ehlo_name = b""
        self._login_user = b""  # AUTH LOGIN: the decoded username, until the password comes
        self._reader = LineReader(max_line)

    # -- public API ----------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def buffered(self) -> int:
        """Client bytes held unconsumed: pause reading if this grows while logging in."""
        return self._reader.buffered

    @property
    def ehlo_name(self) -> bytes:
        """The client's last EHLO/HELO argument (for logs)."""
        return self._ehlo_name

    def greeting(self) -> bytes:
        return b"220 " + self._hostname + b" ESMTP gateway ready\r\n"

    def receive_data(self, data: bytes) -> list[Action]:
        """Feed client bytes; process lines while the state allows it.

        In STARTING_TLS, LOGGING_IN and RELAYING bytes are only buffered (the
        protocol pauses the transport when :attr:`buffered` grows).
        """
        if self._state is State.CLOSED:
            return []
        self._reader.receive_data(data)
        return self._run()

    def login_succeeded(self) -> list[Action]:
        """The upstream session is ready: answer 235 and hand over to the relay."""
        if self._state is not State.LOGGING_IN:
            return []
        self._state = State.RELAYING
        return [Send(_SUCCESS + b"\r\n"), StartRelay()]

    def login_failed(self, reply: bytes) -> list[Action]:
        """Refused (``reply`` is one reply line without CRLF): go on with buffered lines."""
        if self._state is not State.LOGGING_IN:
            return []
        self._state = State.READY
        actions = self._reply(_one_line(reply))
        return actions + self._run()

    def tls_started(self) -> list[Action]:
        """TLS is up: the client must EHLO again; process whatever is buffered."""
        if self._state is not State.STARTING_TLS:
            return []
        self._tls = True
        self._state = State.GREETED
        return self._run()

    def take_pending(self) -> bytes:
        """Raw client bytes not consumed yet (pipelined after AUTH or STARTTLS)."""
        return self._reader.take_buffer()

    # -- line processing -----------------------------------------------------

    def _run(self) -> list[Action]:
        actions: list[Action] = []
        while self._state in _CONSUMING:
            event = self._reader.next_line()
            if event is NEED_DATA:
                break
            if not isinstance(event, Line):  # LineTooLong
                self._abort_auth()
                actions += self._reply(b"500 5.5.2 Line too long")
                continue
            actions += self._line(event.text)
        return actions

    def _line(self, text: bytes) -> list[Action]:
        verb, _, arg = text.partition(b" ")
        verb = verb.upper()
        if self._state in _AUTH_STATES and not (arg and (self._state, verb) in _TRANSITIONS):
            return _TRANSITIONS[(self._state, None)](self, text)  # base64 has no spaces
        if _CONTROL.search(text):
            self._abort_auth()
            return self._reply(b"500 5.5.2 Invalid characters")
        handler = _TRANSITIONS.get((self._state, verb), PreAuth._unknown)
        return handler(self, arg)

    def _reply(self, line: bytes) -> list[Action]:
        """One reply line; the max_errors-th 5xx also ends the session with 421."""
        actions: list[Action] = [Send(line + b"\r\n")]
        if line.startswith(b"5"):
            self._errors += 1
            if self._errors >= self._max_errors:
                self._state = State.CLOSED
                actions += [Send(_TOO_MANY_ERRORS + b"\r\n"), Close()]
        return actions

    def _abort_auth(self) -> None:
        if self._state in _AUTH_STATES:
            self._state = State.READY
        self._login_user = b""

    # -- commands ------------------------------------------------------------

    def _unknown(self, arg: bytes) -> list[Action]:
        return self._reply(b"500 5.5.2 Command unrecognized")

    def _not_implemented(self, arg: bytes) -> list[Action]:
        return self._reply(b"502 5.5.1 Command not implemented")

    def _auth_required(self, arg: bytes) -> list[Action]:
        return self._reply(b"530 5.7.0 Authentication required")

    def _bdat(self, arg: bytes) -> list[Action]:
        match = _BDAT_SIZE.match(arg)
        if match:  # skip the chunk so that its bytes are not read as commands
            self._reader.skip(int(match.group(1)))
        return self._auth_required(arg)

    def _ok(self, arg: bytes) -> list[Action]:
        return self._reply(b"250 2.0.0 OK")

    def _quit(self, arg: bytes) -> list[Action]:
        self._state = State.CLOSED
        return [Send(b"221 2.0.0 Bye\r\n"), Close()]

    def _ehlo(self, arg: bytes) -> list[Action]:
        return self._hello(arg, extended=True)

    def _helo(self, arg: bytes) -> list[Action]:
        return self._hello(arg, extended=False)

    def _hello(self, arg: bytes, *, extended: bool) -> list[Action]:
        self._abort_auth()
        name = arg.strip(b" \t")
        if not name:
            verb = b"EHLO" if extended else b"HELO"
            return self._reply(b"501 5.5.4 Syntax: " + verb + b" hostname")
        self._ehlo_name = name
        self._state = State.READY
        if not extended:
            return self._reply(b"250 " + self._hostname)
        return [Send(ehlo_reply(self._hostname, name, max_size=self._max_size,
                                starttls=not self._tls, auth=self._login_allowed))]

    def _starttls(self, arg: bytes) -> list[Action]:
        if arg.strip(b" "):
            return self._reply(b"501 5.5.4 Syntax: STARTTLS")
        if self._tls:
            return self._reply(b"503 5.5.1 TLS already active")
        self._state = State.STARTING_TLS
        return [Send(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]

    @property
    def _login_allowed(self) -> bool:
        return self._tls or self._allow_plaintext

    def _auth_before_ehlo(self, arg: bytes) -> list[Action]:
        return self._reply(b"503 5.5.1 Send EHLO first")

    def _auth(self, arg: bytes) -> list[Action]:
        if not self._login_allowed:
            return self._reply(b"530 5.7.0 Must issue a STARTTLS command first")
        words = arg.split(b" ")
        if not words[0] or len(words) > 2:
            return self._reply(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        mechanism = words[0].upper()
        initial = None if len(words) == 1 else (b"" if words[1] == b"=" else words[1])
        if mechanism == b"PLAIN":
            if initial is None:
                self._state = State.AUTH_PLAIN
                return [Send(b"334 \r\n")]
            return self._plain(initial)
        if mechanism == b"LOGIN":
            self._state = State.AUTH_LOGIN_USER
            if initial is None:
                return [Send(b"334 VXNlcm5hbWU6\r\n")]
            return self._login_user_line(initial)
        return self._reply(b"504 5.5.4 Unrecognized authentication type")

    # -- AUTH exchange lines -------------------------------------------------

    def _decode(self, line: bytes) -> bytes | list[Action]:
        """Base64-decode one AUTH line, or the reply that ends the exchange."""
        self._state = State.READY
        if line == b"*":
            return self._reply(b"501 5.7.0 Authentication cancelled")
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            return self._reply(b"501 5.5.2 Cannot decode response")

    def _plain(self, line: bytes) -> list[Action]:
        """SASL PLAIN: authzid NUL authcid NUL passwd."""
        message = self._decode(line)
        if isinstance(message, list):
            return message
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return self._reply(b"501 5.5.2 Malformed PLAIN response")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return self._reply(INVALID_CREDENTIALS)
        return self._credentials(authcid, password, "PLAIN")

    def _login_user_line(self, line: bytes) -> list[Action]:
        user = self._decode(line)
        if isinstance(user, list):
            return user
        self._login_user = user
        self._state = State.AUTH_LOGIN_PASS
        return [Send(b"334 UGFzc3dvcmQ6\r\n")]

    def _login_pass_line(self, line: bytes) -> list[Action]:
        password = self._decode(line)
        user, self._login_user = self._login_user, b""
        if isinstance(password, list):
            return password
        return self._credentials(user, password, "LOGIN")

    def _credentials(self, user: bytes, password: bytes, mechanism: str) -> list[Action]:
        try:
            username, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return self._reply(INVALID_CREDENTIALS)
        if not username or not secret:
            return self._reply(INVALID_CREDENTIALS)
        self._state = State.LOGGING_IN
        return [Login(username, secret, mechanism)]


_TRANSITIONS: dict[tuple[State, bytes | None], _Handler] = {
    (State.AUTH_PLAIN, None): PreAuth._plain,
    (State.AUTH_LOGIN_USER, None): PreAuth._login_user_line,
    (State.AUTH_LOGIN_PASS, None): PreAuth._login_pass_line,
}
"""(state, command verb) -> handler; None is any line of an AUTH exchange,
where only EHLO/HELO with an argument (never base64) are commands.

Verbs missing for GREETED/READY get '500 5.5.2 Command unrecognized'.
"""
for _state in (State.GREETED, State.READY):
    _TRANSITIONS.update({
        (_state, b"EHLO"): PreAuth._ehlo,
        (_state, b"HELO"): PreAuth._helo,
        (_state, b"STARTTLS"): PreAuth._starttls,
        (_state, b"AUTH"): PreAuth._auth if _state is State.READY else PreAuth._auth_before_ehlo,
        (_state, b"NOOP"): PreAuth._ok,
        (_state, b"RSET"): PreAuth._ok,
        (_state, b"QUIT"): PreAuth._quit,
        (_state, b"BDAT"): PreAuth._bdat,
    })
    for _verb in (b"MAIL", b"RCPT", b"DATA"):
        _TRANSITIONS[(_state, _verb)] = PreAuth._auth_required
    for _verb in (b"HELP", b"VRFY", b"EXPN", b"ETRN", b"TURN"):
        _TRANSITIONS[(_state, _verb)] = PreAuth._not_implemented
for _state in _AUTH_STATES:
    _TRANSITIONS.update({(_state, b"EHLO"): PreAuth._ehlo, (_state, b"HELO"): PreAuth._helo})
del _state, _verb
