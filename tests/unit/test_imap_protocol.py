"""The client-facing IMAP protocol on StringTransport: wiring, timeouts, bad input, held bytes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.auth.tokens import TokenCheck
from gateway.config import load_config
from gateway.connections import Connections
from gateway.imap.protocol import IMAPGateway
from gateway.session import SessionDeps


class RecordingStore:
    """Answers token checks with a fixed result and records them (the real store is tested elsewhere)."""

    def __init__(self, result: TokenCheck = TokenCheck.INVALID, hold: bool = False) -> None:
        self.result = result
        self.calls: list[tuple[str, str, str | None, str | None]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.hold = hold

    def check_login(self, secret: str, scope: str, peer: str | None, account: str):
        self.calls.append((secret, scope, peer, account))
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed((self.result, None, None))


class NoUpstreams:
    """An upstream source for tests that never get that far: it records the accounts asked for."""

    pooling = False

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    async def acquire(self, account: dict[str, Any], client: Any = None) -> Any:
        self.asked.append(account)
        raise AssertionError("no upstream in this test")


def connected(session_class: Any, section: str, store: Any, tls: bool, peer: str,
              settings: dict[str, Any]) -> tuple[Any, StringTransport, Any]:
    """A session of ``session_class`` on a StringTransport from ``peer``, with a fake clock."""
    config = load_config(overrides={section: settings} if settings else None)
    core = SessionDeps(reactor=MemoryReactorClock(), settings=getattr(config, section),
                       tokens=store or RecordingStore(), upstreams=NoUpstreams(),
                       connections=Connections(), server_tls=None, version="0.1")
    proto = session_class(core, tls=tls)
    transport = StringTransport(peerAddress=SimpleNamespace(host=peer, port=5555))
    proto.makeConnection(transport)
    return proto, transport, core


def connect(store: Any = None, tls: bool = True, **imap: Any) -> tuple[IMAPGateway, StringTransport, Any]:
    return connected(IMAPGateway, "imap", store, tls, "192.0.2.7", imap)


def test_greeting_carries_capabilities():
    """The greeting is `* OK [CAPABILITY ...] ... ready` with AUTH=PLAIN on a TLS listener."""
    _, transport, _ = connect()
    greeting = transport.value()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and greeting.endswith(b"ready\r\n")
    assert b"AUTH=PLAIN" in greeting and b"STARTTLS" not in greeting


def test_wrong_token_gets_the_design_text_and_peer_is_checked():
    """LOGIN with a token the store refuses: tagged NO Invalid credentials; scope and peer passed."""
    store = RecordingStore(TokenCheck.INVALID)
    proto, transport, _ = connect(store)
    transport.clear()
    proto.dataReceived(b'a1 LOGIN alice "tok en"\r\n')
    assert transport.value() == b"a1 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
    assert store.calls == [("tok en", "imap-proxy", "192.0.2.7", "alice")]


def test_cidr_denial_text():
    """A token check that fails on the address gets the design's access-denied text."""
    proto, transport, _ = connect(RecordingStore(TokenCheck.DENIED_ADDRESS))
    transport.clear()
    proto.dataReceived(b"a1 LOGIN alice tok\r\n")
    assert transport.value() == (b"a1 NO [AUTHENTICATIONFAILED] Access denied, "
                                 b"traffic not accepted from this IP\r\n")


def test_malformed_lines_each_get_a_tagged_answer():
    """Every malformed line gets one BAD (tagged when it had a tag); the connection stays up."""
    proto, transport, _ = connect()
    transport.clear()
    lines = [b"a1 LOGIN\r\n", b"a2 FROB\r\n", b'a3 LOGIN "unterminated\r\n', b"\r\n",
             b"a4 AUTHENTICATE\r\n", b"a5 SELECT INBOX\r\n"]
    for line in lines:
        proto.dataReceived(line)
    out = transport.value().split(b"\r\n")[:-1]
    assert len(out) == len(lines)
    for answer, tag in zip(out, [b"a1", b"a2", b"a3", b"*", b"a4", b"a5"]):
        assert answer.startswith(tag + b" BAD") or answer.startswith(tag + b" NO"), answer
    assert not transport.disconnecting


def test_preauth_timeout_says_bye():
    """A client that never logs in is disconnected after imap.preauth_timeout with a BYE."""
    proto, transport, core = connect(preauth_timeout=30)
    transport.clear()
    core.reactor.advance(29)
    assert not transport.disconnecting
    core.reactor.advance(2)
    assert transport.value().startswith(b"* BYE") and transport.disconnecting


def test_bytes_behind_login_are_held_and_bounded():
    """While the login is checked, pipelined bytes are held; past max_pending reading pauses."""
    store = RecordingStore(hold=True)
    proto, transport, _ = connect(store, max_pending=1000)
    transport.clear()
    proto.dataReceived(b"a1 LOGIN alice tok\r\na2 SELECT INBOX\r\n")
    assert transport.value() == b"" and transport.producerState == "producing"
    proto.dataReceived(b"x" * 2000)
    assert transport.producerState == "paused"
    store.pending[0].callback((TokenCheck.INVALID, None, None))
    assert transport.producerState == "producing"
    assert transport.value().startswith(b"a1 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
    assert b"a2 BAD" in transport.value()


def test_starttls_refused_on_tls_listener_and_offered_on_plain():
    """STARTTLS on an implicit-TLS connection is refused; a plain listener offers it, LOGINDISABLED."""
    proto, transport, _ = connect(tls=True)
    transport.clear()
    proto.dataReceived(b"s1 STARTTLS\r\n")
    assert transport.value().startswith(b"s1 BAD")
    _, plain, _ = connect(tls=False)
    assert b"STARTTLS" in plain.value() and b"LOGINDISABLED" in plain.value()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_arbitrary_input_never_crashes(chunks):
    """Any bytes in any chunking: no exception, and only IMAP lines are written back."""
    proto, transport, _ = connect(RecordingStore(TokenCheck.INVALID))
    for chunk in chunks:
        proto.dataReceived(chunk)
    for line in transport.value().split(b"\r\n")[:-1]:
        assert line[:1] in (b"*", b"+") or b" BAD " in line or b" NO " in line or b" OK " in line, line


def test_user_names_are_logged_safely():
    """A user name with a newline cannot forge a log line; a token typed as user name is not logged."""
    from gateway.session import loggable

    assert loggable("alice") == "alice"
    assert "\n" not in loggable("alice\nIMAP login account=admin result=ok")
    assert loggable("a" * 64) == "<token-like user name>"
    assert loggable("x" * 300).endswith("...") and len(loggable("x" * 300)) == 103
