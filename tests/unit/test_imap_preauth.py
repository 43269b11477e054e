"""Tests for gateway.imap.preauth: the sans-io pre-authentication state machine."""

from __future__ import annotations

import base64
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap.preauth import (
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

PLAIN_CAPS = b"IMAP4rev1 ID LITERAL+ SASL-IR STARTTLS LOGINDISABLED"
TLS_CAPS = b"IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN"


def tls_session(**kwargs: object) -> PreAuth:
    return PreAuth(tls=True, allow_plaintext_login=False, **kwargs)  # type: ignore[arg-type]


def sent(actions: list[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def plain(message: bytes) -> bytes:
    return base64.b64encode(message)


# -- greeting and capabilities ---------------------------------------------


def test_greeting_lists_capabilities() -> None:
    assert tls_session().greeting() == b"* OK [CAPABILITY " + TLS_CAPS + b"] IMAP gateway ready\r\n"


def test_plaintext_without_permission_advertises_logindisabled() -> None:
    session = PreAuth(tls=False, allow_plaintext_login=False)
    assert session.greeting() == b"* OK [CAPABILITY " + PLAIN_CAPS + b"] IMAP gateway ready\r\n"


def test_plaintext_with_permission_offers_starttls_and_auth_plain() -> None:
    session = PreAuth(tls=False, allow_plaintext_login=True)
    caps = b"IMAP4rev1 ID LITERAL+ SASL-IR STARTTLS AUTH=PLAIN"
    assert session.receive_data(b"c1 CAPABILITY\r\n") == [
        Send(b"* CAPABILITY " + caps + b"\r\nc1 OK CAPABILITY completed\r\n")
    ]


# -- simple commands --------------------------------------------------------


def test_noop_and_lower_case_command_names() -> None:
    assert tls_session().receive_data(b"n1 noop\r\n") == [Send(b"n1 OK NOOP completed\r\n")]


def test_id_with_nil_or_pairs_answers_server_identity() -> None:
    session = tls_session(server_name=b'gw "1"', version=b"2.0")
    expected = b'* ID ("name" "gw \\"1\\"" "version" "2.0")\r\ni1 OK ID completed\r\n'
    assert session.receive_data(b"i1 ID NIL\r\n") == [Send(expected)]
    assert sent(session.receive_data(b'i1 ID ("name" "mutt" "os" NIL)\r\n')) == expected


def test_id_with_bad_arguments_is_bad() -> None:
    session = tls_session()
    for line in [b"i ID\r\n", b'i ID ("odd")\r\n', b"i ID x\r\n", b'i ID (("a") "b")\r\n']:
        assert session.receive_data(line) == [
            Send(b"i BAD ID expects NIL or a list of field/value pairs\r\n")
        ]


def test_logout_says_bye_and_closes() -> None:
    session = tls_session()
    assert session.receive_data(b"z LOGOUT\r\nx NOOP\r\n") == [
        Send(b"* BYE IMAP gateway logging out\r\nz OK LOGOUT completed\r\n"),
        Close(),
    ]
    assert session.state is State.LOGGED_OUT
    assert session.receive_data(b"y NOOP\r\n") == []


def test_unknown_command_is_bad() -> None:
    assert tls_session().receive_data(b"s SELECT INBOX\r\n") == [
        Send(b"s BAD Command unknown or not allowed before authentication\r\n")
    ]


def test_known_commands_with_wrong_arity_are_bad() -> None:
    session = tls_session()
    assert session.receive_data(b"a NOOP x\r\n") == [Send(b"a BAD NOOP takes no arguments\r\n")]
    assert session.receive_data(b"a LOGIN x\r\n") == [
        Send(b"a BAD LOGIN expects a user name and a password\r\n")
    ]
    assert sent(session.receive_data(b"a AUTHENTICATE\r\n")).startswith(b"a BAD ")
    assert sent(session.receive_data(b"a CAPABILITY x\r\n")).startswith(b"a BAD ")


def test_decoder_errors_become_bad_tagged_or_untagged() -> None:
    session = tls_session()
    assert session.receive_data(b"\r\n") == [Send(b"* BAD Empty command line\r\n")]
    assert session.receive_data(b'q LOGIN "x\r\n') == [Send(b"q BAD Invalid quoted string\r\n")]


def test_fatal_decoder_error_says_bye_and_closes() -> None:
    session = tls_session()
    assert session.receive_data(b"a LOGIN {999999+}\r\n") == [
        Send(b"a BAD Literal too large\r\n"),
        Send(b"* BYE Literal too large\r\n"),
        Close(),
    ]
    assert session.state is State.LOGGED_OUT


def test_too_many_bad_commands_end_the_session() -> None:
    session = tls_session(max_errors=3)
    actions = session.receive_data(b"a X\r\nb Y\r\nc NOOP\r\nd Z\r\ne NOOP\r\n")
    assert sent(actions) == (
        b"a BAD Command unknown or not allowed before authentication\r\n"
        b"b BAD Command unknown or not allowed before authentication\r\n"
        b"c OK NOOP completed\r\n"
        b"d BAD Command unknown or not allowed before authentication\r\n"
        b"* BYE Too many invalid commands\r\n"
    )
    assert actions[-1] == Close() and session.state is State.LOGGED_OUT


# -- STARTTLS ----------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_recomputes_capabilities() -> None:
    session = PreAuth(tls=False, allow_plaintext_login=False)
    actions = session.receive_data(b"t STARTTLS\r\nevil LOGIN u p\r\n")
    assert actions == [Send(b"t OK Begin TLS negotiation now\r\n"), StartTLS()]
    assert session.receive_data(b"more NOOP\r\n") == []  # nothing consumed until TLS is up
    assert session.take_pending() == b"evil LOGIN u p\r\nmore NOOP\r\n"
    assert session.tls_started() == []
    assert session.receive_data(b"c CAPABILITY\r\n") == [
        Send(b"* CAPABILITY " + TLS_CAPS + b"\r\nc OK CAPABILITY completed\r\n")
    ]


def test_starttls_when_tls_is_active_is_bad() -> None:
    assert tls_session().receive_data(b"t STARTTLS\r\n") == [
        Send(b"t BAD TLS is already active\r\n")
    ]


# -- LOGIN -----------------------------------------------------------------


def test_login_in_plaintext_requires_starttls() -> None:
    session = PreAuth(tls=False, allow_plaintext_login=False)
    assert session.receive_data(b"l LOGIN acc tok\r\n") == [
        Send(b"l NO [PRIVACYREQUIRED] Run STARTTLS first\r\n")
    ]
    assert session.state is State.NOT_AUTHENTICATED


def test_login_success_relays_pipelined_bytes() -> None:
    session = tls_session()
    actions = session.receive_data(b'a1 LOGIN acc "to\\"k"\r\na2 SELECT INBOX\r\n')
    assert actions == [Login(b"a1", "acc", 'to"k', "LOGIN")]
    assert session.state is State.LOGGING_IN
    assert session.receive_data(b"a3 NOOP\r\n") == []
    assert session.login_succeeded(b"a1", "acc", b"IMAP4rev1 IDLE") == [
        Send(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] acc authenticated\r\n"),
        StartRelay(),
    ]
    assert session.state is State.RELAYING
    assert session.take_pending() == b"a2 SELECT INBOX\r\na3 NOOP\r\n"


def test_login_with_sync_literals_sends_continuations() -> None:
    session = tls_session()
    assert session.receive_data(b"a LOGIN {3}\r\n") == [Send(b"+ Ready for literal data\r\n")]
    assert session.receive_data(b"acc {4}\r\n") == [Send(b"+ Ready for literal data\r\n")]
    assert session.receive_data(b"t\xc3\xa9k\r\n") == [Login(b"a", "acc", "t\u00e9k", "LOGIN")]


def test_login_with_non_sync_literals_sends_no_continuation() -> None:
    session = tls_session()
    assert session.receive_data(b"a LOGIN {3+}\r\nacc {3+}\r\ntok\r\n") == [
        Login(b"a", "acc", "tok", "LOGIN")
    ]


def test_login_with_undecodable_credentials_is_refused() -> None:
    assert tls_session().receive_data(b'a LOGIN "\xff" tok\r\n') == [
        Send(b"a NO " + INVALID_CREDENTIALS + b"\r\n")
    ]


def test_login_failed_answers_no_and_continues_with_buffered_commands() -> None:
    session = tls_session()
    assert session.receive_data(b"a LOGIN acc bad\r\nb NOOP\r\nc LOGIN acc good\r\n") == [
        Login(b"a", "acc", "bad", "LOGIN")
    ]
    assert session.login_failed(b"a", ACCESS_DENIED) == [
        Send(b"a NO " + ACCESS_DENIED + b"\r\n"),
        Send(b"b OK NOOP completed\r\n"),
        Login(b"c", "acc", "good", "LOGIN"),
    ]
    assert session.state is State.LOGGING_IN


def test_login_results_outside_logging_in_are_ignored() -> None:
    session = tls_session()
    assert session.login_failed(b"a", INVALID_CREDENTIALS) == []
    assert session.login_succeeded(b"a", "acc", b"IMAP4rev1") == []
    assert session.state is State.NOT_AUTHENTICATED


# -- AUTHENTICATE PLAIN --------------------------------------------------------


def test_authenticate_plain_with_initial_response() -> None:
    response = plain(b"\0acc\0tok")
    assert tls_session().receive_data(b"a authenticate plain " + response + b"\r\n") == [
        Login(b"a", "acc", "tok", "PLAIN")
    ]


def test_authenticate_plain_with_continuation() -> None:
    session = tls_session()
    assert session.receive_data(b"a AUTHENTICATE PLAIN\r\n") == [Send(b"+ \r\n")]
    assert session.state is State.AUTHENTICATING
    assert session.receive_data(plain(b"acc\0acc\0tok") + b"\r\n") == [
        Login(b"a", "acc", "tok", "PLAIN")
    ]


def test_authenticate_cancelled_by_star() -> None:
    session = tls_session()
    session.receive_data(b"a AUTHENTICATE PLAIN\r\n")
    assert session.receive_data(b"*\r\nb NOOP\r\n") == [
        Send(b"a BAD Authentication cancelled\r\n"),
        Send(b"b OK NOOP completed\r\n"),
    ]
    assert session.state is State.NOT_AUTHENTICATED


def test_authenticate_bad_base64_and_malformed_messages() -> None:
    session = tls_session()
    session.receive_data(b"a AUTHENTICATE PLAIN\r\n")
    assert session.receive_data(b"not base64!\r\n") == [Send(b"a BAD Invalid base64\r\n")]
    assert session.receive_data(b"b AUTHENTICATE PLAIN =\r\n") == [
        Send(b"b BAD Malformed PLAIN message\r\n")
    ]
    for message in [b"acc\0tok", b"\0\0tok", b"\0acc\0", b"\0a\0b\0c"]:
        assert session.receive_data(b"c AUTHENTICATE PLAIN " + plain(message) + b"\r\n") == [
            Send(b"c BAD Malformed PLAIN message\r\n")
        ], message


def test_authenticate_with_foreign_authzid_is_refused() -> None:
    assert tls_session().receive_data(b"a AUTHENTICATE PLAIN " + plain(b"boss\0acc\0tok") + b"\r\n") == [
        Send(b"a NO " + INVALID_CREDENTIALS + b"\r\n")
    ]


def test_authenticate_other_mechanism_or_plaintext_is_refused() -> None:
    assert tls_session().receive_data(b"a AUTHENTICATE XOAUTH2 abc\r\n") == [
        Send(b"a NO [CANNOT] Unsupported authentication mechanism\r\n")
    ]
    assert PreAuth(tls=False, allow_plaintext_login=False).receive_data(
        b"a AUTHENTICATE PLAIN\r\n"
    ) == [Send(b"a NO [PRIVACYREQUIRED] Run STARTTLS first\r\n")]


def test_too_long_continuation_line_is_bad_with_the_authenticate_tag_and_ends_the_session() -> None:
    session = tls_session()
    session.receive_data(b"a AUTHENTICATE PLAIN\r\n")
    assert session.receive_data(b"A" * 9000 + b"\r\nb NOOP\r\n") == [
        Send(b"a BAD Line too long\r\n"),
        Send(b"* BYE Line too long\r\n"),
        Close(),
    ]


def test_preauth_lines_and_literals_are_capped_at_8_kib() -> None:
    """A LOGIN line over 8 KiB: BAD, BYE, closed. A synchronizing literal over 8 KiB is refused before
    its continuation (no `+`), then closed; 8 KiB itself is fine."""
    session = tls_session()
    assert session.receive_data(b"a LOGIN " + b"x" * 8200 + b" y\r\n") == [
        Send(b"a BAD Line too long\r\n"), Send(b"* BYE Line too long\r\n"), Close()]
    session = tls_session()
    actions = session.receive_data(b"a LOGIN {8193}\r\n")
    assert Send(b"+ Ready for literal data\r\n") not in actions
    assert actions[-2:] == [Send(b"* BYE Literal too large\r\n"), Close()]
    session = tls_session()
    assert session.receive_data(b"a LOGIN {8000}\r\n") == [Send(b"+ Ready for literal data\r\n")]


# -- helpers ------------------------------------------------------------------


def test_unavailable_sanitises_reason() -> None:
    assert unavailable("upstream\r\n down") == b"[UNAVAILABLE] upstream down"
    assert unavailable("caf\u00e9 \x00") == b"[UNAVAILABLE] cafe"
    assert len(unavailable("x" * 1000)) == len(b"[UNAVAILABLE] ") + 200


# -- properties -----------------------------------------------------------------

STATUS = re.compile(rb"^(\S+) (OK|NO|BAD) ", re.M)
KNOWN = {b"CAPABILITY", b"NOOP", b"ID", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE"}


@settings(max_examples=300)
@given(st.binary(max_size=500), st.lists(st.integers(min_value=0, max_value=500), max_size=6))
def test_arbitrary_input_never_raises(data: bytes, cuts: list[int]) -> None:
    """Any bytes in any pieces: only valid actions come out."""
    session = PreAuth(tls=False, allow_plaintext_login=True, max_errors=1000)
    points = sorted({min(c, len(data)) for c in cuts})
    for i, j in zip([0, *points], [*points, len(data)]):
        for action in session.receive_data(data[i:j]):
            assert isinstance(action, (Send, StartTLS, Login, StartRelay, Close))
            if isinstance(action, Send):
                assert action.data.endswith(b"\r\n")


@given(
    st.from_regex(rb"\A[a-z0-9]{1,8}\Z"),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"{" not in b),
)
def test_each_complete_bad_line_yields_exactly_one_bad(tag: bytes, rest: bytes) -> None:
    """A line naming no known command gets exactly one BAD, never a Login."""
    line = tag + b" X" + rest
    name = line.split(b" ")[1].upper()
    session = tls_session(max_errors=1000)
    actions = session.receive_data(line + b"\r\n")
    statuses = STATUS.findall(sent(actions))
    assert name not in KNOWN
    assert len(statuses) == 1 and statuses[0][1] == b"BAD"
    assert not any(isinstance(a, Login) for a in actions)


@given(
    st.sampled_from(sorted(KNOWN - {b"STARTTLS", b"LOGOUT"}) + [b"SELECT", b"", b"*"]),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"{" not in b),
)
def test_each_complete_line_gets_exactly_one_answer(name: bytes, rest: bytes) -> None:
    """Known or not, well-formed or not: one status line, one Login, or one '+'."""
    session = tls_session(max_errors=1000)
    actions = session.receive_data(b"t1 " + name + rest + b"\r\n")
    answers = len(STATUS.findall(sent(actions)))
    answers += sum(isinstance(a, Login) for a in actions)
    answers += sent(actions).count(b"+ \r\n")
    assert answers == 1, actions
