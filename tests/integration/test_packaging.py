"""Packaging and start-up: the twistd plugin is visible, a bad config stops with one clear line."""

from __future__ import annotations

import subprocess
import sys

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_twistd_lists_the_gateway_plugin_from_another_directory(tmp_path):
    """`twistd --help` run outside the checkout lists `gateway` (the editable-install trap)."""
    out = subprocess.run(TWISTD + ["--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert "gateway" in out.stdout


def test_bad_config_stops_with_one_clear_line(tmp_path):
    """An unknown key stops start-up with one line naming it, and no traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text("imap:\n  lisen: ['ssl:2993']\n")
    out = subprocess.run(TWISTD + ["-n", "--pidfile=", "gateway", "--config",
                          str(config)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["gateway: unknown config key imap.lisen"]
    assert "Traceback" not in out.stdout + out.stderr


def test_a_typo_in_tls_key_stops_start_up_with_one_line_and_keeps_the_certificate(dovecot, oauth2_provider,
                                                                                  tmp_path):
    """First start generates the local CA and certificate; a second start whose tls.key path has a
    typo refuses with one line naming tls.key and leaves the certificate as it was."""
    import pytest

    from .gateway_proc import Gateway

    gw = Gateway(tmp_path / "gw", dovecot, oauth2_provider)
    gw.start()
    gw.stop()
    cert = (tmp_path / "gw" / "gw.pem").read_bytes()
    assert (tmp_path / "gw" / "gateway-ca.pem").exists()
    typo = Gateway(tmp_path / "gw", dovecot, oauth2_provider, tls={"key": str(tmp_path / "gw" / "gw.kye")})
    with pytest.raises(RuntimeError, match="gateway exited"):
        typo.start(timeout=15)
    lines = typo.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway: config key tls.key: ")
    assert (tmp_path / "gw" / "gw.pem").read_bytes() == cert


def test_a_port_in_use_stops_start_up_with_one_line_naming_the_key(tmp_path):
    """imap.listen on a port something else holds: one line naming imap.listen, exit status 1."""
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: sqlite:{tmp_path}/var/g.db\nsecret_key_file: {tmp_path}/var/secret.key\n"
                      f"tls: {{cert: {tmp_path}/gw.pem, key: {tmp_path}/gw.key}}\n"
                      f"imap: {{listen: ['ssl:{port}:interface=127.0.0.1']}}\n"
                      f"smtp: {{listen: []}}\napi: {{listen: 'tcp:0:interface=127.0.0.1'}}\n")
    try:
        out = subprocess.run(TWISTD + ["-n", "--pidfile=", "gateway", "--config", str(config)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
    finally:
        busy.close()
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"gateway: config key imap.listen: cannot listen on ssl:{port}:interface=127.0.0.1: Address already in use"]
    assert "Traceback" not in out.stdout + out.stderr


def test_a_key_that_does_not_match_its_certificate_stops_start_up_with_one_line(tmp_path):
    from gateway.tls import ensure_certificate

    ensure_certificate(str(tmp_path / "a.pem"), str(tmp_path / "a.key"), hostname="localhost")
    ensure_certificate(str(tmp_path / "b" / "b.pem"), str(tmp_path / "b" / "b.key"), hostname="localhost")
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: sqlite:{tmp_path}/var/g.db\nsecret_key_file: {tmp_path}/var/secret.key\n"
                      f"tls: {{cert: {tmp_path}/a.pem, key: {tmp_path}/b/b.key}}\n"
                      f"imap: {{listen: ['ssl:0:interface=127.0.0.1']}}\nsmtp: {{listen: []}}\n"
                      f"api: {{listen: 'tcp:0:interface=127.0.0.1'}}\n")
    out = subprocess.run(TWISTD + ["-n", "--pidfile=", "gateway", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"gateway: config key tls.key: {tmp_path}/b/b.key is not the key of the certificate in {tmp_path}/a.pem"]
