"""Tests for gateway.smtp.preauth (and its line reader): the sans-io pre-auth SMTP machine."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp.codec import NEED_DATA, Line, LineReader, LineTooLong
from gateway.smtp.preauth import (
    ACCESS_DENIED,
    INVALID_CREDENTIALS,
    Close,
    Login,
    PreAuth,
    Send,
    StartRelay,
    StartTLS,
    State,
    unavailable,
)

EHLO_TLS = (
    b"250-mx.test Hello client.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-SIZE 1000\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n"
)
EHLO_PLAIN = EHLO_TLS.replace(b"250 AUTH PLAIN LOGIN", b"250 STARTTLS")


def session(tls: bool = True, **kwargs: Any) -> PreAuth:
    return PreAuth(tls=tls, hostname=b"mx.test", max_size=1000, **kwargs)


def ready(**kwargs: Any) -> PreAuth:
    s = session(**kwargs)
    assert s.receive_data(b"EHLO client.example\r\n") == [Send(EHLO_TLS)]
    return s


def sent(actions: Sequence[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def state(s: PreAuth) -> State:
    """The current state (a call, so that mypy does not narrow it between steps)."""
    return s.state


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- greeting, EHLO, simple commands ---------------------------------------------


def test_greeting_names_the_host() -> None:
    assert session().greeting() == b"220 mx.test ESMTP gateway ready\r\n"


def test_ehlo_with_tls_offers_auth_not_starttls() -> None:
    s = ready()
    assert s.state is State.READY and s.ehlo_name == b"client.example"


def test_ehlo_in_plaintext_offers_starttls_and_no_auth() -> None:
    assert session(tls=False).receive_data(b"ehlo client.example\r\n") == [Send(EHLO_PLAIN)]


def test_ehlo_in_plaintext_with_permission_offers_both() -> None:
    s = session(tls=False, allow_plaintext_login=True)
    expected = EHLO_PLAIN.replace(b"250 STARTTLS", b"250-STARTTLS\r\n250 AUTH PLAIN LOGIN")
    assert s.receive_data(b"EHLO client.example\r\n") == [Send(expected)]


def test_helo_and_missing_hostname() -> None:
    s = session()
    assert s.receive_data(b"HELO a.b\r\n") == [Send(b"250 mx.test\r\n")]
    assert s.receive_data(b"EHLO\r\n") == [Send(b"501 5.5.4 Syntax: EHLO hostname\r\n")]
    assert s.receive_data(b"EHLO  \r\n") == [Send(b"501 5.5.4 Syntax: EHLO hostname\r\n")]
    assert s.receive_data(b"HELO\r\n") == [Send(b"501 5.5.4 Syntax: HELO hostname\r\n")]


def test_simple_commands_exact_replies() -> None:
    s = session()
    replies = {
        b"NOOP": b"250 2.0.0 OK",
        b"rset": b"250 2.0.0 OK",
        b"MAIL FROM:<a@b>": b"530 5.7.0 Authentication required",
        b"RCPT TO:<a@b>": b"530 5.7.0 Authentication required",
        b"DATA": b"530 5.7.0 Authentication required",
        b"HELP": b"502 5.5.1 Command not implemented",
        b"VRFY x": b"502 5.5.1 Command not implemented",
        b"EXPN x": b"502 5.5.1 Command not implemented",
        b"ETRN x": b"502 5.5.1 Command not implemented",
        b"TURN": b"502 5.5.1 Command not implemented",
        b"FOO": b"500 5.5.2 Command unrecognized",
        b"": b"500 5.5.2 Command unrecognized",
        b"NO\x00OP": b"500 5.5.2 Invalid characters",
        b"NOOP\rx": b"500 5.5.2 Invalid characters",
    }
    s = session(max_errors=100)
    for line, reply in replies.items():
        assert s.receive_data(line + b"\r\n") == [Send(reply + b"\r\n")], line


def test_bare_lf_lines_are_accepted() -> None:
    assert session().receive_data(b"NOOP\nNOOP\n") == [Send(b"250 2.0.0 OK\r\n")] * 2


def test_bdat_payload_is_skipped_not_read_as_commands() -> None:
    s = session()
    assert sent(s.receive_data(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")) == (
        b"530 5.7.0 Authentication required\r\n250 2.0.0 OK\r\n"
    )


def test_quit_says_bye_closes_and_ignores_the_rest() -> None:
    s = session()
    assert s.receive_data(b"QUIT\r\nNOOP\r\n") == [Send(b"221 2.0.0 Bye\r\n"), Close()]
    assert s.state is State.CLOSED and s.receive_data(b"NOOP\r\n") == []


# -- lines and errors --------------------------------------------------------------


def test_line_too_long_is_refused_and_buffer_stays_bounded() -> None:
    s = session(max_line=64)
    assert s.receive_data(b"NOOP " + b"x" * 200) == [Send(b"500 5.5.2 Line too long\r\n")]
    assert s.buffered < 64
    assert s.receive_data(b"y" * 10_000) == [] and s.buffered == 0
    assert s.receive_data(b"zz\r\nNOOP\r\n") == [Send(b"250 2.0.0 OK\r\n")]


def test_too_many_errors_end_the_session() -> None:
    s = session(max_errors=3)
    actions = s.receive_data(b"A\r\nB\r\nNOOP\r\nC\r\nNOOP\r\n")
    assert sent(actions) == (
        b"500 5.5.2 Command unrecognized\r\n" * 2 + b"250 2.0.0 OK\r\n"
        b"500 5.5.2 Command unrecognized\r\n421 4.7.0 Too many errors\r\n"
    )
    assert actions[-1] == Close() and s.state is State.CLOSED


def test_line_reader_events() -> None:
    reader = LineReader(max_line=16)
    reader.receive_data(b"ab\r\ncd\nef")
    assert reader.next_line() == Line(b"ab\r\n") and Line(b"ab\r\n").text == b"ab"
    assert reader.next_line() == Line(b"cd\n") and Line(b"cd\n").text == b"cd"
    assert reader.next_line() is NEED_DATA and reader.buffered == 2
    reader.receive_data(b"g" * 20 + b"\r\nok\r\n")
    assert reader.next_line() == LineTooLong()
    assert reader.next_line() == Line(b"ok\r\n")
    assert reader.take_buffer() == b""


# -- STARTTLS ------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_requires_new_ehlo() -> None:
    s = session(tls=False)
    s.receive_data(b"EHLO c\r\n")
    actions = s.receive_data(b"STARTTLS\r\nAUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert actions == [Send(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]
    assert state(s) is State.STARTING_TLS
    assert s.receive_data(b"NOOP\r\n") == []
    assert s.take_pending() == b"AUTH PLAIN AGEAYg==\r\nNOOP\r\n"
    assert s.tls_started() == [] and s.state is State.GREETED
    assert s.receive_data(b"AUTH PLAIN x\r\n") == [Send(b"503 5.5.1 Send EHLO first\r\n")]
    assert s.receive_data(b"EHLO client.example\r\n") == [Send(EHLO_TLS)]


def test_starttls_refused_when_active_or_with_arguments() -> None:
    s = session()
    assert s.receive_data(b"STARTTLS\r\n") == [Send(b"503 5.5.1 TLS already active\r\n")]
    assert session(tls=False).receive_data(b"STARTTLS now\r\n") == [
        Send(b"501 5.5.4 Syntax: STARTTLS\r\n")
    ]


# -- AUTH ------------------------------------------------------------------------------


def test_auth_requires_ehlo_and_tls() -> None:
    assert session().receive_data(b"AUTH PLAIN\r\n") == [Send(b"503 5.5.1 Send EHLO first\r\n")]
    s = session(tls=False)
    s.receive_data(b"EHLO c\r\n")
    assert s.receive_data(b"AUTH PLAIN\r\n") == [
        Send(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
    ]


def test_auth_plain_with_initial_response_then_success_relays_pipelined() -> None:
    s = ready()
    actions = s.receive_data(b"auth plain " + b64(b"\0acc\0tok") + b"\r\nMAIL FROM:<a@b>\r\n")
    assert actions == [Login("acc", "tok", "PLAIN")] and state(s) is State.LOGGING_IN
    assert s.receive_data(b"RCPT TO:<c@d>\r\n") == []
    assert s.login_succeeded() == [Send(b"235 2.7.0 Authentication successful\r\n"), StartRelay()]
    assert s.state is State.RELAYING
    assert s.take_pending() == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"


def test_auth_plain_without_initial_response_waits_for_a_line() -> None:
    s = ready()
    assert s.receive_data(b"AUTH PLAIN\r\n") == [Send(b"334 \r\n")]
    assert s.state is State.AUTH_PLAIN
    assert s.receive_data(b64(b"acc\0acc\0t\xc3\xa9k") + b"\r\n") == [
        Login("acc", "t\u00e9k", "PLAIN")
    ]


def test_auth_plain_malformed_foreign_authzid_and_bad_utf8() -> None:
    s = ready()
    assert s.receive_data(b"AUTH PLAIN =\r\n") == [Send(b"501 5.5.2 Malformed PLAIN response\r\n")]
    for message in [b"acc\0tok", b"\0\0tok", b"\0acc\0", b"\0a\0b\0c"]:
        assert s.receive_data(b"AUTH PLAIN " + b64(message) + b"\r\n") == [
            Send(b"501 5.5.2 Malformed PLAIN response\r\n")
        ], message
    for message in [b"boss\0acc\0tok", b"\0\xff\0tok", b"\0acc\0\xfe"]:
        assert s.receive_data(b"AUTH PLAIN " + b64(message) + b"\r\n") == [
            Send(INVALID_CREDENTIALS + b"\r\n")
        ], message
    assert s.state is State.READY


def test_auth_login_with_and_without_initial_username() -> None:
    s = ready()
    assert s.receive_data(b"AUTH LOGIN\r\n") == [Send(b"334 VXNlcm5hbWU6\r\n")]
    assert s.receive_data(b64(b"acc") + b"\r\n") == [Send(b"334 UGFzc3dvcmQ6\r\n")]
    assert s.receive_data(b64(b"tok") + b"\r\n") == [Login("acc", "tok", "LOGIN")]
    s = ready()
    assert s.receive_data(b"AUTH LOGIN " + b64(b"acc") + b"\r\n") == [Send(b"334 UGFzc3dvcmQ6\r\n")]
    assert s.state is State.AUTH_LOGIN_PASS
    assert s.receive_data(b64(b"tok") + b"\r\n") == [Login("acc", "tok", "LOGIN")]


def test_auth_cancel_and_bad_base64() -> None:
    s = ready()
    s.receive_data(b"AUTH LOGIN\r\n")
    assert s.receive_data(b"*\r\nNOOP\r\n") == [
        Send(b"501 5.7.0 Authentication cancelled\r\n"), Send(b"250 2.0.0 OK\r\n")
    ]
    s.receive_data(b"AUTH LOGIN " + b64(b"acc") + b"\r\n")
    assert s.receive_data(b"not base64!\r\n") == [Send(b"501 5.5.2 Cannot decode response\r\n")]
    s.receive_data(b"AUTH PLAIN\r\n")
    assert s.receive_data(b"%%%\r\n") == [Send(b"501 5.5.2 Cannot decode response\r\n")]
    assert s.state is State.READY


def test_auth_other_mechanism_and_bad_syntax() -> None:
    s = ready()
    assert s.receive_data(b"AUTH XOAUTH2 abc\r\n") == [
        Send(b"504 5.5.4 Unrecognized authentication type\r\n")
    ]
    assert sent(s.receive_data(b"AUTH\r\n")).startswith(b"501 5.5.4 ")
    assert sent(s.receive_data(b"AUTH PLAIN a b\r\n")).startswith(b"501 5.5.4 ")


def test_ehlo_resets_an_auth_in_progress() -> None:
    s = ready()
    s.receive_data(b"AUTH LOGIN\r\n")
    assert s.receive_data(b"EHLO client.example\r\n") == [Send(EHLO_TLS)]
    assert s.state is State.READY


def test_too_long_auth_line_aborts_the_exchange() -> None:
    s = ready(max_line=64)
    s.receive_data(b"AUTH PLAIN\r\n")
    assert s.receive_data(b"A" * 100 + b"\r\nNOOP\r\n") == [
        Send(b"500 5.5.2 Line too long\r\n"), Send(b"250 2.0.0 OK\r\n")
    ]


def test_login_failed_replies_and_continues_with_buffered_lines() -> None:
    s = ready()
    lines = b"AUTH PLAIN " + b64(b"\0acc\0bad") + b"\r\nNOOP\r\nAUTH PLAIN " + b64(b"\0acc\0ok")
    assert s.receive_data(lines + b"\r\n") == [Login("acc", "bad", "PLAIN")]
    assert s.login_failed(ACCESS_DENIED) == [
        Send(ACCESS_DENIED + b"\r\n"), Send(b"250 2.0.0 OK\r\n"), Login("acc", "ok", "PLAIN")
    ]
    assert s.login_failed(unavailable("upstream down")) == [
        Send(b"454 4.7.0 upstream down\r\n")
    ]
    assert s.state is State.READY


def test_failed_logins_count_as_errors() -> None:
    s = ready(max_errors=2)
    s.receive_data(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert s.login_failed(INVALID_CREDENTIALS) == [Send(INVALID_CREDENTIALS + b"\r\n")]
    s.receive_data(b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n")
    assert s.login_failed(INVALID_CREDENTIALS) == [
        Send(INVALID_CREDENTIALS + b"\r\n"), Send(b"421 4.7.0 Too many errors\r\n"), Close()
    ]


def test_login_results_outside_logging_in_are_ignored() -> None:
    s = ready()
    assert s.login_failed(INVALID_CREDENTIALS) == [] and s.login_succeeded() == []
    assert s.tls_started() == [] and s.state is State.READY


def test_unavailable_sanitises_reason() -> None:
    assert unavailable("upstream\r\n down") == b"454 4.7.0 upstream down"
    assert unavailable("caf\u00e9 \x00") == b"454 4.7.0 cafe"
    assert len(unavailable("x" * 1000)) == len(b"454 4.7.0 ") + 200


# -- properties ------------------------------------------------------------------------

REPLY = re.compile(rb"^[2-5][0-9][0-9][ -]", re.M)
FINAL = re.compile(rb"^[2-5][0-9][0-9] ", re.M)


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=6))
def test_arbitrary_input_never_raises(data: bytes, cuts: list[int]) -> None:
    """Any bytes in any pieces: only well-formed replies and valid actions come out."""
    s = PreAuth(tls=False, hostname=b"h", max_size=10, allow_plaintext_login=True,
                max_errors=1000, max_line=128)
    points = sorted({min(c, len(data)) for c in cuts})
    for i, j in zip([0, *points], [*points, len(data)]):
        for action in s.receive_data(data[i:j]):
            assert isinstance(action, (Send, StartTLS, Login, StartRelay, Close))
            if isinstance(action, Send):
                assert action.data.endswith(b"\r\n") and REPLY.match(action.data)
        assert s.buffered <= len(data)


@given(st.sampled_from([b"EHLO x", b"HELO", b"NOOP", b"RSET", b"MAIL", b"DATA", b"VRFY", b"AUTH",
                        b"STARTTLS", b"XYZZY", b"", b"auth login", b"AUTH PLAIN"]),
       st.binary(max_size=60).filter(lambda b: b"\n" not in b))
def test_each_complete_line_gets_exactly_one_answer(verb: bytes, rest: bytes) -> None:
    """Known or not, well-formed or not: one final reply line, or a Login, or StartTLS."""
    s = session(tls=True, max_errors=1000)
    s.receive_data(b"EHLO x\r\n")
    actions = s.receive_data(verb + rest + b"\r\n")
    answers = len(FINAL.findall(sent(actions))) + sum(isinstance(a, Login) for a in actions)
    assert answers == 1, actions
