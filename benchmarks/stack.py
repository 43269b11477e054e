"""What every benchmark runs against: the test OAuth2 provider, a real Dovecot, the gateway."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.integration.dovecot import Dovecot
from tests.integration.gateway_proc import Gateway
from tests.integration.oauth2_provider import OAuth2Provider
from tests.integration.smtp_sink import SMTPSink


@dataclass
class Stack:
    provider: OAuth2Provider
    dovecot: Dovecot
    gateway: Gateway
    sink: SMTPSink | None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def stack(prefix: str, *, sink: bool = False) -> Iterator[Stack]:
    """Start provider, Dovecot (and the sink its submission relays to), gateway; stop all after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)  # Dovecot's mail user must traverse it
    (root / "dovecot").mkdir()
    os.chmod(root / "dovecot", 0o755)
    started: list = []
    try:
        provider = OAuth2Provider().start()
        started.append(provider)
        dovecot = Dovecot(root / "dovecot", provider).start()
        started.append(dovecot)
        relay = SMTPSink(dovecot.submission_relay_port).start() if sink else None
        if relay is not None:
            started.append(relay)
        gateway = Gateway(root / "gateway", dovecot, provider)
        started.append(gateway)
        gateway.start()
        yield Stack(provider, dovecot, gateway, relay)
    finally:
        for service in reversed(started):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)
