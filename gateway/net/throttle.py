"""Sans-io: does a provider's answer to our upstream login ask us to back off, and for how long?

Microsoft 365 answers a login it throttles with ``Request is throttled.
Suggested Backoff Time: N milliseconds`` and, when it cannot attach the
mailbox (often throttling too), with ``User is authenticated but not
connected``. Logging in again at once extends the lock-out, so the account
is backed off: for the suggested time, or :data:`NOT_CONNECTED_BACKOFF`.
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["NOT_CONNECTED_BACKOFF", "throttle_delay"]

NOT_CONNECTED_BACKOFF = 60.0
MAX_BACKOFF = 3600.0

_SUGGESTED = re.compile(rb"Request is throttled\.?\s*Suggested Backoff Time:\s*(\d{1,10})\s*milli", re.IGNORECASE)
_NOT_CONNECTED = re.compile(rb"User is authenticated but not connected", re.IGNORECASE)


def throttle_delay(responses: Iterable[bytes]) -> float | None:
    """Seconds to back off when any of ``responses`` is a throttling answer, else None."""
    for response in responses:
        match = _SUGGESTED.search(response)
        if match:
            return min(MAX_BACKOFF, max(1.0, int(match.group(1)) / 1000))
        if _NOT_CONNECTED.search(response):
            return NOT_CONNECTED_BACKOFF
    return None
