"""The client-facing SMTP protocol on StringTransport: wiring, timeouts, bad input, token answers."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from gateway.auth.tokens import TokenCheck
from gateway.smtp.protocol import SMTPGateway
from test_imap_protocol import RecordingStore, connected


def connect(store: Any = None, tls: bool = True, **smtp: Any) -> tuple[SMTPGateway, StringTransport, Any]:
    return connected(SMTPGateway, "smtp", store, tls, "192.0.2.9", smtp)


def auth_plain(proto: SMTPGateway, user: str, token: str) -> None:
    proto.dataReceived(b"EHLO client.example\r\n")
    proto.dataReceived(b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{token}".encode()) + b"\r\n")


def test_greeting_and_ehlo_on_an_implicit_tls_listener():
    """220 greeting; EHLO offers AUTH PLAIN LOGIN and no STARTTLS when TLS is already on."""
    proto, transport, _ = connect()
    assert transport.value().startswith(b"220 ")
    transport.clear()
    proto.dataReceived(b"EHLO client.example\r\n")
    reply = transport.value()
    assert b"250 AUTH PLAIN LOGIN\r\n" in reply and b"STARTTLS" not in reply


def test_bad_token_gets_535_578_and_scope_smtp_is_checked():
    """A refused token: 535 5.7.8; the check asked for scope smtp, the account and the peer."""
    store = RecordingStore(TokenCheck.INVALID)
    proto, transport, _ = connect(store)
    auth_plain(proto, "alice", "tok")
    assert transport.value().endswith(b"535 5.7.8 Authentication credentials invalid\r\n")
    assert store.calls == [("tok", "smtp", "192.0.2.9", "alice")]


def test_address_outside_cidr_gets_535_571():
    """A token refused for the client's address: 535 5.7.1 with the design's text."""
    proto, transport, _ = connect(RecordingStore(TokenCheck.DENIED_ADDRESS))
    auth_plain(proto, "alice", "tok")
    assert transport.value().endswith(b"535 5.7.1 Access denied, traffic not accepted from this IP\r\n")


def test_preauth_timeout_says_421():
    """A client that never authenticates is disconnected after smtp.preauth_timeout with a 421."""
    proto, transport, core = connect(preauth_timeout=20)
    transport.clear()
    core.reactor.advance(21)
    assert transport.value().startswith(b"421 ") and transport.disconnecting


def test_plaintext_listener_requires_starttls_before_auth():
    """On the STARTTLS listener AUTH before TLS gets 530 5.7.0 and is not checked at all."""
    store = RecordingStore(TokenCheck.OK)
    proto, transport, _ = connect(store, tls=False)
    auth_plain(proto, "alice", "tok")
    assert transport.value().endswith(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
    assert store.calls == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_arbitrary_input_never_crashes(chunks):
    """Any bytes in any chunking: no exception, and every reply line starts with a 3-digit code."""
    proto, transport, _ = connect(RecordingStore(TokenCheck.INVALID))
    for chunk in chunks:
        proto.dataReceived(chunk)
    for line in transport.value().split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
