"""The gateway under test, run as `twistd -n gateway` in a subprocess, plus helpers to drive it."""

from __future__ import annotations

import imaplib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import yaml

from .dovecot import Dovecot, free_port
from .oauth2_provider import OAuth2Provider

CLIENT_ID = "gateway-test-client"
CLIENT_SECRET = "gateway-test-secret"

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Gateway:
    """A gateway process with its own work directory, config and admin token."""

    def __init__(self, workdir: Path, dovecot: Dovecot, provider: OAuth2Provider,
                 **overrides: Any) -> None:
        self.workdir = Path(workdir)
        self.dovecot = dovecot
        self.provider = provider
        self.imaps_port = free_port()
        self.imap_port = free_port()
        self.api_port = free_port()
        self.smtp_port = free_port()
        self.smtps_port = free_port()
        self.config_path = self.workdir / "gateway.yaml"
        self.log_path = self.workdir / "gateway.log"
        self.config: dict[str, Any] = {
            "store": f"sqlite:{self.workdir / 'gateway.db'}",
            "secret_key_file": str(self.workdir / "secret.key"),
            "tls": {"cert": str(self.workdir / "gw.pem"), "key": str(self.workdir / "gw.key")},
            "imap": {
                "listen": [f"ssl:{self.imaps_port}:interface=127.0.0.1"],
                "starttls_listen": [f"tcp:{self.imap_port}:interface=127.0.0.1"],
                "allow_plaintext_login": False,
            },
            "smtp": {
                "listen": [f"tcp:{self.smtp_port}:interface=127.0.0.1"],
                "implicit_tls_listen": [f"ssl:{self.smtps_port}:interface=127.0.0.1"],
            },
            "api": {"listen": f"tcp:{self.api_port}:interface=127.0.0.1",
                    "public_url": f"http://127.0.0.1:{self.api_port}"},
            "upstream": {"ca_file": str(dovecot.ca_file), "connect_timeout": 5, "refresh_margin": 1},
            # The suite logs in wrongly on purpose, all from loopback: no login throttling or
            # connection caps unless a test configures them (test_limits.py).
            "limits": {"exempt": ["127.0.0.0/8", "::1/128"]},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                self.config.setdefault(key, {}).update(value)
            else:
                self.config[key] = value
        self.proc: subprocess.Popen[bytes] | None = None
        self.twistd_args: list[str] = []  # e.g. ["--profile=FILE", "--profiler=cprofile"]
        self.nofile: int | None = None    # open-files limit (soft and hard) for the process
        self.admin_token = ""
        self.app_id = ""

    # process
    def start(self, timeout: float = 20.0) -> "Gateway":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        nofile = self.nofile

        def limit_files() -> None:
            if nofile is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", f"--logfile={self.log_path}", *self.twistd_args,
             "gateway", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr", "wb"),
            preexec_fn=limit_files if nofile is not None else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.stderr()}\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"gateway did not start: {self.log_tail()}")
        self.admin_token = self.cli("token", "create", "--scope", "api", "--description", "tests").strip()
        self.provider.register_client(CLIENT_ID, CLIENT_SECRET)
        self.app_id = self.api("POST", "/v1/oauth2", {
            "name": "test provider", "provider": "generic", "clientId": CLIENT_ID,
            "clientSecret": CLIENT_SECRET, "tokenUrl": self.provider.token_url,
            "authorizationUrl": self.provider.url + "/authorize",
            "imap": {"host": "localhost", "port": self.dovecot.imaps_port, "secure": True},
            "smtp": {"host": "localhost", "port": self.dovecot.submission_port, "secure": False},
        })[1]["id"]
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stderr(self) -> str:
        try:
            return (self.workdir / "stderr").read_text()
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    # management
    def cli(self, *args: str, input: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(self.config_path), *args],
                             capture_output=True, text=True, input=input, timeout=30, cwd=self.workdir)
        if out.returncode != 0:
            raise RuntimeError(f"gateway {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``GET /metrics`` (0 when absent), e.g.
        ``metric("gateway_logins_total", protocol="imap", result="ok", reason="")``."""
        text = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/metrics", headers={"Authorization": f"Bearer {self.admin_token}"}),
            timeout=10).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name and not want:
                return float(value)
            if sample.startswith(name + "{") and sample.endswith("}"):
                got = ",".join(sorted(sample[len(name) + 1:-1].split(",")))
                if got == want:
                    return float(value)
        return 0.0

    def add_oauth_account(self, account: str, email: str, access_lifetime: float = 300.0,
                          **extra: Any) -> str:
        """Create an OAuth2 account whose refresh token the provider issued; returns it."""
        _access, refresh = self.provider.issue(email, access_lifetime=access_lifetime)
        status, body = self.api("POST", "/v1/account", {
            "account": account, "name": account, "email": email,
            "oauth2": {"provider": self.app_id, "auth": {"user": email}, "refreshToken": refresh},
            **extra})
        assert status == 200, body
        return refresh

    def token(self, account: str, scopes: list[str] | None = None, cidrs: list[str] | None = None) -> str:
        body: dict[str, Any] = {"account": account, "scopes": scopes or ["imap-proxy"],
                                "description": "test token"}
        if cidrs:
            body["restrictions"] = {"addresses": cidrs}
        status, resp = self.api("POST", "/v1/token", body)
        assert status == 200, resp
        return resp["token"]

    # clients
    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def ca_file(self) -> Path:
        """The local CA the gateway generated beside its certificate (what clients trust)."""
        return self.workdir / "gateway-ca.pem"

    def imap(self, source: str | None = None) -> imaplib.IMAP4_SSL:
        """imaplib over implicit TLS to the gateway, optionally from a given source address."""
        return _SourcedIMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=self.client_context(),
                                 source=source, timeout=30)

    def imap_plain(self, source: str | None = None) -> imaplib.IMAP4:
        """imaplib to the STARTTLS listener (plaintext until STARTTLS)."""
        return _SourcedIMAP4("127.0.0.1", self.imap_port, source=source, timeout=30)

    def raw(self, tls: bool = True, source: str | None = None) -> socket.socket:
        """A raw socket to the gateway, greeting already read."""
        port = self.imaps_port if tls else self.imap_port
        sock = socket.create_connection(("127.0.0.1", port), timeout=15,
                                        source_address=(source, 0) if source else None)
        if tls:
            sock = self.client_context().wrap_socket(sock, server_hostname="localhost")
        sock.recv(4096)
        return sock


@contextmanager
def started_gateway(dovecot: Dovecot, provider: OAuth2Provider, prefix: str,
                    nofile: int | None = None, **overrides: Any) -> Iterator[Gateway]:
    """A gateway of its own (config ``overrides``) in a temporary directory; stopped and removed after."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    gw = Gateway(workdir, dovecot, provider, **overrides)
    gw.nofile = nofile
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class _SourcedIMAP4(imaplib.IMAP4):
    def __init__(self, host: str, port: int, *, source: str | None, timeout: float) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):  # type: ignore[override]
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0) if self._source else None)


class _SourcedIMAP4_SSL(imaplib.IMAP4_SSL):
    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext, source: str | None,
                 timeout: float) -> None:
        self._source = source
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout):  # type: ignore[override]
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0) if self._source else None)
        return self.ssl_context.wrap_socket(sock, server_hostname="localhost")


def read_to_close(sock: socket.socket, seconds: float = 5.0) -> bytes:
    """Everything the gateway sends until it closes the connection; fails if it is still open after
    ``seconds`` (bounded)."""
    sock.settimeout(seconds)
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"still open after {seconds} s: {data!r}")


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
