"""SOCKS4/4a/5/5h client machines: exact bytes out, every reply code, malformed replies, any split."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.net.proxy import HandshakeError, ProxySpec, Step
from gateway.net.socks import SOCKS5_REPLIES, Socks4Client, Socks5Client

OK_V4_REPLY = b"\x05\x00\x00\x01" + socket.inet_aton("10.1.2.3") + struct.pack("!H", 4321)


def feed(machine, data: bytes, split: int | None = None) -> list[Step]:
    """Feed ``data`` whole or byte by byte; returns the steps."""
    if split is None:
        return [machine.receive_data(data)]
    return [machine.receive_data(data[i:i + split]) for i in range(0, len(data), split)]


# SOCKS5 -------------------------------------------------------------------

def test_socks5_no_auth_ipv4_exact_bytes_and_leftover():
    m = Socks5Client("127.0.0.1", 993)
    assert m.start() == b"\x05\x01\x00"
    step = m.receive_data(b"\x05\x00")
    assert step == Step(send=b"\x05\x01\x00\x01\x7f\x00\x00\x01\x03\xe1")
    step = m.receive_data(OK_V4_REPLY + b"* OK greeting")
    assert step.done and step.leftover == b"* OK greeting" and step.send == b""


def test_socks5_ipv6_target():
    m = Socks5Client("::1", 143)
    m.start()
    step = m.receive_data(b"\x05\x00")
    assert step.send == b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x00\x8f"


def test_socks5h_sends_the_host_name():
    m = Socks5Client("imap.example.com", 993, remote_dns=True)
    m.start()
    assert m.receive_data(b"\x05\x00").send == b"\x05\x01\x00\x03\x10imap.example.com\x03\xe1"


def test_socks5_without_remote_dns_refuses_a_host_name():
    with pytest.raises(HandshakeError, match="socks5h"):
        Socks5Client("imap.example.com", 993)


def test_socks5_username_password_rfc1929_bytes():
    m = Socks5Client("127.0.0.1", 993, "user", "p@ss")
    assert m.start() == b"\x05\x02\x00\x02"
    assert m.receive_data(b"\x05\x02").send == b"\x01\x04user\x04p@ss"
    assert m.receive_data(b"\x01\x00").send.startswith(b"\x05\x01\x00\x01")
    assert m.receive_data(OK_V4_REPLY).done


def test_socks5_proxy_may_choose_no_auth_even_when_we_offer_a_password():
    m = Socks5Client("127.0.0.1", 993, "user", "pass")
    m.start()
    assert m.receive_data(b"\x05\x00").send.startswith(b"\x05\x01\x00\x01")


def test_socks5_authentication_refused():
    m = Socks5Client("127.0.0.1", 993, "user", "wrong")
    m.start()
    m.receive_data(b"\x05\x02")
    with pytest.raises(HandshakeError, match="^SOCKS5 authentication refused$"):
        m.receive_data(b"\x01\x01")


def test_socks5_proxy_wants_auth_we_have_none():
    m = Socks5Client("127.0.0.1", 993)
    m.start()
    with pytest.raises(HandshakeError, match="requires authentication"):
        m.receive_data(b"\x05\xff")


def test_socks5_no_acceptable_method_with_credentials():
    m = Socks5Client("127.0.0.1", 993, "u", "p")
    m.start()
    with pytest.raises(HandshakeError, match="accepts none of our authentication methods"):
        m.receive_data(b"\x05\xff")


@pytest.mark.parametrize("code, text", sorted(SOCKS5_REPLIES.items()))
def test_every_socks5_reply_code_is_named(code, text):
    m = Socks5Client("127.0.0.1", 993)
    m.start()
    m.receive_data(b"\x05\x00")
    with pytest.raises(HandshakeError) as info:
        m.receive_data(bytes([5, code]))  # refusals may come without the address part
    assert str(info.value) == f"SOCKS5 {text} (reply {code})"


def test_unknown_socks5_reply_code():
    m = Socks5Client("127.0.0.1", 993)
    m.start()
    m.receive_data(b"\x05\x00")
    with pytest.raises(HandshakeError, match="unknown reply 9"):
        m.receive_data(b"\x05\x09\x00\x01")


@pytest.mark.parametrize("reply, message", [
    (b"\x04\x00", "version 4"),
    (b"HTTP/1.1 400 Bad Request\r\n", "version 72"),
    (b"\x05\x03", "method 3 was not offered"),
    (b"\x05\x02", "method 2 was not offered"),
])
def test_socks5_malformed_method_replies(reply, message):
    m = Socks5Client("127.0.0.1", 993)
    m.start()
    with pytest.raises(HandshakeError, match=message):
        m.receive_data(reply)


@pytest.mark.parametrize("reply, message", [
    (b"\x04\x00\x00\x01", "version 4"),
    (b"\x05\x00\x01\x01", "reserved byte"),
    (b"\x05\x00\x00\x07", "address type 7"),
])
def test_socks5_malformed_connect_replies(reply, message):
    m = Socks5Client("127.0.0.1", 993)
    m.start()
    m.receive_data(b"\x05\x00")
    with pytest.raises(HandshakeError, match=message):
        m.receive_data(reply + b"\x00" * 8)


def test_socks5_bad_auth_reply_version():
    m = Socks5Client("127.0.0.1", 993, "u", "p")
    m.start()
    m.receive_data(b"\x05\x02")
    with pytest.raises(HandshakeError, match="authentication reply"):
        m.receive_data(b"\x05\x00")


@pytest.mark.parametrize("bound", [
    b"\x01" + socket.inet_aton("10.0.0.1"),
    b"\x04" + socket.inet_pton(socket.AF_INET6, "fd00::1"),
    b"\x03\x0bproxy.local",
])
def test_socks5_reply_with_every_address_type_byte_by_byte(bound):
    m = Socks5Client("127.0.0.1", 993, "u", "p")
    m.start()
    feed(m, b"\x05\x02", 1)
    feed(m, b"\x01\x00", 1)
    steps = feed(m, b"\x05\x00\x00" + bound + b"\x10\x00", 1)
    assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
    assert steps[-1].leftover == b""
    # bytes after the reply that arrive later are not the machine's business any more
    with pytest.raises(HandshakeError, match="finished"):
        m.receive_data(b"more")


def test_socks5_whole_conversation_in_one_read():
    m = Socks5Client("127.0.0.1", 993, "u", "p")
    m.start()
    step = m.receive_data(b"\x05\x02" + b"\x01\x00" + OK_V4_REPLY + b"tail")
    assert step.done and step.leftover == b"tail"
    assert step.send == b"\x01\x01u\x01p" + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x03\xe1"


def test_socks5_reply_longer_than_the_limit():
    m = Socks5Client("127.0.0.1", 993)
    m.start()
    m.receive_data(b"\x05\x00")
    with pytest.raises(HandshakeError):
        m.receive_data(b"\x05\x00\x00\x03" + b"\xff" + b"x" * 20000)


def test_socks5_credentials_length_limits():
    with pytest.raises(HandshakeError):
        Socks5Client("127.0.0.1", 1, "u" * 256, "p")
    with pytest.raises(HandshakeError):
        Socks5Client("127.0.0.1", 1, "", "p")


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=8), st.booleans())
@settings(max_examples=400, deadline=None)
def test_socks5_arbitrary_replies_end_in_a_step_or_handshake_error(data, split, auth):
    m = Socks5Client("imap.example.com", 993, "u" if auth else None, "p" if auth else None, remote_dns=True)
    m.start()
    try:
        for i in range(0, len(data), split):
            step = m.receive_data(data[i:i + split])
            assert isinstance(step, Step)
            if step.done:
                break
    except HandshakeError as e:
        assert str(e) and "p" != str(e)


# SOCKS4 -------------------------------------------------------------------

def test_socks4_exact_bytes():
    m = Socks4Client("127.0.0.1", 993, "gw")
    assert m.start() == b"\x04\x01\x03\xe1\x7f\x00\x00\x01gw\x00"
    step = m.receive_data(b"\x00\x5a\x00\x00\x00\x00\x00\x00* OK")
    assert step.done and step.leftover == b"* OK"


def test_socks4a_sends_the_host_name_after_0_0_0_1():
    m = Socks4Client("imap.example.com", 993, None, remote_dns=True)
    assert m.start() == b"\x04\x01\x03\xe1\x00\x00\x00\x01\x00imap.example.com\x00"


def test_socks4_needs_ipv4():
    with pytest.raises(HandshakeError, match="socks4a"):
        Socks4Client("imap.example.com", 993)
    with pytest.raises(HandshakeError, match="IPv6"):
        Socks4Client("::1", 993)


@pytest.mark.parametrize("code, text", [
    (91, "request rejected or failed"),
    (92, "cannot reach our identd"),
    (93, "different user ID"),
])
def test_socks4_refusals(code, text):
    m = Socks4Client("127.0.0.1", 993)
    m.start()
    with pytest.raises(HandshakeError, match=text):
        feed(m, bytes([0, code]) + b"\x00" * 6, 1)


@pytest.mark.parametrize("reply, message", [
    (b"\x05\x5a" + b"\x00" * 6, "version 5"),
    (b"\x00\x10" + b"\x00" * 6, "code 16"),
])
def test_socks4_malformed_replies(reply, message):
    m = Socks4Client("127.0.0.1", 993)
    m.start()
    with pytest.raises(HandshakeError, match=message):
        m.receive_data(reply)


@given(st.binary(max_size=24), st.integers(min_value=1, max_value=5))
@settings(max_examples=300, deadline=None)
def test_socks4_arbitrary_replies_end_in_a_step_or_handshake_error(data, split):
    m = Socks4Client("imap.example.com", 993, "id", remote_dns=True)
    m.start()
    try:
        for i in range(0, len(data), split):
            if m.receive_data(data[i:i + split]).done:
                break
    except HandshakeError:
        pass


# Proxy URLs ---------------------------------------------------------------

def test_proxy_urls_parse_mask_and_default_ports():
    spec = ProxySpec.parse("socks5://us%40er:p%3Ass@proxy.example:1081")
    assert (spec.scheme, spec.host, spec.port, spec.username, spec.password) == (
        "socks5", "proxy.example", 1081, "us@er", "p:ss")
    assert spec.masked == "socks5://us%40er:***@proxy.example:1081"
    assert "p:ss" not in repr(spec) and "p%3Ass" not in spec.masked
    assert ProxySpec.parse("http://[::1]").address == "[::1]:80"
    assert ProxySpec.parse("https://h").port == 443
    assert ProxySpec.parse("socks4a://id@h").masked == "socks4a://id@h:1080"
    assert ProxySpec.parse("socks5h://h").remote_dns and not ProxySpec.parse("socks5://h").remote_dns


@pytest.mark.parametrize("url", ["ftp://h", "socks5://", "socks5://h:99999", "http://h/path",
                                 "socks4://u:p@h", "", "socks5://" + "u" * 300 + ":p@h"])
def test_bad_proxy_urls(url):
    with pytest.raises(ValueError):
        ProxySpec.parse(url)
