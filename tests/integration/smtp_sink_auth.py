"""The SMTP sink's authenticated-upstream mode: TLS, AUTH and the client-violation detectors.

Opt-in through :class:`~tests.integration.smtp_sink.SMTPSink`'s keyword
options (its defaults are unchanged): the sink then plays a provider's
submission server such as smtp.gmail.com, for the gateway's upstream leg.

* ``tls_cert=(cert, key)``: implicit TLS (every accepted socket is wrapped
  before the greeting), or with ``starttls=True`` plaintext until
  ``STARTTLS`` (advertised only before TLS; AUTH only after it).  Bytes
  pipelined behind ``STARTTLS`` are discarded and recorded as a violation.
* ``auth_tokeninfo_url=URL``: ``AUTH XOAUTH2`` is offered and required before
  MAIL, in the two-step form (``AUTH XOAUTH2`` -> ``334 `` -> token line) and
  the initial-response form.  The bearer token is checked with ``GET
  URL<token>`` (the test provider's tokeninfo) and its ``email`` must equal the
  ``user=``.  On failure: ``334 <base64 {"status":"401","schemes":"bearer",
  "scope":"https://mail.google.com/"}>``, then after the client's (empty) line
  ``535 5.7.8 Username and Password not accepted``, as Gmail does.
* ``passwords={user: password}``: ``AUTH PLAIN`` and ``AUTH LOGIN`` (with or
  without initial response) against that table; ``auth_mechanisms=`` narrows
  what EHLO offers, e.g. ``["LOGIN"]``.
* The AUTH command line is limited to ``max_line`` like every command (RFC
  4954: a client must not use the initial response when the line would be
  too long), SASL response lines to ``MAX_AUTH_LINE`` (12288).  Response
  lines are logged in ``commands`` too; each AUTH goes to ``sink.auth`` as an
  :class:`AuthAttempt`.
* ``extensions=[...]`` replaces what EHLO advertises (``DEFAULT_EXTENSIONS``;
  ``"SIZE"`` is shown as ``SIZE <max_size>``), and the sink then behaves as a
  server without the missing ones: a MAIL/RCPT parameter of an extension it
  did not advertise (SIZE, BODY, SMTPUTF8, RET/ENVID/NOTIFY/ORCPT) gets
  ``555 5.5.4``; without ENHANCEDSTATUSCODES no reply carries an enhanced
  code; without 8BITMIME a message with 8-bit bytes is accepted but recorded
  as a violation; without PIPELINING the sink waits ``pipelining_probe``
  seconds after each command line and records a violation if the client's
  next bytes are already there (sent before the reply was).

Violations of the protocol by the client go to ``sink.violations`` as
:class:`Violation` (session, kind, detail).

The seam: :class:`AuthSink` is mixed into ``SMTPSink`` (these options, the
``auth``/``violations`` records, the tokeninfo check; ``SMTPSink`` provides
``_cond``, ``_conns``, ``_log()``, ``has()``, ``pipelining`` and
``pipelining_probe``), :class:`AuthSession` into the per-connection handler of
``smtp_sink_session.py`` (STARTTLS, AUTH and the detectors; the handler
provides ``sock``, ``reader``, ``sid``, ``helo``, ``tls``, ``auth_user``,
``mail_from``, ``attach()``, ``reply()``, ``read_command()`` and ``reset()``).
The extension list itself (``extensions=``: MAIL/RCPT parameters, enhanced
codes, EHLO) is handled there too, where the commands it changes are.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_AUTH_LINE = 12288  # RFC 4954 section 4: SASL response lines
XOAUTH2_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
XOAUTH2_REFUSED = "535 5.7.8 Username and Password not accepted"


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH exchange (authenticated-upstream mode)."""

    session: int
    mechanism: str          # "XOAUTH2", "PLAIN" or "LOGIN"
    user: str               # user= / authentication identity ("" when undecodable)
    ok: bool
    initial_response: bool  # the credentials came on the AUTH line itself (one step)
    response_length: int    # length of the (base64) line that carried the credentials


@dataclass(frozen=True)
class Violation:
    """A protocol violation by the client, e.g. kind "pipelining" without PIPELINING."""

    session: int
    kind: str    # "pipelining", "starttls-injection", "8bit", "sasl", "tls" (handshake failed)
    detail: str


