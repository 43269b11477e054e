"""SIGTERM: listeners close, every client is told (IMAP `* BYE Server shutting down`, SMTP
`421 4.3.2 Server shutting down`) and closed, and the process exits with status 0."""

from __future__ import annotations

import signal
import socket
import time

from .gateway_proc import read_to_close, started_gateway, wait_for
from .test_imap_login import read_until


def test_sigterm_says_bye_to_idle_and_unauthenticated_clients_and_exits_0(dovecot, oauth2_provider, new_email):
    with started_gateway(dovecot, oauth2_provider, "gw-term-", shutdown_grace=5) as gw:
        email = new_email("term")
        account = email.split("@")[0]
        gw.add_oauth_account(account, email)
        idle = gw.raw()
        idle.sendall(b"a1 LOGIN " + account.encode() + b" " + gw.token(account).encode() + b"\r\n")
        assert b"a1 OK" in read_until(idle, b"a1 ")
        idle.sendall(b"s1 SELECT INBOX\r\n")
        read_until(idle, b"s1 ")
        idle.sendall(b"i1 IDLE\r\n")
        assert read_until(idle, b"+").startswith(b"+")
        waiting = gw.raw()  # connected, never logged in
        smtp = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10)
        assert smtp.recv(4096).startswith(b"220")
        started = time.monotonic()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        assert read_to_close(idle, 8).endswith(b"* BYE Server shutting down\r\n")
        assert read_to_close(waiting, 8) == b"* BYE Server shutting down\r\n"
        assert read_to_close(smtp, 8) == b"421 4.3.2 Server shutting down\r\n"
        assert gw.proc.wait(10) == 0
        assert time.monotonic() - started < 8  # IDLE is not waited for
        assert "Shutting down: 3 client connections to close" in gw.log_text()
        for sock in (idle, waiting, smtp):
            sock.close()


def _peer_cert(gw, starttls: bool = False) -> bytes:
    """The certificate the gateway presents to a new connection (implicit TLS or IMAP STARTTLS)."""
    import imaplib
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # which certificate it is, is what is checked
    if starttls:
        conn = imaplib.IMAP4("127.0.0.1", gw.imap_port, timeout=10)
        conn.starttls(context)
        der = conn.sock.getpeercert(binary_form=True)
        conn.logout()
        return der
    with socket.create_connection(("127.0.0.1", gw.imaps_port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def test_sighup_swaps_the_certificate_for_new_connections_and_keeps_live_sessions(
        dovecot, oauth2_provider, new_email, tmp_path):
    """SIGHUP: the next handshake (implicit TLS and STARTTLS) gets the new certificate while a
    logged-in session keeps working; a bad pair on SIGHUP is refused with a line and the current
    certificate stays."""
    import ssl

    from gateway.tls import ensure_certificate

    with started_gateway(dovecot, oauth2_provider, "gw-hup-") as gw:
        email = new_email("hup")
        account = email.split("@")[0]
        gw.add_oauth_account(account, email)
        live = gw.imap()
        live.login(account, gw.token(account))
        live.select("INBOX")
        old = _peer_cert(gw)
        assert old == ssl.PEM_cert_to_DER_cert((gw.workdir / "gw.pem").read_text().split("-----END CERTIFICATE-----")[0]
                                               + "-----END CERTIFICATE-----\n")

        ensure_certificate(str(tmp_path / "new.pem"), str(tmp_path / "new.key"), hostname="localhost")
        (gw.workdir / "gw.pem").write_bytes((tmp_path / "new.pem").read_bytes())
        (gw.workdir / "gw.key").write_bytes((tmp_path / "new.key").read_bytes())
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "Reloaded the TLS certificate" in gw.log_text()), gw.log_tail()
        new = _peer_cert(gw)
        assert new != old
        assert _peer_cert(gw, starttls=True) == new
        assert live.noop()[0] == "OK"  # the live session, on the old certificate, still relays
        assert live.select("INBOX")[0] == "OK"

        ensure_certificate(str(tmp_path / "other" / "x.pem"), str(tmp_path / "other" / "x.key"), hostname="x")
        (gw.workdir / "gw.key").write_bytes((tmp_path / "other" / "x.key").read_bytes())  # not gw.pem's key
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "TLS certificate not reloaded" in gw.log_text()), gw.log_tail()
        assert "config key tls.key" in gw.log_text()
        assert gw.proc.poll() is None
        assert _peer_cert(gw) == new
        assert gw.metric("gateway_tls_reloads_total", result="ok") == 1
        assert gw.metric("gateway_tls_reloads_total", result="fail") == 1
        live.logout()
