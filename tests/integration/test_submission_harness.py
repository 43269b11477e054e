"""The upstream SMTP path without the gateway: smtplib -> Dovecot submission
(STARTTLS with the test CA, AUTH XOAUTH2 with a provider token) -> relay to
the :class:`~tests.integration.smtp_sink.SMTPSink`.

Findings about Dovecot 2.3.19 submission (asserted below, so a Dovecot
upgrade that changes them shows up here):

* It **prepends one ``Received:`` header** to every relayed message and
  changes nothing else except that bare LF becomes CRLF (bare CR, NUL, 8-bit
  bytes, 5000-byte lines, dot lines pass unchanged)::

      Received: from <client EHLO name> ([<client IP>])
      \\tby localhost with ESMTPSA
      \\tid <session id>
      \\t(envelope-from <sender>)
      \\tfor <rcpt>; <RFC 5322 date>        (no "for" line with several rcpts)

  ``Received.original`` / ``split_received()`` strip it for byte comparisons.
* Relay envelope: Dovecot sends ``EHLO localhost`` and ``RSET`` when the user
  logs in, forwards MAIL/RCPT parameters (BODY=8BITMIME, RET, ENVID, NOTIFY,
  ORCPT) and adds ``SIZE=<size + 1024>``; one relay connection per
  submission session.  It reads the whole message before it sends DATA to the
  relay, so a client that disconnects mid-DATA never makes Dovecot open DATA
  upstream; the relay connection is just closed.
* A recipient refused by the relay reaches the client with the relay's code
  and enhanced code, but Dovecot prefixes the text with ``<rcpt> ``:
  ``550 5.1.1 <r@x> <r@x>: Recipient address rejected: User unknown``.
* EHLO after AUTH: 8BITMIME, AUTH (no mechanisms), BURL, CHUNKING, DSN,
  ENHANCEDSTATUSCODES, PIPELINING, SIZE 52427776 (= min(submission_max_mail_size
  50M, relay SIZE 52428800) - 1024).  8BITMIME and DSN are only advertised
  because the relay advertises them.  **No SMTPUTF8**: Dovecot 2.3 has no
  SMTPUTF8 support at all (not in its capability table, even
  ``submission_backend_capabilities = SMTPUTF8`` has no effect): ``MAIL FROM:<..>
  SMTPUTF8`` -> ``555 5.5.4 Unsupported parameters`` and a UTF-8 address ->
  ``501 5.5.4 Invalid ...: Invalid character in localpart``.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import time

import pytest

from .dovecot import xoauth2_string
from .smtp_sink import SMTPSink, split_received

EXPECTED_SIZE = 52428800 - 1024


def _login(dovecot, oauth2_provider, email: str, token: str | None = None, *,
           local_hostname: str = "client.example") -> smtplib.SMTP:
    """Authenticated submission session (STARTTLS verified with the test CA)."""
    if token is None:
        token, _ = oauth2_provider.issue(email)
    smtp = smtplib.SMTP(dovecot.host, dovecot.submission_port, timeout=60,
                        local_hostname=local_hostname)
    try:
        smtp.starttls(context=dovecot.ssl_context())
        smtp.ehlo()
        # On failure Dovecot answers 334 <json>; the client then sends an empty line.
        smtp.auth("XOAUTH2",
                  lambda challenge=None: "" if challenge else xoauth2_string(email, token).decode(),
                  initial_response_ok=True)
        smtp.ehlo()
    except BaseException:
        smtp.close()
        raise
    return smtp


def _received_re(helo: str, sender: str, rcpt: str | None) -> re.Pattern[bytes]:
    for_line = rf"\r\n\tfor <{re.escape(rcpt)}>" if rcpt else ""
    return re.compile(
        rf"\AReceived: from {re.escape(helo)} \(\[127\.0\.0\.1\]\)\r\n"
        rf"\tby localhost with ESMTPSA\r\n"
        rf"\tid [A-Za-z0-9+/]+(?::T\d+)?\r\n"
        rf"\t\(envelope-from <{re.escape(sender)}>\){for_line}; "
        rf"[A-Z][a-z]{{2}}, \d{{1,2}} [A-Z][a-z]{{2}} \d{{4}} \d\d:\d\d:\d\d [+-]\d{{4}}\r\n\Z"
        .encode())


# --------------------------------------------------------------- the sink itself
def test_sink_speaks_esmtp():
    """The sink on its own: EHLO keywords, pipelined commands answered in
    order, dot-unstuffing, rejected recipients, SIZE limits, SMTPUTF8
    enforcement, long lines, and a half-sent DATA is discarded."""
    with SMTPSink(max_size=1000, max_line=200) as sink:
        with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"MAIL FROM:<early@x>\r\nEHLO c.example\r\n"
                      b"MAIL FROM:<a@x> BODY=8BITMIME SIZE=20\r\n"
                      b"RCPT TO:<b@x> NOTIFY=NEVER\r\nRCPT TO:<reject-b@x>\r\n"
                      b"RCPT TO:<tempfail-c@x>\r\nDATA\r\n")
            replies = [f.readline() for _ in range(13)]
            assert replies[0].startswith(b"503 5.5.1")
            assert [r[4:].strip() for r in replies[1:8]] == [
                b"sink.test", b"PIPELINING", b"8BITMIME", b"SIZE 1000", b"ENHANCEDSTATUSCODES",
                b"SMTPUTF8", b"DSN"]
            assert replies[7].startswith(b"250 DSN")
            assert replies[8:] == [
                b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n",
                b"550 5.1.1 <reject-b@x>: Recipient address rejected: User unknown\r\n",
                b"450 4.2.1 <tempfail-c@x>: Recipient address rejected: "
                b"Mailbox temporarily unavailable\r\n",
                b"354 End data with <CR><LF>.<CR><LF>\r\n"]
            s.sendall(b"..lead\r\n..\r\n..\r\nx\r\n.\r\n"
                      b"MAIL FROM:<\xc3\xa9@x>\r\nMAIL FROM:<a@x> SIZE=1001\r\n"
                      b"MAIL FROM:<\xc3\xa9@x> SMTPUTF8\r\nRCPT TO:<\xc3\xa9@x>\r\nDATA\r\n"
                      + b"y" * 1100 + b"\r\n.\r\n" + b"Z" * 300 + b"\r\nNOOP\r\n")
            assert f.readline().startswith(b"250 2.0.0 Ok: queued as ")
            assert f.readline().startswith(b"553 5.6.7")
            assert f.readline().startswith(b"552 5.3.4")
            assert f.readline() == b"250 2.1.0 Ok\r\n"
            assert f.readline() == b"250 2.1.5 Ok\r\n"
            assert f.readline().startswith(b"354 ")
            assert f.readline().startswith(b"552 5.3.4")  # 1100 bytes > max_size
            assert f.readline() == b"500 5.5.2 Line too long\r\n"
            assert f.readline() == b"250 2.0.0 Ok\r\n"
            s.sendall(b"MAIL FROM:<> RET=FULL\r\nRCPT TO:<d@x>\r\nDATA\r\nhalf a mess")
            assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            s.shutdown(socket.SHUT_WR)
            assert f.readline() == b""
        msgs = sink.wait_for(1)
        assert len(msgs) == 1
        m = msgs[0]
        assert (m.mail_from, m.mail_params, m.rcpts, m.rcpt_params, m.helo) == (
            b"a@x", [b"BODY=8BITMIME", b"SIZE=20"], [b"b@x"], [[b"NOTIFY=NEVER"]], b"c.example")
        assert m.data == b".lead\r\n.\r\n.\r\nx\r\n"
        sink.wait_closed(m.session)
        assert [(d.mail_from, d.rcpts, d.data) for d in sink.discarded] == [
            (b"", [b"d@x"], b"half a mess")]
        assert sink.find("b@x") == msgs and sink.find("d@x") == []
        with pytest.raises(TimeoutError):
            sink.wait_for(2, timeout=0.2)


# ------------------------------------------------------------ through Dovecot
def test_message_arrives_with_received_header(dovecot, oauth2_provider, smtp_sink, new_email):
    """A message submitted with XOAUTH2 arrives at the sink: envelope sender
    and recipient intact, relayed with ``EHLO localhost``, content = one
    prepended ``Received:`` header + exactly what was sent (bare CR, NUL,
    8-bit, a 5000-byte line and dot lines unchanged; bare LF -> CRLF)."""
    email, rcpt = new_email("sender"), new_email("rcpt")
    msg = (b"From: <" + email.encode() + b">\r\nTo: <" + rcpt.encode() + b">\r\n"
           b"Subject: harness\r\n\r\n.leading dot\r\n..two\r\n.\r\nbare\rCR\r\nnul\x00\r\n"
           b"8bit \xc3\xa9\xff\r\n" + b"L" * 5000 + b"\r\n")
    lf_msg = b"Subject: lf\n\nbare\nLF\r\n"
    with _login(dovecot, oauth2_provider, email) as smtp:
        assert smtp.sendmail(email, [rcpt], msg, mail_options=["BODY=8BITMIME"]) == {}
        lf_rcpt = new_email("rcpt")
        assert smtp.sendmail(email, [lf_rcpt], lf_msg) == {}
    [m] = smtp_sink.wait_for(1, where=rcpt)
    assert m.mail_from == email.encode() and m.rcpts == [rcpt.encode()]
    assert m.helo == b"localhost"
    trace, rest = split_received(m.data)
    assert rest == m.original == msg
    assert _received_re("client.example", email, rcpt).match(trace), trace
    assert m.data == trace + msg
    assert m.mail_params[0] == b"BODY=8BITMIME"
    assert m.mail_params[1] == b"SIZE=%d" % (len(msg) + 1024)
    cmds = smtp_sink.commands_of(m.session)
    assert cmds[:3] == [b"EHLO localhost", b"RSET", b"MAIL FROM:<%s> BODY=8BITMIME SIZE=%d"
                        % (email.encode(), len(msg) + 1024)]
    [lf] = smtp_sink.wait_for(1, where=lf_rcpt)
    assert lf.original == b"Subject: lf\r\n\r\nbare\r\nLF\r\n"
    assert lf.session == m.session  # one relay connection per submission session


def test_several_recipients_and_rejections(dovecot, oauth2_provider, smtp_sink, new_email):
    """Every accepted recipient arrives (in order, no ``for`` in Received);
    a recipient the relay refuses gets the relay's 550 5.1.1 / 450 4.2.1 at
    the client (text prefixed with ``<rcpt> `` by Dovecot); if all are refused
    smtplib raises SMTPRecipientsRefused with code 550."""
    email = new_email("sender")
    ok1, ok2 = new_email("ok"), new_email("ok")
    bad, tmp = new_email("reject"), new_email("tempfail")
    msg = b"Subject: several\r\n\r\nhello\r\n"
    with _login(dovecot, oauth2_provider, email) as smtp:
        refused = smtp.sendmail(email, [ok1, bad, ok2, tmp], msg)
        assert refused == {
            bad: (550, f"5.1.1 <{bad}> <{bad}>: Recipient address rejected: "
                       "User unknown".encode()),
            tmp: (450, f"4.2.1 <{tmp}> <{tmp}>: Recipient address rejected: "
                       "Mailbox temporarily unavailable".encode()),
        }
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            smtp.sendmail(email, [bad], msg)
        code, text = exc.value.recipients[bad]
        assert code == 550 and text.startswith(b"5.1.1 ")
        smtp.noop()
    [m] = smtp_sink.wait_for(1, where=ok1)
    assert m.rcpts == [ok1.encode(), ok2.encode()] and m.original == msg
    assert _received_re("client.example", email, None).match(m.trace_header), m.trace_header
    assert smtp_sink.find(bad) == [] and smtp_sink.find(tmp) == []


def test_made_up_token_refused(dovecot, oauth2_provider, smtp_sink, new_email):
    """AUTH XOAUTH2 with a token the provider never issued -> 535 5.7.8."""
    with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
        _login(dovecot, oauth2_provider, new_email(), "made-up-token")
    assert exc.value.smtp_code == 535
    assert exc.value.smtp_error.startswith(b"5.7.8 ")


def test_extensions_after_auth(dovecot, oauth2_provider, smtp_sink, new_email):
    """Records Dovecot's EHLO after AUTH: PIPELINING, 8BITMIME, SIZE,
    ENHANCEDSTATUSCODES and DSN are there, SMTPUTF8 is not (Dovecot 2.3 has
    no SMTPUTF8: the MAIL parameter gets 555 and a UTF-8 address 501).
    DSN and 8BITMIME parameters are relayed to the sink."""
    email, rcpt = new_email("sender"), new_email("rcpt")
    with _login(dovecot, oauth2_provider, email) as smtp:
        features = dict(smtp.esmtp_features)
        print("\nDovecot submission EHLO after AUTH:", sorted(features.items()))
        for ext in ("pipelining", "8bitmime", "size", "enhancedstatuscodes", "dsn",
                    "chunking", "burl"):
            assert ext in features, ext
        assert int(features["size"]) == EXPECTED_SIZE
        assert "smtputf8" not in features and "starttls" not in features
        assert features["auth"].strip() == ""

        assert smtp.docmd(f"MAIL FROM:<{email}> SMTPUTF8") == (
            555, b"5.5.4 Unsupported parameters")
        smtp.command_encoding = "utf-8"
        assert smtp.docmd(f"MAIL FROM:<{email}>")[0] == 250
        code, text = smtp.docmd("RCPT TO:<d\u00e9j\u00e0@example.com>")
        assert code == 501 and text.startswith(b"5.5.4 "), (code, text)
        assert smtp.docmd("RSET")[0] == 250

        refused = smtp.sendmail(email, [rcpt], b"Subject: dsn\r\n\r\n\xe2\x82\xac\r\n",
                                mail_options=["BODY=8BITMIME", "RET=HDRS", "ENVID=env-1"],
                                rcpt_options=["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{rcpt}"])
        assert refused == {}
    [m] = smtp_sink.wait_for(1, where=rcpt)
    params = set(m.mail_params)
    assert {b"BODY=8BITMIME", b"RET=HDRS", b"ENVID=env-1"} <= params
    assert any(p.startswith(b"SIZE=") for p in params)
    assert m.rcpt_params == [[b"NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{rcpt}".encode()]]


def test_pipelined_commands(dovecot, oauth2_provider, smtp_sink, new_email):
    """MAIL, three RCPTs (one refused) and DATA in one TLS write are
    answered in order, then the message goes through."""
    email = new_email("sender")
    r1, r2, bad = new_email("p"), new_email("p"), new_email("reject")
    msg = b"Subject: pipelined\r\n\r\n..dot\r\n"
    with _login(dovecot, oauth2_provider, email) as smtp:
        smtp.send(f"MAIL FROM:<{email}>\r\nRCPT TO:<{r1}>\r\nRCPT TO:<{bad}>\r\n"
                  f"RCPT TO:<{r2}>\r\nDATA\r\n".encode())
        codes = [smtp.getreply()[0] for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354]
        smtp.send(b"Subject: pipelined\r\n\r\n...dot\r\n.\r\n")
        assert smtp.getreply()[0] == 250
    [m] = smtp_sink.wait_for(1, where=r1)
    assert m.rcpts == [r1.encode(), r2.encode()] and m.original == msg


def test_hundred_messages_one_session(dovecot, oauth2_provider, smtp_sink, new_email):
    """100 messages in one submission session all arrive, in order, over a
    single relay connection."""
    email, rcpt = new_email("sender"), new_email("many")
    msgs = [b"Subject: n%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(100)]
    with _login(dovecot, oauth2_provider, email) as smtp:
        for msg in msgs:
            assert smtp.sendmail(email, [rcpt], msg) == {}
    got = smtp_sink.wait_for(100, where=rcpt)
    assert [m.original for m in got] == msgs
    assert len({m.session for m in got}) == 1


def test_25mb_message_byte_exact(dovecot, oauth2_provider, smtp_sink, new_email):
    """A 25 MiB message of random 8-bit lines (CRLF-terminated, no bare
    CR/LF, some starting with dots) arrives byte for byte."""
    email, rcpt = new_email("sender"), new_email("big")
    table = bytes(range(256)).replace(b"\r", b"R").replace(b"\n", b"N")
    raw = os.urandom(25 * 1024 * 1024).translate(table)
    lines = [raw[i:i + 998] for i in range(0, len(raw), 998)]
    lines[1::50] = [b"." + line[1:] for line in lines[1::50]]
    msg = b"Subject: big\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    with _login(dovecot, oauth2_provider, email) as smtp:
        start = time.monotonic()
        assert smtp.sendmail(email, [rcpt], msg, mail_options=["BODY=8BITMIME"]) == {}
        [m] = smtp_sink.wait_for(1, timeout=60, where=rcpt)
        elapsed = time.monotonic() - start
    print(f"\n25 MiB via Dovecot submission: {elapsed:.2f}s")
    assert len(m.original) == len(msg)
    assert m.original == msg


def test_disconnect_mid_data_leaves_nothing(dovecot, oauth2_provider, smtp_sink, new_email):
    """A client that drops the connection in the middle of DATA: Dovecot
    never starts DATA upstream (it buffers the whole message first), closes
    the relay connection, and nothing is stored at the sink."""
    email, rcpt = new_email("sender"), new_email("mid")
    smtp = _login(dovecot, oauth2_provider, email)
    try:
        assert smtp.docmd(f"MAIL FROM:<{email}>")[0] == 250
        assert smtp.docmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(b"Subject: partial\r\n\r\n" + b"z" * 300_000 + b"\r\n")
    finally:
        smtp.sock.shutdown(socket.SHUT_RDWR)  # abrupt: no QUIT, no TLS close_notify
        smtp.close()
    session = smtp_sink.session_of(f"RCPT TO:<{rcpt}>")
    assert session is not None
    smtp_sink.wait_closed(session, timeout=15)
    assert b"DATA" not in smtp_sink.commands_of(session)
    assert smtp_sink.find(rcpt) == []
    assert [d for d in smtp_sink.discarded if rcpt.encode() in d.rcpts] == []
