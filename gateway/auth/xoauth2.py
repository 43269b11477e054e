"""The XOAUTH2 SASL mechanism: the client response and the provider's error challenge."""

from __future__ import annotations

import base64
import json


def initial_response(user: str, token: str) -> bytes:
    """The XOAUTH2 client response, base64-encoded: ``user=`` is the mailbox's address."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def decode_error(challenge: bytes) -> str:
    """The provider's base64 JSON error challenge as ``status=... schemes=... scope=...``."""
    try:
        payload = json.loads(base64.b64decode(challenge, validate=True))
    except ValueError:
        return ""
    if not isinstance(payload, dict):
        return ""
    return " ".join(f"{k}={payload[k]}" for k in ("status", "schemes", "scope") if k in payload)
