"""Tests for gateway.smtp.filter: the sans-io filter on the relayed SMTP session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp.filter import CloseBoth, RelayFilter, ToClient, ToUpstream, parse_ehlo

FULL = {b"PIPELINING": b"", b"8BITMIME": b"", b"SIZE": b"35882577", b"SMTPUTF8": b"",
        b"ENHANCEDSTATUSCODES": b"", b"DSN": b"", b"AUTH": b"PLAIN XOAUTH2"}
BARE: dict[bytes, bytes] = {b"PIPELINING": b""}
OK = b"250 2.1.0 Ok\r\n"


def relay(ext: dict[bytes, bytes] = FULL, **kwargs: Any) -> RelayFilter:
    return RelayFilter(ext, hostname=b"mx.test", max_size=1000, **kwargs)


def up(actions: Sequence[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToUpstream))


def client(actions: Sequence[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, ToClient))


def in_body(f: RelayFilter) -> RelayFilter:
    """Drive a filter through MAIL/RCPT/DATA into body mode."""
    f.from_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    f.from_upstream(OK + OK + b"354 Go ahead\r\n")
    assert f.in_body
    return f


def stuff(body: bytes) -> bytes:
    """Dot-stuff a message and append the end marker."""
    lines = body.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return stuffed + (b"" if stuffed.endswith(b"\r\n") or not stuffed else b"\r\n") + b".\r\n"


def test_parse_ehlo_skips_greeting_and_keeps_parameters() -> None:
    reply = (b"250-smtp.example Hello you\r\n250-PIPELINING\r\n250-size 35882577\r\n"
             b"250 AUTH PLAIN XOAUTH2\r\n")
    assert parse_ehlo(reply) == {
        b"PIPELINING": b"", b"SIZE": b"35882577", b"AUTH": b"PLAIN XOAUTH2"
    }
    assert parse_ehlo(b"250 only.greeting\r\n") == {}


# -- pipelined transaction -------------------------------------------------------------


def test_pipelined_group_in_one_chunk_and_replies_in_one_chunk() -> None:
    f = relay()
    group = b"MAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
    assert f.from_client(group) == [ToUpstream(group)]
    replies = (OK + b"250 2.1.5 Ok\r\n" + b"550-5.1.1 no such\r\n550 5.1.1 user\r\n"
               b"354 End data\r\n")
    assert f.from_upstream(replies) == [ToClient(replies)]
    assert f.in_body


def test_body_passes_byte_exact_and_pipelined_quit_follows() -> None:
    f = in_body(relay())
    body = b"Subject: x\r\n\r\n..leading dot\r\n.\r\n"
    assert f.from_client(body + b"QUIT\r\n") == [ToUpstream(body), ToUpstream(b"QUIT\r\n")]
    assert not f.in_body
    assert f.from_upstream(b"250 2.0.0 queued\r\n221 2.0.0 Bye\r\n") == [
        ToClient(b"250 2.0.0 queued\r\n221 2.0.0 Bye\r\n"), CloseBoth()
    ]
    assert f.from_client(b"NOOP\r\n") == [] and f.from_upstream(b"250 x\r\n") == []


def test_body_chunk_is_passed_as_is_without_copy() -> None:
    f = in_body(relay())
    chunk = b"line\r\n" * 100
    assert f.from_client(chunk)[0].data is chunk  # type: ignore[union-attr]


def test_end_marker_split_across_chunks() -> None:
    for cut in range(1, 5):
        f = in_body(relay())
        data = b"hi\r\n.\r\nNOOP\r\n"
        out = up(f.from_client(data[: 2 + cut])) + up(f.from_client(data[2 + cut :]))
        assert out == data and not f.in_body, cut


def test_body_of_only_the_end_marker_right_after_354() -> None:
    f = in_body(relay())
    assert f.from_client(b".\r\nRSET\r\n") == [ToUpstream(b".\r\n"), ToUpstream(b"RSET\r\n")]
    assert client(f.from_upstream(b"250 queued\r\n250 reset\r\n")) == b"250 queued\r\n250 reset\r\n"


def test_dot_line_in_body_is_not_the_end_when_stuffed() -> None:
    f = in_body(relay())
    assert up(f.from_client(b"a\r\n..\r\nb\r\n")) == b"a\r\n..\r\nb\r\n" and f.in_body


def test_bytes_before_the_data_reply_are_held_then_read_as_body() -> None:
    f = relay()
    f.from_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert f.from_client(b"early body\r\n.\r\n") == []
    assert f.from_upstream(OK + OK + b"354 go\r\n") == [
        ToClient(OK + OK + b"354 go\r\n"), ToUpstream(b"early body\r\n.\r\n")
    ]
    assert not f.in_body


def test_refused_data_keeps_command_mode() -> None:
    f = relay()
    f.from_client(b"MAIL FROM:<a@b>\r\nDATA\r\n")
    assert f.from_client(b"NOOP\r\n") == []  # held until DATA's reply
    assert f.from_upstream(OK + b"554 5.5.1 No valid recipients\r\n") == [
        ToClient(OK + b"554 5.5.1 No valid recipients\r\n"), ToUpstream(b"NOOP\r\n")
    ]
    assert not f.in_body


def test_held_bytes_beyond_max_pending_ask_to_pause() -> None:
    f = relay(max_pending=100)
    f.from_client(b"DATA\r\n")
    f.from_client(b"x" * 101)
    assert f.should_pause_client
    f.from_upstream(b"354 go\r\n")
    assert not f.should_pause_client


# -- translate and refuse ----------------------------------------------------------------


def test_size_over_limit_is_refused_locally_in_order() -> None:
    f = relay()
    actions = f.from_client(b"NOOP\r\nMAIL FROM:<a@b> SIZE=5000\r\nNOOP\r\n")
    assert up(actions) == b"NOOP\r\nNOOP\r\n" and client(actions) == b""
    assert f.from_upstream(b"250 one\r\n") == [
        ToClient(b"250 one\r\n552 5.3.4 Message size exceeds fixed limit\r\n")
    ]
    assert f.from_upstream(b"250 two\r\n") == [ToClient(b"250 two\r\n")]


def test_size_is_stripped_when_upstream_lacks_it_other_lines_untouched() -> None:
    f = relay(BARE)
    assert up(f.from_client(b"MAIL FROM:<a@b> SIZE=10 BODY=7BIT\r\n")) == b"MAIL FROM:<a@b>\r\n"
    assert up(f.from_client(b"mail from:<x@y>\n")) == b"mail from:<x@y>\n"
    kept = b"MAIL FROM:<a@b>  SIZE=10\r\n"
    assert relay().from_client(kept) == [ToUpstream(kept)]


def test_8bitmime_refused_and_smtputf8_degraded_when_upstream_lacks_them() -> None:
    """SMTPUTF8, which we advertise, is never refused: dropped for an ASCII envelope; a non-ASCII
    mailbox (MAIL or RCPT) gets 553 5.6.7, as an MTA without an SMTPUTF8 next hop answers."""
    f = relay(BARE)
    assert f.from_client(b"MAIL FROM:<a@b> BODY=8BITMIME\r\n") == [
        ToClient(b"555 5.5.4 BODY=8BITMIME not supported by the upstream server\r\n")
    ]
    assert f.from_client(b"MAIL FROM:<a@b> SMTPUTF8\r\n") == [ToUpstream(b"MAIL FROM:<a@b>\r\n")]
    g = relay(BARE)
    assert g.from_client(b"MAIL FROM:<\xc3\xa9@b> SMTPUTF8\r\n") == [
        ToClient(b"553 5.6.7 Non-ASCII mailbox not supported by the upstream server\r\n")
    ]
    h = relay(BARE)
    assert h.from_client(b"RCPT TO:<j\xc3\xb6rg@b>\r\n") == [
        ToClient(b"553 5.6.7 Non-ASCII mailbox not supported by the upstream server\r\n")
    ]
    line = b"MAIL FROM:<\xc3\xa9@b> BODY=8BITMIME SMTPUTF8\r\n"
    assert relay().from_client(line) == [ToUpstream(line)]


def test_extension_parameters_pass_only_when_advertised() -> None:
    f = relay()
    for line in [b"MAIL FROM:<a@b> RET=HDRS ENVID=x AUTH=<>\r\n",
                 b"RCPT TO:<c@d> NOTIFY=NEVER\r\n"]:
        assert f.from_client(line) == [ToUpstream(line)]
    g = relay(BARE)
    for line in [b"MAIL FROM:<a@b> RET=HDRS\r\n", b"RCPT TO:<c@d> ORCPT=rfc822;c@d\r\n",
                 b"MAIL FROM:<a@b> MT-PRIORITY=3\r\n", b"MAIL FROM:<a@b> HOLDFOR=10\r\n",
                 b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n"]:
        assert g.from_client(line) == [ToClient(b"555 5.5.4 Unsupported parameter\r\n")], line
    with_by = relay({**BARE, b"DELIVERBY": b""})
    by = b"MAIL FROM:<a@b> BY=120;R\r\n"
    assert with_by.from_client(by) == [ToUpstream(by)]


def test_quoted_path_with_spaces_and_angle_bracket() -> None:
    f = relay(BARE)
    line = b'MAIL FROM:<"a > b"@c> SIZE=1\r\n'
    assert up(f.from_client(line)) == b'MAIL FROM:<"a > b"@c>\r\n'


def test_auth_starttls_bdat_answered_locally() -> None:
    f = relay()
    actions = f.from_client(b"AUTH PLAIN x\r\nSTARTTLS\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert client(actions) == (b"503 5.5.1 Already authenticated\r\n"
                               b"503 5.5.1 TLS already active\r\n"
                               b"502 5.5.1 CHUNKING not supported\r\n")
    assert up(actions) == b"NOOP\r\n"  # the 6-byte BDAT chunk was skipped


def test_line_too_long_answered_locally_in_order() -> None:
    f = relay(max_line=32)
    assert f.from_client(b"NOOP\r\n" + b"X" * 100 + b"\r\nRSET\r\n") == [
        ToUpstream(b"NOOP\r\nRSET\r\n")
    ]
    assert client(f.from_upstream(b"250 a\r\n250 b\r\n")) == (
        b"250 a\r\n500 5.5.2 Line too long\r\n250 b\r\n"
    )


# -- EHLO, pipelining, unsolicited replies -------------------------------------------------


def test_ehlo_after_auth_is_local_with_rset_upstream() -> None:
    f = relay()
    assert f.from_client(b"NOOP\r\nEHLO me.example\r\nHELO me\r\n") == [
        ToUpstream(b"NOOP\r\nRSET\r\nRSET\r\n")
    ]
    ehlo = (b"250-mx.test Hello me.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 1000\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
    assert f.from_upstream(b"250 noop\r\n250 2.0.0 reset\r\n250 2.0.0 reset\r\n") == [
        ToClient(b"250 noop\r\n" + ehlo + b"250 mx.test\r\n")
    ]


def test_upstream_without_pipelining_gets_one_command_at_a_time() -> None:
    f = relay({b"SIZE": b"100"})
    assert f.from_client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nAUTH x\r\nDATA\r\n") == [
        ToUpstream(b"MAIL FROM:<a@b>\r\n")
    ]
    assert f.from_upstream(OK) == [ToClient(OK), ToUpstream(b"RCPT TO:<c@d>\r\n")]
    assert f.from_upstream(OK) == [
        ToClient(OK + b"503 5.5.1 Already authenticated\r\n"), ToUpstream(b"DATA\r\n")
    ]
    assert f.from_upstream(b"354 go\r\n") == [ToClient(b"354 go\r\n")] and f.in_body


def test_unsolicited_and_partial_upstream_replies_pass_through() -> None:
    f = relay()
    assert f.from_upstream(b"421 4.4.2 Timeout\r\n") == [ToClient(b"421 4.4.2 Timeout\r\n")]
    f.from_client(b"NOOP\r\n")
    assert f.from_upstream(b"250-a\r\n250") == [ToClient(b"250-a\r\n")]
    assert f.from_upstream(b" b\r\n") == [ToClient(b"250 b\r\n")]
    assert f.from_upstream(b"garbage\r\n") == [ToClient(b"garbage\r\n")]


def test_overlong_upstream_reply_line_is_streamed() -> None:
    f = relay(max_line=32)
    f.from_client(b"NOOP\r\nQUIT\r\n")
    long_line = b"250-" + b"x" * 100 + b"\r\n"
    assert client(f.from_upstream(long_line + b"250 ok\r\n")) == long_line + b"250 ok\r\n"
    assert f.from_upstream(b"221 " + b"y" * 50 + b"\r\n")[-1] == CloseBoth()


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=12),
       st.sampled_from([FULL, BARE, {}]))
def test_arbitrary_bytes_both_ways_never_raise(chunks: list[tuple[bool, bytes]],
                                               ext: dict[bytes, bytes]) -> None:
    """Any interleaving of client and upstream bytes: only valid actions come out."""
    f = relay(ext, max_line=64, max_pending=256)
    for from_client, data in chunks:
        actions = f.from_client(data) if from_client else f.from_upstream(data)
        for action in actions:
            assert isinstance(action, (ToUpstream, ToClient, CloseBoth))


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2100), max_size=8))
def test_body_bytes_out_equal_body_bytes_in(body: bytes, cuts: list[int]) -> None:
    """A dot-stuffed body split anywhere passes byte-exact, then the trailing QUIT."""
    f = in_body(relay())
    data = stuff(body) + b"QUIT\r\n"
    points = sorted({min(c, len(data)) for c in cuts})
    out = b"".join(up(f.from_client(data[i:j])) for i, j in zip([0, *points], [*points, len(data)]))
    assert out == data and not f.in_body


LOCAL = {b"AUTH x": b"503 5.5.1 Already authenticated\r\n",
         b"STARTTLS": b"503 5.5.1 TLS already active\r\n",
         b"MAIL FROM:<a@b> SIZE=5000": b"552 5.3.4 Message size exceeds fixed limit\r\n",
         b"HELO h": b"250 mx.test\r\n"}


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b"NOOP", b"RSET", b"VRFY x", b"MAIL FROM:<a@b>", *LOCAL]),
                max_size=12),
       st.lists(st.integers(min_value=0, max_value=300), max_size=5),
       st.sampled_from([FULL, BARE, {}]))
def test_one_reply_per_command_in_order(commands: list[bytes], cuts: list[int],
                                        ext: dict[bytes, bytes]) -> None:
    """Against an upstream answering each line it gets, replies come back in command order."""
    f = relay(ext)
    data = b"".join(c + b"\r\n" for c in commands)
    points = sorted({min(c, len(data)) for c in cuts})
    got, answered = b"", 0
    for i, j in zip([0, *points], [*points, len(data)]):
        actions = f.from_client(data[i:j])
        while True:
            got += client(actions)
            lines = up(actions).count(b"\n")
            if not lines:
                break
            replies = b"".join(b"250 up%d\r\n" % (answered + k) for k in range(lines))
            answered += lines
            actions = f.from_upstream(replies)
    expected, k = b"", 0
    for command in commands:
        if command in LOCAL:
            k += command == b"HELO h"  # its RSET's reply is swallowed
            expected += LOCAL[command]
        else:
            expected += b"250 up%d\r\n" % k
            k += 1
    assert got == expected


def test_client_ignoring_pause_is_cut_off() -> None:
    f = relay(max_pending=100, max_line=32)
    f.from_client(b"DATA\r\n")
    actions = f.from_client(b"x" * 1000)
    assert actions == [ToClient(b"421 4.7.0 Too much pipelined data\r\n"), CloseBoth()]
    assert f.from_client(b"NOOP\r\n") == [] and f.from_upstream(b"354 go\r\n") == []
