"""The sans-io IMAP session tracker: boundaries both ways, literals, continuations, reusability."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap.tracker import Boundary, ClientState, Tracker


def run(*turns: tuple[str, bytes], record: bool = False) -> Tracker:
    tracker = Tracker(record=record)
    for side, data in turns:
        if side == "c":
            tracker.from_client(data)
        else:
            tracker.from_server(data)
    return tracker


def test_select_then_close_and_unselect_follow_the_selected_state():
    """SELECT OK selects; CLOSE and UNSELECT OK unselect; a refused SELECT leaves none selected."""
    t = run(("c", b"a SELECT INBOX\r\n"), ("s", b"* 3 EXISTS\r\na OK [READ-WRITE] done\r\n"))
    assert t.selected and t.reusable
    t.from_client(b"b CLOSE\r\n")
    assert t.in_flight == {b"b": b"CLOSE"} and not t.reusable
    t.from_server(b"b OK closed\r\n")
    assert not t.selected and t.reusable
    t = run(("c", b"a EXAMINE INBOX\r\n"), ("s", b"a OK\r\n"), ("c", b"b unselect\r\n"), ("s", b"b OK\r\n"))
    assert not t.selected and t.reusable
    t = run(("c", b"a SELECT INBOX\r\n"), ("s", b"a OK\r\n"), ("c", b"b SELECT nope\r\n"),
            ("s", b"b NO [NONEXISTENT] no\r\n"))
    assert not t.selected and t.reusable


def test_logout_is_found_where_it_starts_only_when_all_is_clean():
    """A clean LOGOUT gives its offset; behind a command in flight or with arguments it is left to the server."""
    t = run(("c", b"a SELECT INBOX\r\n"), ("s", b"a OK\r\n"))
    assert t.from_client(b"b NOOP\r\n") == -1
    t.from_server(b"b OK\r\n")
    assert t.from_client(b"c LOGOUT\r\n") == 0
    assert t.logged_out and t.logout_tag == b"c" and t.in_flight == {}
    assert t.reusable and t.selected  # LOGOUT never went upstream; the pool will UNSELECT

    t = run(("s", b""))
    assert t.from_client(b"x NOOP\r\ny LOGOUT\r\n") == -1  # x still in flight
    assert t.in_flight == {b"x": b"NOOP", b"y": b"LOGOUT"} and not t.reusable
    t = run(("s", b""))
    assert t.from_client(b"y LOGOUT now\r\n") == -1
    t = run(("s", b"* 4 EXISTS\r\n"))
    assert t.from_client(b"a NOOP\r\n") == -1
    t.from_server(b"a OK\r\n")
    assert t.from_client(b"a2 logout\r\n") == 0


def test_logout_split_across_chunks_is_not_intercepted():
    """A LOGOUT whose first bytes were already forwarded goes to the server (and taints)."""
    t = Tracker()
    assert t.from_client(b"z LOG") == -1
    assert t.from_client(b"OUT\r\n") == -1
    assert not t.reusable and "LOGOUT" in t.reason


def test_server_literals_are_skipped_by_count():
    """A FETCH literal holding a fake tagged line is skipped; the real answer ends the command."""
    body = b"x\r\na OK fake\r\n{3}\r\n+ go\r\n"
    t = run(("c", b"a FETCH 1 BODY[]\r\n"),
            ("s", b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\n"))
    assert t.in_flight == {b"a": b"FETCH"} and not t.reusable
    t.from_server(b"a OK done\r\n")
    assert t.reusable and not t.why_not
    t = run(("c", b"a UID FETCH 1 BINARY[1]\r\n"), ("s", b"* 1 FETCH (BINARY[1] ~{2}\r\n\x00\n)\r\na OK\r\n"))
    assert t.reusable


def test_synchronizing_literal_waits_for_the_servers_go_ahead():
    """{n}: the literal comes after '+'; a tagged refusal instead ends the command without it."""
    t = run(("c", b"a APPEND INBOX {6}\r\n"))
    assert t.client_state is ClientState.LITERAL_WAIT
    t.from_server(b"+ OK\r\n")
    t.from_client(b"b OK\r\n\r\n")  # 6 literal bytes that look like a line, then the end of the command
    assert t.in_flight == {b"a": b"APPEND"}
    t.from_server(b"a OK [APPENDUID 1 1] done\r\n")
    assert t.reusable

    t = run(("c", b"a APPEND INBOX {99999999}\r\n"), ("s", b"a NO [TOOBIG] too big\r\n"),
            ("c", b"b NOOP\r\n"), ("s", b"b OK\r\n"))
    assert t.reusable and t.in_flight == {}


def test_literal_plus_needs_no_go_ahead():
    """{n+} literals follow at once, even several in one command."""
    t = run(("c", b"a APPEND INBOX (\\Seen) {3+}\r\nabc\r\n"), ("s", b"a OK\r\n"),
            ("c", b"b RENAME {2+}\r\nab {2+}\r\ncd\r\n"), ("s", b"b OK\r\n"))
    assert t.reusable and not t.why_not


def test_authenticate_continuations_and_idle_done_are_not_commands():
    """Client lines after AUTHENTICATE and IDLE are SASL/DONE lines; both taint the connection."""
    t = run(("c", b"a AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"AGZvbwBiYXI=\r\n"),
            ("s", b"a NO not now\r\n"), record=True)
    assert t.in_flight == {} and t.client_state is ClientState.COMMAND
    assert [e.kind for e in t.events or []] == ["command", "continuation", "sasl", "response"]
    assert not t.reusable and "AUTHENTICATE" in t.reason
    t = run(("c", b"i IDLE\r\n"), ("s", b"+ idling\r\n* 2 EXISTS\r\n"), ("c", b"DONE\r\n"), ("s", b"i OK\r\n"))
    assert t.in_flight == {} and t.client_state is ClientState.COMMAND
    assert not t.reusable and "IDLE" in t.reason


def test_compress_makes_the_stream_opaque():
    """After COMPRESS OK nothing more is parsed (it is deflate), and the connection is not reusable."""
    t = run(("c", b"a COMPRESS DEFLATE\r\n"), ("s", b"a OK go\r\n\x78\x9c\n\n{5}\r\n"),
            ("c", b"\x01\x02 LOGOUT\r\n"))
    assert t.client_state is ClientState.OPAQUE and not t.reusable and "COMPRESS" in t.reason


def test_enable_and_condstore_arguments_taint():
    """ENABLE and CONDSTORE-enabling arguments (even split across chunks) change the session: taint."""
    assert "ENABLE" in run(("c", b"a ENABLE UTF8=ACCEPT\r\n"), ("s", b"a OK\r\n")).reason
    t = run(("c", b"a SELECT INBOX (COND"), ("c", b"STORE)\r\n"), ("s", b"a OK\r\n"))
    assert "CONDSTORE" in t.reason
    t = run(("c", b"a FETCH 1:* (FLAGS) (CHANGEDSINCE 4)\r\n"), ("s", b"a OK\r\n"))
    assert not t.reusable


def test_drops_in_the_middle_are_not_reusable():
    """A session left inside a command line, a literal, or a server response is not reusable."""
    assert not run(("c", b"a NOO")).reusable
    assert not run(("c", b"a APPEND INBOX {10+}\r\nabc")).reusable
    assert not run(("c", b"a NOOP\r\n"), ("s", b"* 1 FETCH (BODY[] {10}\r\nabc")).reusable
    assert not run(("c", b"a NOOP\r\n"), ("s", b"a OK")).reusable
    assert run(("c", b"a NOOP\r\n"), ("s", b"a OK\r\n")).reusable


def test_surprises_taint():
    """Answers to unknown tags, unsolicited '+', BYE and bare lines are doubts: not reusable."""
    assert "tag not in flight" in run(("s", b"zz OK\r\n")).reason
    assert "continuation" in run(("s", b"+ hi\r\n")).reason
    assert "BYE" in run(("s", b"* BYE shutting down\r\n")).reason
    assert "tag" in run(("c", b"\r\n")).reason
    assert "reused a tag" in run(("c", b"a NOOP\r\na NOOP\r\n")).reason


# -- property tests -----------------------------------------------------------

_payload = st.binary(min_size=0, max_size=40)
_atoms = st.sampled_from([b"NOOP", b"CHECK", b"LIST \"\" *", b"STATUS INBOX (MESSAGES)", b"SELECT INBOX",
                          b"EXAMINE Sent", b"UNSELECT", b"CLOSE", b"UID SEARCH ALL", b"FETCH 1 (FLAGS)"])


@st.composite
def exchanges(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """A whole, well-formed conversation as (side, bytes) turns, in causal order."""
    turns: list[tuple[str, bytes]] = []
    for i in range(draw(st.integers(1, 8))):
        tag = b"t%d" % i
        kind = draw(st.sampled_from(["simple", "pipelined", "sync", "refused", "plus", "auth", "idle"]))
        untagged = b"".join(
            (b"* %d FETCH (BODY[] {%d}\r\n" % (n, len(p)) + p + b")\r\n") if n % 2 else b"* %d EXISTS\r\n" % n
            for n, p in draw(st.lists(st.tuples(st.integers(0, 9), _payload), max_size=3)))
        if kind == "simple":
            turns += [("c", tag + b" " + draw(_atoms) + b"\r\n"), ("s", untagged + tag + b" OK done\r\n")]
        elif kind == "pipelined":
            turns += [("c", tag + b"a NOOP\r\n" + tag + b"b " + draw(_atoms) + b"\r\n"),
                      ("s", tag + b"a OK\r\n" + untagged + tag + b"b NO nope\r\n")]
        elif kind == "sync":
            data = draw(_payload)
            turns += [("c", tag + b" APPEND INBOX {%d}\r\n" % len(data)), ("s", b"+ Ready\r\n"),
                      ("c", data + b"\r\n"), ("s", tag + b" OK appended\r\n")]
        elif kind == "refused":
            turns += [("c", tag + b" APPEND INBOX {%d}\r\n" % draw(st.integers(1, 10**6))),
                      ("s", tag + b" NO [TOOBIG] no\r\n")]
        elif kind == "plus":
            data = draw(_payload)
            turns += [("c", tag + b" APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n"),
                      ("s", untagged + tag + b" OK\r\n")]
        elif kind == "auth":
            turns += [("c", tag + b" AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"AGEAYg==\r\n"),
                      ("s", tag + b" BAD already authenticated\r\n")]
        else:
            turns += [("c", tag + b" IDLE\r\n"), ("s", b"+ idling\r\n" + untagged), ("c", b"DONE\r\n"),
                      ("s", tag + b" OK idle done\r\n")]
    return turns


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


@settings(max_examples=300, deadline=None)
@given(exchanges(), st.lists(st.integers(0, 10**6), max_size=30))
def test_random_splits_give_the_same_boundaries_as_whole_turns(turns, cuts):
    """Fed in random pieces, the tracker finds exactly the boundaries and state it finds fed whole."""
    whole = Tracker(record=True)
    split = Tracker(record=True)
    for side, data in turns:
        (whole.from_client if side == "c" else whole.from_server)(data)
        for piece in _pieces(data, cuts):
            (split.from_client if side == "c" else split.from_server)(piece)
    assert split.events == whole.events
    assert (split.in_flight, split.selected, split.why_not, split.reusable) == \
        (whole.in_flight, whole.selected, whole.why_not, whole.reusable)
    # Every command got its answer: nothing is in flight at the end of a whole conversation.
    assert whole.in_flight == {}
    commands = [e for e in whole.events or [] if e.kind in ("command", "refused")]
    answers = [e for e in whole.events or [] if e.kind == "response"]
    assert sorted(e.tag for e in commands) == sorted(e.tag for e in answers)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=20))
def test_arbitrary_bytes_never_raise_and_always_explain(chunks):
    """Any bytes either way: no exception, and a tracker that is not reusable says why."""
    t = Tracker()
    for to_server, data in chunks:
        if to_server:
            at = t.from_client(data)
            assert at == -1 or 0 <= at < len(data)
        else:
            t.from_server(data)
    assert t.reusable != bool(t.reason)


def test_boundary_offsets_are_absolute():
    """Offsets count from the start of each direction's stream."""
    t = run(("c", b"a NOOP\r\n"), ("c", b"b NOOP\r\n"), ("s", b"a OK\r\nb OK\r\n"), record=True)
    assert t.events == [Boundary("client", 8, "command", b"a", b"NOOP"),
                        Boundary("client", 16, "command", b"b", b"NOOP"),
                        Boundary("server", 6, "response", b"a", b"OK"),
                        Boundary("server", 12, "response", b"b", b"OK")]
