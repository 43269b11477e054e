"""Access-token secrets and the pure check of a presented token against its record.

Tokens are random and long, so one SHA-256 is enough to store them and a
constant-time compare is enough to check them: no password KDF on the login
path (see DESIGN.md, "Performance facts").
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import netaddr

SCOPES: tuple[str, ...] = ("imap-proxy", "smtp", "api")

TOKEN_BYTES = 32
TOKEN_HEX_LENGTH = TOKEN_BYTES * 2


class TokenCheck(enum.Enum):
    """Outcome of checking a presented token."""

    OK = "ok"
    INVALID = "invalid"                # unknown token, or another account's
    REVOKED = "revoked"
    WRONG_SCOPE = "scope"
    DENIED_ADDRESS = "denied-address"  # outside the token's CIDRs

    @property
    def reason(self) -> str:
        """The reason code of a refused login in logs and metrics (the client is told less)."""
        return _REASONS[self]


_REASONS = {TokenCheck.OK: "", TokenCheck.INVALID: "bad-token", TokenCheck.REVOKED: "revoked",
            TokenCheck.WRONG_SCOPE: "scope", TokenCheck.DENIED_ADDRESS: "cidr"}


def new_token() -> str:
    """Return a fresh token secret: 64 lowercase hex characters."""
    return secrets.token_hex(TOKEN_BYTES)


def hash_token(secret: str) -> str:
    """Return the hex SHA-256 of a token secret, the only form ever stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def looks_like_token(value: str) -> bool:
    """True when value has the shape of a token secret (64 hex characters)."""
    if len(value) != TOKEN_HEX_LENGTH:
        return False
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


def validate_scopes(scopes: Any) -> list[str]:
    """Return scopes as a de-duplicated list, or raise ValueError naming the bad one."""
    if not isinstance(scopes, list) or not scopes:
        raise ValueError("scopes must be a non-empty list of: " + ", ".join(SCOPES))
    result: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of: " + ", ".join(SCOPES))
        if scope not in result:
            result.append(scope)
    return result


def validate_cidrs(cidrs: Any) -> list[str]:
    """Return CIDRs in canonical form, or raise ValueError naming the bad entry.

    A bare address is accepted as a single-host network (/32 or /128).
    """
    if cidrs is None:
        return []
    if not isinstance(cidrs, list):
        raise ValueError("addresses must be a list of CIDR strings")
    result: list[str] = []
    for item in cidrs:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"invalid CIDR {item!r}: expected a string like 10.0.0.0/8")
        text = item.strip()
        try:
            network = netaddr.IPNetwork(text)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise ValueError(f"invalid CIDR {item!r}: expected a string like 10.0.0.0/8") from None
        canonical = str(network.cidr)
        if canonical not in result:
            result.append(canonical)
    return result


def _peer_address(peer_ip: str | None) -> netaddr.IPAddress | None:
    """Parse a peer address; IPv4-mapped IPv6 becomes plain IPv4."""
    if not peer_ip:
        return None
    text = peer_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # drop an IPv6 zone id
    try:
        address = netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    if address.version == 6 and address.is_ipv4_mapped():
        address = address.ipv4()
    return address


def address_allowed(addresses: Iterable[str] | None, peer_ip: str | None) -> bool:
    """True when there are no restrictions or peer_ip lies within one of them."""
    networks = list(addresses or [])
    if not networks:
        return True
    peer = _peer_address(peer_ip)
    if peer is None:
        return False
    for cidr in networks:
        try:
            network = netaddr.IPNetwork(cidr)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            continue
        if network.version == 6 and peer.version == 4:
            if peer.ipv6(ipv4_compatible=False) in network:
                return True
            continue
        if network.version == peer.version and peer in network:
            return True
    return False


def check_token(
    record: Mapping[str, Any] | None,
    presented_hash: str,
    scope: str,
    peer_ip: str | None,
) -> TokenCheck:
    """Check a presented token hash against its stored record.

    record holds at least `hash`, `scopes`, and optionally `revoked` and
    `restrictions: {addresses: [...]}`. Returns INVALID for no record or a hash
    mismatch, REVOKED, WRONG_SCOPE; DENIED_ADDRESS when the peer is outside
    every allowed CIDR; OK otherwise. Clients are told only invalid or denied;
    the distinction is for logs and metrics. Pure: no I/O, no clock.
    """
    if record is None:
        return TokenCheck.INVALID
    stored_hash = record.get("hash")
    if not isinstance(stored_hash, str) or not isinstance(presented_hash, str):
        return TokenCheck.INVALID
    if not hmac.compare_digest(stored_hash.encode("ascii", "replace"),
                               presented_hash.encode("ascii", "replace")):
        return TokenCheck.INVALID
    if record.get("revoked"):
        return TokenCheck.REVOKED
    if scope not in (record.get("scopes") or ()):
        return TokenCheck.WRONG_SCOPE
    restrictions = record.get("restrictions") or {}
    addresses = restrictions.get("addresses") if isinstance(restrictions, Mapping) else None
    if not address_allowed(addresses, peer_ip):
        return TokenCheck.DENIED_ADDRESS
    return TokenCheck.OK