class AuthSink:
    """The sink's side of the mode: TLS and AUTH options, ``auth``/``violations`` records."""

    _cond: threading.Condition
    _conns: set[socket.socket]
    pipelining: bool
    pipelining_probe: float

    def _setup_auth(self, tls_cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None,
                    starttls: bool, auth_tokeninfo_url: str | None,
                    passwords: Mapping[str, str] | None, auth_mechanisms: Sequence[str] | None) -> None:
        if starttls and tls_cert is None:
            raise ValueError("starttls=True needs tls_cert")
        self._tls_context: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls_context.load_cert_chain(str(tls_cert[0]), str(tls_cert[1]))
        self.starttls = starttls
        self.implicit_tls = tls_cert is not None and not starttls
        self.tokeninfo_url = auth_tokeninfo_url
        self.passwords: dict[str, str] = dict(passwords or {})
        offered = (["PLAIN", "LOGIN"] if passwords is not None else []) + \
            (["XOAUTH2"] if auth_tokeninfo_url else [])
        #: SASL mechanisms offered after TLS (none: AUTH unknown, as by default).
        self.mechanisms: list[str] = [m.upper() for m in (auth_mechanisms or offered)]
        unknown = set(self.mechanisms) - set(offered)
        if unknown:
            raise ValueError(f"mechanisms {sorted(unknown)} need passwords= / auth_tokeninfo_url=")
        #: AUTH exchanges, in order.
        self.auth: list[AuthAttempt] = []
        #: Protocol violations by clients, in order.
        self.violations: list[Violation] = []

    def _offers(self, verb: bytes) -> bool:
        return bool(self.mechanisms) if verb == b"AUTH" else self.starttls

    def _token_email(self, token: str) -> str | None:
        """The lower-cased ``email`` the tokeninfo endpoint gives for ``token``, else None."""
        if not self.tokeninfo_url or not token:
            return None
        url = self.tokeninfo_url + urllib.parse.quote(token, safe="")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                info = json.loads(resp.read())
        except (OSError, ValueError):  # urllib.error.HTTPError is an OSError
            return None
        email = info.get("email") if isinstance(info, dict) else None
        return email.lower() if isinstance(email, str) else None

    def _swap(self, old: socket.socket, new: socket.socket) -> None:
        with self._cond:
            self._conns.discard(old)
            self._conns.add(new)

    def _violation(self, sid: int, kind: str, detail: str) -> None:
        with self._cond:
            self.violations.append(Violation(sid, kind, detail))

    def _auth(self, attempt: AuthAttempt) -> None:
        with self._cond:
            self.auth.append(attempt)
            self._cond.notify_all()

    def _clear_auth(self) -> None:
        """Forget the AUTH exchanges and violations (the caller holds ``_cond``)."""
        self.auth.clear()
        self.violations.clear()


