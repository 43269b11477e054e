"""HTTP CONNECT client machine: request bytes, Basic auth, 2xx/401/407/403, malformed and long replies."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.net.httpconnect import ConnectClient
from gateway.net.proxy import HandshakeError


def test_request_without_auth():
    assert ConnectClient("imap.example.com", 993).start() == (
        b"CONNECT imap.example.com:993 HTTP/1.1\r\nHost: imap.example.com:993\r\n\r\n")


def test_request_with_basic_auth_and_ipv6_brackets():
    request = ConnectClient("::1", 143, "user", "p:w").start()
    token = base64.b64encode(b"user:p:w")
    assert request == (b"CONNECT [::1]:143 HTTP/1.1\r\nHost: [::1]:143\r\n"
                       b"Proxy-Authorization: Basic " + token + b"\r\n\r\n")


def test_idn_host_is_sent_as_punycode():
    assert b"CONNECT xn--bcher-kva.example:993 " in ConnectClient("bücher.example", 993).start()


@pytest.mark.parametrize("host", ["a b", "a\r\nX: y", "", "u@h", "h/x"])
def test_hosts_that_would_break_the_request_are_refused(host):
    with pytest.raises(HandshakeError):
        ConnectClient(host, 993)


@pytest.mark.parametrize("split", [None, 1, 7])
def test_200_opens_the_tunnel_and_keeps_the_upstream_bytes(split):
    m = ConnectClient("h", 993)
    reply = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n* OK ready\r\n"
    chunks = [reply] if split is None else [reply[i:i + split] for i in range(0, len(reply), split)]
    steps = []
    for chunk in chunks:
        steps.append(m.receive_data(chunk))
        if steps[-1].done:
            break
    assert steps[-1].done
    assert steps[-1].leftover + b"".join(chunks[len(steps):]) == b"* OK ready\r\n"


def test_http_1_0_200_is_fine():
    assert ConnectClient("h", 1).receive_data(b"HTTP/1.0 200 OK\r\n\r\n").done


@pytest.mark.parametrize("status, with_auth, message", [
    (b"407 Proxy Authentication Required", True, "HTTP CONNECT authentication refused: 407 Proxy Authentication Required"),
    (b"401 Unauthorized", True, "HTTP CONNECT authentication refused: 401 Unauthorized"),
    (b"407 Proxy Authentication Required", False, "HTTP CONNECT proxy requires authentication: 407"),
    (b"403 Forbidden", True, "HTTP CONNECT refused: 403 Forbidden"),
    (b"502 Bad Gateway", False, "HTTP CONNECT refused: 502 Bad Gateway"),
    (b"403", False, "HTTP CONNECT refused: 403$"),
])
def test_refusals_name_the_status(status, with_auth, message):
    m = ConnectClient("h", 993, "u" if with_auth else None, "secret-pw" if with_auth else None)
    with pytest.raises(HandshakeError, match=message) as info:
        m.receive_data(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    assert "secret-pw" not in str(info.value)


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH\r\n\r\n", b"\x05\x00", b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
])
def test_malformed_replies(reply):
    with pytest.raises(HandshakeError, match="malformed"):
        ConnectClient("h", 993).receive_data(reply)


def test_reason_phrase_is_printable_and_short():
    with pytest.raises(HandshakeError) as info:
        ConnectClient("h", 1).receive_data(b"HTTP/1.1 403 \x1b[31mNo\xff" + b"x" * 300 + b"\r\n\r\n")
    text = str(info.value)
    assert text.isprintable() and text.isascii() and len(text) < 120


def test_head_is_bounded():
    m = ConnectClient("h", 1)
    m.receive_data(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(HandshakeError, match="16 KiB"):
        for _ in range(20):
            m.receive_data(b"X-Filler: " + b"y" * 1000 + b"\r\n")


@given(st.binary(max_size=80), st.integers(min_value=1, max_value=9))
@settings(max_examples=400, deadline=None)
def test_arbitrary_replies_end_in_a_step_or_handshake_error(data, split):
    m = ConnectClient("h", 993, "u", "p")
    try:
        for i in range(0, len(data), split):
            if m.receive_data(data[i:i + split]).done:
                break
    except HandshakeError:
        pass
