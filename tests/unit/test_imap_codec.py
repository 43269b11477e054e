"""Tests for gateway.imap.codec: the sans-io IMAP command decoder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap.codec import (
    NEED_DATA,
    BadCommand,
    Command,
    CommandDecoder,
    ContinuationLine,
    LiteralContinuation,
)

EVENT_TYPES = (Command, LiteralContinuation, ContinuationLine, BadCommand)


def drain(decoder: CommandDecoder) -> list[object]:
    events = []
    while (event := decoder.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def decode(data: bytes, **limits: int) -> list[object]:
    decoder = CommandDecoder(**limits)
    decoder.receive_data(data)
    return drain(decoder)


def decode_chunked(chunks: list[bytes], **limits: int) -> list[object]:
    decoder = CommandDecoder(**limits)
    events: list[object] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        events += drain(decoder)
    return events


# -- syntax ---------------------------------------------------------------


def test_command_without_arguments_is_upper_cased() -> None:
    assert decode(b"a1 capability\r\n") == [Command(b"a1", b"CAPABILITY", ())]


def test_bare_lf_ends_a_line_too() -> None:
    assert decode(b"a1 NOOP\nb2 NOOP\r\n") == [Command(b"a1", b"NOOP"), Command(b"b2", b"NOOP")]


def test_atoms_quoted_strings_and_nil() -> None:
    events = decode(b'a LOGIN user "p a\\"ss\\\\" nil NIL \\Seen\r\n')
    assert events == [Command(b"a", b"LOGIN", (b"user", b'p a"ss\\', None, None, b"\\Seen"))]


def test_quoted_string_keeps_8bit_bytes_undecoded() -> None:
    assert decode(b'a LOGIN "\xc3\xa9\xff" x\r\n') == [Command(b"a", b"LOGIN", (b"\xc3\xa9\xff", b"x"))]


def test_nested_and_empty_lists() -> None:
    events = decode(b'a ID ("k" "v" () (NIL (x y))) ()\r\n')
    assert events == [Command(b"a", b"ID", ((b"k", b"v", (), (None, (b"x", b"y"))), ()))]


def test_invalid_quoted_strings_are_bad() -> None:
    for line in [
        b'a LOGIN "x\\n" y\r\n',  # unknown escape
        b'a LOGIN "x\x00" y\r\n',  # NUL
        b'a LOGIN "x\ry" z\r\n',  # bare CR
        b'a LOGIN "unterminated\r\n',
    ]:
        assert decode(line) == [BadCommand(b"a", "Invalid quoted string")], line


def test_syntax_errors_are_bad_with_tag_when_usable() -> None:
    assert decode(b"\r\n") == [BadCommand(None, "Empty command line")]
    assert decode(b"* NOOP\r\n") == [BadCommand(None, "Invalid tag")]
    assert decode(b"a+b NOOP\r\n") == [BadCommand(None, "Invalid tag")]
    assert decode(b"a1\r\n") == [BadCommand(b"a1", "Missing command")]
    assert decode(b"a1 NO(OP\r\n") == [BadCommand(b"a1", "Invalid command name")]
    assert decode(b"a1 LOGIN x  y\r\n")[0].tag == b"a1"
    assert decode(b"a1 LOGIN (x\r\n") == [BadCommand(b"a1", "Unterminated list")]
    assert decode(b"a1 LOGIN x)\r\n") == [BadCommand(b"a1", "Unexpected )")]
    assert decode(b"a1 LOGIN x \r\n") == [BadCommand(b"a1", "Unexpected end of line")]
    assert decode(b"a1 LOGIN \x01\r\n") == [BadCommand(b"a1", "Invalid character in command")]
    assert decode(b"a1 LOGIN {3}x\r\n") == [BadCommand(b"a1", "Invalid literal")]


def test_errors_do_not_affect_the_next_command() -> None:
    assert decode(b'a LOGIN "x\r\nb NOOP\r\n') == [
        BadCommand(b"a", "Invalid quoted string"),
        Command(b"b", b"NOOP"),
    ]


def test_argument_count_and_nesting_are_limited() -> None:
    assert decode(b"a X " + b" ".join([b"x"] * 4) + b"\r\n", max_args=3) == [
        BadCommand(b"a", "Too many arguments")
    ]
    assert decode(b"a X ((((x))))\r\n", max_args=64) == [Command(b"a", b"X", (((((b"x",),),),),))]
    assert decode(b"a X " + b"(" * 9 + b")" * 9 + b"\r\n") == [
        BadCommand(b"a", "Lists nested too deeply")
    ]


# -- literals --------------------------------------------------------------


def test_sync_literal_announces_continuation_once_header_is_complete() -> None:
    decoder = CommandDecoder()
    decoder.receive_data(b"a LOGIN {5}")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"\r\n")
    assert decoder.next_event() == LiteralContinuation()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"hel")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"lo {4}\r\n")
    assert decoder.next_event() == LiteralContinuation()
    decoder.receive_data(b"a\r\nb\r\n")
    assert decoder.next_event() == Command(b"a", b"LOGIN", (b"hello", b"a\r\nb"))
    assert decoder.buffered == 0


def test_non_sync_literal_needs_no_continuation() -> None:
    assert decode(b"a LOGIN {5+}\r\nhello {0+}\r\n\r\n") == [
        Command(b"a", b"LOGIN", (b"hello", b""))
    ]


def test_literal_inside_a_list() -> None:
    assert decode(b'a ID ("name" {3+}\r\nfoo)\r\n') == [Command(b"a", b"ID", ((b"name", b"foo"),))]


def test_literal8_is_rejected_and_its_non_sync_bytes_skipped() -> None:
    assert decode(b"a X ~{3}\r\n") == [BadCommand(b"a", "literal8 is not supported")]
    assert decode(b"a X ~{3+}\r\nb N\r\nc NOOP\r\n") == [
        BadCommand(b"a", "literal8 is not supported"),
        Command(b"c", b"NOOP"),
    ]


def test_bad_line_announcing_non_sync_literal_skips_the_literal() -> None:
    """The client sends a non-sync literal regardless; it must not run as a command."""
    assert decode(b'a LOGIN "x {10+}\r\nb LOGOUT\r\n rest\r\nc NOOP\r\n') == [
        BadCommand(b"a", "Invalid quoted string"),
        Command(b"c", b"NOOP"),
    ]


def test_absurd_literal_sizes_never_raise() -> None:
    """Thousands of digits (beyond int()'s limit) are a plain syntax error."""
    assert decode(b"a X {" + b"9" * 5000 + b"+}\r\nb NOOP\r\n") == [
        BadCommand(b"a", "Invalid literal"),
        Command(b"b", b"NOOP"),
    ]
    assert decode(b"a X {" + b"9" * 20 + b"+}\r\n")[0].fatal


SAMPLES = [
    b"a1 LOGIN {5}\r\nhello {6}\r\nsecret\r\na2 NOOP\r\n",
    b"a1 LOGIN {5+}\r\nhello {6+}\r\nsecret\r\na2 NOOP\n",
    b'a ID ("x\\"y" NIL ("z" {2+}\r\nzz))\r\nb CAPABILITY\r\n\r\n',
    b'a LOGIN "bad\\q" {3+}\r\nabc\r\nb NOOP\r\n',
    b"a X ~{3+}\r\nxyz\r\nb NOOP\r\n",
]


def test_split_at_every_byte_boundary_gives_the_same_events() -> None:
    for data in SAMPLES:
        expected = decode(data)
        for cut in range(len(data) + 1):
            assert decode_chunked([data[:cut], data[cut:]]) == expected, (data, cut)
        assert decode_chunked([bytes([b]) for b in data]) == expected


# -- take_buffer -----------------------------------------------------------


def test_take_buffer_returns_exactly_the_bytes_after_login() -> None:
    decoder = CommandDecoder()
    decoder.receive_data(b"a1 LOGIN user pass\r\na2 SELECT INBOX\r\na3 FE")
    assert decoder.next_event() == Command(b"a1", b"LOGIN", (b"user", b"pass"))
    assert decoder.buffered == len(b"a2 SELECT INBOX\r\na3 FE")
    assert decoder.take_buffer() == b"a2 SELECT INBOX\r\na3 FE"
    assert decoder.buffered == 0 and decoder.next_event() is NEED_DATA


def test_take_buffer_after_literal_login_keeps_pipelined_bytes() -> None:
    decoder = CommandDecoder()
    decoder.receive_data(b"a1 LOGIN {4+}\r\nuser {4+}\r\npass\r\na2 SELECT {5+}\r\nINBOX\r\n")
    assert decoder.next_event() == Command(b"a1", b"LOGIN", (b"user", b"pass"))
    assert decoder.take_buffer() == b"a2 SELECT {5+}\r\nINBOX\r\n"


def test_take_buffer_includes_an_unfinished_command() -> None:
    decoder = CommandDecoder()
    decoder.receive_data(b"a NOOP\r\nb LOGIN {3+}\r\nab")
    assert decoder.next_event() == Command(b"a", b"NOOP")
    assert decoder.next_event() is NEED_DATA
    assert decoder.take_buffer() == b"b LOGIN {3+}\r\nab"
    decoder.receive_data(b"c NOOP\r\n")
    assert drain(decoder) == [Command(b"c", b"NOOP")]


def test_continuation_line_is_returned_raw() -> None:
    decoder = CommandDecoder()
    decoder.receive_data(b"a AUTHENTICATE PLAIN\r\nb NOOP {3}\r\nc NOOP\r\n")
    assert decoder.next_event() == Command(b"a", b"AUTHENTICATE", (b"PLAIN",))
    decoder.expect_continuation()
    assert decoder.next_event() == ContinuationLine(b"b NOOP {3}")
    assert decoder.next_event() == Command(b"c", b"NOOP")


# -- bounds ----------------------------------------------------------------


def test_too_long_line_is_bad_and_skipped_through_its_lf() -> None:
    events = decode(b"a1 LOGIN " + b"x" * 100 + b"\r\na2 NOOP\r\n", max_line=32)
    assert events == [BadCommand(b"a1", "Line too long"), Command(b"a2", b"NOOP")]


def test_too_long_line_without_lf_keeps_the_buffer_bounded() -> None:
    decoder = CommandDecoder(max_line=64, max_literal=64)
    decoder.receive_data(b"a1 LOGIN ")
    events = []
    for _ in range(1000):
        decoder.receive_data(b"y" * 100)
        events += drain(decoder)
        assert decoder.buffered <= 64 + 100
    decoder.receive_data(b"\r\na2 NOOP\r\n")
    events += drain(decoder)
    assert events == [BadCommand(b"a1", "Line too long"), Command(b"a2", b"NOOP")]


def test_garbage_without_any_lf_never_grows_the_buffer() -> None:
    decoder = CommandDecoder()
    events = []
    for _ in range(2000):
        decoder.receive_data(b"\x00\xff garbage " * 100)
        events += drain(decoder)
        assert decoder.buffered <= 8192 + 1100
    assert events == [BadCommand(None, "Line too long")]


def test_huge_sync_literal_is_refused_without_continuation() -> None:
    """The client waits for '+' before sending, so the session goes on."""
    events = decode(b"a LOGIN {70000}\r\nb NOOP\r\n")
    assert events == [BadCommand(b"a", "Literal too large"), Command(b"b", b"NOOP")]


def test_huge_non_sync_literal_is_fatal() -> None:
    decoder = CommandDecoder(max_literal=10)
    decoder.receive_data(b"a LOGIN {11+}\r\n01234567890\r\nb NOOP\r\n")
    assert decoder.next_event() == BadCommand(b"a", "Literal too large", fatal=True)
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"c NOOP\r\n")
    assert decoder.buffered == 0


