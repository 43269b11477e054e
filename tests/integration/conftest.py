"""Session fixtures for the integration suite: a test OAuth2 provider and a
real Dovecot 2.3 upstream (see ``oauth2_provider.py`` and ``dovecot.py``).

Set ``GW_KEEP_DOVECOT=1`` to keep Dovecot's work directory (config, logs,
mail store) after the session; its path is printed at teardown.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from .dovecot import Dovecot
from .oauth2_provider import OAuth2Provider

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def oauth2_provider():
    provider = OAuth2Provider().start()
    try:
        yield provider
    finally:
        provider.stop()


@contextmanager
def _workdir(prefix: str, what: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards unless GW_KEEP_DOVECOT is set."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield workdir
    finally:
        if os.environ.get("GW_KEEP_DOVECOT"):
            print(f"\n{what} workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(oauth2_provider):
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        pytest.fail(
            "Dovecot is not installed: the integration tests need a real Dovecot 2.3. "
            "Run the test command from README.md, which installs it "
            "(apt-get install -y dovecot-imapd dovecot-submissiond).",
            pytrace=False)
    with _workdir("gw-dovecot-", "Dovecot") as workdir:
        os.chmod(workdir, 0o755)
        server = Dovecot(workdir, oauth2_provider)
        sink = None
        try:
            server.start()
            if server.submission_relay_port:
                # Bound now, not when a test first asks: the port was only reserved when Dovecot's
                # config was written, and any process may take it as an ephemeral port meanwhile.
                from .smtp_sink import SMTPSink

                sink = SMTPSink(server.submission_relay_port).start()
            server.relay_sink = sink
            yield server
        finally:
            if sink is not None:
                sink.stop()
            server.stop()


@pytest.fixture
def new_email():
    """Factory for unique upstream mailbox addresses (isolates tests' mail)."""
    def make(prefix: str = "user") -> str:
        return f"{prefix}{os.getpid()}-{next(_counter)}@example.com"
    return make


@pytest.fixture(scope="session")
def gateway(dovecot, oauth2_provider):
    """The gateway (`twistd -n gateway`) with implicit TLS and STARTTLS listeners, upstream Dovecot."""
    from .gateway_proc import Gateway

    with _workdir("gw-gateway-", "Gateway") as workdir:
        gw = Gateway(workdir, dovecot, oauth2_provider)
        try:
            gw.start()
            yield gw
        finally:
            gw.stop()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a loopback port for the session (databases are handed out per test by
    ``redis_url``)."""
    from .redis_server import RedisServer, missing

    if missing():
        pytest.fail("the Redis tests need redis-server and redis-cli (apt-get install redis-server; "
                    "bash scripts/test.sh installs it)")
    with _workdir("gw-redis-", "Redis") as workdir:
        server = RedisServer(workdir).start()
        try:
            yield server
        finally:
            server.stop()


_redis_dbs = itertools.count(1)


@pytest.fixture
def redis_url(redis_server) -> str:
    """A redis:// URL of a database of its own (flushed) for one test."""
    db = next(_redis_dbs) % 16 or 1
    redis_server.flush(db)
    return redis_server.url(db)


@pytest.fixture(scope="session")
def smtp_sink(dovecot):
    """The SMTP sink Dovecot's submission service relays to
    (``dovecot.submission_relay_port``).  Dovecot connects to it as soon as a
    user logs in to submission, so request this fixture before any submission
    login.  Shared by the session: filter ``smtp_sink.find()/wait_for()`` by the
    test's unique addresses."""
    if dovecot.relay_sink is None:
        pytest.skip("Dovecot runs without submission")
    yield dovecot.relay_sink


@pytest.fixture
def smtp_upstream(dovecot, oauth2_provider):
    """Factory of authenticating SMTP sinks that play a provider's submission
    server for the gateway's upstream leg (see ``smtp_sink.py``): loopback,
    ephemeral port, Dovecot's certificate (valid for localhost and 127.0.0.1,
    issued by the CA the gateway trusts), implicit TLS (``tls="implicit"``) or
    STARTTLS (``tls="starttls"``), AUTH XOAUTH2 checked against the test
    provider's tokeninfo unless ``xoauth2=False``; other keyword arguments go
    to :class:`SMTPSink` (``passwords=``, ``extensions=``, ``max_line=``...).
    Every sink started is stopped when the test ends."""
    from .smtp_sink import SMTPSink

    started: list[SMTPSink] = []

    def start(*, tls: str = "implicit", xoauth2: bool = True, **options) -> SMTPSink:
        assert tls in ("implicit", "starttls"), tls
        sink = SMTPSink(0, "127.0.0.1", tls_cert=(dovecot.cert_file, dovecot.key_file),
                        starttls=tls == "starttls",
                        auth_tokeninfo_url=oauth2_provider.tokeninfo_url if xoauth2 else None,
                        **options)
        started.append(sink.start())
        return sink

    try:
        yield start
    finally:
        for sink in started:
            sink.stop()


@pytest.fixture(autouse=True)
def no_traceback_in_the_gateway_log(request):
    """A test that used the shared gateway must leave no traceback in its log (an unhandled
    error in a callback is otherwise invisible to the client and to the test)."""
    if "gateway" not in request.fixturenames:
        yield
        return
    gw = request.getfixturevalue("gateway")
    start = len(gw.log_text())
    yield
    new = gw.log_text()[start:]
    assert "Traceback (most recent call last)" not in new, new[new.find("Traceback") - 2000:][:6000]
