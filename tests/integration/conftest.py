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
from pathlib import Path

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


@pytest.fixture(scope="session")
def dovecot(oauth2_provider):
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        pytest.fail(
            "Dovecot is not installed: the integration tests need a real Dovecot 2.3. "
            "Run the test command from README.md, which installs it "
            "(apt-get install -y dovecot-imapd dovecot-submissiond).",
            pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="gw-dovecot-"))
    os.chmod(workdir, 0o755)
    server = Dovecot(workdir, oauth2_provider)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if os.environ.get("GW_KEEP_DOVECOT"):
            print(f"\nDovecot workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


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

    workdir = Path(tempfile.mkdtemp(prefix="gw-gateway-"))
    gw = Gateway(workdir, dovecot, oauth2_provider)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        if os.environ.get("GW_KEEP_DOVECOT"):
            print(f"\nGateway workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def smtp_sink(dovecot):
    """The SMTP sink Dovecot's submission service relays to
    (``dovecot.submission_relay_port``).  Dovecot connects to it as soon as a
    user logs in to submission, so request this fixture before any submission
    login.  Shared by the session: filter ``smtp_sink.find()/wait_for()`` by the
    test's unique addresses."""
    from .smtp_sink import SMTPSink

    if not dovecot.submission_relay_port:
        pytest.skip("Dovecot runs without submission")
    sink = SMTPSink(dovecot.submission_relay_port).start()
    try:
        yield sink
    finally:
        sink.stop()