def test_whole_command_size_is_bounded() -> None:
    decoder = CommandDecoder(max_line=100, max_literal=100, max_command=150)
    decoder.receive_data(b"a X {90+}\r\n" + b"x" * 90 + b" {90+}\r\n")
    assert decoder.next_event() == BadCommand(b"a", "Literal too large", fatal=True)


# -- properties ------------------------------------------------------------

TOKENS = st.sampled_from(
    [b"a1 ", b"LOGIN", b"NOOP", b" ", b"x", b"NIL", b'"', b"\\", b"(", b")", b"{3}",
     b"{2+}", b"{99+}", b"~{1+}", b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"*"]
)
PROTOCOLISH = st.lists(TOKENS, max_size=60).map(b"".join)
INPUTS = st.one_of(st.binary(max_size=400), PROTOCOLISH)
LIMITS = {"max_line": 24, "max_literal": 16, "max_args": 6}


@settings(max_examples=400)
@given(INPUTS, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_random_input_never_raises_and_splitting_never_matters(
    data: bytes, cuts: list[int]
) -> None:
    """Any bytes, any split: valid events, bounded buffer, same events as one shot."""
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[i:j] for i, j in zip([0, *points], [*points, len(data)])]
    decoder = CommandDecoder(**LIMITS)
    events: list[object] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        events += drain(decoder)
        assert decoder.buffered <= 24 + 16 + len(chunk) + 24
    assert all(isinstance(event, EVENT_TYPES) for event in events)
    assert events == decode(data, **LIMITS)


@given(st.binary(max_size=200))
def test_bytes_after_last_event_are_exactly_the_unconsumed_suffix(tail: bytes) -> None:
    """take_buffer() never loses or invents a byte after a completed command."""
    decoder = CommandDecoder()
    decoder.receive_data(b"a1 LOGIN u p\r\n" + tail)
    assert decoder.next_event() == Command(b"a1", b"LOGIN", (b"u", b"p"))
    assert decoder.take_buffer() == tail
