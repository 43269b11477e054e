"""What the sans-io pre-auth machines of both protocols ask their Twisted protocol to do."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Discard ``PreAuth.take_pending()``, start TLS on the transport, then call ``tls_started()``."""


@dataclass(frozen=True)
class StartRelay:
    """Hand ``PreAuth.take_pending()`` to the relay, then relay both ways."""


@dataclass(frozen=True)
class Close:
    """Close the connection once the previous Sends are written."""


def safe_reason(reason: str, default: str = "Service unavailable") -> bytes:
    """A reason for a client: printable ASCII on one line, at most 200 characters."""
    ascii_text = unicodedata.normalize("NFKD", reason).encode("ascii", "ignore").decode("ascii")
    text = " ".join(re.sub(r"[^\x20-\x7e]", " ", ascii_text).split())[:200].rstrip()
    return (text or default).encode("ascii")