class AuthSession:
    """The connection's side of the mode: TLS, STARTTLS, AUTH and the violation detectors."""

    sink: Any  # the SMTPSink (an AuthSink)
    sock: socket.socket
    reader: Any
    sid: int
    helo: bytes
    tls: bool
    auth_user: str | None
    mail_from: bytes | None

    def attach(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def reply(self, text: str) -> None:
        raise NotImplementedError

    def read_command(self, limit: int = 0, *, probe: bool = True) -> bytes | None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------- detectors
    def probe(self, line: bytes) -> None:
        """Without PIPELINING: is the client's next command here before our reply?"""
        if self.sink.pipelining:
            return
        if self.sink.pipelining_probe and not self.reader.buf:
            time.sleep(self.sink.pipelining_probe)
        if self.reader.poll():
            ahead = bytes(self.reader.buf[:100]).split(b"\r\n")[0]
            self.sink._violation(self.sid, "pipelining",
                                 f"{ahead!r} arrived before the reply to {line[:100]!r}")

    def check_8bit(self, eight_bit: bool) -> None:
        """Record 8-bit message data sent although 8BITMIME was not advertised."""
        if eight_bit and not self.sink.has("8BITMIME"):
            self.sink._violation(self.sid, "8bit", "8-bit message data, 8BITMIME not advertised")

    # ----------------------------------------------------------------- TLS
    def start_tls(self) -> bool:
        """Wrap the connection in TLS (server side); False if the handshake failed."""
        raw, context = self.sock, self.sink._tls_context
        assert context is not None
        raw.settimeout(10)
        try:
            tls_sock = context.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as e:
            self.sink._violation(self.sid, "tls", f"handshake failed: {e}")
            return False
        tls_sock.settimeout(None)
        self.sink._swap(raw, tls_sock)
        self.attach(tls_sock)
        self.tls = True
        return True

    def smtp_STARTTLS(self, arg: bytes) -> bool:
        if self.tls:
            self.reply("554 5.5.1 TLS already active")
            return True
        if arg.strip():
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return True
        self.reply("220 2.0.0 Ready to start TLS")
        if self.reader.buf:  # RFC 3207 section 4: pipelined plaintext must be discarded
            self.sink._violation(self.sid, "starttls-injection",
                                 f"{bytes(self.reader.buf[:100])!r} pipelined behind STARTTLS")
            self.reader.buf.clear()
        if not self.start_tls():
            return False
        self.helo = b""
        self.reset()
        return True

    # ---------------------------------------------------------------- AUTH
    def smtp_AUTH(self, arg: bytes) -> None:
        if not self.helo:
            self.reply("503 5.5.1 Send EHLO first")
        elif self.sink.starttls and not self.tls:
            self.reply("530 5.7.0 Must issue a STARTTLS command first")
        elif self.auth_user is not None:
            self.reply("503 5.5.1 Already authenticated")
        elif self.mail_from is not None:
            self.reply("503 5.5.1 AUTH not permitted during a mail transaction")
        else:
            mechanism, _, initial = arg.strip().partition(b" ")
            name = mechanism.upper().decode("ascii", "replace")
            if name not in self.sink.mechanisms:
                self.reply("504 5.5.4 Unrecognized authentication type")
                return
            getattr(self, "auth_" + name)(initial.strip())

    def sasl_response(self, challenge: str) -> bytes | None:
        """Send ``334 challenge`` and read the client's line; None when answered already."""
        self.reply("334 " + challenge)
        line = self.read_command(MAX_AUTH_LINE)
        if line is None:
            self.sink._log(self.sid, b"<line too long>")
            self.reply("500 5.5.6 Authentication exchange line is too long")
            return None
        self.sink._log(self.sid, line)
        if line == b"*":
            self.reply("501 5.7.0 Authentication aborted")
            return None
        return line

    def _done(self, mechanism: str, user: str, ok: bool, initial: bool, length: int,
              failure: str = "535 5.7.8 Authentication credentials invalid") -> None:
        self.sink._auth(AuthAttempt(self.sid, mechanism, user, ok, initial, length))
        if ok:
            self.auth_user = user
            self.reply("235 2.7.0 Accepted")
        elif failure:
            self.reply(failure)

    def auth_XOAUTH2(self, initial: bytes) -> None:
        response = initial or self.sasl_response("")
        if response is None:
            return
        user, token = _parse_xoauth2(response)
        ok = user is not None and self.sink._token_email(token) == user.lower()
        self._done("XOAUTH2", user or "", ok, bool(initial), len(response), failure="")
        if ok:
            return
        challenge = base64.b64encode(json.dumps(XOAUTH2_ERROR).encode()).decode()
        answer = self.sasl_response(challenge)
        if answer is None:
            return
        if answer:
            self.sink._violation(self.sid, "sasl",
                                 f"XOAUTH2 error challenge answered with {answer[:40]!r}, not an empty line")
        self.reply(XOAUTH2_REFUSED)

    def auth_PLAIN(self, initial: bytes) -> None:
        response = initial or self.sasl_response("")
        if response is None:
            return
        parts = _b64(response).split(b"\0")
        user, ok = "", False
        if len(parts) == 3:
            authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
            user = authcid
            ok = authzid in ("", authcid) and self.sink.passwords.get(authcid) == password
        self._done("PLAIN", user, ok, bool(initial), len(response))

    def auth_LOGIN(self, initial: bytes) -> None:
        name = initial or self.sasl_response("VXNlcm5hbWU6")
        if name is None:
            return
        secret = self.sasl_response("UGFzc3dvcmQ6")
        if secret is None:
            return
        user = _b64(name).decode("utf-8", "replace")
        password = _b64(secret).decode("utf-8", "replace")
        self._done("LOGIN", user, self.sink.passwords.get(user) == password, bool(initial),
                   len(secret))


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _parse_xoauth2(response: bytes) -> tuple[str | None, str]:
    """base64 ``user=U^Aauth=Bearer T^A^A`` -> (U, T); (None, "") if malformed."""
    raw = _b64(response)
    if not raw.endswith(b"\x01\x01"):
        return None, ""
    fields: dict[bytes, bytes] = {}
    for item in raw[:-2].split(b"\x01"):
        key, _, value = item.partition(b"=")
        fields[key] = value
    user, auth = fields.get(b"user"), fields.get(b"auth", b"")
    if not user or auth[:7].lower() != b"bearer ":
        return None, ""
    return user.decode("utf-8", "replace"), auth[7:].decode("ascii", "replace")
