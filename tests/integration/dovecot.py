"""A real Dovecot 2.3 upstream for integration tests.

``Dovecot(workdir, provider)`` writes a standalone configuration (no system
``/etc/dovecot``), a throw-away CA + server certificate, and runs
``dovecot -F -c <workdir>/dovecot.conf`` as a subprocess.  Users log in with
``AUTHENTICATE XOAUTH2`` (bearer token validated by the test
:class:`~tests.integration.oauth2_provider.OAuth2Provider` through Dovecot's
``oauth2`` passdb) or, for accounts added with :meth:`Dovecot.add_password_user`,
with a plain password.
"""

from __future__ import annotations

from typing import Any

import datetime
import imaplib
import ipaddress
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .oauth2_provider import OAuth2Provider

MAIL_USER = "gwmail"


_PORTS = random.Random(os.getpid())
_ISSUED: set[int] = set()  # ports handed out by this process: never twice (they are bound later)


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host``, picked below the kernel's ephemeral range.

    Servers of the suite bind their port some time after it was picked; a port
    from the ephemeral range (what binding to 0 gives) may meanwhile become the
    source port of any outgoing connection, and the server then fails with
    "Address already in use". Below that range only listeners use ports. A port
    is never handed out twice by one process: two picks made before either is
    bound (a gateway's five listeners) would otherwise be able to collide.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    for _ in range(200):
        port = _PORTS.randrange(max(1024, low - 12000), low)
        if port in _ISSUED:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _ISSUED.add(port)
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:  # fall back to what the kernel offers
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _free_port_all(hosts: list[str]) -> int:
    """A port that is currently free on every one of ``hosts``."""
    for _ in range(50):
        port = free_port(hosts[0])
        ok = True
        for h in hosts[1:]:
            family = socket.AF_INET6 if ":" in h else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("could not find a port free on " + ", ".join(hosts))


def ensure_mail_user(name: str = MAIL_USER) -> pwd.struct_passwd:
    """The unprivileged system user that owns the mail store (created if missing)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise RuntimeError(f"system user {name!r} missing and not root to create it")
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    return pwd.getpwnam(name)


def make_traversable(path: Path) -> None:
    """Add o+x to ``path`` and every parent so unprivileged users can reach it."""
    path = path.resolve()
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            os.chmod(p, (mode & 0o7777) | 0o001)


def generate_certs(directory: Path, cn: str = "localhost") -> tuple[Path, Path, Path]:
    """Write a test CA and a server cert (localhost, 127.0.0.1, ::1).

    Returns (ca_cert_pem, server_cert_pem, server_key_pem).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(days=1)
    not_after = now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gateway Test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    os.chmod(ca_file, 0o644)
    os.chmod(cert_file, 0o644)
    return ca_file, cert_file, key_file


def xoauth2_string(email: str, token: str) -> bytes:
    """The raw (un-base64'd) SASL XOAUTH2 initial response."""
    return f"user={email}\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2_callback(email: str, token: str):
    """imaplib ``authenticate`` callback for XOAUTH2.

    On failure Dovecot sends a JSON error as a continuation; the client must
    answer it with an empty line, after which the server says NO.
    """
    def cb(challenge: bytes) -> bytes:
        return b"" if challenge else xoauth2_string(email, token)
    return cb


class Dovecot:
    """A Dovecot instance living entirely in ``workdir``."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, provider: OAuth2Provider, *,
                 submission: bool = True, mail_user: str = MAIL_USER,
                 auth_penalty: bool = False, max_connections: int | None = None,
                 extra_config: str = "") -> None:
        self.workdir = Path(workdir).resolve()
        self.provider = provider
        self.submission_enabled = submission
        self.mail_user = mail_user
        #: Dovecot delays auth from an IP by 2..15 s after failures (anvil
        #: "auth penalty"; all our clients are 127.0.0.1).  Off by default:
        #: 2.3.19 has no setting for it (login_trusted_networks no longer
        #: implies no-penalty), so the anvil-auth-penalty socket is made
        #: unconnectable (mode 0), which makes the auth process disable it.
        self.auth_penalty = auth_penalty
        #: When set, limits are raised so that this many IMAP sessions can be
        #: open at once, all of one user from one IP (benchmarks).  None keeps
        #: Dovecot's defaults: 100 login processes, 10 sessions per user and IP.
        self.max_connections = max_connections
        #: Appended to the generated dovecot.conf (e.g. a service block).
        self.extra_config = extra_config
        self.conf_path = self.workdir / "dovecot.conf"
        self.oauth2_conf_path = self.workdir / "dovecot-oauth2.conf.ext"
        self.passwd_path = self.workdir / "passwd"
        self.log_path = self.workdir / "dovecot.log"
        self.info_log_path = self.workdir / "dovecot-info.log"
        self.stdout_path = self.workdir / "dovecot.stdout"
        self.base_dir = self.workdir / "run"
        self.state_dir = self.workdir / "state"
        self.mail_root = self.workdir / "mail"
        self.cert_dir = self.workdir / "tls"
        self.ca_file = self.cert_dir / "ca.pem"
        self.cert_file = self.cert_dir / "server.pem"
        self.key_file = self.cert_dir / "server.key"
        self.imap_port: int | None = None
        self.imaps_port: int | None = None
        self.submission_port: int | None = None
        #: Port Dovecot's submission service relays to (nothing listens by default).
        self.submission_relay_port: int | None = None
        #: The SMTP sink on that port, when the test session started one (conftest.py).
        self.relay_sink: Any = None
        self.listen_hosts: list[str] = ["127.0.0.1"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._passwords: dict[str, str] = {}

    # --------------------------------------------------------------- setup
    def _write_config(self) -> None:
        mu = ensure_mail_user(self.mail_user)
        for d in (self.workdir, self.base_dir, self.state_dir, self.mail_root, self.cert_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        make_traversable(self.workdir)
        os.chown(self.mail_root, mu.pw_uid, mu.pw_gid)
        if not self.ca_file.exists():
            generate_certs(self.cert_dir)
        self._write_passwd()

        self.listen_hosts = ["127.0.0.1"] + (["::1"] if _ipv6_loopback() else [])
        self.imap_port = _free_port_all(self.listen_hosts)
        self.imaps_port = _free_port_all(self.listen_hosts)
        if self.submission_enabled:
            self.submission_port = _free_port_all(self.listen_hosts)
            if self.submission_relay_port is None:
                self.submission_relay_port = free_port()

        self.oauth2_conf_path.write_text(
            f"tokeninfo_url = {self.provider.tokeninfo_url}\n"
            # Only relevant with introspection_url (unset): tokeninfo_url is
            # always "GET <url><token>"; 2.3 treats "" like "auth".
            "introspection_mode = auth\n"
            "username_attribute = email\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "timeout_msecs = 5000\n"
        )
        os.chmod(self.oauth2_conf_path, 0o644)

        no_penalty = "" if self.auth_penalty else """
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""
        limits, login_limits = self._limits()
        protocols = "imap submission" if self.submission_enabled else "imap"
        submission = ""
        if self.submission_enabled:
            submission = f"""
service submission-login {{
  inet_listener submission {{
    port = {self.submission_port}
  }}
}}
submission_relay_host = 127.0.0.1
submission_relay_port = {self.submission_relay_port}
submission_relay_trusted = no
submission_relay_ssl = no
# Pre-auth SIZE 52428800; after AUTH Dovecot advertises min(this, relay's
# SIZE) - 1024 (room for the Received: header it prepends), i.e. 52427776
# with tests/integration/smtp_sink.py.  The default (0) advertises 40 MiB.
submission_max_mail_size = 50M
"""
        conf = f"""# Generated by tests/integration/dovecot.py -- standalone, no conf.d
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = gwtest-{os.getpid()}-{self.imap_port}
log_path = {self.log_path}
info_log_path = {self.info_log_path}
debug_log_path = {self.info_log_path}
protocols = {protocols}
listen = {", ".join(self.listen_hosts)}
hostname = localhost
postmaster_address = postmaster@localhost

ssl = yes
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
ssl_min_protocol = TLSv1.2

disable_plaintext_auth = yes
auth_mechanisms = plain login xoauth2 oauthbearer
auth_cache_size = 0
auth_verbose = yes
auth_verbose_passwords = no
auth_failure_delay = 0
{no_penalty}
first_valid_uid = {mu.pw_uid}
last_valid_uid = {mu.pw_uid}
first_valid_gid = {mu.pw_gid}
last_valid_gid = {mu.pw_gid}
mail_location = maildir:{self.mail_root}/%u/Maildir
mail_fsync = never

passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_conf_path}
}}
userdb {{
  driver = static
  args = uid={mu.pw_uid} gid={mu.pw_gid} home={self.mail_root}/%u
}}

namespace inbox {{
  inbox = yes
  separator = /
}}

# COMPRESS=DEFLATE (RFC 4978), so the tests can see what the gateway does with it.
mail_plugins = $mail_plugins zlib
protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
}}

service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port}
    ssl = yes
  }}{login_limits}
}}
{submission}
{limits}{self.extra_config}
"""
        self.conf_path.write_text(conf)
        os.chmod(self.conf_path, 0o644)

    def _limits(self) -> tuple[str, str]:
        """Config raising limits for ``max_connections`` sessions: (top-level text, imap-login lines).

        Both empty without ``max_connections``.  Every implicit-TLS session
        holds an imap-login process (its TLS proxy, one client each) and an
        imap process; each of those keeps connections to anvil, auth, log and
        config, whose client limits Dovecot checks against the process limits.
        """
        if self.max_connections is None:
            return "", ""
        n = self.max_connections
        processes = n + 100  # per service: the sessions plus the default headroom
        clients = 4 * processes
        login = f"""
  process_limit = {processes}
  client_limit = 1"""
        top = f"""# Raised for {n} simultaneous IMAP sessions (Dovecot(max_connections={n}))
mail_max_userip_connections = {n}
default_process_limit = {processes}
default_client_limit = {clients}
service imap {{
  process_limit = {processes}
  client_limit = 1
}}
service anvil {{
  client_limit = {clients}
}}
service auth {{
  client_limit = {clients}
}}
"""
        return top, login

    def _write_passwd(self) -> None:
        lines = [f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self._passwords.items()]
        self.passwd_path.write_text("".join(lines))
        os.chmod(self.passwd_path, 0o644)

    def add_password_user(self, email: str, password: str) -> None:
        """Allow ``email`` to log in with ``password`` (LOGIN / AUTH PLAIN).

        Dovecot re-reads passwd-file when it changes, so this works while running.
        """
        if ":" in email or ":" in password or "\n" in email + password:
            raise ValueError("':' and newlines are not allowed in passwd-file fields")
        self._passwords[email] = password
        if self.passwd_path.parent.exists():
            self._write_passwd()

    # ---------------------------------------------------------- lifecycle
    def start(self, timeout: float = 20.0) -> "Dovecot":
        if self._proc is not None:
            return self
        binary = shutil.which("dovecot")
        if binary is None:
            raise RuntimeError("dovecot binary not found (apt-get install dovecot-imapd "
                               "dovecot-submissiond)")
        self._write_config()
        check = subprocess.run([binary, "-n", "-c", str(self.conf_path)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"dovecot config invalid:\n{check.stderr}")
        out = open(self.stdout_path, "ab")
        try:
            self._proc = subprocess.Popen([binary, "-F", "-c", str(self.conf_path)],
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = [self.imap_port, self.imaps_port]
        if self.submission_port:
            ports.append(self.submission_port)
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self._proc.returncode}\n"
                                   + self.log_tail())
            try:
                # The plain IMAP port must deliver a greeting (imap-login is up);
                # the other listeners just have to accept.
                with socket.create_connection((self.host, self.imap_port), timeout=2) as s:
                    s.settimeout(2)
                    greeting = s.recv(1024)
                    if not greeting.startswith(b"* OK"):
                        raise OSError(f"unexpected greeting {greeting!r}")
                for p in ports[1:]:
                    socket.create_connection((self.host, p), timeout=2).close()
                return
            except OSError as e:
                last_err = e
                time.sleep(0.05)
        raise RuntimeError(f"dovecot not ready after {timeout}s ({last_err})\n" + self.log_tail())

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                subprocess.run(["doveadm", "-c", str(self.conf_path), "stop"],
                               capture_output=True, timeout=timeout)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for p in (self.log_path, self.info_log_path, self.stdout_path):
            if p.exists():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def doveadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["doveadm", "-c", str(self.conf_path), *args],
                              capture_output=True, text=True, check=check, timeout=30)

    # ---------------------------------------------------------- clients
    def ssl_context(self) -> ssl.SSLContext:
        """Client context trusting only the test CA (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def imap_connect(self, *, server_hostname: str = "localhost") -> imaplib.IMAP4_SSL:
        """Unauthenticated implicit-TLS connection to the imaps port."""
        ctx = self.ssl_context()
        # imaplib passes host as SNI/hostname; connect to 127.0.0.1 but verify
        # the certificate as ``server_hostname``.
        conn = _IMAP4_SSL_Named(self.host, self.imaps_port, ssl_context=ctx,
                                server_hostname=server_hostname, timeout=15)
        return conn

    def imap_login(self, email: str, token: str | None = None) -> imaplib.IMAP4_SSL:
        """imaps connection logged in with AUTHENTICATE XOAUTH2.

        Without ``token`` a fresh one is issued by the provider.
        """
        if token is None:
            token, _ = self.provider.issue(email)
        conn = self.imap_connect()
        try:
            conn.authenticate("XOAUTH2", xoauth2_callback(email, token))
        except BaseException:
            _close(conn)
            raise
        return conn

    def append(self, email: str, mailbox: str, message: bytes,
               flags: str = "", date_time: object = None) -> None:
        """Store ``message`` verbatim in ``mailbox`` (created if missing)."""
        conn = self.imap_login(email)
        try:
            if mailbox.upper() != "INBOX":
                typ, data = conn.create(_quote(mailbox))
                if typ != "OK" and b"ALREADYEXISTS" not in b" ".join(
                        d for d in data if isinstance(d, bytes)).upper():
                    raise imaplib.IMAP4.error(f"CREATE {mailbox}: {data!r}")
            typ, data = conn.append(_quote(mailbox), f"({flags})" if flags else None,
                                    date_time, message)
            if typ != "OK":
                raise imaplib.IMAP4.error(f"APPEND {mailbox}: {data!r}")
        finally:
            _close(conn)

    def fetch_all(self, email: str, mailbox: str = "INBOX") -> list[bytes]:
        """RFC822 bytes of every message in ``mailbox``, in UID order."""
        conn = self.imap_login(email)
        try:
            typ, data = conn.select(_quote(mailbox), readonly=True)
            if typ != "OK":
                raise imaplib.IMAP4.error(f"SELECT {mailbox}: {data!r}")
            if int(data[0] or 0) == 0:
                return []
            typ, data = conn.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
            if typ != "OK":
                raise imaplib.IMAP4.error(f"FETCH: {data!r}")
            msgs: list[tuple[int, bytes]] = []
            for item in data:
                if isinstance(item, tuple):
                    m = re.search(rb"UID (\d+)", item[0])
                    msgs.append((int(m.group(1)) if m else 0, item[1]))
            return [body for _uid, body in sorted(msgs)]
        finally:
            _close(conn)


class _IMAP4_SSL_Named(imaplib.IMAP4_SSL):
    """IMAP4_SSL that connects to an address but verifies another hostname."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext,
                 server_hostname: str, timeout: float | None = None) -> None:
        self._server_hostname = server_hostname
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout):  # type: ignore[override]
        sock = imaplib.IMAP4._create_socket(self, timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self._server_hostname)


def _quote(mailbox: str) -> str:
    if mailbox.startswith('"'):
        return mailbox
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _close(conn: imaplib.IMAP4) -> None:
    try:
        conn.logout()
    except Exception:
        try:
            conn.shutdown()
        except Exception:
            pass


__all__ = ["Dovecot", "free_port", "generate_certs", "xoauth2_string", "xoauth2_callback",
           "ensure_mail_user", "make_traversable", "MAIL_USER"]
